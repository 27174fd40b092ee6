//! Times one U-Net training step (forward + backward + Adam) and one forward pass.
//! `cargo run --release --example step_time -- [mnist|cifar10] [batch]`

use std::time::Instant;

use ddpm::nn::{Adam, AdamConfig, Preset, UNet};
use ddpm::{rng_from_seed, Tape, Tensor, Var};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let preset = args.get(1).map(String::as_str).unwrap_or("mnist");
    let batch: usize = args.get(2).and_then(|b| b.parse().ok()).unwrap_or(64);
    let (preset, c, r) = match preset {
        "cifar10" => (Preset::Cifar10, 3, 32),
        _ => (Preset::Mnist, 1, 28),
    };
    let net = UNet::new(preset.config(c, r)).expect("preset is valid");
    let mut params = net.init_params(&mut rng_from_seed(0));
    let mut adam = Adam::new(&params, AdamConfig::default());
    let x = Tensor::from_shape_fn(vec![batch, c, r, r], |d| ((d[2] * 7 + d[3] * 3) % 11) as f32 / 11.0);
    let t: Vec<f32> = (0..batch).map(|i| (i * 37 % 1000) as f32).collect();
    let mut rng = rng_from_seed(1);
    for i in 0..4 {
        let t0 = Instant::now();
        let tape = Tape::new();
        let p = params.bind(&tape);
        let y = net.forward(&p, &Var::constant(x.clone()), &t, Some(&mut rng));
        let t_fwd = t0.elapsed();
        let loss = y.mse(&Var::constant(x.clone()));
        let grads = p.grads(&loss.backward());
        let t_bwd = t0.elapsed();
        adam.update(&mut params, &grads, 2e-4);
        let t_all = t0.elapsed();
        let t1 = Instant::now();
        let _ = net.forward(&params.bind_constant(), &Var::constant(x.clone()), &t, None);
        let t_inf = t1.elapsed();
        println!(
            "step {i}: fwd {:?} fwd+bwd {:?} total {:?} | inference fwd {:?}",
            t_fwd, t_bwd, t_all, t_inf
        );
    }
}
