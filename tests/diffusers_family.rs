//! ddpm against huggingface/diffusers 0.42.1 on every DDPM-family `UNet2DModel` option:
//! single- and multi-head attention, scale-shift conditioning (with and without the middle
//! attention's own norm), ResNet up/down blocks, learned-variance outputs, no middle attention,
//! class labels and a three-level layout. Fixtures: tests/fixtures/make_diffusers_family_fixture.py
//! (tests/fixtures/diffusers_family/README.md), counter weights, t ∈ {0, 10, 500, 999}.
//!
//! Each folder is read as `ddpm import --diffusers` reads it; the raw output must agree with
//! diffusers' float32 output and its float64 one to 1e-4 · max(1, |y|max).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ddpm::interop::diffusers::{load_folder, unet_config_to_json};
use ddpm::io::npz::read_npz;
use ddpm::nn::UNet;
use ddpm::Var;
use ndarray::ArrayD;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/diffusers_family")
}

fn npz(name: &str) -> BTreeMap<String, ArrayD<f64>> {
    read_npz(&fixtures().join(name)).expect("fixture reads").into_iter().map(|e| (e.name, e.values)).collect()
}

/// Loads `name/`, runs it on the fixture's inputs and returns (max error vs f32, vs f64, bound).
fn compare(name: &str) -> (f64, f64, f64) {
    let m = load_folder(&fixtures().join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    let net = UNet::new(m.unet.clone()).expect("load_folder validated it");
    let f = npz(&format!("{name}_out.npz"));
    let x = f["x"].mapv(|v| v as f32);
    let t: Vec<f32> = f["t"].iter().map(|&t| t as f32).collect();
    let labels: Option<Vec<usize>> = f.get("class_labels").map(|y| y.iter().map(|&c| c as usize).collect());
    let y = net
        .forward_labelled(&m.params.bind_constant(), &Var::constant(x), &t, labels.as_deref(), None)
        .value()
        .mapv(f64::from);
    let err = |want: &ArrayD<f64>| {
        assert_eq!(y.shape(), want.shape(), "{name}");
        y.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max)
    };
    let bound = 1e-4 * f["out_f64"].iter().fold(1.0f64, |m, v| m.max(v.abs()));
    let (e32, e64) = (err(&f["out"]), err(&f["out_f64"]));
    println!("{name}: max |ddpm − diffusers f32| {e32:.2e}, f64 {e64:.2e} (bound {bound:.1e})");
    // The export writes back the config it read (what `ddpm export --diffusers` relies on).
    let back = unet_config_to_json(&m.unet).expect("every imported config exports");
    assert_eq!(
        ddpm::interop::diffusers::unet_config_from_json(&back, Path::new("re-export")).expect("reads back"),
        m.unet,
        "{name}"
    );
    (e32, e64, bound)
}

fn check(name: &str) {
    let (e32, e64, bound) = compare(name);
    assert!(e32 <= bound && e64 <= bound, "{name}: {e32:.2e} / {e64:.2e} > {bound:.1e}");
}

#[test]
fn single_head_attention() {
    check("single_head");
}

#[test]
fn multi_head_attention_by_head_width_as_train_unconditional_writes_it() {
    check("multi_head_width");
}

#[test]
fn scale_shift_conditioning_with_no_middle_attention_norm() {
    check("scale_shift");
}

#[test]
fn scale_shift_conditioning_with_middle_attention_groups() {
    check("scale_shift_attn_groups");
}

#[test]
fn resnet_up_and_down_sampling_blocks() {
    check("resnet_updown");
}

#[test]
fn downsample_type_is_ignored_by_blocks_without_attention() {
    check("resnet_updown_ignored");
}

#[test]
fn learned_variance_output_has_twice_the_channels() {
    check("learned_sigma");
}

#[test]
fn no_middle_attention() {
    check("no_mid_attention");
}

#[test]
fn class_conditional_model_with_labels() {
    check("class_cond");
}

#[test]
fn three_levels_with_attention_at_two() {
    check("three_levels");
}

#[test]
fn a_rescaled_middle_block_or_centred_input_is_refused_naming_the_key() {
    let err = load_folder(&fixtures().join("mid_scale_center")).expect_err("not reproducible").to_string();
    assert!(err.contains("config.json"), "{err}");
    assert!(err.contains("`center_input_sample`") || err.contains("`mid_block_scale_factor`"), "{err}");
}
