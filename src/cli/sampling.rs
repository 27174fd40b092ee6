//! The sampler flags `sample`, `trace` and `demo` share: --sampler, --steps, --spacing, --karras,
//! --eta, --solver-type and Euler's churn.

use anyhow::bail;
use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
use clap::{Args, ValueEnum};
use ddpm::diffusion::samplers::{Churn, SamplerKind, SamplerOptions, SolverType, TimestepSpacing};
use ddpm::sample::SampleConfig;

use super::common::parse_unit_interval;

/// `--sampler NAME`, each listed in --help with its one line.
fn sampler_parser() -> impl TypedValueParser<Value = SamplerKind> {
    PossibleValuesParser::new(SamplerKind::ALL.map(|(_, name, help)| PossibleValue::new(name).help(help)))
        // The possible values are SamplerKind::ALL's own names, which parse back (a unit test
        // in diffusion::samplers checks every one), so this cannot fail.
        .map(|s| s.parse::<SamplerKind>().expect("clap only passes listed names"))
}

/// `--spacing`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SpacingArg {
    /// round(linspace(0, T-1, K)), rounded half to even: from T-1 down to 0 (diffusers'
    /// "linspace"; improved-diffusion's one-section respacing visits the same steps).
    Linspace,
    /// i*(T div K), i = K-1 .. 0: from 0 up, not reaching T-1 (diffusers' "leading", Stable
    /// Diffusion's default with an offset).
    Leading,
    /// round(T - i*T/K) - 1: from T-1 down, not reaching 0 (diffusers' "trailing"; Lin et al.
    /// 2024 recommend it for few steps).
    Trailing,
}

/// `--solver-type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SolverTypeArg {
    /// Lu et al.'s second-order term (diffusers' default).
    Midpoint,
    /// The exponential-integrator coefficients of a linear interpolant.
    Heun,
}

/// Which sampler, over which steps.
#[derive(Args, Debug, Clone)]
pub struct SamplerArgs {
    /// The sampler. Deterministic ones solve the probability-flow ODE, stochastic ones the
    /// reverse SDE; docs/sampling.md gives each update and its order.
    #[arg(long, default_value = "ddpm", value_parser = sampler_parser())]
    pub sampler: SamplerKind,
    /// Grid points K in 1..=T, chosen by --spacing (default: all T for ddpm, 25 for the others).
    /// Heun evaluates the network about twice per point, PNDM 4 times in its first 3 steps.
    #[arg(long, value_parser = parse_steps)]
    pub steps: Option<usize>,
    /// Which K of the T timesteps are visited.
    #[arg(long, value_enum, default_value = "linspace")]
    pub spacing: SpacingArg,
    /// Visit the Karras et al. (2022) sigma schedule (rho = 7) between the trained schedule's
    /// smallest and largest sigma instead of spaced timesteps (not for ddpm).
    #[arg(long)]
    pub karras: bool,
    /// DDIM's eta in [0, 1] (0 = deterministic, 1 = the ancestral variance); only --sampler ddim.
    #[arg(long, default_value_t = 0.0, value_parser = parse_unit_interval)]
    pub eta: f64,
    /// DPM-Solver's second-order update (dpm-solver-2/3, -2m, dpm++2s/2m/2m-sde).
    #[arg(long, value_enum, default_value = "midpoint")]
    pub solver_type: SolverTypeArg,
    /// Euler's and Heun's stochastic churn S_churn (Karras et al. Algorithm 2; 0 = none).
    #[arg(long, default_value_t = 0.0, value_parser = finite_non_negative)]
    pub s_churn: f64,
    /// Churn only where sigma >= S_tmin.
    #[arg(long, default_value_t = 0.0, value_parser = non_negative)]
    pub s_tmin: f64,
    /// Churn only where sigma <= S_tmax.
    #[arg(long, default_value_t = f64::INFINITY, value_parser = non_negative)]
    pub s_tmax: f64,
    /// The churn noise's scale S_noise.
    #[arg(long, default_value_t = 1.0, value_parser = finite_non_negative)]
    pub s_noise: f64,
}

fn non_negative(s: &str) -> Result<f64, String> {
    let v: f64 = s.trim().parse().map_err(|_| format!("{s:?} is not a number"))?;
    if v.is_nan() || v < 0.0 {
        return Err(format!("{s} is not a number >= 0"));
    }
    Ok(v)
}

fn parse_steps(s: &str) -> Result<usize, String> {
    if s.contains(',') {
        return Err(format!(
            "{s:?} is a list; --steps is the number of grid points (to choose which steps `ddpm trace` \
             keeps, use --keep {s})"
        ));
    }
    s.trim().parse().map_err(|_| format!("{s:?} is not a step count"))
}

fn finite_non_negative(s: &str) -> Result<f64, String> {
    let v = non_negative(s)?;
    if v.is_infinite() {
        return Err(format!("{s} is not a finite number"));
    }
    Ok(v)
}

impl SamplerArgs {
    /// Ancestral sampling over all steps, the default.
    pub fn ancestral() -> Self {
        SamplerArgs {
            sampler: SamplerKind::Ancestral,
            steps: None,
            spacing: SpacingArg::Linspace,
            karras: false,
            eta: 0.0,
            solver_type: SolverTypeArg::Midpoint,
            s_churn: 0.0,
            s_tmin: 0.0,
            s_tmax: f64::INFINITY,
            s_noise: 1.0,
        }
    }

    /// The number of grid points for a process of T steps.
    pub fn steps(&self, big_t: usize) -> usize {
        self.steps.unwrap_or(self.sampler.default_steps(big_t))
    }

    /// The library's sampling configuration; `clip_x0` from the model and --no-clip.
    pub fn config(&self, big_t: usize, clip_x0: bool) -> anyhow::Result<SampleConfig> {
        let k = self.sampler;
        if self.eta != 0.0 && k != SamplerKind::Ddim {
            bail!("--eta {} applies to --sampler ddim; {} has no eta", self.eta, k.name());
        }
        let euler_like = matches!(k, SamplerKind::Euler | SamplerKind::Heun);
        if !euler_like
            && (self.s_churn != 0.0 || self.s_noise != 1.0 || self.s_tmin != 0.0 || self.s_tmax.is_finite())
        {
            bail!(
                "--s-churn, --s-tmin, --s-tmax and --s-noise apply to --sampler euler or heun, not {}",
                k.name()
            );
        }
        if self.s_tmin > self.s_tmax {
            bail!("--s-tmin {} is above --s-tmax {}: churn would never apply", self.s_tmin, self.s_tmax);
        }
        if self.karras && k == SamplerKind::Ancestral {
            bail!("--karras: ancestral sampling (ddpm) runs on the trained chain's timesteps; use ddim, euler, heun, euler-ancestral or a dpm sampler");
        }
        Ok(SampleConfig {
            sampler: k,
            steps: Some(self.steps(big_t)),
            spacing: match self.spacing {
                SpacingArg::Linspace => TimestepSpacing::Linspace,
                SpacingArg::Leading => TimestepSpacing::Leading,
                SpacingArg::Trailing => TimestepSpacing::Trailing,
            },
            karras: self.karras,
            options: SamplerOptions {
                eta: self.eta,
                clip_x0,
                solver_type: match self.solver_type {
                    SolverTypeArg::Midpoint => SolverType::Midpoint,
                    SolverTypeArg::Heun => SolverType::Heun,
                },
                lower_order_final: true,
                churn: Churn {
                    s_churn: self.s_churn,
                    s_tmin: self.s_tmin,
                    s_tmax: self.s_tmax,
                    s_noise: self.s_noise,
                },
                reference_3m: false,
            },
            trajectory_frames: 0,
            stop: None,
            class: None,
        })
    }
}
