//! Training: [`TrainConfig`] (everything a run depends on, serialised into every checkpoint)
//! and [`Trainer::step`], one step of Ho et al.'s Algorithm 1 with Adam, clipping, warm-up and
//! the parameter EMA.
//!
//! Randomness: the trainer owns one [`Rng`] (timesteps, noise, dropout, in that order each
//! step) and the batch stream has its own seeded stream; both positions are saved in the
//! checkpoint, so a resumed run draws exactly what an uninterrupted one would.

use std::sync::Arc;

use rand::Rng as _;
use rand_distr::StandardNormal;
use serde::{Deserialize, Serialize};

use crate::data::{BatchConfig, BatchPosition, Batches, Dataset};
use crate::diffusion::gaussian::q_sample_f32;
use crate::diffusion::tape_losses::training_losses_tape;
use crate::diffusion::timesteps::sample_uniform;
use crate::diffusion::{
    BetaSchedule, Convention, ImportanceSampler, LossType, MeanType, NoiseSchedule, Parameterization,
    TimestepSampling, VarianceType,
};
use crate::nn::{clip_grad_norm, warmup_lr, Adam, AdamConfig, Ema, ParamStore, UNet, UNetConfig};
use crate::{rng_from_seed, Error, Result, Rng, Tape, Tensor, Var};

/// The diffusion process and the objective.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DiffusionConfig {
    /// β schedule.
    pub schedule: BetaSchedule,
    /// Number of steps T.
    pub timesteps: usize,
    /// Conventions where the references disagree.
    pub convention: Convention,
    /// What the network predicts.
    pub mean_type: MeanType,
    /// The reverse process variance.
    pub variance_type: VarianceType,
    /// The training objective.
    pub loss: LossType,
    /// How t is drawn.
    pub timestep_sampling: TimestepSampling,
}

impl Default for DiffusionConfig {
    /// Ho et al.'s CIFAR-10 setting: linear β, T = 1000, ε-prediction, σ² = β, L_simple.
    fn default() -> Self {
        Self {
            schedule: BetaSchedule::Linear,
            timesteps: 1000,
            convention: Convention::Ho2020,
            mean_type: MeanType::Eps,
            variance_type: VarianceType::FixedLarge,
            loss: LossType::Simple,
            timestep_sampling: TimestepSampling::Uniform,
        }
    }
}

impl DiffusionConfig {
    /// The precomputed schedule.
    ///
    /// # Errors
    /// As [`NoiseSchedule::new`].
    pub fn schedule(&self) -> Result<NoiseSchedule> {
        NoiseSchedule::new(&self.schedule, self.timesteps, self.convention.settings())
    }

    /// Mean and variance choice together.
    pub fn parameterization(&self) -> Parameterization {
        Parameterization { mean_type: self.mean_type, variance_type: self.variance_type }
    }
}

/// Optimiser settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OptimConfig {
    /// Peak learning rate (Ho et al.: 2e-4 for CIFAR-10).
    pub lr: f64,
    /// Linear warm-up steps (Ho et al.: 5000).
    pub warmup_steps: u64,
    /// Clip gradients to this global norm (Ho et al.: 1.0); `None` disables.
    pub grad_clip: Option<f64>,
    /// Adam's β1.
    pub beta1: f64,
    /// Adam's β2.
    pub beta2: f64,
    /// Adam's ε.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// EMA decay (Ho et al.: 0.9999).
    pub ema_decay: f64,
    /// Warm the EMA decay up as `min(decay, (1+k)/(10+k))`.
    pub ema_warmup: bool,
}

impl OptimConfig {
    /// Adam's hyper-parameters from these settings.
    pub fn adam_config(&self) -> AdamConfig {
        AdamConfig { beta1: self.beta1, beta2: self.beta2, eps: self.eps, weight_decay: self.weight_decay }
    }
}

impl Default for OptimConfig {
    fn default() -> Self {
        Self {
            lr: 2e-4,
            warmup_steps: 5000,
            grad_clip: Some(1.0),
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            ema_decay: 0.9999,
            ema_warmup: true,
        }
    }
}

/// Everything a training run depends on; stored in every checkpoint's metadata.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// The network.
    pub unet: UNetConfig,
    /// The diffusion process and objective.
    pub diffusion: DiffusionConfig,
    /// The optimiser.
    pub optim: OptimConfig,
    /// Images per step.
    pub batch_size: usize,
    /// Random horizontal flips of training images.
    pub random_flip: bool,
    /// Seed of the weights, the trainer's RNG and the batch order.
    pub seed: u64,
}

impl TrainConfig {
    /// Checks the parts against each other.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] naming the mismatch.
    pub fn validate(&self) -> Result<()> {
        self.unet.validate()?;
        let param = self.diffusion.parameterization();
        self.diffusion.loss.check(&param)?;
        let want = param.output_channels(self.unet.in_channels);
        if self.unet.out_channels != want {
            return Err(Error::config(
                "U-Net",
                format!(
                    "{} output channels, but {:?} needs {want}",
                    self.unet.out_channels, self.diffusion.variance_type
                ),
            ));
        }
        if self.batch_size == 0 {
            return Err(Error::config("batch size", "must be at least 1"));
        }
        Ok(())
    }
}

/// What one step reports.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepStats {
    /// The step just taken (1-based).
    pub step: u64,
    /// The training loss of the batch.
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Learning rate used.
    pub lr: f64,
}

/// The complete state of a training run: exactly what a checkpoint holds.
pub struct Trainer {
    /// The run's configuration.
    pub config: TrainConfig,
    /// The network.
    pub net: UNet,
    /// The weights being trained.
    pub params: ParamStore,
    /// Adam's moments and step.
    pub adam: Adam,
    /// The averaged weights.
    pub ema: Ema,
    /// Steps taken.
    pub step: u64,
    /// Timesteps, noise and dropout.
    pub rng: Rng,
    /// The data stream.
    pub batches: Batches,
    /// Per-timestep loss history for importance sampling (None when uniform).
    pub importance: Option<ImportanceSampler>,
    schedule: NoiseSchedule,
}

impl Trainer {
    /// A fresh run: weights from the seed, zero Adam moments, EMA at the initial weights.
    ///
    /// # Errors
    /// An invalid configuration, or data whose shape does not match the network.
    pub fn new(config: TrainConfig, data: Arc<Dataset>) -> Result<Self> {
        config.validate()?;
        let net = UNet::new(config.unet.clone())?;
        check_data(&config.unet, &data)?;
        let mut init_rng = rng_from_seed(config.seed);
        let params = net.init_params(&mut init_rng);
        let o = &config.optim;
        let adam = Adam::new(&params, o.adam_config());
        let ema = Ema::new(&params, o.ema_decay, o.ema_warmup);
        let batches = Batches::new(data, batch_config(&config))?;
        // The training stream is seeded apart from the initialisation stream.
        let mut rng = rng_from_seed(config.seed);
        rng.set_stream(1);
        let schedule = config.diffusion.schedule()?;
        let importance = importance_for(&config.diffusion);
        Ok(Self { config, net, params, adam, ema, step: 0, rng, batches, importance, schedule })
    }

    /// Reassembles a run from its parts (used when loading a checkpoint).
    ///
    /// # Errors
    /// As [`Trainer::new`]; also a batch position that does not fit the data.
    #[allow(clippy::too_many_arguments)]
    pub fn from_parts(
        config: TrainConfig,
        data: Arc<Dataset>,
        params: ParamStore,
        adam: Adam,
        ema: Ema,
        step: u64,
        rng: Rng,
        position: BatchPosition,
    ) -> Result<Self> {
        config.validate()?;
        let net = UNet::new(config.unet.clone())?;
        check_data(&config.unet, &data)?;
        let batches = Batches::resume(data, batch_config(&config), position)?;
        let schedule = config.diffusion.schedule()?;
        let importance = importance_for(&config.diffusion);
        Ok(Self { config, net, params, adam, ema, step, rng, batches, importance, schedule })
    }

    /// The noise schedule.
    pub fn schedule(&self) -> &NoiseSchedule {
        &self.schedule
    }

    /// One step of Algorithm 1 (Ho et al. 2020): x0 from the data, t ~ U{0..T−1} (or by
    /// importance), ε ~ N(0, I), x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε (Eq. 4), the configured loss
    /// (L_simple = mean‖ε − ε_θ(x_t, t)‖², Eq. 14, or the bound / hybrid of
    /// [`training_losses_tape`]); then clip, Adam with warm-up, EMA.
    pub fn step(&mut self) -> StepStats {
        let x0 = self.batches.next_batch();
        let n = x0.shape()[0];
        let big_t = self.schedule.num_timesteps();
        let t = match &self.importance {
            Some(s) if s.warmed_up() => s.sample(n, &mut self.rng),
            _ => sample_uniform(big_t, n, &mut self.rng),
        };
        let eps = Tensor::from_shape_simple_fn(x0.shape(), || self.rng.sample::<f32, _>(StandardNormal));
        let x_t = q_sample_f32(&self.schedule, &x0, &t.t, &eps);
        let model_t = self.schedule.model_timesteps_f32(&t.t).to_vec();

        let tape = Tape::new();
        let p = self.params.bind(&tape);
        let out = self.net.forward(&p, &Var::constant(x_t.clone()), &model_t, Some(&mut self.rng));
        let d = &self.config.diffusion;
        let param = d.parameterization();
        let per_item = training_losses_tape(&self.schedule, &param, d.loss, &x0, &x_t, &t.t, &eps, &out).loss;
        let weights = Tensor::from_shape_vec(vec![n], t.weights.iter().map(|&w| w as f32).collect())
            .expect("one weight per item");
        let loss = per_item.mul(&Var::constant(weights)).mean();
        let loss_value = loss.value()[[]] as f64;
        if let Some(s) = &mut self.importance {
            let losses: Vec<f64> = per_item.value().iter().map(|&l| l as f64).collect();
            s.update(&t.t, &losses).expect("one loss per sampled timestep, all in range");
        }
        let mut grads = p.grads(&loss.backward());
        drop(p);
        let o = &self.config.optim;
        let grad_norm = match o.grad_clip {
            Some(max) => clip_grad_norm(&mut grads, max),
            None => clip_grad_norm(&mut grads, f64::INFINITY),
        };
        self.step += 1;
        let lr = warmup_lr(o.lr, self.step, o.warmup_steps);
        self.adam.update(&mut self.params, &grads, lr);
        self.ema.update(&self.params);
        StepStats { step: self.step, loss: loss_value, grad_norm, lr }
    }

    /// The EMA weights as a store (what sampling uses by default).
    pub fn ema_params(&self) -> ParamStore {
        self.ema.to_store(&self.params)
    }
}

fn batch_config(c: &TrainConfig) -> BatchConfig {
    BatchConfig { batch_size: c.batch_size, random_flip: c.random_flip, seed: c.seed }
}

fn importance_for(d: &DiffusionConfig) -> Option<ImportanceSampler> {
    match d.timestep_sampling {
        TimestepSampling::Uniform => None,
        TimestepSampling::Importance => Some(ImportanceSampler::new(d.timesteps)),
    }
}

fn check_data(unet: &UNetConfig, data: &Dataset) -> Result<()> {
    let [_, c, h, w] = data.shape();
    if c != unet.in_channels || h != unet.resolution || w != unet.resolution {
        return Err(Error::bad_file(
            data.source(),
            format!(
                "images are {c}x{h}x{w} but the model expects {}x{}x{}; pick a matching --image-size/--channels",
                unet.in_channels, unet.resolution, unet.resolution
            ),
        ));
    }
    Ok(())
}
