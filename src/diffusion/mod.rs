//! The diffusion math of Ho et al. 2020 (arXiv:2006.11239) and Nichol & Dhariwal 2021
//! (arXiv:2102.09672), exact, in f64, named as in the papers.
//!
//! # Timesteps
//! **In code, t is a 0-based index i ∈ {0, …, T−1}; the paper's step is t = i + 1.** Every
//! table has length T and entry i belongs to paper step i + 1: `alpha_bar()[0]` is ᾱ_1 and
//! `alpha_bar()[T − 1]` is ᾱ_T. Index 0 is the first step, where the bound's term is the decoder
//! L_0 and sampling adds no noise. This is the numbering of Ho et al.'s and improved-diffusion's
//! code; what number the *network* is given for index i is a separate convention
//! ([`convention::ModelTimestep`]).
//!
//! # Module map
//! | file              | owns                                                                      |
//! |-------------------|---------------------------------------------------------------------------|
//! | [`convention`]    | where the references disagree: [`Convention`] (`ho2020`, `improved-diffusion`, `diffusers`) |
//! | [`schedule`]      | β schedules, [`NoiseSchedule`] with every derived table, `extract` for a batch of t |
//! | [`gaussian`]      | q(x_t ∣ x_0), q_sample, the posterior (Eqs. 6–7), p_θ for every parameterisation, sampling |
//! | [`losses`]        | KL, the discretized decoder (Eq. 13), bits/dim, L_vlb breakdown, L_simple / L_hybrid |
//! | [`timesteps`]     | uniform and importance-sampled t (N&D Eq. 18)                             |
//! | [`normal`]        | erf/erfc and the standard normal CDF, exact or tanh-approximated          |
//! | [`oracle`]        | the closed-form optimal denoiser of a finite data set                     |
//! | [`samplers`]      | every sampler as a state machine over a grid of noise levels: ancestral, DDIM, PNDM, DPM-Solver(++), Euler/Heun |
//! | [`vectors`]       | the reference vectors written by `ddpm vectors`, compared by `ddpm compare` |
//!
//! Shapes: batches are `[N, …]` (`[N, D]` or `[N, C, H, W]`) of f64 with one timestep per sample.
//! The training code's f32 tensors get their per-sample coefficients from
//! [`NoiseSchedule::extract_f32`] / [`NoiseSchedule::extract_broadcast_f32`].
//! docs/derivation.md links each step of the derivation to the function computing it and the
//! test checking it.

pub mod convention;
pub mod gaussian;
pub mod losses;
pub mod normal;
pub mod oracle;
pub mod samplers;
pub mod schedule;
pub mod tape_losses;
pub mod timesteps;
pub mod vectors;
pub mod weighting;

pub use convention::{Convention, Conventions, NormalCdf};
pub use gaussian::{
    p_mean_variance, p_sample, p_sample_loop, q_mean_variance, q_posterior_mean_variance, q_sample,
    q_sample_rng, Gaussian, MeanType, ModelOutput, PMeanVariance, Parameterization, VarianceType,
};
pub use losses::{
    calc_bpd_loop, discretized_gaussian_log_likelihood, normal_kl, prior_bpd, training_losses, vb_terms_bpd,
    BpdBreakdown, LossType, TrainingLosses, VbTerms,
};
pub use oracle::OracleDenoiser;
pub use schedule::{BetaSchedule, NoiseSchedule, Table};
pub use timesteps::{ImportanceSampler, TimestepBatch, TimestepSampling};
pub use weighting::LossWeighting;
