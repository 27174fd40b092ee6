//! Multi-head self-attention over all spatial positions. With one head it is the attention
//! block of the DDPM U-Net (Ho et al. 2020, Appendix B); with H heads, that of improved- and
//! guided-diffusion and of diffusers' `Attention` (the channels of head h are `h·d .. (h+1)·d`):
//!
//! ```text
//! h = norm(x) (or x when the block has no norm); q, k, v = 1x1 convs of h     each [N, C, H·W]
//! per head, d = C/H channels:  w[i, j] = softmax_j( Σ_c q[c,i] k[c,j] / √d )
//!                              o[c, i] = Σ_j w[i, j] v[c, j]
//! out = x + proj_out(o)                            proj_out starts at ~zero
//! ```
//!
//! improved-diffusion scales q and k by d^(−1/4) each instead of the logits by d^(−1/2): the same
//! function up to rounding. Its fused `qkv` projection is split into `q`, `k`, `v` on import
//! (src/interop), in whichever channel order the checkpoint used.

use super::layers::{conv, conv_params, conv_plus, group_norm, group_norm_params, Init, ParamSink};
use super::Bound;
use crate::ops::Padding;
use crate::Var;

/// Declares `norm` (if `norm`), `q`, `k`, `v`, `proj_out` for `c` channels under `prefix`.
pub fn attention_params(sink: &mut dyn ParamSink, prefix: &str, c: usize, norm: bool) {
    if norm {
        group_norm_params(sink, &format!("{prefix}.norm"), c);
    }
    for name in ["q", "k", "v"] {
        conv_params(sink, &format!("{prefix}.{name}"), c, c, 1, Init::Default);
    }
    conv_params(sink, &format!("{prefix}.proj_out"), c, c, 1, Init::Zero);
}

/// Runs the attention block on x `[N, C, H, W]` with `heads` heads (dividing C), after a group
/// norm of `groups` groups, or none.
///
/// # Panics
/// If `heads` is 0 or does not divide C.
pub fn attention(p: &Bound, prefix: &str, x: &Var, groups: Option<usize>, eps: f32, heads: usize) -> Var {
    let s = x.shape().to_vec();
    let (n, c, hw) = (s[0], s[1], s[2] * s[3]);
    assert!(heads > 0 && c.is_multiple_of(heads), "attention {prefix}: {heads} heads for {c} channels");
    let d = c / heads;
    let h = match groups {
        Some(g) => group_norm(p, &format!("{prefix}.norm"), x, g, eps),
        None => x.clone(),
    };
    // [N, C, HW] with C = heads·d is [N·heads, d, HW] in memory: each head is one "image".
    let proj = |name: &str| {
        conv(p, &format!("{prefix}.{name}"), &h, 1, Padding::zero()).reshape(&[n * heads, d, hw])
    };
    let (q, k, v) = (proj("q"), proj("k"), proj("v"));
    // w[i,j] = softmax_j(Σ_c q[c,i] k[c,j] / √d); o[c,i] = Σ_j v[c,j] w[i,j], per head.
    let o = Var::attention(&q, &k, &v, 1.0 / (d as f32).sqrt()).reshape(&s);
    // x + proj_out(o), the sum fused into the convolution.
    conv_plus(p, &format!("{prefix}.proj_out"), &o, None, Some(x), 1, Padding::zero())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::layers::Initialise;
    use crate::ops::Padding;
    use crate::{rng_from_seed, Tensor};
    use rand::Rng as _;

    /// Attention with H heads equals H single-head attentions, each on its own `d` consecutive
    /// channels of q, k, v, with the logits scaled by 1/√d, concatenated before `proj_out`.
    #[test]
    fn heads_are_consecutive_channel_groups_scaled_by_their_width() {
        let (n, c, side) = (2, 12, 3);
        for heads in [1, 2, 3, 4, 6, 12] {
            for norm in [true, false] {
                let mut rng = rng_from_seed(heads as u64);
                let mut init = Initialise { store: crate::nn::ParamStore::new(), rng: &mut rng };
                attention_params(&mut init, "a", c, norm);
                let mut store = init.store;
                // Non-zero everything (proj_out starts at ~0).
                let names = store.names().to_vec();
                let mut r = rng_from_seed(99);
                for name in names {
                    let shape = store.get(&name).expect("declared").shape().to_vec();
                    store.set(&name, Tensor::from_shape_simple_fn(shape, || r.random_range(-1.0f32..1.0)));
                }
                let x = Var::constant(Tensor::from_shape_simple_fn(vec![n, c, side, side], || {
                    r.random_range(-2.0f32..2.0)
                }));
                let p = store.bind_constant();
                let groups = norm.then_some(3);
                let got = attention(&p, "a", &x, groups, 1e-5, heads);

                let h = if norm { group_norm(&p, "a.norm", &x, 3, 1e-5) } else { x.clone() };
                let hw = side * side;
                let proj =
                    |name: &str| conv(&p, &format!("a.{name}"), &h, 1, Padding::zero()).reshape(&[n, c, hw]);
                let (q, k, v) = (proj("q"), proj("k"), proj("v"));
                let d = c / heads;
                let per_head: Vec<Var> = (0..heads)
                    .map(|i| {
                        let part = |t: &Var| t.slice(1, i * d, (i + 1) * d);
                        Var::attention(&part(&q), &part(&k), &part(&v), 1.0 / (d as f32).sqrt())
                    })
                    .collect();
                let o = Var::concat(&per_head.iter().collect::<Vec<_>>(), 1).reshape(&[n, c, side, side]);
                let want = x.add(&conv(&p, "a.proj_out", &o, 1, Padding::zero()));
                for (a, b) in got.value().iter().zip(want.value().iter()) {
                    assert!(
                        (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                        "{heads} heads, norm {norm}: {a} vs {b}"
                    );
                }
            }
        }
    }
}
