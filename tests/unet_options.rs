//! The U-Net options of improved-/guided-diffusion and diffusers (multi-head attention,
//! scale-shift conditioning, residual resampling blocks, class labels, the middle attention's
//! norm) are differentiable: the tape's gradient of the whole network agrees with finite
//! differences, with respect to the input and to the parameters each option adds or changes.
//! Their values are checked against the libraries themselves in tests/openai_equivalence.rs and
//! tests/diffusers_equivalence.rs.

use ddpm::autodiff::{gradcheck, GradcheckConfig};
use ddpm::interop::counter::counter_params;
use ddpm::nn::{AttnHeads, AttnNorm, Preset, Resample, TimeConditioning, UNet, UNetConfig};
use ddpm::{rng_from_seed, Tensor, Var};

/// ch 8, levels (1, 2) at 8x8 and 4x4, attention at 4x4, 4 groups.
fn base() -> UNetConfig {
    UNetConfig { ch: 8, gn_groups: 4, gn_eps: 1e-5, ..Preset::Tiny.config(2, 8) }
}

fn check(name: &str, config: UNetConfig, params: &[&str]) {
    let net = UNet::new(config.clone()).unwrap_or_else(|e| panic!("{name}: {e}"));
    let template = net.init_params(&mut rng_from_seed(0));
    let names = template.names().to_vec();
    // Counter weights: no tensor near zero, so every path carries gradient.
    let store = counter_params(&template, &names);
    for p in params {
        assert!(store.get(p).is_some(), "{name}: no parameter {p}; have {names:?}");
    }
    let labels: Option<Vec<usize>> = config.num_classes.map(|k| vec![k - 1, 0]);
    let x = Tensor::from_shape_fn(vec![2, 2, 8, 8], |ix| {
        ((ix[0] * 7 + ix[1] * 5 + ix[2] * 3 + ix[3]) % 11) as f32 / 5.5 - 1.0
    });
    let mut inputs = vec![x];
    inputs.extend(params.iter().map(|p| store.get(p).expect("checked above").clone()));
    let f = |vs: &[Var]| {
        let mut bound = store.bind_constant();
        for (p, v) in params.iter().zip(&vs[1..]) {
            bound = bound.with_var(p, v.clone());
        }
        net.forward_labelled(&bound, &vs[0], &[3.0, 700.0], labels.as_deref(), None)
    };
    let cfg = GradcheckConfig { eps: 3e-3, rtol: 3e-2, atol: 3e-3, seed: 1, max_checks_per_input: 24 };
    let report = gradcheck(&inputs, f, &cfg).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert!(
        report.checked >= 24 * (params.len() + 1) / 2,
        "{name}: only {} elements checked",
        report.checked
    );
}

#[test]
fn scale_shift_conditioning_is_differentiable() {
    let c = UNetConfig { time_conditioning: TimeConditioning::ScaleShift, ..base() };
    check(
        "scale-shift",
        c,
        &["down.0.block.0.temb_proj.weight", "up.1.block.0.norm2.bias", "temb.dense.0.weight"],
    );
}

#[test]
fn residual_resampling_blocks_are_differentiable() {
    let c = UNetConfig { downsample: Resample::ResBlock, upsample: Resample::ResBlock, ..base() };
    check(
        "resblock up/down",
        c,
        &["down.0.downsample.conv1.weight", "up.1.upsample.conv1.weight", "up.1.upsample.norm1.weight"],
    );
}

#[test]
fn multi_head_attention_is_differentiable() {
    let c =
        UNetConfig { attn_heads: AttnHeads::Width(4), attn_heads_up: Some(AttnHeads::Count(2)), ..base() };
    check("heads", c, &["mid.attn_1.q.weight", "up.1.attn.0.k.weight", "down.1.attn.0.v.bias"]);
}

#[test]
fn class_embedding_is_differentiable() {
    let c = UNetConfig { num_classes: Some(3), ..base() };
    check("class", c, &["label_emb.weight"]);
}

#[test]
fn middle_attention_options_are_differentiable() {
    let off = UNetConfig { mid_attention: false, attn_resolutions: vec![], ..base() };
    check("no attention", off, &["mid.block_1.conv1.weight"]);
    let no_norm = UNetConfig { mid_attn_norm: AttnNorm::Off, ..base() };
    check("mid attention without norm", no_norm, &["mid.attn_1.q.weight"]);
    let groups = UNetConfig { mid_attn_norm: AttnNorm::Groups(2), ..base() };
    check("mid attention with 2 groups", groups, &["mid.attn_1.norm.weight"]);
}

#[test]
fn all_options_together_are_differentiable() {
    let c = UNetConfig {
        time_conditioning: TimeConditioning::ScaleShift,
        downsample: Resample::ResBlock,
        upsample: Resample::ResBlock,
        attn_heads: AttnHeads::Count(2),
        num_classes: Some(4),
        out_channels: 4,
        ..base()
    };
    check(
        "everything",
        c,
        &["label_emb.weight", "down.0.downsample.temb_proj.weight", "mid.attn_1.proj_out.weight"],
    );
}

#[test]
fn options_change_the_parameters_they_should_and_no_others() {
    let names = |c: UNetConfig| -> Vec<(String, Vec<usize>)> { UNet::new(c).expect("valid").param_shapes() };
    let plain = names(base());
    let ss = names(UNetConfig { time_conditioning: TimeConditioning::ScaleShift, ..base() });
    // Same names; every temb_proj twice as wide, nothing else changed.
    assert_eq!(plain.len(), ss.len());
    for ((n0, s0), (n1, s1)) in plain.iter().zip(&ss) {
        assert_eq!(n0, n1);
        if n0.contains("temb_proj") {
            assert_eq!(s1[0], 2 * s0[0], "{n0}");
        } else {
            assert_eq!(s0, s1, "{n0}");
        }
    }
    let heads = names(UNetConfig { attn_heads: AttnHeads::Count(4), ..base() });
    assert_eq!(plain, heads, "heads split channels; they add no parameters");
    let rs = names(UNetConfig { downsample: Resample::ResBlock, upsample: Resample::ResBlock, ..base() });
    assert!(rs.iter().any(|(n, _)| n == "down.0.downsample.conv2.weight"));
    assert!(rs.iter().any(|(n, _)| n == "up.1.upsample.temb_proj.bias"));
    assert!(!rs
        .iter()
        .any(|(n, _)| n.ends_with("downsample.conv.weight") || n.ends_with("upsample.conv.weight")));
    let cls = names(UNetConfig { num_classes: Some(10), ..base() });
    assert_eq!(cls.len(), plain.len() + 1);
    assert!(cls.contains(&("label_emb.weight".to_string(), vec![10, 32])));
    let no_norm = names(UNetConfig { mid_attn_norm: AttnNorm::Off, ..base() });
    assert!(!no_norm.iter().any(|(n, _)| n.starts_with("mid.attn_1.norm")));
    assert!(no_norm.iter().any(|(n, _)| n.starts_with("mid.attn_1.q")));
}

#[test]
fn options_that_cannot_work_are_refused_naming_them() {
    for (what, c) in [
        ("heads", UNetConfig { attn_heads: AttnHeads::Count(3), ..base() }),
        ("heads", UNetConfig { attn_heads: AttnHeads::Width(5), ..base() }),
        ("heads", UNetConfig { attn_heads: AttnHeads::Count(0), ..base() }),
        ("heads", UNetConfig { attn_heads_up: Some(AttnHeads::Width(32)), ..base() }),
        ("mid_attn_norm", UNetConfig { mid_attn_norm: AttnNorm::Groups(3), ..base() }),
        ("mid_attn_norm", UNetConfig { mid_attn_norm: AttnNorm::Groups(0), ..base() }),
        ("num_classes", UNetConfig { num_classes: Some(0), ..base() }),
        ("num_classes", UNetConfig { num_classes: Some(usize::MAX), ..base() }),
    ] {
        let e = UNet::new(c).expect_err(what).to_string();
        assert!(e.contains(what), "{what}: {e}");
    }
}

#[test]
fn configs_written_before_the_options_existed_still_load() {
    // A U-Net config as checkpoints stored it before these fields existed.
    let mut v = serde_json::to_value(Preset::Mnist.config(1, 28)).expect("serialisable");
    let map = v.as_object_mut().expect("an object");
    for key in [
        "attn_heads",
        "attn_heads_up",
        "time_conditioning",
        "downsample",
        "upsample",
        "mid_attention",
        "mid_attn_norm",
        "num_classes",
    ] {
        assert!(map.remove(key).is_some(), "{key} is serialised");
    }
    let back: UNetConfig = serde_json::from_value(v).expect("old configs deserialise");
    assert_eq!(back, Preset::Mnist.config(1, 28));
}

#[test]
fn no_residual_blocks_on_the_way_down_keeps_the_stem_width_to_the_middle() {
    // improved-diffusion's num_res_blocks 0: the down path only resamples, the middle runs at ch.
    let c = UNetConfig { num_res_blocks: 0, ch_mult: vec![1, 2], ..base() };
    assert_eq!(c.mid_width(), 8);
    let shapes = UNet::new(c.clone()).expect("valid").param_shapes();
    assert!(shapes.contains(&("mid.attn_1.q.weight".to_string(), vec![8, 8, 1, 1])));
    assert!(shapes.contains(&("up.1.block.0.conv1.weight".to_string(), vec![16, 16, 3, 3])));
    check("no down blocks", c, &["mid.block_1.conv1.weight", "up.0.block.0.nin_shortcut.weight"]);
}
