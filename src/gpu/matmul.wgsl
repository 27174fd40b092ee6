// Batched, strided single-precision matrix multiply:
//
//     C_b = alpha · A_b @ B_b + beta · C_b (+ bias[row])        for b in 0..batch
//
// A_b is [m, k], B_b is [k, n], C_b is [m, n]; every operand is a strided view of its buffer,
// so a transposed operand is only a swap of strides. The k index may be split in two,
// k = ko · k_inner + ki, each part with its own stride: the convolution weight gradient sums
// over (image, pixel) pairs that way without copying dy or the patch matrices.
//
// Tiling: one workgroup of 16x16 threads computes a 64x64 tile of C; it walks k in steps of 16,
// staging a 64x16 tile of A and a 16x64 tile of B in workgroup memory, and each thread
// accumulates a 4x4 block of C (rows ty + 16·i, columns tx + 16·j) in registers.

struct Params {
    m: u32,
    n: u32,
    k: u32,
    k_inner: u32,
    // A: element (b, row, ko·k_inner + ki) at a_off + b·a_bs + row·a_ms + ki·a_ks + ko·a_kos
    a_off: u32,
    a_bs: u32,
    a_ms: u32,
    a_ks: u32,
    a_kos: u32,
    // B: element (b, ko·k_inner + ki, col) at b_off + b·b_bs + ki·b_ks + ko·b_kos + col·b_ns
    b_off: u32,
    b_bs: u32,
    b_ks: u32,
    b_kos: u32,
    b_ns: u32,
    // C: element (b, row, col) at c_off + b·c_bs + row·c_ms + col
    c_off: u32,
    c_bs: u32,
    c_ms: u32,
    // bit 0: add beta · C (else C is not read); bit 1: add bias[row]
    flags: u32,
    alpha: f32,
    beta: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> c: array<f32>;
@group(0) @binding(4) var<storage, read> bias: array<f32>;

const TILE: u32 = 64u;
const TK: u32 = 16u;
// Row length of the staged tiles, one more than TILE so that threads storing down a column
// hit different memory banks.
const LD: u32 = 65u;

var<workgroup> a_tile: array<f32, 1040>; // [TK][LD], a_tile[kk·LD + row]
var<workgroup> b_tile: array<f32, 1040>; // [TK][LD], b_tile[kk·LD + col]

fn a_at(batch: u32, row: u32, kk: u32) -> f32 {
    let ko = kk / p.k_inner;
    let ki = kk - ko * p.k_inner;
    return a[p.a_off + batch * p.a_bs + row * p.a_ms + ki * p.a_ks + ko * p.a_kos];
}

fn b_at(batch: u32, kk: u32, col: u32) -> f32 {
    let ko = kk / p.k_inner;
    let ki = kk - ko * p.k_inner;
    return b[p.b_off + batch * p.b_bs + ki * p.b_ks + ko * p.b_kos + col * p.b_ns];
}

@compute @workgroup_size(16, 16, 1)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let batch = wg.z;
    let row0 = wg.y * TILE;
    let col0 = wg.x * TILE;
    let tid = lid.y * 16u + lid.x;
    // Consecutive threads load consecutive addresses when they can: along k when k is the
    // operand's unit stride, else along rows (A) or columns (B).
    let a_k_fast = p.a_ks == 1u;
    let b_k_fast = p.b_ks == 1u && p.b_ns != 1u;

    var acc: array<f32, 16>;
    for (var i = 0u; i < 16u; i++) {
        acc[i] = 0.0;
    }

    for (var k0 = 0u; k0 < p.k; k0 += TK) {
        for (var l = 0u; l < 4u; l++) {
            let e = tid + l * 256u;
            var r: u32;
            var kk: u32;
            if a_k_fast {
                kk = e % TK;
                r = e / TK;
            } else {
                r = e % TILE;
                kk = e / TILE;
            }
            var v = 0.0;
            if row0 + r < p.m && k0 + kk < p.k {
                v = a_at(batch, row0 + r, k0 + kk);
            }
            a_tile[kk * LD + r] = v;

            var cc: u32;
            var kb: u32;
            if b_k_fast {
                kb = e % TK;
                cc = e / TK;
            } else {
                cc = e % TILE;
                kb = e / TILE;
            }
            var w = 0.0;
            if col0 + cc < p.n && k0 + kb < p.k {
                w = b_at(batch, k0 + kb, col0 + cc);
            }
            b_tile[kb * LD + cc] = w;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < TK; kk++) {
            var av: array<f32, 4>;
            var bv: array<f32, 4>;
            for (var i = 0u; i < 4u; i++) {
                av[i] = a_tile[kk * LD + lid.y + 16u * i];
                bv[i] = b_tile[kk * LD + lid.x + 16u * i];
            }
            for (var i = 0u; i < 4u; i++) {
                for (var j = 0u; j < 4u; j++) {
                    acc[i * 4u + j] = fma(av[i], bv[j], acc[i * 4u + j]);
                }
            }
        }
        workgroupBarrier();
    }

    for (var i = 0u; i < 4u; i++) {
        let row = row0 + lid.y + 16u * i;
        if row >= p.m {
            continue;
        }
        for (var j = 0u; j < 4u; j++) {
            let col = col0 + lid.x + 16u * j;
            if col >= p.n {
                continue;
            }
            let idx = p.c_off + batch * p.c_bs + row * p.c_ms + col;
            var v = p.alpha * acc[i * 4u + j];
            if (p.flags & 1u) != 0u {
                v += p.beta * c[idx];
            }
            if (p.flags & 2u) != 0u {
                v += bias[row];
            }
            c[idx] = v;
        }
    }
}
