//! ddpm's parameter names ↔ diffusers' `state_dict` names, and the layouts that differ.
//!
//! | ddpm                               | diffusers                                              |
//! |------------------------------------|--------------------------------------------------------|
//! | `temb.dense.0`, `temb.dense.1`     | `time_embedding.linear_1`, `time_embedding.linear_2`   |
//! | `label_emb`                        | `class_embedding`                                      |
//! | `conv_in`, `norm_out`, `conv_out`  | `conv_in`, `conv_norm_out`, `conv_out`                 |
//! | `down.{i}.block.{j}.{norm1,conv1,temb_proj,norm2,conv2,nin_shortcut}` | `down_blocks.{i}.resnets.{j}.{norm1,conv1,time_emb_proj,norm2,conv2,conv_shortcut}` |
//! | `down.{i}.attn.{j}.{norm,q,k,v,proj_out}` | `down_blocks.{i}.attentions.{j}.{group_norm,to_q,to_k,to_v,to_out.0}` (old files: `query,key,value,proj_attn`) |
//! | `down.{i}.downsample.conv`, or the residual block `down.{i}.downsample.{norm1,…}` | `down_blocks.{i}.downsamplers.0.conv`, or `…downsamplers.0.{norm1,…}` |
//! | `mid.{block_1,attn_1,block_2}`     | `mid_block.{resnets.0,attentions.0,resnets.1}`         |
//! | `up.{i}.…` (level i)               | `up_blocks.{L−1−i}.…` (diffusers counts from the bottom) |
//! | `up.{i}.upsample.conv` or `up.{i}.upsample.{norm1,…}` | `up_blocks.{L−1−i}.upsamplers.0.conv` or `….upsamplers.0.{norm1,…}` |
//!
//! Attention q/k/v/out are 1x1 convs in ddpm (`[C, C, 1, 1]`) and linear layers in diffusers
//! (`[C, C]`), the same numbers; heads are consecutive channel groups in both.

use std::collections::BTreeMap;
use std::path::Path;

use crate::nn::{ParamStore, UNet};
use crate::{Error, Result, Tensor};

/// The diffusers name of ddpm parameter `name` in a U-Net with `levels` levels (module docs).
///
/// # Panics
/// If `name` is not a name [`UNet::init_params`] creates.
pub fn diffusers_name(name: &str, levels: usize) -> String {
    let parts: Vec<&str> = name.split('.').collect();
    let resnet = |layer: &str| match layer {
        "temb_proj" => "time_emb_proj".to_string(),
        "nin_shortcut" => "conv_shortcut".to_string(),
        other => other.to_string(),
    };
    let attn = |layer: &str| match layer {
        "norm" => "group_norm",
        "q" => "to_q",
        "k" => "to_k",
        "v" => "to_v",
        "proj_out" => "to_out.0",
        other => panic!("diffusers_name: unknown attention layer {other} in {name}"),
    };
    // A documented precondition (# Panics): init_params names have a number in this place.
    let up_index = |i: &str| levels - 1 - i.parse::<usize>().expect("level index");
    match parts.as_slice() {
        ["temb", "dense", "0", p] => format!("time_embedding.linear_1.{p}"),
        ["temb", "dense", "1", p] => format!("time_embedding.linear_2.{p}"),
        ["label_emb", p] => format!("class_embedding.{p}"),
        ["norm_out", p] => format!("conv_norm_out.{p}"),
        ["conv_in" | "conv_out", _] => name.to_string(),
        ["down", i, "block", j, layer, p] => format!("down_blocks.{i}.resnets.{j}.{}.{p}", resnet(layer)),
        ["down", i, "attn", j, layer, p] => format!("down_blocks.{i}.attentions.{j}.{}.{p}", attn(layer)),
        ["down", i, "downsample", layer, p] => {
            format!("down_blocks.{i}.downsamplers.0.{}.{p}", resnet(layer))
        }
        ["mid", "block_1", layer, p] => format!("mid_block.resnets.0.{}.{p}", resnet(layer)),
        ["mid", "block_2", layer, p] => format!("mid_block.resnets.1.{}.{p}", resnet(layer)),
        ["mid", "attn_1", layer, p] => format!("mid_block.attentions.0.{}.{p}", attn(layer)),
        ["up", i, "block", j, layer, p] => {
            format!("up_blocks.{}.resnets.{j}.{}.{p}", up_index(i), resnet(layer))
        }
        ["up", i, "attn", j, layer, p] => {
            format!("up_blocks.{}.attentions.{j}.{}.{p}", up_index(i), attn(layer))
        }
        ["up", i, "upsample", layer, p] => {
            format!("up_blocks.{}.upsamplers.0.{}.{p}", up_index(i), resnet(layer))
        }
        _ => panic!("diffusers_name: {name} is not a U-Net parameter"),
    }
}

/// The name older diffusers files (before the `Attention` rewrite, e.g. google/ddpm-cifar10-32)
/// use for an attention tensor, if it differs.
pub(super) fn deprecated_name(name: &str) -> Option<String> {
    [(".to_q.", ".query."), (".to_k.", ".key."), (".to_v.", ".value."), (".to_out.0.", ".proj_attn.")]
        .iter()
        .find(|(new, _)| name.contains(new))
        .map(|(new, old)| name.replace(new, old))
}

/// Whether a diffusers tensor is an attention projection, stored `[C, C]` (ddpm: `[C, C, 1, 1]`).
fn is_attention_linear(diffusers: &str) -> bool {
    diffusers.contains("attentions.") && !diffusers.contains(".group_norm.")
}

/// The diffusers tensor `name` → ddpm parameter, for every parameter of `net` (in its order),
/// taken from `tensors`; `path` names the file in errors.
///
/// # Errors
/// [`Error::BadFile`] naming the tensor if one is missing, has the wrong shape, or is left over
/// (a tensor ddpm's U-Net has no place for).
pub fn params_from_tensors(
    net: &UNet,
    mut tensors: BTreeMap<String, Tensor>,
    path: &Path,
) -> Result<ParamStore> {
    let levels = net.config.ch_mult.len();
    let mut store = ParamStore::new();
    for (name, want) in &net.param_shapes() {
        let want_len: usize = want.iter().product();
        let key = diffusers_name(name, levels);
        let t = match tensors.remove(&key) {
            Some(t) => t,
            None => deprecated_name(&key).and_then(|old| tensors.remove(&old)).ok_or_else(|| {
                Error::bad_file(
                    path,
                    format!("tensor `{key}` (ddpm `{name}`) is missing; is config.json the one saved with these weights?"),
                )
            })?,
        };
        let t = if t.shape() != want.as_slice() && is_attention_linear(&key) && t.len() == want_len {
            // Row-major first: into_shape_with_order reshapes only a C-contiguous array.
            let t = if t.is_standard_layout() { t } else { t.as_standard_layout().into_owned() };
            t.into_shape_with_order(want.as_slice())
                .expect("row-major, and t.len() == want_len checked above")
        } else {
            t
        };
        if t.shape() != want.as_slice() {
            return Err(Error::bad_file(
                path,
                format!(
                    "tensor `{key}` has shape {:?}; config.json needs {want:?} for ddpm `{name}`",
                    t.shape()
                ),
            ));
        }
        store.insert(name.as_str(), t.as_standard_layout().into_owned());
    }
    if !tensors.is_empty() {
        let extra: Vec<&str> = tensors.keys().take(5).map(String::as_str).collect();
        return Err(Error::bad_file(
            path,
            format!(
                "{} tensor(s) have no place in the U-Net config.json describes, e.g. `{}`; a block or option ddpm does not map?",
                tensors.len(),
                extra.join("`, `")
            ),
        ));
    }
    Ok(store)
}

/// ddpm's parameters under diffusers' names and shapes, sorted by name.
///
/// # Panics
/// If `params` is not a parameter set of `net` (a name [`diffusers_name`] does not know).
pub fn params_to_tensors(net: &UNet, params: &ParamStore) -> Vec<(String, Tensor)> {
    let levels = net.config.ch_mult.len();
    let mut out: Vec<(String, Tensor)> = params
        .iter()
        .map(|(name, t)| {
            let key = diffusers_name(name, levels);
            let t = if is_attention_linear(&key) && t.ndim() == 4 {
                let s = t.shape();
                // A documented precondition (# Panics): params has net's shapes, [C, C, 1, 1] here.
                t.to_shape((s[0], s[1])).expect("[C, C, 1, 1] holds C x C").into_dyn().into_owned()
            } else {
                t.clone()
            };
            (key, t)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::Preset;

    #[test]
    fn every_parameter_gets_a_distinct_diffusers_name_and_back() {
        let net = UNet::new(Preset::Cifar10.config(3, 32)).unwrap();
        let params = net.init_params(&mut crate::rng_from_seed(0));
        let tensors = params_to_tensors(&net, &params);
        let names: std::collections::BTreeSet<&String> = tensors.iter().map(|(n, _)| n).collect();
        assert_eq!(names.len(), params.len());
        assert!(names.contains(&"up_blocks.2.attentions.1.to_out.0.weight".to_string()));
        assert!(names.contains(&"down_blocks.1.resnets.0.conv_shortcut.weight".to_string()));
        let back = params_from_tensors(&net, tensors.into_iter().collect(), Path::new("x")).unwrap();
        for (name, t) in params.iter() {
            assert_eq!(back.get(name).unwrap(), t, "{name}");
        }
    }

    #[test]
    fn deprecated_attention_names_are_read() {
        let net = UNet::new(Preset::Tiny.config(1, 8)).unwrap();
        let params = net.init_params(&mut crate::rng_from_seed(0));
        let old: BTreeMap<String, Tensor> = params_to_tensors(&net, &params)
            .into_iter()
            .map(|(n, t)| (deprecated_name(&n).unwrap_or(n), t))
            .collect();
        assert!(old.contains_key("mid_block.attentions.0.proj_attn.weight"));
        let back = params_from_tensors(&net, old, Path::new("x")).unwrap();
        assert_eq!(back.get("mid.attn_1.proj_out.weight"), params.get("mid.attn_1.proj_out.weight"));
    }

    #[test]
    fn missing_and_extra_tensors_are_named() {
        let net = UNet::new(Preset::Tiny.config(1, 8)).unwrap();
        let params = net.init_params(&mut crate::rng_from_seed(0));
        let mut tensors: BTreeMap<String, Tensor> = params_to_tensors(&net, &params).into_iter().collect();
        let t = tensors.remove("conv_in.bias").unwrap();
        let err = params_from_tensors(&net, tensors.clone(), Path::new("w")).unwrap_err().to_string();
        assert!(err.contains("`conv_in.bias`") && err.contains("missing"), "{err}");
        tensors.insert("conv_in.bias".into(), t);
        tensors.insert("class_embedding.weight".into(), Tensor::zeros(vec![2]));
        let err = params_from_tensors(&net, tensors, Path::new("w")).unwrap_err().to_string();
        assert!(err.contains("class_embedding.weight"), "{err}");
    }
}
