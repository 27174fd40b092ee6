//! The `mnist` preset computes the same function as the PyTorch reference model
//! (`DDPMUNet` of ../shared/bench/peer/ddpm_peer.py, config `mnist-small`), on the same
//! weights. The fixtures were written by tests/fixtures/make_peer_fixture.py (torch 2.15.0,
//! float32 on CPU); every parameter was re-drawn at random so that the zero-initialised layers
//! count too. See tests/fixtures/README.md.

use std::path::Path;

use ddpm::io::safetensors::load;
use ddpm::nn::{ParamStore, Preset, UNet};
use ddpm::{Tensor, Var};

fn check(file: &str, preset: Preset, resolution: usize) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(file);
    let fixture = load(&path).expect("fixture loads");
    let net = UNet::new(preset.config(1, resolution)).expect("valid preset");
    let template = net.init_params(&mut ddpm::rng_from_seed(0));
    let mut store = ParamStore::new();
    for (name, want) in template.iter() {
        let t = fixture.tensors.get(name).unwrap_or_else(|| panic!("fixture lacks {name}"));
        assert_eq!(t.shape(), want.shape(), "{name}");
        store.insert(name, t.clone());
    }
    let n_params =
        fixture.tensors.keys().filter(|k| !k.starts_with("input.") && !k.starts_with("output.")).count();
    assert_eq!(n_params, template.len(), "the fixture has parameters the preset does not");
    let x: &Tensor = &fixture.tensors["input.x"];
    let t: Vec<f32> = fixture.tensors["input.t"].iter().copied().collect();
    let want: &Tensor = &fixture.tensors["output.eps"];
    let got = net.forward(&store.bind_constant(), &Var::constant(x.clone()), &t, None);
    let max_err = got.value().iter().zip(want.iter()).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    eprintln!("{file}: max |ddpm - torch| = {max_err:.3e}");
    assert!(max_err < 1e-4, "{file}: max abs error {max_err}");
}

#[test]
fn mnist_preset_matches_the_pytorch_peer() {
    check("peer_mnist-small.safetensors", Preset::Mnist, 28);
}

#[test]
fn tiny_config_matches_the_pytorch_peer() {
    check("peer_tiny.safetensors", Preset::Tiny, 8);
}
