//! The U-Net's other layers and whole steps: group norm (+SiLU) and attention at the `mnist`
//! preset's shapes (batch 64), forward alone and forward + backward through the tape; one
//! training step (L_simple, forward + backward + Adam) and one sampling step (forward and the
//! `p_sample` update) of the `mnist` and `cifar10` presets at small batches.
//!
//! Run with `cargo bench --bench layers`; `ddpm bench` times the steps at the peer's batch sizes
//! (see benches/README.md).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ddpm::diffusion::{p_sample, ModelOutput, Parameterization};
use ddpm::nn::{Adam, AdamConfig, Preset, UNet};
use ddpm::train::DiffusionConfig;
use ddpm::{rng_from_seed, Tape, Tensor, Var};
use rand::Rng as _;
use rand_distr::StandardNormal;

mod common;

fn randn(shape: &[usize], seed: u64) -> Tensor {
    let mut rng = rng_from_seed(seed);
    Tensor::from_shape_simple_fn(shape, || rng.sample::<f32, _>(StandardNormal))
}

/// Group norm with SiLU, 32 groups, at the shapes of the `mnist` U-Net's first two levels.
/// Throughput in elements.
fn bench_group_norm(c: &mut Criterion) {
    let mut group = common::group(c, "group_norm_silu", 2000);
    for (name, shape) in [("64x32x28x28", [64, 32, 28, 28]), ("64x64x14x14", [64, 64, 14, 14])] {
        let x = randn(&shape, 1);
        let ch = shape[1];
        let (gamma, beta) = (randn(&[ch], 2), randn(&[ch], 3));
        group.throughput(Throughput::Elements(x.len() as u64));
        group.bench_function(BenchmarkId::new("forward", name), |bench| {
            let (x, g, b) =
                (Var::constant(x.clone()), Var::constant(gamma.clone()), Var::constant(beta.clone()));
            bench.iter(|| x.group_norm_silu(&g, &b, 32, 1e-6))
        });
        group.bench_function(BenchmarkId::new("forward_backward", name), |bench| {
            bench.iter(|| {
                let tape = Tape::new();
                let (x, g, b) = (tape.var(x.clone()), tape.var(gamma.clone()), tape.var(beta.clone()));
                x.group_norm_silu(&g, &b, 32, 1e-6).sum().backward()
            })
        });
    }
    group.finish();
}

/// Self-attention's core (`Var::attention`, fused per image) at the `mnist` U-Net's 14x14
/// level: q, k, v of `[64, 64, 196]`. Throughput in FLOPs of the two products (forward).
fn bench_attention(c: &mut Criterion) {
    let mut group = common::group(c, "attention", 2000);
    let shape = [64, 64, 196];
    let (q, k, v) = (randn(&shape, 1), randn(&shape, 2), randn(&shape, 3));
    group.throughput(Throughput::Elements(2 * 2 * 64 * 64 * 196 * 196));
    group.bench_function("forward/64x64x196", |bench| {
        let (q, k, v) = (Var::constant(q.clone()), Var::constant(k.clone()), Var::constant(v.clone()));
        bench.iter(|| Var::attention(&q, &k, &v, 0.125))
    });
    group.bench_function("forward_backward/64x64x196", |bench| {
        bench.iter(|| {
            let tape = Tape::new();
            let (q, k, v) = (tape.var(q.clone()), tape.var(k.clone()), tape.var(v.clone()));
            Var::attention(&q, &k, &v, 0.125).sum().backward()
        })
    });
    group.finish();
}

/// One training step and one sampling step of a preset, as `ddpm bench` runs them.
fn bench_steps(c: &mut Criterion) {
    let mut group = common::group(c, "unet_step", 2000);
    for (preset, name, channels, res, batch) in
        [(Preset::Mnist, "mnist", 1, 28, 8), (Preset::Cifar10, "cifar10", 3, 32, 2)]
    {
        let net = UNet::new(preset.config(channels, res)).expect("preset config");
        let mut rng = rng_from_seed(0);
        let mut params = net.init_params(&mut rng);
        let d = DiffusionConfig::default();
        let schedule = d.schedule().expect("default schedule");
        let shape = vec![batch, channels, res, res];
        let x0 = Tensor::from_shape_simple_fn(shape.clone(), || rng.random_range(-1.0f32..1.0));
        let mut adam = Adam::new(&params, AdamConfig::default());
        group.bench_function(BenchmarkId::new("train", format!("{name}_batch{batch}")), |bench| {
            bench.iter(|| {
                let t: Vec<usize> = (0..batch).map(|_| rng.random_range(0..d.timesteps)).collect();
                let eps = Tensor::from_shape_simple_fn(x0.shape(), || rng.sample::<f32, _>(StandardNormal));
                let x_t = ddpm::diffusion::gaussian::q_sample_f32(&schedule, &x0, &t, &eps);
                let mt: Vec<f32> = t.iter().map(|&v| v as f32).collect();
                let tape = Tape::new();
                let p = params.bind(&tape);
                let loss = net.forward(&p, &Var::constant(x_t), &mt, Some(&mut rng)).mse(&Var::constant(eps));
                let grads = p.grads(&loss.backward());
                drop(p);
                adam.update(&mut params, &grads, 2e-4);
            })
        });
        let param = Parameterization { mean_type: d.mean_type, variance_type: d.variance_type };
        let bound = params.bind_constant();
        let x = ndarray::ArrayD::<f64>::from_shape_simple_fn(shape, || rng.sample::<f64, _>(StandardNormal));
        let t = d.timesteps / 2;
        group.bench_function(BenchmarkId::new("sample", format!("{name}_batch{batch}")), |bench| {
            bench.iter(|| {
                let out =
                    net.forward(&bound, &Var::constant(x.mapv(|v| v as f32)), &vec![t as f32; batch], None);
                let output = ModelOutput::split(out.value().mapv(|v| v as f64), param.variance_type);
                p_sample(&schedule, &param, &x, &vec![t; batch], &output, true, &mut rng).x_prev
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench_group_norm, bench_attention, bench_steps);
criterion_main!(benches);
