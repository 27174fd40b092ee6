//! improved-/guided-diffusion `state_dict` names ↔ ddpm's parameters.
//!
//! Their `UNetModel` numbers its modules in sequence: `input_blocks.{k}` (k = 0 the stem conv,
//! then one per residual block — `.0` the block, `.1` its attention — and one per downsampler),
//! `middle_block.{0,1,2}`, `output_blocks.{k}` (one per up block: `.0` the block, `.1` attention,
//! and the upsampler after the last block of a level), `time_embed.{0,2}`, `label_emb`,
//! `out.{0,2}`. Inside a residual block: `in_layers.0` = norm1, `in_layers.2` = conv1,
//! `emb_layers.1` = temb_proj, `out_layers.0` = norm2, `out_layers.3` = conv2,
//! `skip_connection` = nin_shortcut. An attention block has `norm`, a fused 1-D conv `qkv`
//! `[3C, C, 1]` and `proj_out` `[C, C, 1]`; `qkv`'s rows are, per head h of width d,
//! `[q_h | k_h | v_h]` (the legacy order of improved-diffusion and of guided-diffusion by
//! default) or all q, then all k, then all v (`use_new_attention_order`).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use ndarray::Axis;

use crate::nn::{Resample, UNet, UNetConfig};
use crate::{Error, Result, Tensor};

/// What a ddpm module is, for translating the names inside it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// A conv, linear or norm whose `weight`/`bias` keep their names.
    Plain,
    /// A residual block.
    ResBlock,
    /// An attention block with this many heads.
    Attention { heads: usize, up: bool },
}

/// ddpm module prefix → (their module prefix, kind), for every module of `c`.
fn modules(c: &UNetConfig) -> BTreeMap<String, (String, Kind)> {
    let mut m = BTreeMap::new();
    let mut put = |ours: String, theirs: String, kind: Kind| {
        m.insert(ours, (theirs, kind));
    };
    put("temb.dense.0".into(), "time_embed.0".into(), Kind::Plain);
    put("temb.dense.1".into(), "time_embed.2".into(), Kind::Plain);
    put("label_emb".into(), "label_emb".into(), Kind::Plain);
    put("conv_in".into(), "input_blocks.0.0".into(), Kind::Plain);
    put("norm_out".into(), "out.0".into(), Kind::Plain);
    put("conv_out".into(), "out.2".into(), Kind::Plain);
    let attn = |up: bool| Kind::Attention { heads: 0, up };
    let levels = c.ch_mult.len();
    let mut k = 1;
    let mut res = c.resolution;
    for i in 0..levels {
        for j in 0..c.num_res_blocks {
            put(format!("down.{i}.block.{j}"), format!("input_blocks.{k}.0"), Kind::ResBlock);
            if c.attn_resolutions.contains(&res) {
                put(format!("down.{i}.attn.{j}"), format!("input_blocks.{k}.1"), attn(false));
            }
            k += 1;
        }
        if i + 1 != levels {
            match c.downsample {
                Resample::Conv => {
                    put(format!("down.{i}.downsample.conv"), format!("input_blocks.{k}.0.op"), Kind::Plain)
                }
                Resample::ResBlock => {
                    put(format!("down.{i}.downsample"), format!("input_blocks.{k}.0"), Kind::ResBlock)
                }
            }
            k += 1;
            res /= 2;
        }
    }
    put("mid.block_1".into(), "middle_block.0".into(), Kind::ResBlock);
    put("mid.attn_1".into(), "middle_block.1".into(), attn(false));
    put("mid.block_2".into(), "middle_block.2".into(), Kind::ResBlock);
    let mut k = 0;
    for i in (0..levels).rev() {
        for j in 0..=c.num_res_blocks {
            put(format!("up.{i}.block.{j}"), format!("output_blocks.{k}.0"), Kind::ResBlock);
            let mut idx = 1;
            if c.attn_resolutions.contains(&res) {
                put(format!("up.{i}.attn.{j}"), format!("output_blocks.{k}.1"), attn(true));
                idx = 2;
            }
            if i != 0 && j == c.num_res_blocks {
                match c.upsample {
                    Resample::Conv => put(
                        format!("up.{i}.upsample.conv"),
                        format!("output_blocks.{k}.{idx}.conv"),
                        Kind::Plain,
                    ),
                    Resample::ResBlock => {
                        put(format!("up.{i}.upsample"), format!("output_blocks.{k}.{idx}"), Kind::ResBlock)
                    }
                }
            }
            k += 1;
        }
        if i != 0 {
            res *= 2;
        }
    }
    m
}

/// Their name for the tensor inside a residual block.
fn resblock_layer(layer: &str) -> Option<&'static str> {
    Some(match layer {
        "norm1" => "in_layers.0",
        "conv1" => "in_layers.2",
        "temb_proj" => "emb_layers.1",
        "norm2" => "out_layers.0",
        "conv2" => "out_layers.3",
        "nin_shortcut" => "skip_connection",
        _ => return None,
    })
}

/// Rows of `qkv` (a `[3C, …]` tensor) that hold `which` (0 = q, 1 = k, 2 = v), in ddpm's order
/// (head by head).
fn qkv_rows(c: usize, heads: usize, which: usize, new_order: bool) -> Vec<usize> {
    let d = c / heads;
    (0..heads)
        .flat_map(|h| {
            let start = if new_order { which * c + h * d } else { h * 3 * d + which * d };
            start..start + d
        })
        .collect()
}

/// ddpm's parameters for `net` from their `state_dict` (names as in the file), splitting the
/// fused `qkv` in the order `new_order` says. Every tensor of the file must find its place.
///
/// # Errors
/// [`Error::BadFile`] naming `path` and the tensor: missing, of another shape (with what that
/// usually means: a super-resolution model's 6-channel stem, other flags), or left over.
pub fn params_from_state_dict(
    net: &UNet,
    tensors: Vec<(String, Tensor)>,
    new_order: bool,
    path: &Path,
) -> Result<crate::nn::ParamStore> {
    let c = &net.config;
    let modules = modules(c);
    let mut theirs: HashMap<String, Tensor> = HashMap::new();
    for (name, t) in tensors {
        theirs.insert(name, t);
    }
    // A super-resolution model's stem takes the noisy image and an upsampled low-resolution one.
    if let Some(stem) = theirs.get("input_blocks.0.0.weight") {
        if stem.ndim() == 4 && stem.shape()[1] == 2 * c.in_channels {
            return Err(Error::bad_file(
                path,
                format!(
                    "tensor `input_blocks.0.0.weight` takes {} channels, the noisy image and an upsampled low-resolution one: a super-resolution model, which ddpm does not import",
                    stem.shape()[1]
                ),
            ));
        }
    }
    let mut used: Vec<String> = vec![];
    let bad = |reason: String| Error::bad_file(path, reason);
    let mut store = crate::nn::ParamStore::new();
    for (name, want) in net.param_shapes() {
        let (module, p) = name.rsplit_once('.').expect("every parameter name is module.param");
        let (key, part) = match modules.get(module) {
            Some((t, _)) => (format!("{t}.{p}"), None),
            None => {
                let (parent, layer) = module.rsplit_once('.').expect("nested modules have a parent");
                let (t, kind) = modules.get(parent).unwrap_or_else(|| panic!("no module map for {name}"));
                match (kind, layer) {
                    (Kind::ResBlock, l) => {
                        let l = resblock_layer(l)
                            .unwrap_or_else(|| panic!("unknown residual-block layer in {name}"));
                        (format!("{t}.{l}.{p}"), None)
                    }
                    (Kind::Attention { up, .. }, "q" | "k" | "v") => {
                        let which = ["q", "k", "v"].iter().position(|x| *x == layer).expect("q, k or v");
                        (format!("{t}.qkv.{p}"), Some((which, *up)))
                    }
                    (Kind::Attention { .. }, l) => (format!("{t}.{l}.{p}"), None),
                    (Kind::Plain, _) => panic!("no module map for {name}"),
                }
            }
        };
        let t = theirs.get(&key).ok_or_else(|| {
            bad(format!(
                "tensor `{key}` (ddpm `{name}`) is missing; were these the flags the model was trained with?"
            ))
        })?;
        let value = match part {
            None => t.clone(),
            Some((which, up)) => {
                let ch = want[0];
                if t.shape().first() != Some(&(3 * ch)) {
                    return Err(bad(format!(
                        "tensor `{key}` has shape {:?}; the flags need {} rows (3 x {ch} channels)",
                        t.shape(),
                        3 * ch
                    )));
                }
                let heads = c.heads_at(ch, up);
                t.select(Axis(0), &qkv_rows(ch, heads, which, new_order))
            }
        };
        // 1-D convs ([C_out, C_in, 1]) are ddpm's 1x1 convs ([C_out, C_in, 1, 1]): same numbers.
        let conv1d_as_1x1 = value.ndim() == 3
            && want.len() == 4
            && want[2..] == [1, 1]
            && value.shape()[..2] == want[..2]
            && value.shape()[2] == 1;
        let value = if conv1d_as_1x1 {
            value
                .as_standard_layout()
                .into_owned()
                .into_shape_with_order(want.as_slice())
                .expect("same length, standard layout")
        } else {
            value
        };
        if value.shape() != want.as_slice() {
            let hint = if key == "input_blocks.0.0.weight" && value.shape().get(1) == Some(&6) {
                ": its stem takes 6 channels, the noisy image and an upsampled low-resolution one — a super-resolution model, which ddpm does not support"
            } else {
                "; were these the flags the model was trained with?"
            };
            return Err(bad(format!(
                "tensor `{key}` has shape {:?}, ddpm `{name}` needs {want:?}{hint}",
                value.shape()
            )));
        }
        store.insert(name.as_str(), value.as_standard_layout().into_owned());
        used.push(key);
    }
    for k in &used {
        theirs.remove(k);
    }
    if !theirs.is_empty() {
        let mut extra: Vec<&String> = theirs.keys().collect();
        extra.sort();
        let shown: Vec<&str> = extra.iter().take(5).map(|s| s.as_str()).collect();
        return Err(bad(format!(
            "{} tensor(s) have no place in the model the flags describe, e.g. `{}`; other flags (class_cond, learn_sigma, resblock_updown, num_res_blocks, attention_resolutions)?",
            extra.len(),
            shown.join("`, `")
        )));
    }
    Ok(store)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qkv_rows_follow_the_legacy_and_the_new_order() {
        // C = 4, 2 heads of width 2. Legacy: [q0 q0 k0 k0 v0 v0 | q1 q1 k1 k1 v1 v1].
        assert_eq!(qkv_rows(4, 2, 0, false), vec![0, 1, 6, 7]);
        assert_eq!(qkv_rows(4, 2, 1, false), vec![2, 3, 8, 9]);
        assert_eq!(qkv_rows(4, 2, 2, false), vec![4, 5, 10, 11]);
        // New: [q (4 rows) | k | v].
        assert_eq!(qkv_rows(4, 2, 1, true), vec![4, 5, 6, 7]);
        // One head: both orders are [q | k | v].
        assert_eq!(qkv_rows(4, 1, 2, false), qkv_rows(4, 1, 2, true));
    }

    #[test]
    fn every_parameter_has_one_distinct_name() {
        let f = super::super::flags::Flags::parse(
            "--image_size 32 --num_channels 32 --num_res_blocks 2 --learn_sigma True --class_cond True",
            super::super::flags::Family::Improved,
        )
        .unwrap();
        let c = f.unet_config().unwrap();
        let m = modules(&c);
        let theirs: std::collections::BTreeSet<&String> = m.values().map(|(t, _)| t).collect();
        assert_eq!(theirs.len(), m.len());
        assert_eq!(m["down.1.downsample.conv"].0, "input_blocks.6.0.op");
        assert_eq!(m["up.3.upsample.conv"].0, "output_blocks.2.1.conv");
        assert_eq!(m["up.2.attn.2"].0, "output_blocks.5.1");
        assert_eq!(m["up.2.upsample.conv"].0, "output_blocks.5.2.conv");
    }
}
