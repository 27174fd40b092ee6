//! The GPU back end (feature `wgpu`) against the CPU kernels: matrix products (transposed,
//! batched, odd sizes), the three convolution kernels, the matmul / bmm / linear ops with their
//! gradients, and one U-Net training step.
//!
//! These tests need a GPU adapter. Without one they fail, saying how to get one (CI installs
//! Mesa's software Vulkan driver, lavapipe). A build without the feature compiles none of this.
//!
//! Tolerance. The GPU adds the terms of each sum in another order than the CPU (tiles of 16
//! along k, fused multiply-adds), so results differ in the last bits. For a sum of `n` products,
//! any order satisfies `|computed − exact| ≤ γ_n · Σ|terms|` with `γ_n = n·u/(1 − n·u)` and
//! `u = 2⁻²⁴` (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., §3.1), so the
//! CPU and GPU results of one element differ by at most `2·γ_n·Σ|terms|`. The tests check
//! exactly that bound (with `n` counting alpha, beta and bias as terms too), and `Σ|terms|` is
//! computed by running the CPU kernel on the absolute values of the inputs: every kernel here
//! is bilinear, so that gives the sum of the terms' magnitudes. Each test prints the largest
//! error it saw as a fraction of its bound.

#![cfg(feature = "wgpu")]

use std::sync::Mutex;

use ddpm::device::{self, DeviceChoice};
use ddpm::kernels::{self, Conv2dGeom};
use ddpm::nn::{Adam, AdamConfig, Preset, UNet};
use ddpm::{rng_from_seed, Tape, Tensor, Var};
use rand::Rng as _;
use rand_distr::StandardNormal;

/// The device is process-wide; the tests switch it, so they take turns.
static DEVICE: Mutex<()> = Mutex::new(());

/// Unit roundoff of f32.
const U: f64 = 1.0 / (1u64 << 24) as f64;

/// `f` run with the CPU selected, then with the GPU selected and every product offloaded.
fn on_cpu_then_gpu<T>(f: impl Fn() -> T) -> (T, T) {
    let _turn = DEVICE.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    device::select(DeviceChoice::Cpu).expect("the CPU is always there");
    let cpu = f();
    device::select(DeviceChoice::Gpu).unwrap_or_else(|e| {
        panic!("the wgpu tests need a GPU adapter (Debian: apt-get install mesa-vulkan-drivers): {e}")
    });
    device::set_gpu_min_macs(0);
    let before = device::gpu_calls();
    let gpu = f();
    let ran = device::gpu_calls() - before;
    device::select(DeviceChoice::Cpu).expect("the CPU is always there");
    assert!(ran > 0, "the GPU was selected but nothing ran on it");
    (cpu, gpu)
}

/// `f` on the CPU only (for the scales).
fn on_cpu<T>(f: impl Fn() -> T) -> T {
    let _turn = DEVICE.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    device::select(DeviceChoice::Cpu).expect("the CPU is always there");
    f()
}

/// Checks `|gpu − cpu| ≤ 2·γ_n·scale` element by element; returns the largest error as a
/// fraction of its bound.
fn assert_within_bound(cpu: &[f32], gpu: &[f32], scale: &[f32], n: usize, what: &str) -> f64 {
    assert_eq!(cpu.len(), gpu.len(), "{what}: lengths differ");
    assert_eq!(cpu.len(), scale.len(), "{what}: scale length");
    let nu = n as f64 * U;
    // A hair above 2·γ_n: the scale itself was computed in f32.
    let factor = 2.0 * nu / (1.0 - nu) * 1.01;
    let mut worst: f64 = 0.0;
    for (i, ((&c, &g), &s)) in cpu.iter().zip(gpu).zip(scale).enumerate() {
        let err = (c as f64 - g as f64).abs();
        let bound = factor * s as f64 + f64::from(f32::MIN_POSITIVE);
        assert!(err <= bound, "{what}[{i}]: cpu {c}, gpu {g}, |diff| {err:e} > bound {bound:e} (n = {n})");
        worst = worst.max(err / bound);
    }
    eprintln!("{what}: largest |gpu − cpu| is {:.3} of the bound 2·γ_{n}·Σ|terms|", worst);
    worst
}

fn random_vec(rng: &mut ddpm::Rng, len: usize) -> Vec<f32> {
    (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

fn abs(v: &[f32]) -> Vec<f32> {
    v.iter().map(|x| x.abs()).collect()
}

#[test]
fn sgemm_matches_the_cpu_for_every_transpose_and_odd_sizes() {
    let shapes = [(1, 1, 1), (3, 5, 2), (17, 33, 65), (64, 64, 64), (70, 3, 129), (130, 200, 66)];
    let mut seed = 0;
    for (m, k, n) in shapes {
        for (trans_a, trans_b) in [(false, false), (true, false), (false, true), (true, true)] {
            for (alpha, beta) in [(1.0f32, 0.0f32), (-0.5, 1.5)] {
                seed += 1;
                let mut rng = rng_from_seed(seed);
                let (a, b, c0) =
                    (random_vec(&mut rng, m * k), random_vec(&mut rng, k * n), random_vec(&mut rng, m * n));
                let run = |a: &[f32], b: &[f32], c0: &[f32]| {
                    let mut c = c0.to_vec();
                    kernels::sgemm(trans_a, trans_b, m, k, n, alpha, a, b, beta, &mut c);
                    c
                };
                let (cpu, gpu) = on_cpu_then_gpu(|| run(&a, &b, &c0));
                let scale = on_cpu(|| {
                    let mut c = abs(&c0);
                    kernels::sgemm(
                        trans_a,
                        trans_b,
                        m,
                        k,
                        n,
                        alpha.abs(),
                        &abs(&a),
                        &abs(&b),
                        beta.abs(),
                        &mut c,
                    );
                    c
                });
                let what =
                    format!("sgemm(ta={trans_a}, tb={trans_b}, {m}x{k}x{n}, alpha {alpha}, beta {beta})");
                assert_within_bound(&cpu, &gpu, &scale, k + 2, &what);
            }
        }
    }
}

#[test]
fn sgemm_with_zero_beta_ignores_nan_in_c_on_the_gpu() {
    let a = [1.0, 2.0, 3.0, 4.0];
    let b = [1.0, 0.0, 0.0, 1.0];
    let (_, gpu) = on_cpu_then_gpu(|| {
        let mut c = [f32::NAN; 4];
        kernels::sgemm(false, false, 2, 2, 2, 1.0, &a, &b, 0.0, &mut c);
        c
    });
    assert_eq!(gpu, a, "an identity product is exact in any order");
}

#[test]
fn sgemm_batched_matches_the_cpu() {
    for (seed, (batch, m, k, n, trans_a, trans_b)) in [
        (3, 9, 7, 5, false, false),
        (5, 33, 17, 65, true, false),
        (2, 64, 70, 3, false, true),
        (4, 1, 129, 2, true, true),
    ]
    .into_iter()
    .enumerate()
    {
        let mut rng = rng_from_seed(100 + seed as u64);
        let a = random_vec(&mut rng, batch * m * k);
        let b = random_vec(&mut rng, batch * k * n);
        let c0 = random_vec(&mut rng, batch * m * n);
        let (cpu, gpu) = on_cpu_then_gpu(|| {
            let mut c = c0.clone();
            kernels::sgemm_batched(batch, trans_a, trans_b, m, k, n, 0.75, &a, &b, -1.0, &mut c);
            c
        });
        let scale = on_cpu(|| {
            let mut c = abs(&c0);
            kernels::sgemm_batched(batch, trans_a, trans_b, m, k, n, 0.75, &abs(&a), &abs(&b), 1.0, &mut c);
            c
        });
        let what = format!("sgemm_batched({batch}x, ta={trans_a}, tb={trans_b}, {m}x{k}x{n})");
        assert_within_bound(&cpu, &gpu, &scale, k + 2, &what);
    }
}

/// Geometries of the U-Net's convolutions and a few awkward ones: the 3x3 "same" convolution,
/// the stride-2 downsample with TensorFlow's asymmetric padding, the 1x1 shortcut (no im2col),
/// odd sizes, a kernel that is not square, stride 3.
fn geometries() -> Vec<Conv2dGeom> {
    let g = |n, c_in, h, w, c_out, kh, kw, stride, pads: [usize; 4]| Conv2dGeom {
        n,
        c_in,
        h,
        w,
        c_out,
        kh,
        kw,
        stride,
        pad_top: pads[0],
        pad_bottom: pads[1],
        pad_left: pads[2],
        pad_right: pads[3],
    };
    vec![
        g(3, 4, 8, 8, 8, 3, 3, 1, [1, 1, 1, 1]),
        g(2, 5, 8, 8, 6, 3, 3, 2, [0, 1, 0, 1]),
        g(2, 7, 5, 6, 3, 1, 1, 1, [0, 0, 0, 0]),
        g(1, 3, 7, 9, 70, 3, 3, 1, [1, 1, 1, 1]),
        g(2, 2, 9, 7, 5, 2, 3, 3, [2, 0, 1, 2]),
        g(17, 3, 4, 4, 2, 3, 3, 1, [1, 1, 1, 1]),
    ]
}

#[test]
fn conv2d_forward_matches_the_cpu() {
    for (seed, g) in geometries().into_iter().enumerate() {
        for with_bias in [false, true] {
            let mut rng = rng_from_seed(200 + seed as u64);
            let (x, w, b) = (
                random_vec(&mut rng, g.x_len()),
                random_vec(&mut rng, g.w_len()),
                random_vec(&mut rng, g.c_out),
            );
            let run = |x: &[f32], w: &[f32], b: &[f32]| {
                let mut y = vec![f32::NAN; g.y_len()];
                kernels::conv2d_forward(&g, x, w, with_bias.then_some(b), &mut y);
                y
            };
            let (cpu, gpu) = on_cpu_then_gpu(|| run(&x, &w, &b));
            let scale = on_cpu(|| run(&abs(&x), &abs(&w), &abs(&b)));
            let taps = g.c_in * g.kh * g.kw + 1;
            assert_within_bound(
                &cpu,
                &gpu,
                &scale,
                taps,
                &format!("conv2d_forward(bias {with_bias}, {g:?})"),
            );
        }
    }
}

#[test]
fn conv2d_backward_input_matches_the_cpu() {
    for (seed, g) in geometries().into_iter().enumerate() {
        let mut rng = rng_from_seed(300 + seed as u64);
        let (dy, w) = (random_vec(&mut rng, g.y_len()), random_vec(&mut rng, g.w_len()));
        let run = |dy: &[f32], w: &[f32]| {
            let mut dx = vec![f32::NAN; g.x_len()];
            kernels::conv2d_backward_input(&g, dy, w, &mut dx);
            dx
        };
        let (cpu, gpu) = on_cpu_then_gpu(|| run(&dy, &w));
        let scale = on_cpu(|| run(&abs(&dy), &abs(&w)));
        let taps = g.c_out * g.kh * g.kw;
        assert_within_bound(&cpu, &gpu, &scale, taps, &format!("conv2d_backward_input({g:?})"));
    }
}

#[test]
fn conv2d_backward_weight_matches_the_cpu() {
    for (seed, g) in geometries().into_iter().enumerate() {
        let mut rng = rng_from_seed(400 + seed as u64);
        let (x, dy) = (random_vec(&mut rng, g.x_len()), random_vec(&mut rng, g.y_len()));
        let run = |x: &[f32], dy: &[f32]| {
            let mut dw = vec![f32::NAN; g.w_len()];
            let mut db = vec![f32::NAN; g.c_out];
            kernels::conv2d_backward_weight(&g, x, dy, &mut dw, Some(&mut db));
            (dw, db)
        };
        let ((cpu_dw, cpu_db), (gpu_dw, gpu_db)) = on_cpu_then_gpu(|| run(&x, &dy));
        let (scale, _) = on_cpu(|| run(&abs(&x), &abs(&dy)));
        let taps = g.n * g.out_h() * g.out_w();
        assert_within_bound(&cpu_dw, &gpu_dw, &scale, taps, &format!("conv2d_backward_weight({g:?})"));
        assert_eq!(cpu_db, gpu_db, "db is summed on the CPU in the same order either way");
    }
}

/// Value and gradients of `sum(weight ⊙ f(inputs))`, all flattened.
fn value_and_grads(inputs: &[Tensor], weight: &Tensor, f: &dyn Fn(&[Var]) -> Var) -> Vec<Vec<f32>> {
    let tape = Tape::new();
    let vars: Vec<Var> = inputs.iter().map(|t| tape.var(t.clone())).collect();
    let y = f(&vars);
    let loss = y.mul(&Var::constant(weight.clone())).sum();
    let grads = loss.backward();
    let mut out = vec![y.value().iter().copied().collect::<Vec<f32>>()];
    out.extend(vars.iter().map(|v| grads.get_or_zeros(v).iter().copied().collect()));
    out
}

/// One differentiable product to compare: its inputs, output shape, the most terms any of its
/// sums (forward or backward) has, and the op.
struct OpCase {
    name: &'static str,
    inputs: Vec<Tensor>,
    out_shape: Vec<usize>,
    terms: usize,
    op: fn(&[Var]) -> Var,
}

#[test]
fn matmul_bmm_and_linear_ops_and_their_gradients_match_the_cpu() {
    let mut rng = rng_from_seed(500);
    let mut randn =
        |shape: &[usize]| Tensor::from_shape_simple_fn(shape.to_vec(), || rng.sample(StandardNormal));
    let cases = vec![
        OpCase {
            name: "matmul",
            inputs: vec![randn(&[19, 37]), randn(&[37, 70])],
            out_shape: vec![19, 70],
            terms: 70,
            op: |v| v[0].matmul(&v[1]),
        },
        OpCase {
            name: "matmul of a transpose",
            inputs: vec![randn(&[37, 19])],
            out_shape: vec![19, 19],
            terms: 37,
            op: |v| v[0].transpose(0, 1).matmul(&v[0]),
        },
        OpCase {
            name: "bmm",
            inputs: vec![randn(&[3, 17, 9]), randn(&[3, 9, 66])],
            out_shape: vec![3, 17, 66],
            terms: 66,
            op: |v| v[0].bmm(&v[1]),
        },
        OpCase {
            name: "linear",
            inputs: vec![randn(&[13, 40]), randn(&[24, 40]), randn(&[24])],
            out_shape: vec![13, 24],
            terms: 41,
            op: |v| v[0].linear(&v[1], Some(&v[2])),
        },
    ];
    for OpCase { name, inputs, out_shape, terms: n, op: f } in cases {
        let weight = randn(&out_shape);
        let (cpu, gpu) = on_cpu_then_gpu(|| value_and_grads(&inputs, &weight, &f));
        let abs_inputs: Vec<Tensor> = inputs.iter().map(|t| t.mapv(f32::abs)).collect();
        let scale = on_cpu(|| value_and_grads(&abs_inputs, &weight.mapv(f32::abs), &f));
        for (i, ((c, g), s)) in cpu.iter().zip(&gpu).zip(&scale).enumerate() {
            let what = if i == 0 {
                format!("{name}: value")
            } else {
                format!("{name}: gradient of input {}", i - 1)
            };
            // n bounds the terms of every product in the case (forward and backward).
            assert_within_bound(c, g, s, n, &what);
        }
    }
}

/// One L_simple training step of the `tiny` U-Net: loss, every parameter's gradient, and the
/// parameters after Adam. The tensors the initialisation leaves at zero (the output convolution,
/// each block's last convolution, the biases) are filled with small random values first: with
/// them at zero the network's output is zero whatever the products compute, and most gradients
/// vanish, which would make the comparison weak.
fn unet_step() -> (f32, Vec<Vec<f32>>, Vec<Vec<f32>>) {
    let cfg = Preset::Tiny.config(1, 8);
    let net = UNet::new(cfg).expect("the tiny preset is valid");
    let mut rng = rng_from_seed(7);
    let mut params = net.init_params(&mut rng);
    for v in params.values_mut() {
        if v.iter().all(|&x| x.abs() < 1e-6) {
            v.mapv_inplace(|_| 0.05 * rng.sample::<f32, _>(StandardNormal));
        }
    }
    let batch = 4;
    let x_t = Tensor::from_shape_simple_fn(vec![batch, 1, 8, 8], || rng.random_range(-1.0f32..1.0));
    let eps = Tensor::from_shape_simple_fn(vec![batch, 1, 8, 8], || rng.sample(StandardNormal));
    let t = [3.0, 250.0, 600.0, 999.0];
    let tape = Tape::new();
    let p = params.bind(&tape);
    let loss = net.forward(&p, &Var::constant(x_t), &t, Some(&mut rng)).mse(&Var::constant(eps));
    let grads = p.grads(&loss.backward());
    let loss = loss.value().iter().copied().next().expect("the loss is a scalar");
    drop(p);
    let mut adam = Adam::new(&params, AdamConfig::default());
    adam.update(&mut params, &grads, 1e-3);
    let flat = |t: &Tensor| t.iter().copied().collect::<Vec<f32>>();
    (loss, grads.iter().map(flat).collect(), params.iter().map(|(_, t)| flat(t)).collect())
}

/// Normwise relative difference `‖a − b‖₂ / ‖a‖₂` (0 when both are 0).
fn rel_diff(a: &[f32], b: &[f32]) -> f64 {
    let (num, den) = a.iter().zip(b).fold((0.0f64, 0.0f64), |(num, den), (&x, &y)| {
        (num + (x as f64 - y as f64).powi(2), den + (x as f64).powi(2))
    });
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

/// Tolerance of the training step. Its products have at most 1,152 terms (a 3x3 convolution of
/// 128 channels in the backward pass), so each product's CPU and GPU results differ by less than
/// 2·γ_1152 ≈ 1.4e-4 relative to Σ|terms|, and in practice by about √n·u ≈ 2e-6. A gradient goes
/// through a few dozen such products and GroupNorms, so differences of 1e-6 to 1e-5 are
/// expected; 1e-3 leaves a wide margin while still catching any wrong index (which gives
/// differences of order 1).
const UNET_STEP_REL_TOL: f64 = 1e-3;

/// The whole gradient, all tensors end to end, must agree more closely than one tensor.
const UNET_GRAD_REL_TOL: f64 = 1e-4;

/// A gradient tensor counts as zero in exact arithmetic when its norm is below this fraction of
/// the largest tensor's. 15 of the 144 are: the attention key biases (adding a constant to every
/// key adds the same number to every score of a query, which the softmax ignores), and the biases
/// and timestep projections that add a per-channel constant just before a GroupNorm with one
/// channel per group (the 32-channel level of the `tiny` preset, with 32 groups), which the
/// normalisation removes. Both devices return rounding noise there (norms 4e-19 to 7e-14 in
/// this test, against 2e-12 to 1.3 for the others; the largest is the output convolution's), so
/// the test checks that the GPU's is noise too.
const ZERO_GRAD_FRACTION: f64 = 1e-12;

fn norm(v: &[f32]) -> f64 {
    v.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt()
}

#[test]
fn one_unet_training_step_matches_the_cpu() {
    let names: Vec<String> = UNet::new(Preset::Tiny.config(1, 8))
        .expect("the tiny preset is valid")
        .init_params(&mut rng_from_seed(0))
        .names()
        .to_vec();
    let ((cpu_loss, cpu_grads, cpu_params), (gpu_loss, gpu_grads, gpu_params)) = on_cpu_then_gpu(unet_step);
    let loss_diff = ((cpu_loss - gpu_loss) / cpu_loss).abs() as f64;
    eprintln!("U-Net step: loss cpu {cpu_loss}, gpu {gpu_loss}, relative difference {loss_diff:e}");
    assert!(loss_diff <= UNET_STEP_REL_TOL, "loss differs by {loss_diff:e}");

    let flat = |gs: &[Vec<f32>]| gs.iter().flatten().copied().collect::<Vec<f32>>();
    let whole = rel_diff(&flat(&cpu_grads), &flat(&gpu_grads));
    eprintln!("U-Net step: whole gradient, normwise relative difference {whole:e}");
    assert!(whole <= UNET_GRAD_REL_TOL, "the gradient differs by {whole:e} (normwise, relative)");

    // Each weight tensor (a matrix or a convolution kernel) on its own. Biases and GroupNorm
    // scales are left to the whole-gradient check: a bias feeding a GroupNorm gets the sum of an
    // upstream gradient that the normalisation makes nearly cancel, so its relative difference
    // measures that cancellation (up to 6e-2 seen, on values 1e-7 of the weights' gradients),
    // not the products. The kernels' own tests above check every product element by element.
    let largest = cpu_grads.iter().map(|g| norm(g)).fold(0.0, f64::max);
    let (mut worst, mut zero, mut weights) = (0.0f64, 0, 0);
    for ((name, c), g) in names.iter().zip(&cpu_grads).zip(&gpu_grads) {
        if norm(c) < ZERO_GRAD_FRACTION * largest {
            zero += 1;
            assert!(
                norm(g) < ZERO_GRAD_FRACTION * largest,
                "{name}: gradient zero on the CPU, {:e} on the GPU",
                norm(g)
            );
        } else if name.ends_with(".weight") && !name.contains("norm") {
            weights += 1;
            let d = rel_diff(c, g);
            assert!(d <= UNET_STEP_REL_TOL, "{name}: gradient differs by {d:e} (normwise, relative)");
            worst = worst.max(d);
        }
    }
    eprintln!(
        "U-Net step: largest normwise relative difference of a weight's gradient {worst:e} ({weights} weights; \
         {zero} of {} gradients zero in exact arithmetic)",
        names.len()
    );
    assert!(
        weights >= 30 && zero <= 15,
        "{weights} weights compared, {zero} zero gradients: the test would be weak"
    );

    let mut worst: f64 = 0.0;
    for (c, g) in cpu_params.iter().zip(&gpu_params) {
        worst = worst.max(rel_diff(c, g));
    }
    eprintln!("U-Net step: largest normwise relative difference of a parameter after Adam {worst:e}");
    assert!(worst <= UNET_STEP_REL_TOL, "parameters after Adam differ by {worst:e}");
}

#[test]
fn auto_prefers_the_cpu_to_a_software_adapter() {
    let _turn = DEVICE.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let info = ddpm::gpu::init().expect("the wgpu tests need a GPU adapter");
    let auto = device::select(DeviceChoice::Auto).expect("auto never fails");
    if info.software {
        assert_eq!(auto.device, device::Device::Cpu);
        assert!(auto.notice.expect("a fallback says why").contains("software"));
    } else {
        assert_eq!(auto.device, device::Device::Gpu);
        assert_eq!(auto.adapter, Some(info.to_string()));
    }
    device::select(DeviceChoice::Cpu).expect("the CPU is always there");
}
