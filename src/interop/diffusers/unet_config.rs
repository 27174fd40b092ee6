//! diffusers' `UNet2DModel` config (`config.json`) ↔ ddpm's [`UNetConfig`].
//!
//! | diffusers key                         | ddpm                                                    |
//! |---------------------------------------|---------------------------------------------------------|
//! | `block_out_channels`                  | `ch` · `ch_mult` (integer multiples of the first)       |
//! | `layers_per_block`                    | `num_res_blocks`                                        |
//! | `AttnDownBlock2D` / `AttnUpBlock2D` at a level | that level's resolution in `attn_resolutions`  |
//! | `DownBlock2D`, `UpBlock2D`            | a level without attention, conv resampling              |
//! | `ResnetDownsampleBlock2D`, `ResnetUpsampleBlock2D` | a level without attention, residual resampling |
//! | `downsample_type`, `upsample_type`    | the resampling of the attention levels: `conv` or `resnet` ([`Resample`]) |
//! | `attention_head_dim`                  | null: one head per block ([`AttnHeads::Count`]`(1)`); d: heads of width d ([`AttnHeads::Width`]) |
//! | `resnet_time_scale_shift`             | `default` / `scale_shift` ([`TimeConditioning`])        |
//! | `attn_norm_num_groups`                | the middle attention's norm ([`AttnNorm`]); null means `norm_num_groups`, or no norm with `scale_shift` |
//! | `add_attention`                       | `mid_attention`                                         |
//! | `num_class_embeds` (`class_embed_type` null) | `num_classes`                                    |
//! | `norm_num_groups`, `norm_eps`         | `gn_groups`, `gn_eps`                                   |
//! | `downsample_padding` 0 / 1            | [`DownsamplePadding::TfSame`] / [`DownsamplePadding::Symmetric`] |
//! | `flip_sin_to_cos` false / true, `freq_shift` | [`EmbeddingOrder::SinCos`] / [`EmbeddingOrder::CosSin`], `embedding_freq_shift` |
//!
//! ddpm resamples every level the same way, so the effective kinds of all levels must agree.
//! Anything else (another block type, time embedding, activation, a rescaled middle block, an
//! input centring, another class embedding) is refused naming the key.

use std::path::Path;

use serde_json::{json, Value};

use super::keys::Keys;
use super::DIFFUSERS_VERSION;
use crate::nn::{
    AttnHeads, AttnNorm, DownsamplePadding, EmbeddingOrder, Resample, TimeConditioning, UNet, UNetConfig,
};
use crate::{Error, Result};

/// The keys of `UNet2DModel`'s config that [`unet_config_from_json`] understands.
const UNET_KEYS: [&str; 28] = [
    "sample_size",
    "in_channels",
    "out_channels",
    "center_input_sample",
    "time_embedding_type",
    "time_embedding_dim",
    "freq_shift",
    "flip_sin_to_cos",
    "down_block_types",
    "mid_block_type",
    "up_block_types",
    "block_out_channels",
    "layers_per_block",
    "mid_block_scale_factor",
    "downsample_padding",
    "downsample_type",
    "upsample_type",
    "dropout",
    "act_fn",
    "attention_head_dim",
    "norm_num_groups",
    "attn_norm_num_groups",
    "norm_eps",
    "resnet_time_scale_shift",
    "add_attention",
    "class_embed_type",
    "num_class_embeds",
    "num_train_timesteps",
];

/// One level's down or up block: whether it has attention and how it resamples.
fn block_kind(
    keys: &Keys,
    key: &str,
    kind: &str,
    level: usize,
    attn_resample: Resample,
) -> Result<(bool, Resample)> {
    let (down, plain, resnet, attn) = if key == "down_block_types" {
        (true, "DownBlock2D", "ResnetDownsampleBlock2D", "AttnDownBlock2D")
    } else {
        (false, "UpBlock2D", "ResnetUpsampleBlock2D", "AttnUpBlock2D")
    };
    match kind {
        k if k == plain => Ok((false, Resample::Conv)),
        k if k == resnet => Ok((false, Resample::ResBlock)),
        k if k == attn => Ok((true, attn_resample)),
        other => Err(keys.bad(
            key,
            &format!(
                "{other} ({} level {level}) is not a DDPM-family block; {plain}, {resnet} and {attn} map",
                if down { "down" } else { "up" }
            ),
        )),
    }
}

fn resample_type(keys: &Keys, key: &str) -> Result<Resample> {
    match keys.str_or(key, "conv")? {
        "conv" => Ok(Resample::Conv),
        "resnet" => Ok(Resample::ResBlock),
        other => Err(keys.bad(key, &format!("{other:?}: ddpm resamples with \"conv\" or \"resnet\" blocks"))),
    }
}

/// ddpm's U-Net configuration for a diffusers `UNet2DModel` config (`config.json`'s value);
/// missing keys take `UNet2DModel`'s defaults, as diffusers does.
///
/// # Errors
/// [`Error::BadFile`] naming `path`, the key and the reason for any setting ddpm's U-Net cannot
/// reproduce (see the module docs).
pub fn unet_config_from_json(v: &Value, path: &Path) -> Result<UNetConfig> {
    let keys = Keys::new(v, path, "UNet2DModel config")?;
    keys.class_name("UNet2DModel")?;
    keys.refuse_unknown(&UNET_KEYS)?;
    keys.require("center_input_sample", json!(false), &[json!(false)], "ddpm feeds x unchanged")?;
    keys.require(
        "time_embedding_type",
        json!("positional"),
        &[json!("positional")],
        "ddpm has the sinusoidal (positional) timestep embedding only",
    )?;
    keys.require(
        "mid_block_type",
        json!("UNetMidBlock2D"),
        &[json!("UNetMidBlock2D")],
        "ddpm's U-Net always has the ResBlock-(attention-)ResBlock middle",
    )?;
    keys.require(
        "mid_block_scale_factor",
        json!(1),
        &[json!(1), json!(1.0)],
        "ddpm does not rescale the middle block",
    )?;
    keys.require("act_fn", json!("silu"), &[json!("silu"), json!("swish")], "ddpm uses SiLU")?;
    let time_conditioning = match keys.str_or("resnet_time_scale_shift", "default")? {
        "default" => TimeConditioning::Add,
        "scale_shift" => TimeConditioning::ScaleShift,
        other => {
            return Err(keys.bad(
                "resnet_time_scale_shift",
                &format!("{other:?}: ddpm's residual blocks add the timestep (\"default\") or scale and shift (\"scale_shift\")"),
            ))
        }
    };
    let mid_attention = keys.bool_or("add_attention", true)?;
    keys.require(
        "class_embed_type",
        Value::Null,
        &[Value::Null],
        "ddpm's class conditioning is a table of embeddings (class_embed_type null with num_class_embeds)",
    )?;
    let num_classes = match keys.get("num_class_embeds") {
        None => None,
        Some(_) => Some(keys.usize_or("num_class_embeds", 0)?),
    };

    let resolution = match keys.get("sample_size") {
        None => return Err(keys.bad("sample_size", "missing; ddpm needs the image size")),
        Some(Value::Array(a)) if a.len() == 2 && a[0] == a[1] && a[0].as_u64().is_some() => {
            a[0].as_u64().map(|x| x as usize).unwrap_or(0)
        }
        Some(v) => v.as_u64().map(|x| x as usize).ok_or_else(|| {
            keys.bad("sample_size", &format!("{v}: ddpm needs square images, one integer size"))
        })?,
    };
    let in_channels = keys.usize_or("in_channels", 3)?;
    let out_channels = keys.usize_or("out_channels", 3)?;
    let boc = match keys.get("block_out_channels") {
        None => vec![224, 448, 672, 896],
        Some(_) => keys.usize_list("block_out_channels")?,
    };
    let ch = *boc.first().ok_or_else(|| keys.bad("block_out_channels", "empty"))?;
    if ch == 0 || boc.iter().any(|c| c % ch != 0) {
        return Err(keys.bad(
            "block_out_channels",
            &format!("{boc:?}: ddpm's widths are ch x ch_mult with integer multipliers of the first"),
        ));
    }
    let ch_mult: Vec<usize> = boc.iter().map(|c| c / ch).collect();
    let levels = boc.len();
    let down = match keys.get("down_block_types") {
        None => vec!["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
        Some(_) => keys.str_list("down_block_types")?,
    };
    let up = match keys.get("up_block_types") {
        None => vec!["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
        Some(_) => keys.str_list("up_block_types")?,
    };
    if down.len() != levels || up.len() != levels {
        return Err(keys.bad(
            "down_block_types",
            &format!("{} down and {} up blocks for {levels} block_out_channels", down.len(), up.len()),
        ));
    }
    let (attn_down, attn_up) =
        (resample_type(&keys, "downsample_type")?, resample_type(&keys, "upsample_type")?);
    let mut attn_resolutions = vec![];
    let (mut downsample, mut upsample) = (None::<(Resample, usize)>, None::<(Resample, usize)>);
    for (i, kind) in down.iter().enumerate() {
        let level_res = resolution >> i;
        let (down_attn, down_kind) = block_kind(&keys, "down_block_types", kind, i, attn_down)?;
        let (up_attn, up_kind) =
            block_kind(&keys, "up_block_types", up[levels - 1 - i], levels - 1 - i, attn_up)?;
        if down_attn != up_attn {
            return Err(keys.bad(
                "up_block_types",
                &format!(
                    "level {i} ({level_res}x{level_res}) has attention on the way {} only; ddpm puts it on both ways",
                    if down_attn { "down" } else { "up" }
                ),
            ));
        }
        if down_attn {
            attn_resolutions.push(level_res);
        }
        // The last level does not downsample; the first does not upsample.
        for (slot, kind, applies, key) in [
            (&mut downsample, down_kind, i + 1 != levels, "down_block_types"),
            (&mut upsample, up_kind, i != 0, "up_block_types"),
        ] {
            if !applies {
                continue;
            }
            match *slot {
                None => *slot = Some((kind, i)),
                Some((first, at)) if first != kind => {
                    return Err(keys.bad(
                        key,
                        &format!(
                            "level {at} resamples with {first:?} and level {i} with {kind:?}; ddpm resamples every level the same way"
                        ),
                    ))
                }
                Some(_) => {}
            }
        }
    }
    let gn_groups = keys.usize_or("norm_num_groups", 32)?;
    let mid_attn_norm = match (keys.get("attn_norm_num_groups"), time_conditioning) {
        (None, TimeConditioning::Add) => AttnNorm::Inherit,
        (None, TimeConditioning::ScaleShift) => AttnNorm::Off,
        (Some(_), _) => match keys.usize_or("attn_norm_num_groups", 0)? {
            g if g == gn_groups => AttnNorm::Inherit,
            g => AttnNorm::Groups(g),
        },
    };
    let attn_heads = match keys.get("attention_head_dim") {
        None if keys.map.contains_key("attention_head_dim") => AttnHeads::Count(1),
        None => AttnHeads::Width(8), // UNet2DModel's default when the key is absent
        Some(_) => AttnHeads::Width(keys.usize_or("attention_head_dim", 0)?),
    };
    if let Some(d) = keys.get("time_embedding_dim") {
        if d.as_u64() != Some(4 * ch as u64) {
            return Err(keys.bad(
                "time_embedding_dim",
                &format!("{d}: ddpm's timestep MLP is 4 x ch = {} wide", 4 * ch),
            ));
        }
    }
    let downsample_padding = match keys.usize_or("downsample_padding", 1)? {
        0 => DownsamplePadding::TfSame,
        1 => DownsamplePadding::Symmetric,
        p => return Err(keys.bad("downsample_padding", &format!("{p}: ddpm has 0 (TF-style) and 1"))),
    };
    let embedding_order =
        if keys.bool_or("flip_sin_to_cos", true)? { EmbeddingOrder::CosSin } else { EmbeddingOrder::SinCos };
    let config = UNetConfig {
        in_channels,
        out_channels,
        resolution,
        ch,
        ch_mult,
        num_res_blocks: keys.usize_or("layers_per_block", 2)?,
        attn_resolutions,
        dropout: keys.f64_or("dropout", 0.0)? as f32,
        gn_groups,
        gn_eps: keys.f64_or("norm_eps", 1e-5)? as f32,
        downsample_padding,
        embedding_order,
        embedding_freq_shift: keys.f64_or("freq_shift", 0.0)?,
        attn_heads,
        attn_heads_up: None,
        time_conditioning,
        downsample: downsample.map_or(Resample::Conv, |(k, _)| k),
        upsample: upsample.map_or(Resample::Conv, |(k, _)| k),
        mid_attention,
        mid_attn_norm,
        num_classes,
    };
    config.validate().map_err(|e| {
        let key = if e.to_string().contains("heads") { "attention_head_dim" } else { "the config" };
        Error::bad_file(path, format!("{key}: the UNet2DModel config maps to an invalid U-Net: {e}"))
    })?;
    if let Some(w) = group_widths(&config).into_iter().find(|&w| w < gn_groups) {
        return Err(keys.bad(
            "norm_num_groups",
            &format!("{gn_groups} groups for a {w}-channel norm (diffusers itself cannot build this)"),
        ));
    }
    Ok(config)
}

/// The channel count of every group norm of the U-Net that uses `gn_groups`.
fn group_widths(c: &UNetConfig) -> Vec<usize> {
    UNet { config: c.clone() }
        .param_shapes()
        .into_iter()
        .filter(|(name, _)| {
            let layer = name.rsplit('.').nth(1).unwrap_or("");
            let own_groups =
                name.starts_with("mid.attn_1.norm") && matches!(c.mid_attn_norm, AttnNorm::Groups(_));
            name.ends_with(".weight")
                && matches!(layer, "norm1" | "norm2" | "norm" | "norm_out")
                && !own_groups
        })
        .map(|(_, shape)| shape.iter().product())
        .collect()
}

/// The `config.json` value of a ddpm U-Net, every key written, so `UNet2DModel(**config)`
/// builds the same network.
///
/// # Errors
/// [`Error::InvalidConfig`] if diffusers cannot express it: a group norm narrower than
/// `gn_groups` (ddpm then uses fewer groups, diffusers cannot), a head count (diffusers sets
/// head widths), different heads on the way up, a middle attention without norm under additive
/// conditioning, no residual blocks on the way down, or attention at a resolution that is not
/// one of the levels'.
pub fn unet_config_to_json(c: &UNetConfig) -> Result<Value> {
    c.validate()?;
    let refuse = |reason: String| Err(Error::config("diffusers export", reason));
    if let Some(w) = group_widths(c).into_iter().find(|&w| w < c.gn_groups) {
        return refuse(format!(
            "a {w}-channel group norm uses min({}, {w}) groups in ddpm; diffusers' norm_num_groups is one count for all",
            c.gn_groups
        ));
    }
    if c.num_res_blocks == 0 {
        // diffusers' down blocks change width in their residual blocks; without any, its
        // resamplers and middle block would be built for widths the features never reach.
        return refuse("num_res_blocks 0 (improved-diffusion allows it) has no UNet2DModel layout".into());
    }
    let levels = c.ch_mult.len();
    let level_res: Vec<usize> = (0..levels).map(|i| c.resolution >> i).collect();
    let attn = |i: usize| c.attn_resolutions.contains(&level_res[i]);
    let boc: Vec<usize> = c.ch_mult.iter().map(|m| m * c.ch).collect();
    // The widths of the attention blocks: one head each means a head width equal to each.
    let mut attn_widths: Vec<usize> = (0..levels).filter(|&i| attn(i)).map(|i| boc[i]).collect();
    if c.mid_attention {
        attn_widths.push(boc[levels - 1]);
    }
    if c.attn_heads_up.is_some_and(|h| h != c.attn_heads) {
        return refuse("different heads on the way up (num_heads_upsample) have no UNet2DModel key".into());
    }
    let head_dim = match c.attn_heads {
        AttnHeads::Count(1) => Value::Null,
        AttnHeads::Width(d) => json!(d),
        AttnHeads::Count(h) => match attn_widths.iter().map(|w| w / h).collect::<Vec<_>>().as_slice() {
            [] => Value::Null,
            [d, rest @ ..] if rest.iter().all(|r| r == d) => json!(d),
            _ => {
                return refuse(format!(
                    "{h} heads in attention blocks of widths {attn_widths:?} make different head widths; diffusers sets one head width"
                ))
            }
        },
    };
    let attn_norm = match (c.mid_attn_norm, c.time_conditioning) {
        (AttnNorm::Inherit, TimeConditioning::Add) | (AttnNorm::Off, TimeConditioning::ScaleShift) => {
            Value::Null
        }
        (AttnNorm::Inherit, TimeConditioning::ScaleShift) => json!(c.gn_groups),
        (AttnNorm::Groups(g), _) => json!(g),
        (AttnNorm::Off, TimeConditioning::Add) => {
            return refuse(
                "a middle attention without norm under additive conditioning has no UNet2DModel key".into(),
            )
        }
    };
    let resample_name = |r: Resample| match r {
        Resample::Conv => "conv",
        Resample::ResBlock => "resnet",
    };
    let down: Vec<&str> = (0..levels)
        .map(|i| match (attn(i), c.downsample) {
            (true, _) => "AttnDownBlock2D",
            (false, Resample::Conv) => "DownBlock2D",
            (false, Resample::ResBlock) => "ResnetDownsampleBlock2D",
        })
        .collect();
    let up: Vec<&str> = (0..levels)
        .rev()
        .map(|i| match (attn(i), c.upsample) {
            (true, _) => "AttnUpBlock2D",
            (false, Resample::Conv) => "UpBlock2D",
            (false, Resample::ResBlock) => "ResnetUpsampleBlock2D",
        })
        .collect();
    Ok(json!({
        "_class_name": "UNet2DModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "act_fn": "silu",
        "add_attention": c.mid_attention,
        "attention_head_dim": head_dim,
        "attn_norm_num_groups": attn_norm,
        "block_out_channels": boc,
        "center_input_sample": false,
        "class_embed_type": null,
        "down_block_types": down,
        "downsample_padding": match c.downsample_padding {
            DownsamplePadding::TfSame => 0,
            DownsamplePadding::Symmetric => 1,
        },
        "downsample_type": resample_name(c.downsample),
        "dropout": short(c.dropout),
        "flip_sin_to_cos": c.embedding_order == EmbeddingOrder::CosSin,
        "freq_shift": c.embedding_freq_shift,
        "in_channels": c.in_channels,
        "layers_per_block": c.num_res_blocks,
        "mid_block_scale_factor": 1,
        "mid_block_type": "UNetMidBlock2D",
        "norm_eps": short(c.gn_eps),
        "norm_num_groups": c.gn_groups,
        "num_class_embeds": c.num_classes,
        "num_train_timesteps": null,
        "out_channels": c.out_channels,
        "resnet_time_scale_shift": match c.time_conditioning {
            TimeConditioning::Add => "default",
            TimeConditioning::ScaleShift => "scale_shift",
        },
        "sample_size": c.resolution,
        "time_embedding_dim": null,
        "time_embedding_type": "positional",
        "up_block_types": up,
        "upsample_type": resample_name(c.upsample),
    }))
}

/// An f32 as the shortest decimal that reads back to it (0.1, not 0.10000000149011612).
fn short(x: f32) -> f64 {
    x.to_string().parse().expect("f32's Display output, inf and NaN included, parses as f64")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::Preset;

    fn tiny() -> UNetConfig {
        UNetConfig { ch: 16, gn_groups: 8, ..Preset::Tiny.config(3, 8) }
    }

    #[test]
    fn every_option_round_trips_through_config_json() {
        let cases = [
            Preset::Cifar10.config(3, 32),
            UNetConfig {
                time_conditioning: TimeConditioning::ScaleShift,
                mid_attn_norm: AttnNorm::Off,
                ..tiny()
            },
            UNetConfig { time_conditioning: TimeConditioning::ScaleShift, ..tiny() },
            UNetConfig { mid_attn_norm: AttnNorm::Groups(4), ..tiny() },
            UNetConfig { attn_heads: AttnHeads::Width(8), ..tiny() },
            UNetConfig { downsample: Resample::ResBlock, upsample: Resample::ResBlock, ..tiny() },
            UNetConfig { downsample: Resample::ResBlock, attn_resolutions: vec![], ..tiny() },
            UNetConfig { mid_attention: false, ..tiny() },
            UNetConfig { num_classes: Some(10), out_channels: 6, ..tiny() },
        ];
        for c in cases {
            let v = unet_config_to_json(&c).unwrap();
            assert_eq!(unet_config_from_json(&v, Path::new("c")).unwrap(), c, "{v}");
        }
        // A head count with one head width everywhere is written as that width.
        let counted = UNetConfig { attn_heads: AttnHeads::Count(2), ..tiny() };
        let v = unet_config_to_json(&counted).unwrap();
        assert_eq!(v["attention_head_dim"], json!(16));
    }

    #[test]
    fn diffusers_defaults_and_block_kinds_are_read_as_diffusers_builds_them() {
        let v = unet_config_to_json(&tiny()).unwrap();
        // Absent attention_head_dim: UNet2DModel's default 8 (train_unconditional.py's models).
        let mut absent = v.clone();
        absent.as_object_mut().unwrap().remove("attention_head_dim");
        assert_eq!(unet_config_from_json(&absent, Path::new("c")).unwrap().attn_heads, AttnHeads::Width(8));
        // ResnetDownsampleBlock2D at a level without attention, AttnDownBlock2D with
        // downsample_type resnet at one with attention: one residual kind throughout.
        let mut mixed = v.clone();
        mixed["down_block_types"] = json!(["ResnetDownsampleBlock2D", "AttnDownBlock2D"]);
        mixed["downsample_type"] = json!("resnet");
        assert_eq!(unet_config_from_json(&mixed, Path::new("c")).unwrap().downsample, Resample::ResBlock);
        // ... but a residual block on one level and a conv (downsample_type "conv") on the next
        // cannot be one ddpm U-Net.
        let mut three =
            unet_config_to_json(&UNetConfig { ch_mult: vec![1, 2, 2], resolution: 8, ..tiny() }).unwrap();
        three["down_block_types"] = json!(["ResnetDownsampleBlock2D", "AttnDownBlock2D", "DownBlock2D"]);
        let err = unet_config_from_json(&three, Path::new("c")).unwrap_err().to_string();
        assert!(err.contains("`down_block_types`") && err.contains("same way"), "{err}");
    }

    #[test]
    fn unmappable_keys_are_refused_by_name() {
        let v = unet_config_to_json(&Preset::Cifar10.config(3, 32)).unwrap();
        for (key, value, needle) in [
            ("resnet_time_scale_shift", json!("spatial"), "spatial"),
            ("attention_head_dim", json!(7), "heads"),
            ("attention_head_dim", json!([8, 8]), "not a non-negative integer"),
            (
                "down_block_types",
                json!(["DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D", "DownBlock2D"]),
                "CrossAttnDownBlock2D",
            ),
            ("class_embed_type", json!("timestep"), "table"),
            ("num_class_embeds", json!(-1), "non-negative"),
            ("downsample_type", json!("fir"), "fir"),
            ("time_embedding_type", json!("fourier"), "positional"),
            ("some_new_option", json!(1), "unknown"),
        ] {
            let mut bad = v.clone();
            bad[key] = value;
            let err = unet_config_from_json(&bad, Path::new("c")).unwrap_err().to_string();
            assert!(err.contains(key) && err.contains(needle), "{key}: {err}");
        }
        // ddpm's `small` preset narrows its 16 groups nowhere; `tiny` at ch 32 with 64 groups would.
        let narrow = UNetConfig { gn_groups: 64, ..Preset::Tiny.config(1, 8) };
        assert!(unet_config_to_json(&narrow).unwrap_err().to_string().contains("groups"));
        let up_heads = UNetConfig { attn_heads_up: Some(AttnHeads::Count(2)), ..tiny() };
        assert!(unet_config_to_json(&up_heads).unwrap_err().to_string().contains("num_heads_upsample"));
        let no_blocks = UNetConfig { num_res_blocks: 0, ..tiny() };
        assert!(unet_config_to_json(&no_blocks).unwrap_err().to_string().contains("num_res_blocks 0"));
        let no_norm = UNetConfig { mid_attn_norm: AttnNorm::Off, ..tiny() };
        assert!(unet_config_to_json(&no_norm).unwrap_err().to_string().contains("without norm"));
    }
}
