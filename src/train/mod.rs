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

pub use crate::config::{DecayShape, DiffusionConfig, Draws, LrDecay, OptimConfig, TrainConfig};
use crate::data::{BatchConfig, Batches, Dataset};
use crate::diffusion::gaussian::q_sample_f32;
use crate::diffusion::tape_losses::training_losses_tape;
use crate::diffusion::timesteps::sample_uniform;
use crate::diffusion::{BetaSchedule, ImportanceSampler, NoiseSchedule, TimestepSampling};
use crate::distributed::{batch_slice, Collective, SingleProcess};
pub use crate::io::checkpoint::TrainState;
use crate::nn::{all_finite, clip_grad_norm, Adam, Bound, ParamStore, UNet, UNetConfig};
use crate::ops::DropoutDraws;
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
    /// Seconds spent exchanging losses and gradients with the other ranks (0 in one process).
    pub comm_s: f64,
}

/// A training run in memory: its [`TrainState`] plus what is derived from it (the network, the
/// schedule, the batch stream over the data).
pub struct Trainer {
    state: TrainState,
    net: UNet,
    schedule: NoiseSchedule,
    batches: Batches,
    /// The summed gradients of a data-parallel step, kept from step to step.
    exchange_buffer: Vec<f32>,
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
        Ok(Self { state, net, schedule, batches, exchange_buffer: vec![] })
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
        self.step_with(&SingleProcess)
    }

    /// [`Trainer::step`] as one rank of a data-parallel group: the batch is the global batch
    /// (every rank draws the same one), this rank computes the gradient of its slice
    /// ([`batch_slice`]) of (1/B)·Σ wᵢ·lossᵢ, the gradients are summed in rank order
    /// ([`Collective::sum_in_rank_order`]) and the per-example losses gathered, and every rank
    /// then takes the same clipping, Adam and EMA step. With [`SingleProcess`] this is the
    /// ordinary step. docs/distributed.md.
    ///
    /// # Errors
    /// As [`Trainer::step`]; [`Error::Distributed`] if the group has more than one rank but the
    /// run draws sequentially (a run started before keyed draws), or a communication fails.
    pub fn step_with(&mut self, group: &dyn Collective) -> Result<StepStats> {
        let batch = self.batches.next_labelled();
        self.state.batch_position = self.batches.position();
        // An unconditional model ignores labels the data may hold; check_data made sure a
        // class-conditional one has them, each below num_classes.
        let labels = batch.labels.filter(|_| self.net.config.num_classes.is_some());
        let n = batch.x0.shape()[0];
        let part = batch_slice(n, group.rank(), group.size());
        let draws = match self.state.config.draws {
            Draws::Keyed => self.keyed_draws(&part),
            Draws::Sequential if group.size() == 1 => self.sequential_draws(n),
            Draws::Sequential => {
                return Err(Error::Distributed(
                    "this run was started before keyed draws and can only continue in one process".into(),
                ))
            }
        };
        let Draws_ { t, weights, eps, mut dropout_rng } = draws;
        let x0 = batch.x0.slice_axis(ndarray::Axis(0), ndarray::Slice::from(part.clone())).to_owned();
        let labels = labels.map(|l| l[part.clone()].to_vec());
        let x_t = q_sample_f32(&self.schedule, &x0, &t, &eps);
        let model_t = self.schedule.model_timesteps_f32(&t).to_vec();

        let s = &mut self.state;
        let tape = Tape::new();
        let p = s.params.bind(&tape);
        let x_t_var = Var::constant(x_t.clone());
        let dropout = match s.config.draws {
            Draws::Keyed => DropoutDraws::Keyed { rng: &mut dropout_rng, first_example: part.start as u64 },
            Draws::Sequential => DropoutDraws::Sequential(&mut s.rng),
        };
        let out = self.net.forward_labelled(&p, &x_t_var, &model_t, labels.as_deref(), Some(dropout));
        let d = &s.config.diffusion;
        let param = d.parameterization();
        let per_item = training_losses_tape(&self.schedule, &param, d.loss, &x0, &x_t, &t, &eps, &out).loss;
        // The importance sampler's weights times the loss weighting's (docs in weighting.rs),
        // over the global batch size: the ranks' gradients add up to that of the batch mean.
        let (lw, alpha_bar) = (d.loss_weighting, self.schedule.alpha_bar());
        let w: Vec<f32> = weights
            .iter()
            .zip(&t)
            .map(|(&w, &ti)| (w * lw.weight(alpha_bar[ti], d.mean_type) / n as f64) as f32)
            .collect();
        let local = part.len();
        let loss = match local {
            0 => None,
            _ => {
                let w = Tensor::from_shape_vec(vec![local], w.clone())
                    .expect("one weight per example of the slice");
                Some(per_item.mul(&Var::constant(w)).sum())
            }
        };
        // Every rank learns every example's weighted loss and timestep, in batch order.
        let item_losses: Vec<f64> = per_item.value().iter().map(|&l| f64::from(l)).collect();
        let mine: Vec<f64> = item_losses
            .iter()
            .zip(&w)
            .map(|(&l, &w)| l * f64::from(w))
            .chain(item_losses.iter().copied())
            .chain(t.iter().map(|&t| t as f64))
            .collect();
        let comm_start = std::time::Instant::now();
        let gathered = gather_examples(group, &mine, local)?;
        let mut comm_s = if group.size() > 1 { comm_start.elapsed().as_secs_f64() } else { 0.0 };
        let loss_value = match group.size() {
            // One process: the loss as the tape computed it (the sum in f32 of the batch).
            1 => loss.as_ref().map_or(0.0, |l| f64::from(l.value()[[]])),
            _ => gathered.weighted.iter().sum::<f64>(),
        };
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
                comm_s,
            });
        }
        let mut grads = if group.size() > 1 {
            let (grads, exchange_s) =
                exchange_gradients(group, &p, loss.as_ref(), &mut self.exchange_buffer)?;
            comm_s += exchange_s;
            grads
        } else {
            match &loss {
                Some(l) => p.grads(&l.backward()),
                None => s.params.iter().map(|(_, v)| Tensor::zeros(v.raw_dim())).collect(),
            }
        };
        drop(p);
        let grad_norm = clip_grad_norm(&mut grads, o.grad_clip.unwrap_or(f64::INFINITY));
        if !grad_norm.is_finite() {
            s.skipped_steps += 1;
            return Ok(StepStats {
                step: s.step + 1,
                loss: loss_value,
                grad_norm,
                lr,
                applied: false,
                comm_s,
            });
        }
        if let Some(imp) = &mut s.importance {
            if gathered.raw.iter().all(|l| l.is_finite()) {
                imp.update(&gathered.t, &gathered.raw)
                    .expect("one finite loss per sampled timestep, each in range");
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
        Ok(StepStats { step: s.step, loss: loss_value, grad_norm, lr, applied: true, comm_s })
    }

    /// The sequential draws of a whole batch of `n`: timesteps, then noise, from the run's one
    /// stream (dropout masks come from it during the forward pass).
    fn sequential_draws(&mut self, n: usize) -> Draws_ {
        let big_t = self.schedule.num_timesteps();
        let [_, c, h, w] = self.batches.dataset().shape();
        let s = &mut self.state;
        let tb = match &s.importance {
            Some(imp) if imp.warmed_up() => imp.sample(n, &mut s.rng),
            _ => sample_uniform(big_t, n, &mut s.rng),
        };
        let eps = Tensor::from_shape_simple_fn(vec![n, c, h, w], || s.rng.sample::<f32, _>(StandardNormal));
        Draws_ { t: tb.t, weights: tb.weights, eps, dropout_rng: crate::rng_from_seed(0) }
    }

    /// The keyed draws of the examples in `part` of the next step: example i's timestep and
    /// noise from its own stream, the dropout seeds from the step's shared stream.
    fn keyed_draws(&self, part: &std::ops::Range<usize>) -> Draws_ {
        let step = self.state.step + 1;
        let seed = self.state.config.seed;
        let big_t = self.schedule.num_timesteps();
        let [_, c, h, w] = self.batches.dataset().shape();
        let (mut t, mut weights) = (Vec::with_capacity(part.len()), Vec::with_capacity(part.len()));
        let mut eps = Vec::with_capacity(part.len() * c * h * w);
        for i in part.clone() {
            let mut r = keyed_rng(seed, step, Some(i));
            let tb = match &self.state.importance {
                Some(imp) if imp.warmed_up() => imp.sample(1, &mut r),
                _ => sample_uniform(big_t, 1, &mut r),
            };
            t.extend(tb.t);
            weights.extend(tb.weights);
            eps.extend((0..c * h * w).map(|_| r.sample::<f32, _>(StandardNormal)));
        }
        let eps = Tensor::from_shape_vec(vec![part.len(), c, h, w], eps).expect("C·H·W normals per example");
        Draws_ { t, weights, eps, dropout_rng: keyed_rng(seed, step, None) }
    }
}

/// What a step draws for the examples it computes.
struct Draws_ {
    t: Vec<usize>,
    weights: Vec<f64>,
    eps: Tensor,
    dropout_rng: crate::Rng,
}

/// The stream of example `example` of (1-based) step `step`, or the step's shared stream
/// (dropout seeds) for `None`: ChaCha8 of the run's seed on stream 2^63 | step·2^16 | example,
/// or 2^62 | step. Streams 0 and 1 are the initialisation's and the sequential draws'.
pub fn keyed_rng(seed: u64, step: u64, example: Option<usize>) -> crate::Rng {
    let mut r = crate::rng_from_seed(seed);
    r.set_stream(match example {
        Some(i) => (1 << 63) | (step << 16) | i as u64,
        None => (1 << 62) | step,
    });
    r
}

/// Every example's weighted loss, raw loss and timestep, in batch order, gathered from the ranks.
struct Gathered {
    weighted: Vec<f64>,
    raw: Vec<f64>,
    t: Vec<usize>,
}

/// Gathers `mine` (this rank's `local` weighted losses, then raw losses, then timesteps) from
/// every rank into batch order.
fn gather_examples(group: &dyn Collective, mine: &[f64], local: usize) -> Result<Gathered> {
    let all = group.all_gather_f64(mine)?;
    // Three values per example; each rank's slice length follows from the batch size.
    if all.len() % 3 != 0 {
        return Err(Error::Distributed("the ranks sent losses of different shapes".into()));
    }
    let n = all.len() / 3;
    let (mut weighted, mut raw, mut t) =
        (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
    let mut at = 0;
    for r in 0..group.size() {
        let len = batch_slice(n, r, group.size()).len();
        weighted.extend_from_slice(&all[at..at + len]);
        raw.extend_from_slice(&all[at + len..at + 2 * len]);
        t.extend(all[at + 2 * len..at + 3 * len].iter().map(|&x| x as usize));
        at += 3 * len;
    }
    debug_assert_eq!(local, batch_slice(n, group.rank(), group.size()).len());
    Ok(Gathered { weighted, raw, t })
}

/// The backward pass of this rank's `loss` (zeros for a rank without examples) with every
/// gradient handed to the group as soon as it is complete, and the gradients summed over the
/// ranks in rank order ([`Collective::sum_pieces_in_rank_order`]): the gradients in store order,
/// and the seconds spent communicating (the whole exchange less the backward pass's own work).
/// `buffer` holds the summed vector and is kept from step to step.
fn exchange_gradients(
    group: &dyn Collective,
    p: &Bound,
    loss: Option<&Var>,
    buffer: &mut Vec<f32>,
) -> Result<(Vec<Tensor>, f64)> {
    let shapes: Vec<Vec<usize>> = p.vars().map(|v| v.shape().to_vec()).collect();
    let lens: Vec<usize> = shapes.iter().map(|s| s.iter().product()).collect();
    buffer.resize(lens.iter().sum(), 0.0);
    let (mut putting, mut backward) = (0.0, 0.0);
    let start = std::time::Instant::now();
    group.sum_pieces_in_rank_order(
        &lens,
        &mut |put| {
            let mut hand_over = |i: usize, g: Option<&Tensor>| {
                let t0 = std::time::Instant::now();
                match g.and_then(|g| g.as_slice()) {
                    Some(values) => put(i, values),
                    None => put(
                        i,
                        &g.map_or_else(|| vec![0.0; lens[i]], |g| g.iter().copied().collect::<Vec<_>>()),
                    ),
                }
                putting += t0.elapsed().as_secs_f64();
            };
            let t0 = std::time::Instant::now();
            match loss {
                Some(l) => drop(p.backward_notify(l, &mut hand_over)),
                None => (0..lens.len()).for_each(|i| hand_over(i, None)),
            }
            backward = t0.elapsed().as_secs_f64();
        },
        buffer,
    )?;
    let comm_s = start.elapsed().as_secs_f64() - (backward - putting);
    let mut at = 0;
    let grads = shapes
        .into_iter()
        .zip(&lens)
        .map(|(shape, &len)| {
            at += len;
            // Cannot fail: `len` is the product of `shape` (computed above from it).
            Tensor::from_shape_vec(shape, buffer[at - len..at].to_vec()).expect("len is the shape's product")
        })
        .collect();
    Ok((grads, comm_s))
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
