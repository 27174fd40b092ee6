//! Choosing the training timesteps: uniform, or importance-sampled by the bound's second moment
//! (Nichol & Dhariwal 2021, §3.3, Eq. 18: L_vlb = E_{t∼p_t}\[L_t/p_t\], p_t ∝ √E\[L_t²\]).
//!
//! The importance sampler follows improved-diffusion's `LossSecondMomentResampler`: it samples
//! uniformly until every t has 10 recorded losses, then uses p_t ∝ √(mean of the last 10 L_t²),
//! mixed with 0.1% of the uniform distribution so no t starves. The weights returned with each
//! batch, 1/(T p_t), make the weighted mean of the losses unbiased.

use std::collections::VecDeque;

use rand::Rng as _;

use crate::error::{Error, Result};
use crate::Rng;

/// How training timesteps are drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TimestepSampling {
    /// t uniform on 0 … T−1 (Ho Algorithm 1), every weight 1.
    Uniform,
    /// p_t ∝ √E\[L_t²\] (Nichol & Dhariwal Eq. 18), weights 1/(T p_t).
    Importance,
}

/// A batch of timesteps with their importance weights.
#[derive(Clone, Debug, PartialEq)]
pub struct TimestepBatch {
    /// Code indices 0 … T−1, one per sample.
    pub t: Vec<usize>,
    /// 1/(T p_t) per sample: multiply each sample's loss by it before averaging (1 when uniform).
    pub weights: Vec<f64>,
}

/// Draws `n` timesteps uniformly from 0 … T−1.
///
/// # Panics
/// If `timesteps` is 0.
pub fn sample_uniform(timesteps: usize, n: usize, rng: &mut Rng) -> TimestepBatch {
    assert!(timesteps > 0, "sample_uniform: T = 0");
    TimestepBatch { t: (0..n).map(|_| rng.random_range(0..timesteps)).collect(), weights: vec![1.0; n] }
}

/// The second-moment importance sampler of Nichol & Dhariwal §3.3.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct ImportanceSampler {
    history: Vec<VecDeque<f64>>,
    history_per_term: usize,
    uniform_prob: f64,
}

impl ImportanceSampler {
    /// Losses kept per timestep (improved-diffusion: 10).
    pub const HISTORY_PER_TERM: usize = 10;
    /// The share of the uniform distribution mixed in (improved-diffusion: 0.001).
    pub const UNIFORM_PROB: f64 = 0.001;

    /// A sampler over T timesteps with the improved-diffusion settings.
    ///
    /// # Panics
    /// If `timesteps` is 0.
    pub fn new(timesteps: usize) -> Self {
        assert!(timesteps > 0, "ImportanceSampler: T = 0");
        ImportanceSampler {
            history: vec![VecDeque::with_capacity(Self::HISTORY_PER_TERM); timesteps],
            history_per_term: Self::HISTORY_PER_TERM,
            uniform_prob: Self::UNIFORM_PROB,
        }
    }

    /// Checks a sampler read from a file (a checkpoint) against the run's T: one history per
    /// timestep, each of at most 10 finite losses, and the standard settings.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] saying what does not match.
    pub fn validate(&self, timesteps: usize) -> Result<()> {
        let bad = |reason: String| Err(Error::config("importance-sampling state", reason));
        if self.history.len() != timesteps {
            return bad(format!(
                "{} timesteps of history for a process of T = {timesteps}",
                self.history.len()
            ));
        }
        if self.history_per_term != Self::HISTORY_PER_TERM || self.uniform_prob != Self::UNIFORM_PROB {
            return bad(format!(
                "settings {} losses per term and uniform share {}, expected {} and {}",
                self.history_per_term,
                self.uniform_prob,
                Self::HISTORY_PER_TERM,
                Self::UNIFORM_PROB
            ));
        }
        for (t, h) in self.history.iter().enumerate() {
            if h.len() > self.history_per_term {
                return bad(format!(
                    "timestep {t} holds {} losses, more than {}",
                    h.len(),
                    self.history_per_term
                ));
            }
            if let Some(l) = h.iter().find(|l| !l.is_finite()) {
                return bad(format!("timestep {t} holds the loss {l}, not a finite number"));
            }
        }
        Ok(())
    }

    /// Whether every timestep has a full history (before that, sampling is uniform).
    pub fn warmed_up(&self) -> bool {
        self.history.iter().all(|h| h.len() == self.history_per_term)
    }

    /// The sampling probabilities p_t, shape `[T]`, summing to 1: uniform before warm-up, then
    /// (1 − 0.001)·√E\[L_t²\]/Σ√E\[L_s²\] + 0.001/T.
    pub fn probabilities(&self) -> Vec<f64> {
        let big_t = self.history.len();
        if !self.warmed_up() {
            return vec![1.0 / big_t as f64; big_t];
        }
        let rms: Vec<f64> = self
            .history
            .iter()
            .map(|h| (h.iter().map(|l| l * l).sum::<f64>() / h.len() as f64).sqrt())
            .collect();
        let total: f64 = rms.iter().sum();
        if !(total > 0.0 && total.is_finite()) {
            return vec![1.0 / big_t as f64; big_t];
        }
        rms.iter().map(|r| r / total * (1.0 - self.uniform_prob) + self.uniform_prob / big_t as f64).collect()
    }

    /// Draws `n` timesteps from [`ImportanceSampler::probabilities`], with weights 1/(T p_t).
    pub fn sample(&self, n: usize, rng: &mut Rng) -> TimestepBatch {
        let p = self.probabilities();
        let big_t = p.len() as f64;
        let mut cumulative = Vec::with_capacity(p.len());
        let mut acc = 0.0;
        for &pi in &p {
            acc += pi;
            cumulative.push(acc);
        }
        let mut t = Vec::with_capacity(n);
        let mut weights = Vec::with_capacity(n);
        for _ in 0..n {
            let u = rng.random::<f64>() * acc;
            let i = cumulative.partition_point(|&c| c <= u).min(p.len() - 1);
            t.push(i);
            weights.push(1.0 / (big_t * p[i]));
        }
        TimestepBatch { t, weights }
    }

    /// Records the per-sample losses L_t of a batch (the bound term, not weighted), keeping the
    /// last 10 per timestep.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] if the lengths differ, a t is out of range, or a loss is not finite.
    pub fn update(&mut self, t: &[usize], losses: &[f64]) -> Result<()> {
        if t.len() != losses.len() {
            return Err(Error::config(
                "timestep sampler",
                format!("{} timesteps but {} losses", t.len(), losses.len()),
            ));
        }
        for (&ti, &loss) in t.iter().zip(losses) {
            let len = self.history.len();
            let h = self.history.get_mut(ti).ok_or_else(|| {
                Error::config("timestep sampler", format!("timestep {ti} out of range 0..{len}"))
            })?;
            if !loss.is_finite() {
                return Err(Error::config(
                    "timestep sampler",
                    format!("loss {loss} at timestep {ti} is not finite"),
                ));
            }
            if h.len() == self.history_per_term {
                h.pop_front();
            }
            h.push_back(loss);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng_from_seed;

    #[test]
    fn uniform_sampling_covers_the_range_with_unit_weights() {
        let b = sample_uniform(5, 1000, &mut rng_from_seed(0));
        assert!(b.t.iter().all(|&t| t < 5));
        for k in 0..5 {
            assert!(b.t.contains(&k));
        }
        assert!(b.weights.iter().all(|&w| w == 1.0));
    }

    #[test]
    fn importance_sampler_is_uniform_until_warm_then_follows_the_rms_loss() {
        let mut s = ImportanceSampler::new(4);
        assert_eq!(s.probabilities(), vec![0.25; 4]);
        for _ in 0..ImportanceSampler::HISTORY_PER_TERM {
            s.update(&[0, 1, 2, 3], &[1.0, 1.0, 2.0, 4.0]).expect("valid");
        }
        assert!(s.warmed_up());
        let p = s.probabilities();
        assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-15);
        let u = ImportanceSampler::UNIFORM_PROB;
        assert!((p[3] - (4.0 / 8.0 * (1.0 - u) + u / 4.0)).abs() < 1e-15);
        let b = s.sample(20_000, &mut rng_from_seed(1));
        let share = b.t.iter().filter(|&&t| t == 3).count() as f64 / 20_000.0;
        assert!((share - p[3]).abs() < 0.02, "{share} vs {}", p[3]);
        // The weights make E[w L] the uniform mean of L: Σ_t p_t · 1/(T p_t) · L_t = mean L.
        for (&t, &w) in b.t.iter().zip(&b.weights) {
            assert!((w - 1.0 / (4.0 * p[t])).abs() < 1e-12);
        }
        assert!(s.update(&[4], &[1.0]).is_err());
        assert!(s.update(&[0], &[f64::NAN]).is_err());
    }
}
