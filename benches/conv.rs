//! Convolution kernels at the `mnist` preset's shapes (batch 64): forward, and forward plus both
//! gradients (input and weight + bias), as one training step runs them; and each gradient alone.
//!
//! Throughput is the multiply-add count times two (`2·N·P·C_out·K` per pass, `P` output pixels,
//! `K = C_in·kh·kw`), so criterion's `elem/s` reads as FLOP/s; forward+backward counts three
//! such products. Run with `cargo bench --bench conv`; see benches/README.md.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ddpm::kernels::{conv2d_backward_input, conv2d_backward_weight, conv2d_forward, Conv2dGeom};
use rand::Rng as _;

mod common;

/// Batch size of the `mnist` preset's training step.
const BATCH: usize = 64;

/// One benchmarked convolution: a name for the report and its geometry.
struct Case {
    name: &'static str,
    geom: Conv2dGeom,
}

/// A square convolution of `c_in -> c_out` channels at `hw x hw`, kernel `k`, stride `stride`,
/// padding `(top, bottom, left, right)`.
fn conv(
    c_in: usize,
    c_out: usize,
    hw: usize,
    k: usize,
    stride: usize,
    (pad_top, pad_bottom, pad_left, pad_right): (usize, usize, usize, usize),
) -> Conv2dGeom {
    Conv2dGeom {
        n: BATCH,
        c_in,
        h: hw,
        w: hw,
        c_out,
        kh: k,
        kw: k,
        stride,
        pad_top,
        pad_bottom,
        pad_left,
        pad_right,
    }
}

/// The mnist U-Net's main convolutions (ch 32, ch_mult (1, 2, 2), 28 -> 14 -> 7).
fn cases() -> Vec<Case> {
    let same = (1, 1, 1, 1);
    let tf_same_s2 = (0, 1, 0, 1); // TensorFlow "SAME" for a stride-2 3x3 on an even image
    let none = (0, 0, 0, 0);
    vec![
        Case { name: "3x3_32to32_28x28", geom: conv(32, 32, 28, 3, 1, same) },
        Case { name: "3x3_64to64_14x14", geom: conv(64, 64, 14, 3, 1, same) },
        Case { name: "3x3_64to64_7x7", geom: conv(64, 64, 7, 3, 1, same) },
        Case { name: "3x3_96to64_14x14", geom: conv(96, 64, 14, 3, 1, same) },
        Case { name: "3x3_128to64_14x14", geom: conv(128, 64, 14, 3, 1, same) },
        Case { name: "3x3s2_32to32_28x28", geom: conv(32, 32, 28, 3, 2, tf_same_s2) },
        Case { name: "1x1_128to64_14x14", geom: conv(128, 64, 14, 1, 1, none) },
        Case { name: "1x1_64to64_14x14", geom: conv(64, 64, 14, 1, 1, none) },
    ]
}

/// FLOPs of one pass (forward, or either gradient): `2·N·P·C_out·K`.
fn pass_flops(g: &Conv2dGeom) -> u64 {
    (2 * g.n * g.out_h() * g.out_w() * g.c_out * g.c_in * g.kh * g.kw) as u64
}

fn random_vec(rng: &mut ddpm::Rng, len: usize) -> Vec<f32> {
    (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

fn bench_conv(c: &mut Criterion) {
    let mut group = common::group(c, "conv", 1500);
    for case in cases() {
        let g = case.geom;
        let mut rng = ddpm::rng_from_seed(0);
        let x = random_vec(&mut rng, g.x_len());
        let w = random_vec(&mut rng, g.w_len());
        let b = random_vec(&mut rng, g.c_out);
        let dy = random_vec(&mut rng, g.y_len());
        let mut y = vec![0.0; g.y_len()];
        let mut dx = vec![0.0; g.x_len()];
        let mut dw = vec![0.0; g.w_len()];
        let mut db = vec![0.0; g.c_out];

        group.throughput(Throughput::Elements(pass_flops(&g)));
        group.bench_function(BenchmarkId::new("forward", case.name), |bench| {
            bench.iter(|| conv2d_forward(&g, &x, &w, Some(&b), &mut y))
        });
        group.bench_function(BenchmarkId::new("backward_input", case.name), |bench| {
            bench.iter(|| conv2d_backward_input(&g, &dy, &w, &mut dx))
        });
        group.bench_function(BenchmarkId::new("backward_weight", case.name), |bench| {
            bench.iter(|| conv2d_backward_weight(&g, &x, &dy, &mut dw, Some(&mut db)))
        });
        group.throughput(Throughput::Elements(3 * pass_flops(&g)));
        group.bench_function(BenchmarkId::new("forward_backward", case.name), |bench| {
            bench.iter(|| {
                conv2d_forward(&g, &x, &w, Some(&b), &mut y);
                conv2d_backward_input(&g, &dy, &w, &mut dx);
                conv2d_backward_weight(&g, &x, &dy, &mut dw, Some(&mut db));
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench_conv);
criterion_main!(benches);
