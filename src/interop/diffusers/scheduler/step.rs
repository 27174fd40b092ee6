//! [`DiffusersScheduler`]: diffusers' `DDPMScheduler` / `DDIMScheduler` state (tables and
//! timesteps) and their `step`, in diffusers' float32 arithmetic.

use ndarray::{Axis, Zip};

use super::config::{DdpmVarianceType, DiffusersSchedulerConfig, PredictionType, SchedulerClass};
use super::tables;
use super::SchedulerStep;
use crate::{Error, Result, Tensor};

/// A diffusers `DDPMScheduler` or `DDIMScheduler`: its float32 tables, its timesteps, and
/// `step` computed operation by operation as diffusers 0.42.1 computes it with torch on the CPU.
///
/// Like diffusers' object it has state: [`Self::new`] gives the full chain T−1 … 0 (which
/// `DDPMScheduler` can step without `set_timesteps`; `DDIMScheduler` cannot),
/// [`Self::set_timesteps`] a respaced one.
///
/// Precision: everything in [`Self::step`] is f32 (diffusers' ᾱ values are 0-d float32 tensors
/// and `** 0.5` is a float32 square root), in diffusers' operation order; f64 appears only where
/// diffusers uses it: ᾱ's running product, the cosine β, the timestep arithmetic and
/// torch.quantile's rank. The one remaining difference: torch 2.15's float32 `sqrt`, `log` and
/// `exp` on the CPU are not correctly rounded (about 0.6% of its square roots are one ulp
/// below; the same under every `ATEN_CPU_CAPABILITY`, so not torch's own vector kernels),
/// while Rust's `sqrt` is correctly rounded and its `ln`/`exp` (glibc's) can differ from torch's
/// by an ulp. A coefficient can then differ by one ulp and x_{t−1} by about |x|·2⁻²⁴: at most 2.4e-7 over the 46 fixtures, and with
/// torch's own `sqrt`/`log`/`exp` substituted, this operation order gives all 46 bit for bit.
#[derive(Clone, Debug, PartialEq)]
pub struct DiffusersScheduler {
    config: DiffusersSchedulerConfig,
    betas: Vec<f32>,
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    timesteps: Vec<usize>,
    /// K after [`Self::set_timesteps`]; `None` on the full chain or custom timesteps.
    num_inference_steps: Option<usize>,
    /// Set by [`Self::set_custom_timesteps`].
    custom_timesteps: bool,
}

impl DiffusersScheduler {
    /// The scheduler `config` describes, with its full chain of timesteps T−1 … 0.
    pub fn new(config: DiffusersSchedulerConfig) -> Self {
        let t = config.num_train_timesteps;
        let mut betas = tables::betas(&config.betas, t);
        if config.rescale_betas_zero_snr {
            betas = tables::rescale_zero_terminal_snr(&betas);
        }
        let alphas_cumprod = tables::alphas_cumprod(&betas);
        let final_alpha_cumprod = match config.class {
            SchedulerClass::Ddim { set_alpha_to_one: false } => alphas_cumprod[0],
            SchedulerClass::Ddim { set_alpha_to_one: true } | SchedulerClass::Ddpm { .. } => 1.0,
        };
        DiffusersScheduler {
            config,
            betas,
            alphas_cumprod,
            final_alpha_cumprod,
            timesteps: (0..t).rev().collect(),
            num_inference_steps: None,
            custom_timesteps: false,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &DiffusersSchedulerConfig {
        &self.config
    }

    /// diffusers' `betas`, β_t for t = 0 … T−1 (after zero-SNR rescaling when asked).
    pub fn betas(&self) -> &[f32] {
        &self.betas
    }

    /// diffusers' `alphas_cumprod`, ᾱ_t = ∏_{s≤t}(1 − β_s) (Ho et al. Eq. 4), t = 0 … T−1.
    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
    }

    /// The ᾱ used past the last step: 1 (`DDPMScheduler`'s `one`, `DDIMScheduler` with
    /// `set_alpha_to_one`) or ᾱ_0.
    pub fn final_alpha_cumprod(&self) -> f32 {
        self.final_alpha_cumprod
    }

    /// The timesteps to step through, in order (`scheduler.timesteps`).
    pub fn timesteps(&self) -> &[usize] {
        &self.timesteps
    }

    /// `set_timesteps(K)`: K of the T steps, chosen by `timestep_spacing` (and `steps_offset`
    /// for `leading`).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] if K is 0 or above T, if the offset reaches past T − 1, or for
    /// a `trailing` K whose numpy arange gives diffusers K + 1 timesteps ending at −1.
    pub fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let c = &self.config;
        self.timesteps =
            tables::spacing(c.timestep_spacing, c.num_train_timesteps, num_inference_steps, c.steps_offset)?;
        self.num_inference_steps = Some(num_inference_steps);
        self.custom_timesteps = false;
        Ok(())
    }

    /// `DDPMScheduler.set_timesteps(timesteps=[…])`: explicit timesteps, strictly descending,
    /// below T. The previous timestep of each is then the next in the list.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for a `DDIMScheduler` (it has no custom timesteps), an empty,
    /// non-descending or out-of-range list.
    pub fn set_custom_timesteps(&mut self, timesteps: &[usize]) -> Result<()> {
        if matches!(self.config.class, SchedulerClass::Ddim { .. }) {
            return Err(Error::config("timesteps", "DDIMScheduler.set_timesteps takes no custom timesteps"));
        }
        if timesteps.is_empty()
            || timesteps.windows(2).any(|w| w[1] >= w[0])
            || timesteps[0] >= self.config.num_train_timesteps
        {
            return Err(Error::config(
                "timesteps",
                format!(
                    "custom timesteps must be strictly descending and below T = {}: {timesteps:?}",
                    self.config.num_train_timesteps
                ),
            ));
        }
        self.timesteps = timesteps.to_vec();
        self.num_inference_steps = None;
        self.custom_timesteps = true;
        Ok(())
    }

    /// The timestep `step(t)` goes to; negative means past the end (ᾱ_prev is then
    /// [`Self::final_alpha_cumprod`]). `DDPMScheduler`: the entry after t in
    /// [`Self::timesteps`] (−1 after the last) once timesteps are set, else t − 1.
    /// `DDIMScheduler`: t − T div K whatever the spacing, so with `linspace` (and `trailing`
    /// when K does not divide T) it need not be the next timestep, and the last can be −5.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] if t ≥ T, if t is not among the set timesteps (DDPM), or for a
    /// `DDIMScheduler` whose timesteps were never set (diffusers raises).
    pub fn previous_timestep(&self, t: usize) -> Result<i64> {
        let big_t = self.config.num_train_timesteps;
        if t >= big_t {
            return Err(Error::config("timestep", format!("t = {t} is past T − 1 = {}", big_t - 1)));
        }
        match self.config.class {
            SchedulerClass::Ddpm { .. } if self.custom_timesteps || self.num_inference_steps.is_some() => {
                let i = self.timesteps.iter().position(|&s| s == t).ok_or_else(|| {
                    Error::config(
                        "timestep",
                        format!("t = {t} is not one of the set timesteps {:?}", self.timesteps),
                    )
                })?;
                Ok(self.timesteps.get(i + 1).map_or(-1, |&p| p as i64))
            }
            SchedulerClass::Ddpm { .. } => Ok(t as i64 - 1),
            SchedulerClass::Ddim { .. } => {
                let k = self.num_inference_steps.ok_or_else(|| {
                    Error::config("num_inference_steps", "DDIMScheduler steps only after set_timesteps")
                })?;
                Ok(t as i64 - (big_t / k) as i64)
            }
        }
    }

    /// ᾱ at a previous timestep as `step` reads it.
    fn alpha_bar_at(&self, prev: i64) -> f32 {
        usize::try_from(prev).map_or(self.final_alpha_cumprod, |p| self.alphas_cumprod[p])
    }

    /// Whether `step` at t uses the noise: `DDPMScheduler` when t > 0 (the integer t, so with
    /// `steps_offset` or `trailing` the last step draws too), `DDIMScheduler` when η > 0 (at
    /// every step). diffusers draws one `randn` of the sample's shape exactly then.
    pub fn draws_noise(&self, t: usize, eta: f64) -> bool {
        match self.config.class {
            SchedulerClass::Ddpm { .. } => t > 0,
            SchedulerClass::Ddim { .. } => eta > 0.0,
        }
    }

    /// One reverse step x_t → x_{t−1} (diffusers' `step(model_output, t, sample, …)`), with the
    /// noise diffusers would draw given as `noise` (read only when [`Self::draws_noise`]).
    ///
    /// With ᾱ_t, ᾱ_prev (the previous timestep's, see [`Self::previous_timestep`]) and x̂_0 from
    /// `prediction_type`, clipped or thresholded:
    /// - `DDPMScheduler`: x_{t−1} = μ̃(x_t, x̂_0) + σ·z with Ho et al. Eq. (7) on the respaced
    ///   chain, β'_t = 1 − ᾱ_t/ᾱ_prev, μ̃ = (√ᾱ_prev β'_t/(1−ᾱ_t)) x̂_0 + (√(1−β'_t)(1−ᾱ_prev)/(1−ᾱ_t)) x_t,
    ///   σ by [`DdpmVarianceType`], added only when t > 0.
    /// - `DDIMScheduler` (Song et al. 2021, Eqs. 12 and 16): σ = η √((1−ᾱ_prev)/(1−ᾱ_t)) √(1−ᾱ_t/ᾱ_prev),
    ///   x_{t−1} = √ᾱ_prev x̂_0 + √(1−ᾱ_prev−σ²) ε̂ + σ z, ε̂ from the unclipped x̂_0
    ///   (`use_clipped_model_output=False`, diffusers' default). In f32, 1 − ᾱ_prev − σ² can
    ///   round below 0 where it is exactly 0 (zero terminal SNR with η > 0 at the first step):
    ///   diffusers' square root then gives NaN, and so does this.
    ///
    /// `sample` and `noise` are `[N, C, …]`; `model_output` is `[N, C, …]`, or `[N, 2C, …]` for
    /// the `learned` variances (ε or x_0 or v first, the variance output second). `eta` is
    /// DDIM's η (diffusers' default 0); `DDPMScheduler.step` has none and refuses a non-zero one.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] as [`Self::previous_timestep`], or for η ≠ 0 with
    /// `DDPMScheduler`.
    ///
    /// # Panics
    /// If the shapes differ as above (a `learned` variance given C channels fails in diffusers
    /// too).
    pub fn step(
        &self,
        model_output: &Tensor,
        t: usize,
        sample: &Tensor,
        noise: &Tensor,
        eta: f64,
    ) -> Result<SchedulerStep> {
        assert!(sample.ndim() >= 2, "DiffusersScheduler::step: sample {:?} is not [N, C, …]", sample.shape());
        assert_eq!(noise.shape(), sample.shape(), "DiffusersScheduler::step: noise vs sample");
        let prev_t = self.previous_timestep(t)?;
        let c = sample.shape()[1];
        let learned =
            matches!(self.config.class, SchedulerClass::Ddpm { variance_type } if variance_type.is_learned());
        let (model_output, predicted_variance) = if learned {
            let mut want = sample.shape().to_vec();
            want[1] = 2 * c;
            assert_eq!(
                model_output.shape(),
                &want[..],
                "DiffusersScheduler::step: a learned variance needs [N, 2C, …] model output"
            );
            let (a, b) = model_output.view().split_at(Axis(1), c);
            (a.to_owned(), Some(b.to_owned()))
        } else {
            assert_eq!(
                model_output.shape(),
                sample.shape(),
                "DiffusersScheduler::step: model_output vs sample"
            );
            (model_output.clone(), None)
        };
        let alpha_prod_t = self.alphas_cumprod[t];
        let alpha_prod_t_prev = self.alpha_bar_at(prev_t);
        match self.config.class {
            SchedulerClass::Ddpm { variance_type } => {
                if eta != 0.0 {
                    return Err(Error::config("eta", "DDPMScheduler.step takes no eta"));
                }
                Ok(self.ddpm_step(
                    variance_type,
                    t,
                    alpha_prod_t,
                    alpha_prod_t_prev,
                    &model_output,
                    predicted_variance.as_ref(),
                    sample,
                    noise,
                ))
            }
            SchedulerClass::Ddim { .. } => {
                Ok(self.ddim_step(alpha_prod_t, alpha_prod_t_prev, &model_output, sample, noise, eta))
            }
        }
    }

    /// x̂_0 from the model output (fixtures README fact S7), before clipping.
    fn pred_original_sample(&self, alpha_prod_t: f32, model_output: &Tensor, sample: &Tensor) -> Tensor {
        let beta_prod_t = 1.0 - alpha_prod_t;
        let (sqrt_ab, sqrt_1m_ab) = (alpha_prod_t.sqrt(), beta_prod_t.sqrt());
        match self.config.prediction_type {
            PredictionType::Epsilon => {
                Zip::from(sample).and(model_output).map_collect(|&x, &e| (x - sqrt_1m_ab * e) / sqrt_ab)
            }
            PredictionType::Sample => model_output.clone(),
            PredictionType::VPrediction => {
                Zip::from(sample).and(model_output).map_collect(|&x, &v| sqrt_ab * x - sqrt_1m_ab * v)
            }
        }
    }

    /// Thresholding or clipping of x̂_0 (fact S8); thresholding wins when both are on.
    fn clip_or_threshold(&self, x0: &mut Tensor) {
        let c = &self.config;
        if c.thresholding {
            threshold_sample(x0, c.dynamic_thresholding_ratio, c.sample_max_value);
        } else if c.clip_sample {
            let r = c.clip_sample_range as f32;
            x0.mapv_inplace(|v| torch_clamp(v, -r, r));
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn ddpm_step(
        &self,
        variance_type: DdpmVarianceType,
        t: usize,
        alpha_prod_t: f32,
        alpha_prod_t_prev: f32,
        model_output: &Tensor,
        predicted_variance: Option<&Tensor>,
        sample: &Tensor,
        noise: &Tensor,
    ) -> SchedulerStep {
        let beta_prod_t = 1.0 - alpha_prod_t;
        let beta_prod_t_prev = 1.0 - alpha_prod_t_prev;
        let current_alpha_t = alpha_prod_t / alpha_prod_t_prev;
        let current_beta_t = 1.0 - current_alpha_t;
        let mut x0 = self.pred_original_sample(alpha_prod_t, model_output, sample);
        self.clip_or_threshold(&mut x0);
        // Ho et al. Eq. (7), the posterior mean on the respaced chain.
        let coef_x0 = (alpha_prod_t_prev.sqrt() * current_beta_t) / beta_prod_t;
        let coef_xt = current_alpha_t.sqrt() * beta_prod_t_prev / beta_prod_t;
        let mut prev = Zip::from(&x0).and(sample).map_collect(|&p, &x| coef_x0 * p + coef_xt * x);
        if t > 0 {
            // `_get_variance`: β̃ clamped at 1e-20 before any log.
            let beta_tilde =
                torch_clamp_min(beta_prod_t_prev / beta_prod_t * current_beta_t, 1e-20_f64 as f32);
            let learned = || predicted_variance.expect("step splits the learned variance off");
            let std: Tensor = match variance_type {
                DdpmVarianceType::FixedSmall => scalar_like(sample, beta_tilde.sqrt()),
                DdpmVarianceType::FixedSmallLog => scalar_like(sample, (0.5 * beta_tilde.ln()).exp()),
                DdpmVarianceType::FixedLarge => scalar_like(sample, current_beta_t.sqrt()),
                // diffusers returns ln β' as "the variance" and step takes its square root: NaN.
                DdpmVarianceType::FixedLargeLog => scalar_like(sample, current_beta_t.ln().sqrt()),
                DdpmVarianceType::Learned => learned().mapv(f32::sqrt),
                DdpmVarianceType::LearnedRange => {
                    let (min_log, max_log) = (beta_tilde.ln(), current_beta_t.ln());
                    learned().mapv(|v| {
                        let frac = (v + 1.0) / 2.0;
                        let log_variance = frac * max_log + (1.0 - frac) * min_log;
                        (0.5 * log_variance).exp()
                    })
                }
            };
            Zip::from(&mut prev).and(&std).and(noise).for_each(|p, &s, &z| *p += s * z);
        }
        SchedulerStep { prev_sample: prev, pred_original_sample: x0 }
    }

    fn ddim_step(
        &self,
        alpha_prod_t: f32,
        alpha_prod_t_prev: f32,
        model_output: &Tensor,
        sample: &Tensor,
        noise: &Tensor,
        eta: f64,
    ) -> SchedulerStep {
        let beta_prod_t = 1.0 - alpha_prod_t;
        let beta_prod_t_prev = 1.0 - alpha_prod_t_prev;
        let (sqrt_ab, sqrt_1m_ab) = (alpha_prod_t.sqrt(), beta_prod_t.sqrt());
        let mut x0 = self.pred_original_sample(alpha_prod_t, model_output, sample);
        // ε̂ from the unclipped x̂_0 (Song et al. Eq. 12 needs both).
        let eps: Tensor = match self.config.prediction_type {
            PredictionType::Epsilon => model_output.clone(),
            PredictionType::Sample => {
                Zip::from(sample).and(&x0).map_collect(|&x, &p| (x - sqrt_ab * p) / sqrt_1m_ab)
            }
            PredictionType::VPrediction => {
                Zip::from(model_output).and(sample).map_collect(|&v, &x| sqrt_ab * v + sqrt_1m_ab * x)
            }
        };
        self.clip_or_threshold(&mut x0);
        // Song et al. Eq. (16): σ_t(η)² / η².
        let variance = (beta_prod_t_prev / beta_prod_t) * (1.0 - alpha_prod_t / alpha_prod_t_prev);
        let std_dev_t = eta as f32 * variance.sqrt();
        let coef_eps = (1.0 - alpha_prod_t_prev - std_dev_t * std_dev_t).sqrt();
        let coef_x0 = alpha_prod_t_prev.sqrt();
        let mut prev = Zip::from(&x0).and(&eps).map_collect(|&p, &e| coef_x0 * p + coef_eps * e);
        if eta > 0.0 {
            Zip::from(&mut prev).and(noise).for_each(|p, &z| *p += std_dev_t * z);
        }
        SchedulerStep { prev_sample: prev, pred_original_sample: x0 }
    }
}

/// A tensor of `sample`'s shape filled with `v` (so both noise paths multiply element-wise).
fn scalar_like(sample: &Tensor, v: f32) -> Tensor {
    Tensor::from_elem(sample.raw_dim(), v)
}

/// torch.clamp(x, lo, hi): max then min, NaN in any argument gives NaN, hi wins when lo > hi.
fn torch_clamp(x: f32, lo: f32, hi: f32) -> f32 {
    if x.is_nan() || lo.is_nan() || hi.is_nan() {
        f32::NAN
    } else {
        x.max(lo).min(hi)
    }
}

/// torch.clamp(x, min=lo) with NaN propagated.
fn torch_clamp_min(x: f32, lo: f32) -> f32 {
    if x.is_nan() {
        x
    } else {
        x.max(lo)
    }
}

/// diffusers' `_threshold_sample` (Saharia et al. 2022, §2.3), per sample n of `[N, …]`: s =
/// the `ratio` quantile of |x̂_0| over its values, clamped to [1, `sample_max_value`];
/// x̂_0 ← clamp(x̂_0, −s, s)/s.
fn threshold_sample(x0: &mut Tensor, ratio: f64, sample_max_value: f64) {
    let max = sample_max_value as f32;
    for mut row in x0.outer_iter_mut() {
        let abs: Vec<f32> = row.iter().map(|v| v.abs()).collect();
        let s = torch_clamp(torch_quantile(abs, ratio), 1.0, max);
        row.mapv_inplace(|v| torch_clamp(v, -s, s) / s);
    }
}

/// torch.quantile(values, q) of a float32 vector with linear interpolation, as torch 2.15
/// computes it on the CPU: q rounded to f32 (the tensor the scalar becomes), rank = q·(n−1) in
/// f64, weight w = rank − ⌊rank⌋ rounded to f32, and torch's `lerp` between the neighbouring
/// order statistics a ≤ b: a + w(b − a) when w < ½, else b − (b − a)(1 − w), each one fused
/// multiply-add (as torch's AVX2/AVX-512 kernels compute it). Any NaN gives NaN.
fn torch_quantile(mut values: Vec<f32>, q: f64) -> f32 {
    if values.is_empty() || values.iter().any(|v| v.is_nan()) {
        return f32::NAN;
    }
    values.sort_by(f32::total_cmp);
    let rank = f64::from(q as f32) * (values.len() - 1) as f64;
    let (below, above) = (rank.floor() as usize, rank.ceil() as usize);
    let w = (rank - below as f64) as f32;
    let (a, b) = (values[below], values[above.min(values.len() - 1)]);
    if w.abs() < 0.5 {
        w.mul_add(b - a, a)
    } else {
        (-(b - a)).mul_add(1.0 - w, b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantile_matches_torch_on_a_tie() {
        // torch.quantile(x, 0.9) with x = |randn(96)|·3 (numpy default_rng(1)): rank
        // f32(0.9)·95 = 85.49999774 in f64, so the weight is just under ½ and the result the odd
        // neighbour of the tie 3.8958315, which a weight of exactly ½ would round to even.
        let (a, b) = (3.882_191_4_f32, 3.909_471_5_f32);
        let mut v = vec![0.0f32; 96];
        v[85] = a;
        for x in &mut v[86..] {
            *x = b;
        }
        assert_eq!(torch_quantile(v, 0.9), 3.895_831_3);
        assert_eq!(torch_quantile(vec![1.0, 3.0], 0.5), 2.0);
        assert!(torch_quantile(vec![1.0, f32::NAN], 0.5).is_nan());
    }

    #[test]
    fn previous_timestep_follows_each_class_rule_and_refuses_what_diffusers_refuses() {
        let mut ddpm = DiffusersScheduler::new(DiffusersSchedulerConfig {
            num_train_timesteps: 50,
            ..DiffusersSchedulerConfig::ddpm()
        });
        assert_eq!(ddpm.previous_timestep(7).unwrap(), 6);
        ddpm.set_custom_timesteps(&[40, 20, 5]).unwrap();
        let prev: Vec<i64> = [40, 20, 5].iter().map(|&t| ddpm.previous_timestep(t).unwrap()).collect();
        assert_eq!(prev, [20, 5, -1]);
        assert!(ddpm.previous_timestep(7).is_err());
        assert!(ddpm.set_custom_timesteps(&[5, 20]).is_err());
        let x = Tensor::zeros(vec![1, 3, 2, 2]);
        assert!(ddpm.step(&x, 40, &x, &x, 1.0).is_err(), "DDPMScheduler.step has no eta");

        let mut ddim = DiffusersScheduler::new(DiffusersSchedulerConfig {
            num_train_timesteps: 50,
            ..DiffusersSchedulerConfig::ddim()
        });
        assert!(ddim.previous_timestep(45).is_err(), "DDIM steps only after set_timesteps");
        assert!(ddim.set_custom_timesteps(&[40, 20]).is_err());
        ddim.set_timesteps(7).unwrap();
        assert_eq!(ddim.previous_timestep(42).unwrap(), 35);
        assert!(ddim.previous_timestep(50).is_err());
    }

    #[test]
    fn torch_clamp_propagates_nan_and_lets_the_upper_bound_win() {
        assert!(torch_clamp(f32::NAN, -1.0, 1.0).is_nan());
        assert_eq!(torch_clamp(f32::INFINITY, -1.0, 1.0), 1.0);
        assert_eq!(torch_clamp(0.0, 2.0, 1.0), 1.0);
    }
}
