// The two data movements around the convolution's matrix products (src/kernels/conv.rs has
// the same maps on the CPU):
//
//   im2col: col[n, (ci·kh + i)·kw + j, oh·out_w + ow] = x_padded[n, ci, oh·s + i, ow·s + j]
//   col2im: dx[n, ci, ih, iw] = Σ over (i, j, oh, ow) with oh·s + i − pad_top = ih and
//           ow·s + j − pad_left = iw of dcol[n, (ci·kh + i)·kw + j, oh·out_w + ow]
//
// col2im is written as a gather (one thread per element of dx, summing its taps in a fixed
// order), so it needs no atomics and is deterministic. Both run one thread per output element;
// the grid is two-dimensional because one dimension holds at most 65535 workgroups.

struct Geom {
    n: u32,       // images in this call
    c_in: u32,
    h: u32,
    w: u32,
    kh: u32,
    kw: u32,
    stride: u32,
    pad_top: u32,
    pad_left: u32,
    out_h: u32,
    out_w: u32,
    src_off: u32, // first element read (x for im2col, dcol for col2im)
    dst_off: u32, // first element written
    total: u32,   // elements written
    groups_x: u32, // workgroups along x in the dispatch
    _pad: u32,
}

@group(0) @binding(0) var<uniform> g: Geom;
@group(0) @binding(1) var<storage, read> src: array<f32>;
@group(0) @binding(2) var<storage, read_write> dst: array<f32>;

fn element(wg: vec3<u32>, lid: vec3<u32>) -> u32 {
    return (wg.y * g.groups_x + wg.x) * 256u + lid.x;
}

@compute @workgroup_size(256, 1, 1)
fn im2col(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let idx = element(wg, lid);
    if idx >= g.total {
        return;
    }
    let px = g.out_h * g.out_w;
    let kk_len = g.c_in * g.kh * g.kw;
    let img = idx / (kk_len * px);
    let rem = idx - img * kk_len * px;
    let kk = rem / px;
    let pp = rem - kk * px;
    let ci = kk / (g.kh * g.kw);
    let ij = kk - ci * g.kh * g.kw;
    let i = ij / g.kw;
    let j = ij - i * g.kw;
    let oh = pp / g.out_w;
    let ow = pp - oh * g.out_w;
    let ih = i32(oh * g.stride + i) - i32(g.pad_top);
    let iw = i32(ow * g.stride + j) - i32(g.pad_left);
    var v = 0.0;
    if ih >= 0 && iw >= 0 && ih < i32(g.h) && iw < i32(g.w) {
        v = src[g.src_off + ((img * g.c_in + ci) * g.h + u32(ih)) * g.w + u32(iw)];
    }
    dst[g.dst_off + idx] = v;
}

@compute @workgroup_size(256, 1, 1)
fn col2im(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let idx = element(wg, lid);
    if idx >= g.total {
        return;
    }
    let plane = g.h * g.w;
    let img = idx / (g.c_in * plane);
    let rem = idx - img * g.c_in * plane;
    let ci = rem / plane;
    let pix = rem - ci * plane;
    let ih = pix / g.w;
    let iw = pix - ih * g.w;
    let px = g.out_h * g.out_w;
    let kk_len = g.c_in * g.kh * g.kw;
    let base = g.src_off + img * kk_len * px;
    let s = i32(g.stride);
    var acc = 0.0;
    for (var i = 0u; i < g.kh; i++) {
        let th = i32(ih + g.pad_top) - i32(i);
        if th < 0 || th % s != 0 || th / s >= i32(g.out_h) {
            continue;
        }
        let oh = u32(th / s);
        for (var j = 0u; j < g.kw; j++) {
            let tw = i32(iw + g.pad_left) - i32(j);
            if tw < 0 || tw % s != 0 || tw / s >= i32(g.out_w) {
                continue;
            }
            let ow = u32(tw / s);
            acc += src[base + ((ci * g.kh + i) * g.kw + j) * px + oh * g.out_w + ow];
        }
    }
    dst[g.dst_off + idx] = acc;
}
