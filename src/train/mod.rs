//! Training: [`Trainer::step`], one step of Ho et al.'s Algorithm 1 with Adam, clipping, warm-up
//! and the parameter EMA, on a [`TrainState`] (the plain record a checkpoint holds); and
//! [`run::Run`], a whole training run in a directory (checkpoints, metrics, samples, the lock and
//! the stop policy).
//!
//! | file       | owns                                                                  |
//! |------------|-----------------------------------------------------------------------|
//! | `mod.rs`   | [`Trainer`]: state + network + schedule + batch stream; the non-finite guard |
//! | [`run`]    | [`run::Run`]: directory, lock, rotation, metrics.csv, loss.png, samples, stop policy |
//! | [`metrics`]| metrics.csv: the header, a row per step, the cut back to a checkpoint's step |
//! | [`scoring`]| `--score-every`: samples of the EMA weights scored during the run     |
//!
//! Randomness: the trainer owns one [`Rng`](crate::Rng) (timesteps, noise, dropout, in that
//! order each step) and the batch stream has its own seeded stream; both positions are saved in
//! the checkpoint, so a resumed run draws exactly what an uninterrupted one would.

pub mod metrics;
pub mod run;
pub mod scoring;

use std::sync::Arc;

use rand::Rng as _;
use rand_distr::StandardNormal;

pub use crate::config::{DecayShape, DiffusionConfig, LrDecay, OptimConfig, TrainConfig};
use crate::data::{BatchConfig, Batches, Dataset};
use crate::diffusion::gaussian::q_sample_f32;
use crate::diffusion::tape_losses::training_losses_tape;
use crate::diffusion::timesteps::sample_uniform;
use crate::diffusion::{BetaSchedule, ImportanceSampler, NoiseSchedule, TimestepSampling};
pub use crate::io::checkpoint::TrainState;
use crate::nn::{all_finite, clip_grad_norm, Adam, ParamStore, UNet, UNetConfig};
use crate::{rng_from_seed, Error, Result, Tape, Tensor, Var};

/// What one step reports.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepStats {
    /// The step: the one just taken if `applied`, else the one attempted (1-based).
    pub step: u64,
    /// The training loss of the batch.
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Learning rate used (or that would have been).
    pub lr: f64,
    /// False when the loss or the gradient norm was not finite: the weights, moments and EMA
    /// were left untouched (the batch, timesteps and noise were still consumed).
    pub applied: bool,
}

/// A training run in memory: its [`TrainState`] plus what is derived from it (the network, the
/// schedule, the batch stream over the data).
pub struct Trainer {
    state: TrainState,
    net: UNet,
    schedule: NoiseSchedule,
    batches: Batches,
}

impl Trainer {
    /// A fresh run: weights from the seed, zero Adam moments, EMA at the initial weights. A
    /// `file:` schedule is read here, once, and stored in the configuration as its β values
    /// (with the file's name and hash in [`TrainState::schedule_source`]), so the run never
    /// depends on the file again.
    ///
    /// # Errors
    /// An invalid configuration, an unreadable schedule file, or data whose shape does not
    /// match the network.
    pub fn new(mut config: TrainConfig, data: Arc<Dataset>) -> Result<Self> {
        let mut schedule_source = None;
        if let BetaSchedule::File(path) = &config.diffusion.schedule {
            let bytes = crate::files::read_capped(path, 64 << 20)?;
            let betas = config
                .diffusion
                .schedule
                .betas(config.diffusion.timesteps, &config.diffusion.convention.settings());
            schedule_source =
                Some(format!("{} (xxh3 {:032x})", path.display(), xxhash_rust::xxh3::xxh3_128(&bytes)));
            // Validated as a process below, with the file named in any error.
            config.diffusion.schedule()?;
            config.diffusion.schedule = BetaSchedule::Custom(betas?);
        }
        config.validate()?;
        let net = UNet::new(config.unet.clone())?;
        check_data(&config.unet, &data)?;
        let mut init_rng = rng_from_seed(config.seed);
        let params = net.init_params(&mut init_rng);
        let o = &config.optim;
        let adam = Adam::new(&params, o.adam_config());
        let ema = o.new_ema(&params);
        // The training stream is seeded apart from the initialisation stream.
        let mut rng = rng_from_seed(config.seed);
        rng.set_stream(1);
        let state = TrainState {
            importance: importance_for(&config.diffusion),
            step: 0,
            skipped_steps: 0,
            params,
            adam,
            ema,
            rng,
            batch_position: Default::default(),
            data: None,
            source: "ddpm train".into(),
            schedule_source,
            clip_x0: None,
            config,
        };
        Self::from_state(state, data)
    }

    /// Continues from a state (a loaded checkpoint) on `data`.
    ///
    /// # Errors
    /// An invalid configuration, data that does not fit the network, or a batch position
    /// that does not fit the data.
    pub fn from_state(mut state: TrainState, data: Arc<Dataset>) -> Result<Self> {
        state.config.validate()?;
        let net = UNet::new(state.config.unet.clone())?;
        check_data(&state.config.unet, &data)?;
        let batches = Batches::resume(data, batch_config(&state.config), state.batch_position)?;
        let schedule = state.config.diffusion.schedule()?;
        if state.importance.is_none() {
            state.importance = importance_for(&state.config.diffusion);
        }
        if let Some(imp) = &state.importance {
            imp.validate(schedule.num_timesteps())?;
        }
        Ok(Self { state, net, schedule, batches })
    }

    /// The state: what a checkpoint of this moment holds.
    pub fn state(&self) -> &TrainState {
        &self.state
    }

    /// The state, for changes a run makes between steps (e.g. recording the data).
    pub fn state_mut(&mut self) -> &mut TrainState {
        &mut self.state
    }

    /// The run's configuration.
    pub fn config(&self) -> &TrainConfig {
        &self.state.config
    }

    /// Optimiser steps taken.
    pub fn step_count(&self) -> u64 {
        self.state.step
    }

    /// The network.
    pub fn net(&self) -> &UNet {
        &self.net
    }

    /// The noise schedule.
    pub fn schedule(&self) -> &NoiseSchedule {
        &self.schedule
    }

    /// The training set.
    pub fn dataset(&self) -> &Dataset {
        self.batches.dataset()
    }

    /// The EMA weights as a store (what sampling uses by default).
    pub fn ema_params(&self) -> ParamStore {
        self.state.ema_params()
    }

    /// One step of Algorithm 1 (Ho et al. 2020): x0 from the data, t ~ U{0..T−1} (or by
    /// importance), ε ~ N(0, I), x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε (Eq. 4), the configured loss
    /// (L_simple = mean‖ε − ε_θ(x_t, t)‖², Eq. 14, or the bound / hybrid of
    /// [`training_losses_tape`]); then clip, Adam with warm-up, EMA.
    ///
    /// A loss or gradient norm that is not finite is caught before the optimiser: the step is
    /// skipped ([`StepStats::applied`] is false, [`TrainState::skipped_steps`] counts it) and
    /// nothing but the random streams moves.
    ///
    /// # Errors
    /// [`Error::Diverged`] if the update itself made a weight non-finite (finite gradients and
    /// a finite learning rate so large that the result overflows f32): the state cannot be
    /// saved after that.
    pub fn step(&mut self) -> Result<StepStats> {
        let batch = self.batches.next_labelled();
        let x0 = batch.x0;
        self.state.batch_position = self.batches.position();
        // An unconditional model ignores labels the data may hold; check_data made sure a
        // class-conditional one has them, each below num_classes.
        let labels = batch.labels.filter(|_| self.net.config.num_classes.is_some());
        let n = x0.shape()[0];
        let big_t = self.schedule.num_timesteps();
        let s = &mut self.state;
        let t = match &s.importance {
            Some(imp) if imp.warmed_up() => imp.sample(n, &mut s.rng),
            _ => sample_uniform(big_t, n, &mut s.rng),
        };
        let eps = Tensor::from_shape_simple_fn(x0.shape(), || s.rng.sample::<f32, _>(StandardNormal));
        let x_t = q_sample_f32(&self.schedule, &x0, &t.t, &eps);
        let model_t = self.schedule.model_timesteps_f32(&t.t).to_vec();

        let tape = Tape::new();
        let p = s.params.bind(&tape);
        let x_t_var = Var::constant(x_t.clone());
        let out = self.net.forward_labelled(&p, &x_t_var, &model_t, labels.as_deref(), Some(&mut s.rng));
        let d = &s.config.diffusion;
        let param = d.parameterization();
        let per_item = training_losses_tape(&self.schedule, &param, d.loss, &x0, &x_t, &t.t, &eps, &out).loss;
        // The importance sampler's weights times the loss weighting's (docs in weighting.rs).
        let (lw, alpha_bar) = (d.loss_weighting, self.schedule.alpha_bar());
        let w: Vec<f32> = t
            .weights
            .iter()
            .zip(&t.t)
            .map(|(&w, &ti)| (w * lw.weight(alpha_bar[ti], d.mean_type)) as f32)
            .collect();
        let weights = Tensor::from_shape_vec(vec![n], w)
            .expect("both samplers return one weight per item of the batch");
        let loss = per_item.mul(&Var::constant(weights)).mean();
        let loss_value = loss.value()[[]] as f64;
        let o = &s.config.optim;
        let lr = o.lr_at(s.step + 1);
        if !loss_value.is_finite() {
            s.skipped_steps += 1;
            return Ok(StepStats {
                step: s.step + 1,
                loss: loss_value,
                grad_norm: f64::NAN,
                lr,
                applied: false,
            });
        }
        let mut grads = p.grads(&loss.backward());
        drop(p);
        let grad_norm = clip_grad_norm(&mut grads, o.grad_clip.unwrap_or(f64::INFINITY));
        if !grad_norm.is_finite() {
            s.skipped_steps += 1;
            return Ok(StepStats { step: s.step + 1, loss: loss_value, grad_norm, lr, applied: false });
        }
        if let Some(imp) = &mut s.importance {
            let losses: Vec<f64> = per_item.value().iter().map(|&l| l as f64).collect();
            if losses.iter().all(|l| l.is_finite()) {
                imp.update(&t.t, &losses).expect("one finite loss per sampled timestep, each in range");
            }
        }
        s.step += 1;
        s.adam.update(&mut s.params, &grads, lr);
        s.ema.update(&s.params);
        if let Some((name, _)) = s.params.iter().find(|(_, v)| !all_finite(v)) {
            return Err(Error::Diverged {
                step: s.step,
                what: format!("the Adam update made `{name}` non-finite (learning rate {lr})"),
                consecutive: 1,
                checkpoint: String::new(),
            });
        }
        Ok(StepStats { step: s.step, loss: loss_value, grad_norm, lr, applied: true })
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

/// Checks that the data fits the network: its shape, and for a class-conditional network, one
/// label per image, each below `num_classes`. Both new runs and resumes pass here.
fn check_data(unet: &UNetConfig, data: &Dataset) -> Result<()> {
    if let Some(k) = unet.num_classes {
        match data.num_classes() {
            None => {
                return Err(Error::bad_file(
                    data.source(),
                    format!(
                        "the model is conditioned on {k} classes but these images were loaded without \
                         class labels; load them with their labels (`ddpm train --class-cond`)"
                    ),
                ))
            }
            Some(found) if found > k => {
                return Err(Error::bad_file(
                    data.source(),
                    format!(
                        "the labels go up to {} but the model is conditioned on {k} classes (0..={})",
                        found - 1,
                        k - 1
                    ),
                ))
            }
            Some(_) => {}
        }
    }
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
