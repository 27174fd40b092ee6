//! Writes the ddpm checkpoint behind the export fixture (tests/fixtures/diffusers/export_eps.npz):
//! a U-Net in ddpm's own layout (the `small` preset at 1x16x16, with improved-diffusion's
//! padding and embedding options so the export exercises the other mappings), holding counter
//! weights (`ddpm::interop::counter`) numbered by ddpm's parameter names.
//! tests/fixtures/make_diffusers_fixture.py runs it, exports the result with
//! `ddpm export --diffusers` and loads that in diffusers; tests/diffusers_equivalence.rs rebuilds
//! the same checkpoint from this file's `fixture_checkpoint`.
//!
//! `cargo run --release --example counter_checkpoint -- OUT.safetensors`

use std::path::Path;

use ddpm::interop::counter::counter_params;
use ddpm::io::checkpoint::save_weights;
use ddpm::nn::{DownsamplePadding, EmbeddingOrder, ParamStore, Preset, UNet, UNetConfig};
use ddpm::train::{DiffusionConfig, OptimConfig, TrainConfig};

/// The configuration and weights of the export fixture's checkpoint.
pub fn fixture_checkpoint() -> (TrainConfig, ParamStore) {
    let unet = UNetConfig {
        downsample_padding: DownsamplePadding::Symmetric,
        embedding_order: EmbeddingOrder::CosSin,
        embedding_freq_shift: 0.0,
        gn_eps: 1e-5,
        ..Preset::Small.config(1, 16)
    };
    let config = TrainConfig {
        unet,
        diffusion: DiffusionConfig::default(),
        optim: OptimConfig::default(),
        batch_size: 16,
        random_flip: false,
        seed: 0,
        draws: ddpm::config::Draws::Keyed,
    };
    let template =
        UNet::new(config.unet.clone()).expect("valid config").init_params(&mut ddpm::rng_from_seed(0));
    let names = template.names().to_vec();
    (config, counter_params(&template, &names))
}

fn main() {
    let out = std::env::args().nth(1).expect("usage: counter_checkpoint OUT.safetensors");
    let (config, params) = fixture_checkpoint();
    save_weights(Path::new(&out), &config, &params, "counter weights (examples/counter_checkpoint.rs)", None)
        .expect("checkpoint written");
    eprintln!("wrote {out} ({} parameters)", params.num_scalars());
}
