//! The U-Net's building layers as functions of a [`Bound`] parameter set and a name prefix:
//! convolution, linear, group norm. Each `*_params` function declares the tensors to a
//! [`ParamSink`] under PyTorch's names (`{prefix}.weight`, `{prefix}.bias`), with the DDPM
//! initialisation.

use rand::Rng as _;

use super::{Bound, ParamStore};
use crate::ops::Padding;
use crate::{Rng, Tensor, Var};

/// DDPM's initialiser: `variance_scaling(scale, mode="fan_avg", distribution="uniform")` of the
/// original TF code, i.e. `U(−a, a)` with `a = √(3·scale / ((fan_in + fan_out)/2))`, where the
/// fans count `channels × kh × kw`. `scale = 1e-10` is the original code's "zero" init of the
/// last conv of each residual branch and of the output conv.
pub fn variance_scaling_uniform(
    shape: &[usize],
    fan_in: usize,
    fan_out: usize,
    scale: f64,
    rng: &mut Rng,
) -> Tensor {
    let limit = (3.0 * scale / ((fan_in + fan_out) as f64 / 2.0)).sqrt() as f32;
    Tensor::from_shape_simple_fn(shape, || rng.random_range(-limit..=limit))
}

/// How a layer's weights start.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    /// Variance scaling with scale 1.
    Default,
    /// Variance scaling with scale 1e-10 (effectively zero): residual branches start as identity.
    Zero,
}

impl Init {
    fn scale(self) -> f64 {
        match self {
            Init::Default => 1.0,
            Init::Zero => 1e-10,
        }
    }
}

/// How one parameter tensor starts.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ParamInit {
    /// [`variance_scaling_uniform`] with these fans and scale (draws from the RNG).
    VarianceScaling {
        /// Fan in (channels × kh × kw).
        fan_in: usize,
        /// Fan out.
        fan_out: usize,
        /// Scale.
        scale: f64,
    },
    /// All zeros (biases, β of a norm).
    Zeros,
    /// All ones (γ of a norm).
    Ones,
    /// Standard normal draws (an embedding table, as PyTorch's `nn.Embedding` starts).
    StandardNormal,
}

/// Receives a network's parameters as they are declared, in order: a name, a shape and how
/// it starts. [`Initialise`] creates the tensors; a `Vec<(String, Vec<usize>)>` only records the
/// shapes, so a configuration can be checked without allocating its weights.
pub trait ParamSink {
    /// Declares one parameter.
    fn declare(&mut self, name: String, shape: &[usize], init: ParamInit);
}

impl ParamSink for Vec<(String, Vec<usize>)> {
    fn declare(&mut self, name: String, shape: &[usize], _init: ParamInit) {
        self.push((name, shape.to_vec()));
    }
}

/// A [`ParamSink`] that creates each tensor with the DDPM initialisation, drawing from `rng` in
/// declaration order.
pub struct Initialise<'a> {
    /// Where the tensors go.
    pub store: ParamStore,
    /// The RNG of the variance-scaling draws.
    pub rng: &'a mut Rng,
}

impl ParamSink for Initialise<'_> {
    fn declare(&mut self, name: String, shape: &[usize], init: ParamInit) {
        let t = match init {
            ParamInit::VarianceScaling { fan_in, fan_out, scale } => {
                variance_scaling_uniform(shape, fan_in, fan_out, scale, self.rng)
            }
            ParamInit::Zeros => Tensor::zeros(shape.to_vec()),
            ParamInit::Ones => Tensor::ones(shape.to_vec()),
            ParamInit::StandardNormal => {
                Tensor::from_shape_simple_fn(shape, || self.rng.sample(rand_distr::StandardNormal))
            }
        };
        self.store.insert(name, t);
    }
}

/// Declares a conv's `weight [C_out, C_in, k, k]` and `bias [C_out]` (bias zero).
pub fn conv_params(sink: &mut dyn ParamSink, prefix: &str, c_in: usize, c_out: usize, k: usize, init: Init) {
    let rf = k * k;
    let weight = ParamInit::VarianceScaling { fan_in: c_in * rf, fan_out: c_out * rf, scale: init.scale() };
    sink.declare(format!("{prefix}.weight"), &[c_out, c_in, k, k], weight);
    sink.declare(format!("{prefix}.bias"), &[c_out], ParamInit::Zeros);
}

/// Declares a linear layer's `weight [out, in]` and `bias [out]` (bias zero).
pub fn linear_params(sink: &mut dyn ParamSink, prefix: &str, d_in: usize, d_out: usize) {
    let weight = ParamInit::VarianceScaling { fan_in: d_in, fan_out: d_out, scale: 1.0 };
    sink.declare(format!("{prefix}.weight"), &[d_out, d_in], weight);
    sink.declare(format!("{prefix}.bias"), &[d_out], ParamInit::Zeros);
}

/// Declares a group norm's `weight` (γ = 1) and `bias` (β = 0), both `[C]`.
pub fn group_norm_params(sink: &mut dyn ParamSink, prefix: &str, c: usize) {
    sink.declare(format!("{prefix}.weight"), &[c], ParamInit::Ones);
    sink.declare(format!("{prefix}.bias"), &[c], ParamInit::Zeros);
}

/// `conv2d` with the parameters `{prefix}.weight`, `{prefix}.bias`.
pub fn conv(p: &Bound, prefix: &str, x: &Var, stride: usize, pad: Padding) -> Var {
    x.conv2d(p.get(&format!("{prefix}.weight")), Some(p.get(&format!("{prefix}.bias"))), stride, pad)
}

/// [`conv`] with, fused into it, a per-image bias `[N, C_out]` and a residual of the output's
/// shape added (see [`Var::conv2d_plus`]).
pub fn conv_plus(
    p: &Bound,
    prefix: &str,
    x: &Var,
    image_bias: Option<&Var>,
    residual: Option<&Var>,
    stride: usize,
    pad: Padding,
) -> Var {
    let (w, b) = (p.get(&format!("{prefix}.weight")), p.get(&format!("{prefix}.bias")));
    x.conv2d_plus(w, Some(b), image_bias, residual, stride, pad)
}

/// `linear` with the parameters `{prefix}.weight`, `{prefix}.bias`.
pub fn linear(p: &Bound, prefix: &str, x: &Var) -> Var {
    x.linear(p.get(&format!("{prefix}.weight")), Some(p.get(&format!("{prefix}.bias"))))
}

/// `group_norm` with the parameters `{prefix}.weight` (γ), `{prefix}.bias` (β).
pub fn group_norm(p: &Bound, prefix: &str, x: &Var, groups: usize, eps: f32) -> Var {
    x.group_norm(p.get(&format!("{prefix}.weight")), p.get(&format!("{prefix}.bias")), groups, eps)
}

/// `SiLU(group_norm(x))` with the parameters `{prefix}.weight` (γ), `{prefix}.bias` (β), fused.
pub fn group_norm_silu(p: &Bound, prefix: &str, x: &Var, groups: usize, eps: f32) -> Var {
    x.group_norm_silu(p.get(&format!("{prefix}.weight")), p.get(&format!("{prefix}.bias")), groups, eps)
}
