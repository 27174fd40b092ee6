//! Single-precision matrix products at the shapes the U-Net runs, plus a large square product as
//! the machine's reference peak.
//!
//! Throughput is `2·M·N·K` per product, so criterion's `elem/s` reads as FLOP/s.
//!
//! * `sgemm_conv/*`: one image's convolution product (`M = C_out`, `K = 9·C_in`, `N` = pixels)
//!   on one thread, through [`ddpm::kernels::sgemm`] and, for comparison, straight through the
//!   `matrixmultiply` crate.
//! * `bmm_attention/*`: the attention products of the mnist preset at 14x14 (batch 64, 64
//!   channels, 196 positions), through [`ddpm::kernels::sgemm_batched`] on all threads.
//! * `sgemm_square/*`: a 1024³ product on one thread and on all threads.
//!
//! Run with `cargo bench --bench matmul`; see benches/README.md.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ddpm::kernels::{sgemm, sgemm_batched};
use rand::Rng as _;

mod common;

fn random_vec(rng: &mut ddpm::Rng, len: usize) -> Vec<f32> {
    (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

fn flops(m: usize, k: usize, n: usize) -> u64 {
    (2 * m * k * n) as u64
}

fn pool(threads: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("building a rayon pool")
}

/// `C = A @ B` on row-major slices, straight through `matrixmultiply` (the pre-switch backend).
fn matrixmultiply_sgemm(m: usize, k: usize, n: usize, a: &[f32], b: &[f32], c: &mut [f32]) {
    assert!(a.len() == m * k && b.len() == k * n && c.len() == m * n);
    // SAFETY: the asserts above make every addressed element lie inside its slice; `c` is a
    // unique borrow, so it overlaps neither input.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            a.as_ptr(),
            k as isize,
            1,
            b.as_ptr(),
            n as isize,
            1,
            0.0,
            c.as_mut_ptr(),
            n as isize,
            1,
        );
    }
}

fn bench_conv_shapes(c: &mut Criterion) {
    let one = pool(1);
    let mut group = common::group(c, "sgemm_conv", 1000);
    // (name, M = C_out, K = 9·C_in, N = pixels of one image)
    let shapes = [
        ("32x288x784", 32, 288, 784),
        ("64x576x196", 64, 576, 196),
        ("64x576x49", 64, 576, 49),
        ("64x1152x196", 64, 1152, 196),
        ("288x32x784", 288, 32, 784),
    ];
    for (name, m, k, n) in shapes {
        let mut rng = ddpm::rng_from_seed(0);
        let a = random_vec(&mut rng, m * k);
        let b = random_vec(&mut rng, k * n);
        let mut out = vec![0.0; m * n];
        group.throughput(Throughput::Elements(flops(m, k, n)));
        group.bench_function(BenchmarkId::new("ddpm_1t", name), |bench| {
            one.install(|| bench.iter(|| sgemm(false, false, m, k, n, 1.0, &a, &b, 0.0, &mut out)))
        });
        group.bench_function(BenchmarkId::new("matrixmultiply_1t", name), |bench| {
            bench.iter(|| matrixmultiply_sgemm(m, k, n, &a, &b, &mut out))
        });
    }
    group.finish();
}

fn bench_attention(c: &mut Criterion) {
    let mut group = common::group(c, "bmm_attention", 1000);
    let (batch, ch, pos) = (64, 64, 196);
    let mut rng = ddpm::rng_from_seed(1);
    let q = random_vec(&mut rng, batch * ch * pos);
    let k = random_vec(&mut rng, batch * ch * pos);
    let w = random_vec(&mut rng, batch * pos * pos);
    let mut scores = vec![0.0; batch * pos * pos];
    let mut o = vec![0.0; batch * ch * pos];
    // scores[b] = q[b]ᵀ @ k[b]: [196, 64] x [64, 196]
    group.throughput(Throughput::Elements(batch as u64 * flops(pos, ch, pos)));
    group.bench_function("qk_64x196x64x196", |bench| {
        bench.iter(|| sgemm_batched(batch, true, false, pos, ch, pos, 1.0, &q, &k, 0.0, &mut scores))
    });
    // o[b] = v[b] @ w[b]ᵀ: [64, 196] x [196, 196]
    group.throughput(Throughput::Elements(batch as u64 * flops(ch, pos, pos)));
    group.bench_function("vw_64x64x196x196", |bench| {
        bench.iter(|| sgemm_batched(batch, false, true, ch, pos, pos, 1.0, &k, &w, 0.0, &mut o))
    });
    group.finish();
}

fn bench_square(c: &mut Criterion) {
    let mut group = common::group(c, "sgemm_square", 1000);
    let n = 1024;
    let mut rng = ddpm::rng_from_seed(2);
    let a = random_vec(&mut rng, n * n);
    let b = random_vec(&mut rng, n * n);
    let mut out = vec![0.0; n * n];
    group.throughput(Throughput::Elements(flops(n, n, n)));
    let threads = rayon::current_num_threads();
    for t in [1, threads] {
        let p = pool(t);
        group.bench_function(BenchmarkId::new("ddpm", format!("1024_{t}t")), |bench| {
            p.install(|| bench.iter(|| sgemm(false, false, n, n, n, 1.0, &a, &b, 0.0, &mut out)))
        });
    }
    group.bench_function("matrixmultiply_1t/1024", |bench| {
        bench.iter(|| matrixmultiply_sgemm(n, n, n, &a, &b, &mut out))
    });
    group.finish();
}

criterion_group!(benches, bench_conv_shapes, bench_attention, bench_square);
criterion_main!(benches);
