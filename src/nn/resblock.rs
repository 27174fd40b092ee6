//! The residual block of the DDPM U-Net (Ho et al. 2020, Appendix B; the Wide ResNet block with
//! group norm and a timestep projection), with the options of improved-diffusion (Nichol &
//! Dhariwal 2021) and guided-diffusion (Dhariwal & Nichol 2021):
//!
//! ```text
//! h = SiLU(norm1(x))
//! [resampling block: h = R(h), x = R(x)]          R = 2x2 average pool or nearest 2x upsample
//! h = conv1(h)                                    3x3, C_in → C_out
//! add:          h = SiLU(norm2(h + temb_proj(SiLU(temb))[:, :, None, None]))
//! scale-shift:  [s, b] = temb_proj(SiLU(temb))    2·C_out wide, split in halves
//!               h = SiLU(norm2(h)·(1 + s) + b)
//! h = conv2(dropout(h))                           3x3, C_out → C_out, starts at ~zero
//! out = (C_in ≠ C_out ? nin_shortcut(x) : x) + h  1x1 shortcut when the width changes
//! ```

use super::layers::{
    conv, conv_params, conv_plus, group_norm, group_norm_params, group_norm_silu, linear, linear_params,
    Init, ParamSink,
};
use super::unet::TimeConditioning;
use super::Bound;
use crate::ops::{DropoutDraws, Padding};
use crate::Var;

/// What a residual block does to the resolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resampling {
    /// Keeps it.
    None,
    /// Halves it (2x2 average pool).
    Down,
    /// Doubles it (nearest neighbour).
    Up,
}

/// Shape of one residual block.
#[derive(Clone, Copy, Debug)]
pub struct ResBlockSpec {
    /// Input channels.
    pub c_in: usize,
    /// Output channels.
    pub c_out: usize,
    /// Width of the timestep embedding (4 × base channels).
    pub temb_ch: usize,
    /// How the timestep embedding enters.
    pub conditioning: TimeConditioning,
    /// Whether the block changes the resolution.
    pub resampling: Resampling,
}

/// Group count for `c` channels: `min(max_groups, c)`, as in the reference code.
pub fn groups_for(c: usize, max_groups: usize) -> usize {
    max_groups.min(c)
}

impl ResBlockSpec {
    /// Width of the timestep projection: `C_out`, or `2·C_out` for scale-shift.
    pub fn temb_out(&self) -> usize {
        match self.conditioning {
            TimeConditioning::Add => self.c_out,
            TimeConditioning::ScaleShift => 2 * self.c_out,
        }
    }

    /// Registers the block's parameters under `prefix` (`norm1`, `conv1`, `temb_proj`, `norm2`,
    /// `conv2`, and `nin_shortcut` when the width changes).
    pub fn params(&self, sink: &mut dyn ParamSink, prefix: &str) {
        group_norm_params(sink, &format!("{prefix}.norm1"), self.c_in);
        conv_params(sink, &format!("{prefix}.conv1"), self.c_in, self.c_out, 3, Init::Default);
        linear_params(sink, &format!("{prefix}.temb_proj"), self.temb_ch, self.temb_out());
        group_norm_params(sink, &format!("{prefix}.norm2"), self.c_out);
        conv_params(sink, &format!("{prefix}.conv2"), self.c_out, self.c_out, 3, Init::Zero);
        if self.c_in != self.c_out {
            conv_params(sink, &format!("{prefix}.nin_shortcut"), self.c_in, self.c_out, 1, Init::Default);
        }
    }

    /// Runs the block on x `[N, C_in, H, W]` with the embedding temb `[N, temb_ch]`.
    /// `dropout` is `Some((p, draws))` in training.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        p: &Bound,
        prefix: &str,
        x: &Var,
        temb: &Var,
        max_groups: usize,
        eps: f32,
        dropout: Option<(f32, &mut DropoutDraws)>,
    ) -> Var {
        let (gi, go) = (groups_for(self.c_in, max_groups), groups_for(self.c_out, max_groups));
        let resample = |v: &Var| match self.resampling {
            Resampling::None => v.clone(),
            Resampling::Down => v.avg_pool2x(),
            Resampling::Up => v.upsample_nearest2x(),
        };
        let h = resample(&group_norm_silu(p, &format!("{prefix}.norm1"), x, gi, eps));
        let x = resample(x);
        let t = linear(p, &format!("{prefix}.temb_proj"), &temb.silu());
        let mut h = match self.conditioning {
            TimeConditioning::Add => {
                // conv1 with the timestep's projection [N, C_out] added per channel, in one op.
                let h = conv_plus(p, &format!("{prefix}.conv1"), &h, Some(&t), None, 1, Padding::same(1));
                group_norm_silu(p, &format!("{prefix}.norm2"), &h, go, eps)
            }
            TimeConditioning::ScaleShift => {
                let h = conv(p, &format!("{prefix}.conv1"), &h, 1, Padding::same(1));
                let h = group_norm(p, &format!("{prefix}.norm2"), &h, go, eps);
                let (scale, shift) = (t.slice(1, 0, self.c_out), t.slice(1, self.c_out, 2 * self.c_out));
                h.scale_shift_per_channel(&scale, &shift).silu()
            }
        };
        if let Some((rate, draws)) = dropout {
            h = draws.apply(&h, rate);
        }
        let skip = if self.c_in != self.c_out {
            conv(p, &format!("{prefix}.nin_shortcut"), &x, 1, Padding::zero())
        } else {
            x
        };
        // conv2 with the skip connection added, in one op.
        conv_plus(p, &format!("{prefix}.conv2"), &h, None, Some(&skip), 1, Padding::same(1))
    }
}
