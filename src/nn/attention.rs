//! Single-head self-attention over all spatial positions, as in the DDPM U-Net (Ho et al.
//! 2020, Appendix B):
//!
//! ```text
//! h = norm(x); q, k, v = 1x1 convs of h            each [N, C, H·W]
//! w[n, i, j] = softmax_j( Σ_c q[n,c,i] k[n,c,j] / √C )
//! o[n, c, i] = Σ_j w[n, i, j] v[n, c, j]
//! out = x + proj_out(o)                            proj_out starts at ~zero
//! ```

use super::layers::{conv, conv_params, conv_plus, group_norm, group_norm_params, Init, ParamSink};
use super::resblock::groups_for;
use super::Bound;
use crate::ops::Padding;
use crate::Var;

/// Declares `norm`, `q`, `k`, `v`, `proj_out` for `c` channels under `prefix`.
pub fn attention_params(sink: &mut dyn ParamSink, prefix: &str, c: usize) {
    group_norm_params(sink, &format!("{prefix}.norm"), c);
    for name in ["q", "k", "v"] {
        conv_params(sink, &format!("{prefix}.{name}"), c, c, 1, Init::Default);
    }
    conv_params(sink, &format!("{prefix}.proj_out"), c, c, 1, Init::Zero);
}

/// Runs the attention block on x `[N, C, H, W]`.
pub fn attention(p: &Bound, prefix: &str, x: &Var, max_groups: usize, eps: f32) -> Var {
    let s = x.shape().to_vec();
    let (n, c, hw) = (s[0], s[1], s[2] * s[3]);
    let h = group_norm(p, &format!("{prefix}.norm"), x, groups_for(c, max_groups), eps);
    let proj = |name: &str| conv(p, &format!("{prefix}.{name}"), &h, 1, Padding::zero()).reshape(&[n, c, hw]);
    let (q, k, v) = (proj("q"), proj("k"), proj("v")); // each [N, C, HW]
                                                       // w[n,i,j] = softmax_j(Σ_c q[n,c,i] k[n,c,j] / √C); o[n,c,i] = Σ_j v[n,c,j] w[n,i,j].
    let o = Var::attention(&q, &k, &v, 1.0 / (c as f32).sqrt()).reshape(&s);
    // x + proj_out(o), the sum fused into the convolution.
    conv_plus(p, &format!("{prefix}.proj_out"), &o, None, Some(x), 1, Padding::zero())
}
