//! The U-Net of Ho et al. 2020 (Appendix B), parameter for parameter: the original TF code's
//! architecture under the names of its common PyTorch port (`down.{i}.block.{j}.conv1.weight`,
//! `mid.attn_1.q.bias`, …), the names ../shared/bench/peer and checkpoints use.
//!
//! ```text
//! temb = dense.1(SiLU(dense.0(sinusoid(t, ch))))            4·ch wide
//! hs = [conv_in(x)]
//! for level i (width ch·ch_mult[i]):  num_res_blocks × (ResBlock, + Attn at attn resolutions)
//!                                     then Downsample (stride-2 conv) except at the last level
//! mid: ResBlock, Attn, ResBlock
//! for level i reversed: (num_res_blocks + 1) × ResBlock(concat[h, hs.pop()]) (+ Attn)
//!                       then Upsample (nearest ×2 + conv) except at level 0
//! out = conv_out(SiLU(norm_out(h)))                          starts at ~zero
//! ```

use serde::{Deserialize, Serialize};

use super::attention::{attention, attention_params};
use super::embedding::{timestep_embedding, EmbeddingOrder};
use super::layers::{
    conv, conv_params, group_norm_params, group_norm_silu, linear, linear_params, Init, Initialise,
    ParamInit, ParamSink,
};
use super::resblock::{groups_for, ResBlockSpec, Resampling};
use super::{Bound, ParamStore};
use crate::ops::{DropoutDraws, Padding};
use crate::{Error, Result, Rng, Var};

/// How the stride-2 downsampling conv pads its input.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DownsamplePadding {
    /// TensorFlow "SAME" for even sizes: 0 rows/columns before, 1 after (Ho et al.'s code, the
    /// peer model, diffusers' `downsample_padding=0`).
    TfSame,
    /// 1 on every side (PyTorch-style `padding=1`, diffusers' `downsample_padding=1`,
    /// improved-diffusion). Same output size for even inputs, different numbers.
    Symmetric,
}

impl DownsamplePadding {
    fn padding(self) -> Padding {
        match self {
            DownsamplePadding::TfSame => Padding { top: 0, bottom: 1, left: 0, right: 1 },
            DownsamplePadding::Symmetric => Padding::same(1),
        }
    }
}

/// How an attention block splits its channels into heads (the channels of head h are
/// `h·d .. (h+1)·d`, `d` the head width, in every family).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AttnHeads {
    /// A fixed number of heads (improved-diffusion's `num_heads`); 1 is Ho et al.'s attention.
    Count(usize),
    /// Heads of a fixed width, as many as the block's channels allow (guided-diffusion's
    /// `num_head_channels`, diffusers' `attention_head_dim`).
    Width(usize),
}

impl Default for AttnHeads {
    fn default() -> Self {
        AttnHeads::Count(1)
    }
}

impl AttnHeads {
    /// The number of heads for a block of `c` channels, if they divide it.
    pub fn heads_for(self, c: usize) -> Option<usize> {
        match self {
            AttnHeads::Count(h) if h > 0 && c.is_multiple_of(h) => Some(h),
            AttnHeads::Width(d) if d > 0 && c.is_multiple_of(d) && c >= d => Some(c / d),
            _ => None,
        }
    }
}

/// How a residual block takes in the timestep embedding.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TimeConditioning {
    /// `h = conv1(…) + temb_proj(SiLU(temb))` (Ho et al.).
    #[default]
    Add,
    /// `[s, b] = temb_proj(SiLU(temb))` (2·C wide), `h = norm2(h)·(1 + s) + b` before the
    /// second SiLU (improved-diffusion's `use_scale_shift_norm`, diffusers' `scale_shift`).
    ScaleShift,
}

/// How the U-Net changes resolution between levels.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Resample {
    /// Down: a stride-2 3x3 conv; up: nearest 2x, then a 3x3 conv (Ho et al.).
    #[default]
    Conv,
    /// A residual block that average-pools (down) or nearest-upsamples (up) both its branch
    /// after the first SiLU and its shortcut (guided-diffusion's `resblock_updown`, diffusers'
    /// `downsample_type`/`upsample_type = "resnet"`).
    ResBlock,
}

/// The group norm in front of the middle block's attention.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AttnNorm {
    /// `min(gn_groups, C)` groups, like every other norm.
    #[default]
    Inherit,
    /// This many groups (diffusers' `attn_norm_num_groups`).
    Groups(usize),
    /// No norm (diffusers' mid block with `scale_shift` and no `attn_norm_num_groups`).
    Off,
}

/// Every architectural choice of the U-Net.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UNetConfig {
    /// Image channels in (1 for MNIST, 3 for RGB).
    pub in_channels: usize,
    /// Channels out: `in_channels`, or `2·in_channels` when the variance is learned.
    pub out_channels: usize,
    /// Input height = width.
    pub resolution: usize,
    /// Base width `ch`.
    pub ch: usize,
    /// Width multiplier per level; one level per entry.
    pub ch_mult: Vec<usize>,
    /// Residual blocks per level on the way down (one more on the way up).
    pub num_res_blocks: usize,
    /// Feature-map sizes at which attention follows each residual block.
    pub attn_resolutions: Vec<usize>,
    /// Dropout rate inside the residual blocks during training.
    pub dropout: f32,
    /// Group norm uses `min(gn_groups, C)` groups.
    pub gn_groups: usize,
    /// Group norm epsilon (1e-6 in the original code; PyTorch's default is 1e-5).
    pub gn_eps: f32,
    /// Downsampling padding convention.
    pub downsample_padding: DownsamplePadding,
    /// Sinusoid order of the timestep embedding.
    pub embedding_order: EmbeddingOrder,
    /// `freq_shift` of the timestep embedding (1 in Ho et al.'s code).
    pub embedding_freq_shift: f64,
    /// Heads of the attention blocks on the way down and in the middle.
    #[serde(default)]
    pub attn_heads: AttnHeads,
    /// Heads of the attention blocks on the way up, if different (improved-diffusion's
    /// `num_heads_upsample`).
    #[serde(default)]
    pub attn_heads_up: Option<AttnHeads>,
    /// How the residual blocks take in the timestep embedding.
    #[serde(default)]
    pub time_conditioning: TimeConditioning,
    /// How the down path halves the resolution.
    #[serde(default)]
    pub downsample: Resample,
    /// How the up path doubles it.
    #[serde(default)]
    pub upsample: Resample,
    /// Whether the middle block has attention between its residual blocks.
    #[serde(default = "yes")]
    pub mid_attention: bool,
    /// The norm in front of the middle block's attention.
    #[serde(default)]
    pub mid_attn_norm: AttnNorm,
    /// Class conditioning: a table of `num_classes` embeddings added to the timestep embedding
    /// (improved-diffusion's `class_cond`, diffusers' `num_class_embeds`).
    #[serde(default)]
    pub num_classes: Option<usize>,
}

fn yes() -> bool {
    true
}

/// The named architectures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Preset {
    /// `mnist-small` of ../shared/bench/peer: ch 32, ch_mult (1,2,2), one block per level,
    /// attention at 14x14, 1,112,801 parameters at 1x28x28.
    Mnist,
    /// The paper's CIFAR-10 model: ch 128, ch_mult (1,2,2,2), two blocks per level, attention
    /// at 16x16, 35,746,307 parameters at 3x32x32.
    Cifar10,
    /// A small network for tests: ch 32, ch_mult (1,2), one block, attention at 4x4 on 8x8
    /// inputs.
    Tiny,
    /// The demo's network, for short CPU runs: the `mnist` layout at half the width (ch 16,
    /// ch_mult (1,2,2), one block per level), attention only in the middle block, 16 groups, no
    /// dropout; 267,313 parameters at 1x28x28, a quarter of `mnist`'s FLOPs.
    Small,
}

impl Preset {
    /// The preset's configuration for images of `channels` x `resolution` x `resolution`.
    pub fn config(self, channels: usize, resolution: usize) -> UNetConfig {
        let base = |ch, ch_mult: &[usize], nrb, attn: &[usize], dropout| UNetConfig {
            in_channels: channels,
            out_channels: channels,
            resolution,
            ch,
            ch_mult: ch_mult.to_vec(),
            num_res_blocks: nrb,
            attn_resolutions: attn.to_vec(),
            dropout,
            gn_groups: 32,
            gn_eps: 1e-6,
            downsample_padding: DownsamplePadding::TfSame,
            embedding_order: EmbeddingOrder::SinCos,
            embedding_freq_shift: 1.0,
            attn_heads: AttnHeads::Count(1),
            attn_heads_up: None,
            time_conditioning: TimeConditioning::Add,
            downsample: Resample::Conv,
            upsample: Resample::Conv,
            mid_attention: true,
            mid_attn_norm: AttnNorm::Inherit,
            num_classes: None,
        };
        match self {
            Preset::Mnist => base(32, &[1, 2, 2], 1, &[resolution / 2], 0.1),
            Preset::Cifar10 => base(128, &[1, 2, 2, 2], 2, &[resolution / 2], 0.1),
            Preset::Tiny => base(32, &[1, 2], 1, &[resolution / 2], 0.0),
            Preset::Small => UNetConfig { gn_groups: 16, ..base(16, &[1, 2, 2], 1, &[], 0.0) },
        }
    }
}

impl UNetConfig {
    /// Width of the timestep embedding MLP: 4·ch.
    pub fn temb_ch(&self) -> usize {
        4 * self.ch
    }

    /// Checks that the shapes work out: at least one level, a resolution divisible by
    /// 2^(levels−1), and group counts that divide every width.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] naming the offending field.
    pub fn validate(&self) -> Result<()> {
        let bad = |reason: String| Err(Error::config("U-Net", reason));
        if self.ch_mult.is_empty() || self.ch_mult.len() > Self::MAX_LEVELS {
            return bad(format!("ch_mult has {} levels; use 1..={}", self.ch_mult.len(), Self::MAX_LEVELS));
        }
        for (what, v) in [
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels),
            ("ch (base width)", self.ch),
            ("gn_groups (group-norm groups)", self.gn_groups),
        ] {
            if v == 0 {
                return bad(format!("{what} is 0; it must be at least 1"));
            }
        }
        if let Some(m) = self.ch_mult.iter().find(|&&m| m == 0) {
            return bad(format!("ch_mult {:?} holds {m}; every multiplier must be at least 1", self.ch_mult));
        }
        if self.num_res_blocks > Self::MAX_RES_BLOCKS {
            return bad(format!("num_res_blocks {} is above {}", self.num_res_blocks, Self::MAX_RES_BLOCKS));
        }
        let widest = self
            .ch_mult
            .iter()
            .map(|&m| self.ch.checked_mul(m))
            .try_fold(self.ch, |a, w| w.map(|w| a.max(w)));
        let widths_ok = widest.is_some_and(|w| w.saturating_mul(2) <= Self::MAX_WIDTH)
            && self.ch.saturating_mul(4) <= Self::MAX_WIDTH
            && self.in_channels <= Self::MAX_WIDTH
            && self.out_channels <= Self::MAX_WIDTH;
        if !widths_ok {
            return bad(format!(
                "widths ch {} x ch_mult {:?} (or {} / {} image channels) exceed {}",
                self.ch,
                self.ch_mult,
                self.in_channels,
                self.out_channels,
                Self::MAX_WIDTH
            ));
        }
        let down = 1usize << (self.ch_mult.len() - 1);
        if self.resolution == 0
            || self.resolution > Self::MAX_RESOLUTION
            || !self.resolution.is_multiple_of(down)
        {
            return bad(format!(
                "resolution {} must be a multiple of {down} (for {} levels) in 1..={}",
                self.resolution,
                self.ch_mult.len(),
                Self::MAX_RESOLUTION
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return bad(format!("dropout {} is not in [0, 1)", self.dropout));
        }
        if !(self.gn_eps.is_finite() && self.gn_eps > 0.0) {
            return bad(format!("group-norm epsilon {} must be a finite number above 0", self.gn_eps));
        }
        if !self.embedding_freq_shift.is_finite() {
            return bad(format!("embedding_freq_shift {} is not finite", self.embedding_freq_shift));
        }
        // The timestep embedding has ch sinusoids: at least one sin/cos pair, and a frequency
        // denominator ch/2 − freq_shift that is not zero.
        if self.ch < 2 || (self.ch / 2) as f64 == self.embedding_freq_shift {
            return bad(format!(
                "ch {} gives a timestep embedding of {} sin/cos pairs with frequency shift {}; \
                 use ch ≥ 2 with ch/2 ≠ the shift",
                self.ch,
                self.ch / 2,
                self.embedding_freq_shift
            ));
        }
        let mut level_res = vec![self.resolution];
        for _ in 1..self.ch_mult.len() {
            level_res.push(level_res[level_res.len() - 1] / 2);
        }
        if let Some(r) = self.attn_resolutions.iter().find(|r| !level_res.contains(r)) {
            return bad(format!(
                "attention at resolution {r}, which no level has (the levels run at {level_res:?})"
            ));
        }
        let mut widths = vec![self.ch];
        widths.extend(self.ch_mult.iter().map(|m| m * self.ch));
        for (c_in, _) in self.up_blocks() {
            widths.push(c_in);
        }
        for c in widths {
            if c % groups_for(c, self.gn_groups) != 0 {
                return bad(format!("{} groups do not divide {c} channels", groups_for(c, self.gn_groups)));
            }
        }
        for (c, up) in self.attention_blocks() {
            let heads = if up { self.attn_heads_up.unwrap_or(self.attn_heads) } else { self.attn_heads };
            if heads.heads_for(c).is_none() {
                return bad(format!(
                    "attention heads ({heads:?}) do not divide the {c} channels of an attention block"
                ));
            }
        }
        if let (true, AttnNorm::Groups(g)) = (self.mid_attention, self.mid_attn_norm) {
            let c = self.mid_width();
            if g == 0 || !c.is_multiple_of(g) {
                return bad(format!(
                    "mid_attn_norm: {g} groups do not divide the middle block's {c} channels"
                ));
            }
        }
        if let Some(k) = self.num_classes {
            if k == 0 || k > Self::MAX_CLASSES {
                return bad(format!("num_classes {k} is not in 1..={}", Self::MAX_CLASSES));
            }
        }
        if self.num_params() > Self::MAX_PARAMS {
            return bad(format!(
                "{} parameters, more than the {} supported",
                self.num_params(),
                Self::MAX_PARAMS
            ));
        }
        Ok(())
    }

    /// Checks that `class` fits the network: given (and below `num_classes`) exactly when it is
    /// class-conditional.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] saying which, with the range of classes.
    pub fn check_class(&self, class: Option<usize>) -> Result<()> {
        match (self.num_classes, class) {
            (None, None) => Ok(()),
            (Some(k), Some(c)) if c < k => Ok(()),
            (Some(k), Some(c)) => Err(Error::config(
                "class (--class)",
                format!("{c} is not a class of this model, which has {k} (0..={})", k - 1),
            )),
            (Some(k), None) => Err(Error::config(
                "class (--class)",
                format!(
                    "none given, and the model is class-conditional: give one of its {k} classes, 0..={}",
                    k - 1
                ),
            )),
            (None, Some(c)) => Err(Error::config(
                "class (--class)",
                format!("{c} given, but the model is unconditional: leave --class out"),
            )),
        }
    }

    /// The most classes of a class-conditional model (ImageNet-21k has 21,841).
    pub const MAX_CLASSES: usize = 1 << 20;
    /// The most levels (entries of `ch_mult`).
    pub const MAX_LEVELS: usize = 16;
    /// The most residual blocks per level.
    pub const MAX_RES_BLOCKS: usize = 64;
    /// The widest layer (channels), counting the concatenated skip connections.
    pub const MAX_WIDTH: usize = 1 << 16;
    /// The largest input side.
    pub const MAX_RESOLUTION: usize = 4096;
    /// The most parameters (2^30, about a billion: 4 GiB per copy of the weights; the paper's
    /// largest model has 114 million).
    pub const MAX_PARAMS: u64 = 1 << 30;

    /// The number of parameters [`UNet::init_params`] creates, from [`UNet::param_shapes`]
    /// (saturating instead of overflowing), so a configuration can be refused before anything
    /// is allocated. Needs the level and block counts within their limits (checked first by
    /// [`UNetConfig::validate`]).
    pub fn num_params(&self) -> u64 {
        UNet { config: self.clone() }
            .param_shapes()
            .iter()
            .map(|(_, shape)| shape.iter().fold(1u64, |n, &d| n.saturating_mul(d as u64)))
            .fold(0u64, u64::saturating_add)
    }

    /// Widths of the skip connections pushed on the way down, in push order. Without residual
    /// blocks on the way down (`num_res_blocks` 0, as improved-diffusion allows) the width
    /// stays `ch` all the way to the middle.
    fn skip_widths(&self) -> Vec<usize> {
        let mut hs = vec![self.ch];
        let mut w = self.ch;
        for (i, m) in self.ch_mult.iter().enumerate() {
            for _ in 0..self.num_res_blocks {
                w = self.ch * m;
                hs.push(w);
            }
            if i + 1 != self.ch_mult.len() {
                hs.push(w);
            }
        }
        hs
    }

    /// The width of the middle block.
    pub fn mid_width(&self) -> usize {
        if self.num_res_blocks == 0 {
            self.ch
        } else {
            self.ch * self.ch_mult.last().copied().unwrap_or(1)
        }
    }

    /// (input, output) channels of every up-path block, in the order they run.
    fn up_blocks(&self) -> Vec<(usize, usize)> {
        let mut hs = self.skip_widths();
        let mut block_in = self.mid_width();
        let mut out = vec![];
        for m in self.ch_mult.iter().rev() {
            for _ in 0..=self.num_res_blocks {
                // Cannot fail: skip_widths pushes ch_mult.len()·(num_res_blocks + 1) widths, one
                // per iteration of these loops.
                let skip = hs.pop().expect("one skip per up block");
                out.push((block_in + skip, self.ch * m));
                block_in = self.ch * m;
            }
        }
        out
    }
}

impl UNetConfig {
    /// The channels of every attention block and whether it is on the way up, in the order
    /// they run (the middle block's counts as down).
    fn attention_blocks(&self) -> Vec<(usize, bool)> {
        let mut out = vec![];
        let mut res = self.resolution;
        for (i, m) in self.ch_mult.iter().enumerate() {
            if self.attn_resolutions.contains(&res) {
                out.extend(std::iter::repeat_n((self.ch * m, false), self.num_res_blocks));
            }
            if i + 1 != self.ch_mult.len() {
                res /= 2;
            }
        }
        if self.mid_attention {
            out.push((self.mid_width(), false));
        }
        for (i, m) in self.ch_mult.iter().enumerate().rev() {
            if self.attn_resolutions.contains(&res) {
                out.extend(std::iter::repeat_n((self.ch * m, true), self.num_res_blocks + 1));
            }
            if i != 0 {
                res *= 2;
            }
        }
        out
    }

    /// Heads of an attention block of `c` channels, on the way up or not (validated to divide
    /// `c`).
    pub fn heads_at(&self, c: usize, up: bool) -> usize {
        self.heads(c, up)
    }

    fn heads(&self, c: usize, up: bool) -> usize {
        let heads = if up { self.attn_heads_up.unwrap_or(self.attn_heads) } else { self.attn_heads };
        heads.heads_for(c).unwrap_or(1)
    }

    /// The group count of the middle block's attention norm, or `None` without one.
    fn mid_attn_groups(&self, c: usize) -> Option<usize> {
        match self.mid_attn_norm {
            AttnNorm::Inherit => Some(groups_for(c, self.gn_groups)),
            AttnNorm::Groups(g) => Some(g),
            AttnNorm::Off => None,
        }
    }

    /// A residual block of this configuration.
    fn res_block(&self, c_in: usize, c_out: usize, resampling: Resampling) -> ResBlockSpec {
        ResBlockSpec {
            c_in,
            c_out,
            temb_ch: self.temb_ch(),
            conditioning: self.time_conditioning,
            resampling,
        }
    }
}

impl UNetConfig {
    /// Multiply-add FLOPs (2 per multiply-add) of one forward pass for one image, counting the
    /// convolutions, linear layers and attention matrix products: the quantity PyTorch's
    /// `torch.utils.flop_counter` reports (elementwise ops and norms are not counted).
    pub fn forward_flops_per_image(&self) -> u64 {
        let conv =
            |cin: usize, cout: usize, k: usize, res: usize| (2 * cin * cout * k * k * res * res) as u64;
        let attn = |c: usize, res: usize| {
            let hw = res * res;
            4 * conv(c, c, 1, res) + (2 * 2 * hw * hw * c) as u64
        };
        // A residual block whose convolutions run at `res` (after any resampling).
        let res_block = |cin: usize, cout: usize, res: usize| {
            let temb_out = self.res_block(cin, cout, Resampling::None).temb_out();
            let mut f =
                conv(cin, cout, 3, res) + conv(cout, cout, 3, res) + (2 * self.temb_ch() * temb_out) as u64;
            if cin != cout {
                f += conv(cin, cout, 1, res);
            }
            f
        };
        let resample = |c: usize, res: usize, kind: Resample| match kind {
            Resample::Conv => conv(c, c, 3, res),
            Resample::ResBlock => res_block(c, c, res),
        };
        let temb = self.temb_ch();
        let mut f = (2 * self.ch * temb + 2 * temb * temb) as u64
            + conv(self.in_channels, self.ch, 3, self.resolution);
        let mut res = self.resolution;
        let mut block_in = self.ch;
        for (i, m) in self.ch_mult.iter().enumerate() {
            for _ in 0..self.num_res_blocks {
                f += res_block(block_in, self.ch * m, res);
                block_in = self.ch * m;
                if self.attn_resolutions.contains(&res) {
                    f += attn(block_in, res);
                }
            }
            if i + 1 != self.ch_mult.len() {
                res /= 2;
                f += resample(block_in, res, self.downsample);
            }
        }
        f += 2 * res_block(block_in, block_in, res);
        if self.mid_attention {
            f += attn(block_in, res);
        }
        let mut up = self.up_blocks().into_iter();
        for (i, m) in self.ch_mult.iter().enumerate().rev() {
            for _ in 0..=self.num_res_blocks {
                let (cin, cout) = up.next().expect("up_blocks yields one entry per iteration of these loops");
                f += res_block(cin, cout, res);
                if self.attn_resolutions.contains(&res) {
                    f += attn(cout, res);
                }
            }
            if i != 0 {
                res *= 2;
                f += resample(self.ch * m, res, self.upsample);
            }
        }
        f + conv(self.ch * self.ch_mult[0], self.out_channels, 3, self.resolution)
    }

    /// FLOPs of one training step's forward and backward for one image: three times the
    /// forward (each product's backward costs two), less the input gradient of `conv_in`, which
    /// is not needed. Matches `torch.utils.flop_counter` on the reference model.
    pub fn train_flops_per_image(&self) -> u64 {
        3 * self.forward_flops_per_image()
            - (2 * self.in_channels * self.ch * 9 * self.resolution * self.resolution) as u64
    }
}

/// The U-Net: a configuration; its weights live in a [`ParamStore`].
#[derive(Clone, Debug)]
pub struct UNet {
    /// The architecture.
    pub config: UNetConfig,
}

impl UNet {
    /// A U-Net for a validated configuration.
    ///
    /// # Errors
    /// As [`UNetConfig::validate`].
    pub fn new(config: UNetConfig) -> Result<Self> {
        config.validate()?;
        Ok(Self { config })
    }

    /// Creates every parameter with the DDPM initialisation, in the reference model's order.
    pub fn init_params(&self, rng: &mut Rng) -> ParamStore {
        let mut init = Initialise { store: ParamStore::new(), rng };
        self.declare_params(&mut init);
        init.store
    }

    /// Every parameter's name and shape, in [`UNet::init_params`]' order, without allocating
    /// any weight.
    pub fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let mut shapes = Vec::new();
        self.declare_params(&mut shapes);
        shapes
    }

    /// Declares every parameter to `s`, in the reference model's order (which is also the
    /// order the initialisation draws from the RNG).
    fn declare_params(&self, s: &mut dyn ParamSink) {
        let c = &self.config;
        let temb_ch = c.temb_ch();
        linear_params(s, "temb.dense.0", c.ch, temb_ch);
        linear_params(s, "temb.dense.1", temb_ch, temb_ch);
        if let Some(k) = c.num_classes {
            s.declare("label_emb.weight".into(), &[k, temb_ch], ParamInit::StandardNormal);
        }
        conv_params(s, "conv_in", c.in_channels, c.ch, 3, Init::Default);
        let mut res = c.resolution;
        let mut block_in = c.ch;
        for (i, m) in c.ch_mult.iter().enumerate() {
            let block_out = c.ch * m;
            for j in 0..c.num_res_blocks {
                c.res_block(block_in, block_out, Resampling::None).params(s, &format!("down.{i}.block.{j}"));
                block_in = block_out;
                if c.attn_resolutions.contains(&res) {
                    attention_params(s, &format!("down.{i}.attn.{j}"), block_in, true);
                }
            }
            if i + 1 != c.ch_mult.len() {
                match c.downsample {
                    Resample::Conv => conv_params(
                        s,
                        &format!("down.{i}.downsample.conv"),
                        block_in,
                        block_in,
                        3,
                        Init::Default,
                    ),
                    Resample::ResBlock => c
                        .res_block(block_in, block_in, Resampling::Down)
                        .params(s, &format!("down.{i}.downsample")),
                }
                res /= 2;
            }
        }
        let mid = c.res_block(block_in, block_in, Resampling::None);
        mid.params(s, "mid.block_1");
        if c.mid_attention {
            attention_params(s, "mid.attn_1", block_in, c.mid_attn_groups(block_in).is_some());
        }
        mid.params(s, "mid.block_2");
        let mut up = c.up_blocks().into_iter();
        for (i, m) in c.ch_mult.iter().enumerate().rev() {
            for j in 0..=c.num_res_blocks {
                let (c_in, c_out) =
                    up.next().expect("up_blocks yields one entry per iteration of these loops");
                c.res_block(c_in, c_out, Resampling::None).params(s, &format!("up.{i}.block.{j}"));
                if c.attn_resolutions.contains(&res) {
                    attention_params(s, &format!("up.{i}.attn.{j}"), c_out, true);
                }
            }
            if i != 0 {
                let w = c.ch * m;
                match c.upsample {
                    Resample::Conv => {
                        conv_params(s, &format!("up.{i}.upsample.conv"), w, w, 3, Init::Default)
                    }
                    Resample::ResBlock => {
                        c.res_block(w, w, Resampling::Up).params(s, &format!("up.{i}.upsample"))
                    }
                }
                res *= 2;
            }
        }
        group_norm_params(s, "norm_out", c.ch * c.ch_mult[0]);
        conv_params(s, "conv_out", c.ch * c.ch_mult[0], c.out_channels, 3, Init::Zero);
    }

    /// The network's output for x `[N, C_in, R, R]` at timesteps `t` (one per image, fed as-is),
    /// `[N, C_out, R, R]`, for an unconditional model. `dropout_rng` is `Some` in training
    /// (dropout active) and `None` for evaluation and sampling.
    ///
    /// # Panics
    /// If x's shape does not match the configuration, `t.len()` differs from N, or the model is
    /// class-conditional (use [`UNet::forward_labelled`]).
    pub fn forward(&self, p: &Bound, x: &Var, t: &[f32], dropout_rng: Option<&mut Rng>) -> Var {
        self.forward_labelled(p, x, t, None, dropout_rng.map(DropoutDraws::Sequential))
    }

    /// [`UNet::forward`] with one class label per image for a class-conditional model (its
    /// embedding is added to the timestep embedding), `None` for an unconditional one.
    ///
    /// # Panics
    /// As [`UNet::forward`]; also if labels are given to an unconditional model, missing for a
    /// conditional one, not one per image, or not below `num_classes`.
    pub fn forward_labelled(
        &self,
        p: &Bound,
        x: &Var,
        t: &[f32],
        labels: Option<&[usize]>,
        mut dropout: Option<DropoutDraws>,
    ) -> Var {
        let c = &self.config;
        let s = x.shape();
        assert!(
            s.len() == 4 && s[1] == c.in_channels && s[2] == c.resolution && s[3] == c.resolution,
            "U-Net: input {s:?} does not match [N, {}, {}, {}]",
            c.in_channels,
            c.resolution,
            c.resolution
        );
        assert_eq!(t.len(), s[0], "U-Net: {} timesteps for a batch of {}", t.len(), s[0]);
        let (g, eps) = (c.gn_groups, c.gn_eps);
        let emb = Var::constant(timestep_embedding(t, c.ch, c.embedding_order, c.embedding_freq_shift));
        let mut temb = linear(p, "temb.dense.1", &linear(p, "temb.dense.0", &emb).silu());
        match (c.num_classes, labels) {
            (None, None) => {}
            (Some(k), Some(y)) => {
                assert_eq!(y.len(), s[0], "U-Net: {} labels for a batch of {}", y.len(), s[0]);
                // The table's rows picked by a one-hot product (whose gradient is the scatter).
                let mut one_hot = crate::Tensor::zeros(vec![y.len(), k]);
                for (n, &label) in y.iter().enumerate() {
                    assert!(label < k, "U-Net: class label {label} of a {k}-class model");
                    one_hot[[n, label]] = 1.0;
                }
                temb = temb.add(&Var::constant(one_hot).matmul(p.get("label_emb.weight")));
            }
            (None, Some(_)) => panic!("U-Net: class labels given to an unconditional model"),
            (Some(k), None) => {
                panic!("U-Net: the model is conditioned on {k} classes and needs a label per image")
            }
        }

        let mut res_block = |spec: ResBlockSpec, prefix: &str, h: &Var| -> Var {
            let drop = match dropout.as_mut() {
                Some(draws) if c.dropout > 0.0 => Some((c.dropout, draws)),
                _ => None,
            };
            spec.forward(p, prefix, h, &temb, g, eps, drop)
        };

        let mut hs = vec![conv(p, "conv_in", x, 1, Padding::same(1))];
        let mut res = c.resolution;
        let mut block_in = c.ch;
        for (i, m) in c.ch_mult.iter().enumerate() {
            for j in 0..c.num_res_blocks {
                let spec = c.res_block(block_in, c.ch * m, Resampling::None);
                let last = hs.last().expect("hs starts with conv_in's output and only grows here");
                let mut h = res_block(spec, &format!("down.{i}.block.{j}"), last);
                block_in = c.ch * m;
                if c.attn_resolutions.contains(&res) {
                    let groups = Some(groups_for(block_in, g));
                    h = attention(
                        p,
                        &format!("down.{i}.attn.{j}"),
                        &h,
                        groups,
                        eps,
                        c.heads(block_in, false),
                    );
                }
                hs.push(h);
            }
            if i + 1 != c.ch_mult.len() {
                let last = hs.last().expect("hs starts with conv_in's output and only grows here");
                let d = match c.downsample {
                    Resample::Conv => {
                        conv(p, &format!("down.{i}.downsample.conv"), last, 2, c.downsample_padding.padding())
                    }
                    Resample::ResBlock => {
                        let spec = c.res_block(block_in, block_in, Resampling::Down);
                        res_block(spec, &format!("down.{i}.downsample"), last)
                    }
                };
                hs.push(d);
                res /= 2;
            }
        }
        let mid = c.res_block(block_in, block_in, Resampling::None);
        let mut h =
            res_block(mid, "mid.block_1", hs.last().expect("hs starts with conv_in's output and only grew"));
        if c.mid_attention {
            h = attention(p, "mid.attn_1", &h, c.mid_attn_groups(block_in), eps, c.heads(block_in, false));
        }
        h = res_block(mid, "mid.block_2", &h);
        let mut up = c.up_blocks().into_iter();
        for (i, _) in c.ch_mult.iter().enumerate().rev() {
            for j in 0..=c.num_res_blocks {
                // Cannot fail: up_blocks, like the down path's pushes onto hs (see skip_widths),
                // has ch_mult.len()·(num_res_blocks + 1) entries, one per iteration of these loops.
                let (c_in, c_out) = up.next().expect("one up_blocks entry per iteration");
                let skip = hs.pop().expect("one skip per up block");
                let cat = Var::concat(&[&h, &skip], 1);
                h = res_block(c.res_block(c_in, c_out, Resampling::None), &format!("up.{i}.block.{j}"), &cat);
                if c.attn_resolutions.contains(&res) {
                    let groups = Some(groups_for(c_out, g));
                    h = attention(p, &format!("up.{i}.attn.{j}"), &h, groups, eps, c.heads(c_out, true));
                }
            }
            if i != 0 {
                match c.upsample {
                    Resample::Conv => {
                        let prefix = format!("up.{i}.upsample.conv");
                        let (w, b) = (p.get(&format!("{prefix}.weight")), p.get(&format!("{prefix}.bias")));
                        h = h.upsample2x_conv3x3(w, Some(b));
                    }
                    Resample::ResBlock => {
                        let w = h.shape()[1];
                        h = res_block(c.res_block(w, w, Resampling::Up), &format!("up.{i}.upsample"), &h);
                    }
                }
                res *= 2;
            }
        }
        let c0 = c.ch * c.ch_mult[0];
        let h = group_norm_silu(p, "norm_out", &h, groups_for(c0, g), eps);
        conv(p, "conv_out", &h, 1, Padding::same(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng_from_seed;

    fn count(preset: Preset, channels: usize, res: usize) -> usize {
        UNet::new(preset.config(channels, res)).unwrap().init_params(&mut rng_from_seed(0)).num_scalars()
    }

    #[test]
    fn presets_have_the_reference_parameter_counts() {
        // Counts of ../shared/bench/peer/README.md (PyTorch's DDPMUNet).
        assert_eq!(count(Preset::Mnist, 1, 28), 1_112_801);
        assert_eq!(count(Preset::Cifar10, 3, 32), 35_746_307);
        assert_eq!(count(Preset::Small, 1, 28), 267_313);
    }

    #[test]
    fn every_preset_maps_images_to_images() {
        for (preset, ch, res) in [
            (Preset::Tiny, 1, 8),
            (Preset::Tiny, 3, 16),
            (Preset::Mnist, 1, 28),
            (Preset::Small, 1, 28),
            (Preset::Small, 3, 32),
            (Preset::Cifar10, 3, 32),
        ] {
            let net = UNet::new(preset.config(ch, res)).unwrap();
            let params = net.init_params(&mut rng_from_seed(1));
            let x = Var::constant(crate::Tensor::zeros(vec![2, ch, res, res]));
            let y = net.forward(&params.bind_constant(), &x, &[0.0, 999.0], None);
            assert_eq!(y.shape(), &[2, ch, res, res], "{preset:?}");
        }
    }

    #[test]
    fn flop_counts_match_pytorchs_flop_counter() {
        // fwd_flops_per_image of ../shared/bench/peer/results/20261128.jsonl
        // (torch.utils.flop_counter on DDPMUNet).
        assert_eq!(Preset::Mnist.config(1, 28).forward_flops_per_image(), 422_189_312);
        assert_eq!(Preset::Cifar10.config(3, 32).forward_flops_per_image(), 12_443_713_536);
    }

    #[test]
    fn invalid_configs_are_refused() {
        let mut c = Preset::Mnist.config(1, 30);
        assert!(UNet::new(c.clone()).is_err(), "30 is not divisible by 4");
        c.resolution = 28;
        c.ch = 24;
        c.gn_groups = 7;
        assert!(UNet::new(c).is_err(), "7 groups do not divide 24");
    }

    #[test]
    fn num_params_counts_exactly_what_init_params_creates() {
        use proptest::prelude::*;
        for (preset, ch, res) in [(Preset::Mnist, 1, 28), (Preset::Cifar10, 3, 32), (Preset::Small, 1, 28)] {
            let c = preset.config(ch, res);
            assert_eq!(c.num_params() as usize, count(preset, ch, res), "{preset:?}");
        }
        let config = (
            1usize..4,
            1usize..4,
            prop::collection::vec(1usize..4, 1..4),
            0usize..3,
            any::<bool>(),
            1usize..3,
        )
            .prop_map(|(cin, ch8, mult, nrb, attn, out_mul)| {
                let mut c = Preset::Tiny.config(cin, 16);
                c.out_channels = cin * out_mul;
                c.ch = 8 * ch8;
                c.gn_groups = 8;
                c.resolution = 8 << mult.len();
                c.ch_mult = mult;
                c.num_res_blocks = nrb;
                c.attn_resolutions = match (attn, c.ch_mult.len()) {
                    (false, _) => vec![],
                    (true, 1) => vec![c.resolution],
                    (true, _) => vec![c.resolution / 2, c.resolution],
                };
                c
            });
        proptest!(ProptestConfig::with_cases(24), |(c in config)| {
            let n = UNet::new(c.clone()).unwrap().init_params(&mut rng_from_seed(0)).num_scalars();
            prop_assert_eq!(c.num_params() as usize, n);
        });
    }

    #[test]
    fn zero_huge_and_non_finite_fields_are_refused_without_panicking() {
        let base = Preset::Tiny.config(1, 8);
        type Edit = Box<dyn Fn(&mut UNetConfig)>;
        let cases: Vec<(&str, Edit)> = vec![
            ("gn_groups", Box::new(|c| c.gn_groups = 0)),
            ("ch", Box::new(|c| c.ch = 0)),
            ("ch_mult", Box::new(|c| c.ch_mult = vec![1, 0])),
            ("ch_mult", Box::new(|c| c.ch_mult = vec![])),
            ("levels", Box::new(|c| c.ch_mult = vec![1; 70])),
            ("num_res_blocks", Box::new(|c| c.num_res_blocks = usize::MAX)),
            ("in_channels", Box::new(|c| c.in_channels = 0)),
            ("width", Box::new(|c| c.ch = usize::MAX / 2)),
            ("width", Box::new(|c| c.ch_mult = vec![1, usize::MAX])),
            ("resolution", Box::new(|c| c.resolution = 0)),
            ("resolution", Box::new(|c| c.resolution = 1 << 40)),
            ("dropout", Box::new(|c| c.dropout = f32::NAN)),
            ("dropout", Box::new(|c| c.dropout = 1.0)),
            ("epsilon", Box::new(|c| c.gn_eps = 0.0)),
            ("freq_shift", Box::new(|c| c.embedding_freq_shift = f64::INFINITY)),
            (
                "embedding",
                Box::new(|c| {
                    c.ch = 2;
                    c.gn_groups = 1;
                }),
            ),
            ("embedding", Box::new(|c| c.embedding_freq_shift = 16.0)),
            ("attention", Box::new(|c| c.attn_resolutions = vec![3])),
            (
                "parameters",
                Box::new(|c| {
                    c.ch = 4096;
                    c.ch_mult = vec![1, 2, 4, 8];
                    c.resolution = 64;
                }),
            ),
        ];
        for (what, edit) in cases {
            let mut c = base.clone();
            edit(&mut c);
            let e = UNet::new(c).expect_err(what).to_string();
            assert!(e.contains("U-Net"), "{what}: {e}");
        }
    }
}
