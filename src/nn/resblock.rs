//! The residual block of the DDPM U-Net (Ho et al. 2020, Appendix B; the Wide ResNet block with
//! group norm and a timestep projection):
//!
//! ```text
//! h = conv1(SiLU(norm1(x)))                      3x3, C_in → C_out
//! h = h + temb_proj(SiLU(temb))[:, :, None, None]
//! h = conv2(dropout(SiLU(norm2(h))))             3x3, C_out → C_out, starts at ~zero
//! out = (C_in ≠ C_out ? nin_shortcut(x) : x) + h  1x1 shortcut when the width changes
//! ```

use super::layers::{
    conv, conv_params, conv_plus, group_norm_params, group_norm_silu, linear, linear_params, Init, ParamSink,
};
use super::Bound;
use crate::ops::Padding;
use crate::{Rng, Var};

/// Shape of one residual block.
#[derive(Clone, Copy, Debug)]
pub struct ResBlockSpec {
    /// Input channels.
    pub c_in: usize,
    /// Output channels.
    pub c_out: usize,
    /// Width of the timestep embedding (4 × base channels).
    pub temb_ch: usize,
}

/// Group count for `c` channels: `min(max_groups, c)`, as in the reference code.
pub fn groups_for(c: usize, max_groups: usize) -> usize {
    max_groups.min(c)
}

impl ResBlockSpec {
    /// Registers the block's parameters under `prefix` (`norm1`, `conv1`, `temb_proj`, `norm2`,
    /// `conv2`, and `nin_shortcut` when the width changes).
    pub fn params(&self, sink: &mut dyn ParamSink, prefix: &str) {
        group_norm_params(sink, &format!("{prefix}.norm1"), self.c_in);
        conv_params(sink, &format!("{prefix}.conv1"), self.c_in, self.c_out, 3, Init::Default);
        linear_params(sink, &format!("{prefix}.temb_proj"), self.temb_ch, self.c_out);
        group_norm_params(sink, &format!("{prefix}.norm2"), self.c_out);
        conv_params(sink, &format!("{prefix}.conv2"), self.c_out, self.c_out, 3, Init::Zero);
        if self.c_in != self.c_out {
            conv_params(sink, &format!("{prefix}.nin_shortcut"), self.c_in, self.c_out, 1, Init::Default);
        }
    }

    /// Runs the block on x `[N, C_in, H, W]` with the embedding temb `[N, temb_ch]`.
    /// `dropout` is `Some((p, rng))` in training.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        p: &Bound,
        prefix: &str,
        x: &Var,
        temb: &Var,
        max_groups: usize,
        eps: f32,
        dropout: Option<(f32, &mut Rng)>,
    ) -> Var {
        let (gi, go) = (groups_for(self.c_in, max_groups), groups_for(self.c_out, max_groups));
        let h = group_norm_silu(p, &format!("{prefix}.norm1"), x, gi, eps);
        // conv1 with the timestep's projection [N, C_out] added per channel, in one op.
        let t = linear(p, &format!("{prefix}.temb_proj"), &temb.silu());
        let h = conv_plus(p, &format!("{prefix}.conv1"), &h, Some(&t), None, 1, Padding::same(1));
        let mut h = group_norm_silu(p, &format!("{prefix}.norm2"), &h, go, eps);
        if let Some((rate, rng)) = dropout {
            h = h.dropout(rate, rng);
        }
        let skip = if self.c_in != self.c_out {
            conv(p, &format!("{prefix}.nin_shortcut"), x, 1, Padding::zero())
        } else {
            x.clone()
        };
        // conv2 with the skip connection added, in one op.
        conv_plus(p, &format!("{prefix}.conv2"), &h, None, Some(&skip), 1, Padding::same(1))
    }
}
