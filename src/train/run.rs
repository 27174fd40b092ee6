//! A training run in a directory: [`Run`] owns the directory, its lock, the checkpoints (rotated,
//! atomic, never non-finite), `metrics.csv`, `loss.png`, the periodic sample grids and the stop
//! policy (a step target, a time budget, a [`StopFlag`] that signal handlers set, and a limit on
//! non-finite steps in a row). It reports through an [`Observer`] and knows nothing of the
//! terminal, so the command line, the distributed trainer and the Python bindings share it.
//!
//! A run directory holds:
//!
//! | file                          | what                                                    |
//! |-------------------------------|---------------------------------------------------------|
//! | `checkpoint.safetensors`      | the latest checkpoint ([`crate::io::checkpoint`])       |
//! | `checkpoint.prev.safetensors` | the one before it, kept by every save                   |
//! | `metrics.csv`                 | one row per step ([`super::metrics`])                   |
//! | `loss.png`                    | the loss curve, redrawn at every save                   |
//! | `score.png`                   | the sample score (`--score-every`), redrawn when scored |
//! | `samples/step_NNNNNN.png`     | grids drawn with the EMA weights                        |
//! | `.ddpm.lock`                  | the lock file ([`crate::files::DirLock`])               |
//!
//! The guarantees, and the tests that check them, are listed in docs/reliability.md.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::metrics::{Metrics, ScoreColumns};
use super::scoring::Scoring;
use super::{StepStats, Trainer};
use crate::config::TrainConfig;
use crate::data::{DataRecord, DataSpec, Dataset};
use crate::diffusion::samplers::SamplerKind;
use crate::distributed::{Collective, SingleProcess};
use crate::files::DirLock;
use crate::io::checkpoint;
use crate::sample::{sample, SampleConfig};
pub use crate::stop::StopFlag;
use crate::{Error, Result};

/// The checkpoint's file name in a run directory.
pub const CHECKPOINT: &str = "checkpoint.safetensors";
/// The previous checkpoint's file name, kept by every save.
pub const PREVIOUS_CHECKPOINT: &str = "checkpoint.prev.safetensors";
/// The metrics file's name.
pub const METRICS: &str = "metrics.csv";
/// The loss curve's file name.
pub const LOSS_PLOT: &str = "loss.png";
/// The score curve's file name.
pub const SCORE_PLOT: &str = "score.png";

/// When a run stops and what it writes on the way.
#[derive(Clone, Debug, PartialEq)]
pub struct RunOptions {
    /// Stop when this many steps have been taken in all (counting those before a resume).
    pub steps: Option<u64>,
    /// Stop after this much time in this invocation.
    pub duration: Option<Duration>,
    /// Save a checkpoint every this many steps (and always at the end).
    pub checkpoint_every: u64,
    /// Draw a sample grid every this many steps (0: only at the end).
    pub sample_every: u64,
    /// Images in a sample grid (0: no grids).
    pub sample_count: usize,
    /// DDIM steps of the sample grids.
    pub sample_steps: usize,
    /// Stop with [`Error::Diverged`] after this many non-finite steps in a row.
    pub max_bad_steps: u64,
    /// Score the EMA weights' samples every this many steps (0: never); needs
    /// [`Run::enable_scoring`].
    pub score_every: u64,
    /// Images drawn for each score.
    pub score_samples: usize,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            steps: None,
            duration: None,
            checkpoint_every: 500,
            sample_every: 0,
            sample_count: 16,
            sample_steps: 50,
            max_bad_steps: 3,
            score_every: 0,
            score_samples: 256,
        }
    }
}

impl RunOptions {
    /// Checks the options.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] if there is neither a step target nor a time budget, or a count
    /// is out of range.
    pub fn validate(&self) -> Result<()> {
        if self.steps.is_none() && self.duration.is_none() {
            return Err(Error::config(
                "run length",
                "say how long to train: a number of steps or of minutes",
            ));
        }
        if self.checkpoint_every == 0 {
            return Err(Error::config("checkpoint interval (--checkpoint-every)", "must be at least 1"));
        }
        if self.max_bad_steps == 0 {
            return Err(Error::config("non-finite step limit (--max-bad-steps)", "must be at least 1"));
        }
        if self.sample_count > 4096 {
            return Err(Error::config(
                "sample grid size (--sample-count)",
                format!("{} is above 4096", self.sample_count),
            ));
        }
        if self.score_every > 0 && self.score_samples < 4 {
            return Err(Error::config(
                "images scored (--score-samples)",
                format!("{} is too few to score (at least 4)", self.score_samples),
            ));
        }
        if self.sample_count > 0 && self.sample_steps < 2 {
            return Err(Error::config("sample grid steps (--sample-steps)", "must be at least 2"));
        }
        Ok(())
    }
}

/// Where a resumed run's data comes from.
#[derive(Clone, Debug)]
pub enum ResumeData {
    /// Reload what the checkpoint records, and refuse it if its fingerprint changed.
    Recorded,
    /// This dataset, loaded from `spec`; refused if its fingerprint differs from the recorded
    /// one unless `allow_different`.
    Given {
        /// Where it was loaded from.
        spec: DataSpec,
        /// The images.
        dataset: Arc<Dataset>,
        /// Train on it even if it is not what the checkpoint was trained on.
        allow_different: bool,
    },
}

/// Why a run stopped (when it stopped without an error).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// The step target was reached.
    StepsReached,
    /// The time budget was spent.
    TimeUp,
    /// The [`StopFlag`] was raised, with this code (a signal number).
    Requested(usize),
}

/// What a finished run reports.
#[derive(Clone, Debug, PartialEq)]
pub struct RunOutcome {
    /// The checkpoint written last.
    pub checkpoint: PathBuf,
    /// Steps taken in all.
    pub steps: u64,
    /// Steps skipped in all for a non-finite loss or gradient.
    pub skipped_steps: u64,
    /// Why it stopped.
    pub reason: StopReason,
    /// The grid drawn at the end, if any.
    pub final_samples: Option<PathBuf>,
}

/// Something that happened during a run, for an [`Observer`] to show.
#[derive(Clone, Debug, PartialEq)]
pub enum RunEvent {
    /// Resumed on data other than the recorded data (allowed), or on data that could not be
    /// checked (an old or imported checkpoint): the message says which.
    DataNotice(String),
    /// A step was skipped for a non-finite loss or gradient norm.
    Skipped {
        /// The step attempted.
        step: u64,
        /// Its loss.
        loss: f64,
        /// Its gradient norm (NaN when the loss was already non-finite).
        grad_norm: f64,
        /// Non-finite steps in a row, this one included.
        consecutive: u64,
    },
    /// The stop flag was seen; the run saves and ends.
    Stopping(usize),
    /// A checkpoint was written.
    Saved {
        /// Its path.
        path: PathBuf,
        /// The step it holds.
        step: u64,
    },
    /// A sample grid was written.
    Sampled(PathBuf),
    /// The samples of a step were scored (`--score-every`).
    Scored {
        /// The step.
        step: u64,
        /// The figures.
        score: ScoreColumns,
    },
}

/// Progress of a run, given with every step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Progress {
    /// Time in this invocation.
    pub elapsed: Duration,
    /// Images per second of the last step.
    pub images_per_sec: f64,
    /// The step target, if any.
    pub target_steps: Option<u64>,
    /// The time budget, if any.
    pub budget: Option<Duration>,
}

/// Receives a run's progress; every method does nothing by default.
pub trait Observer {
    /// The run is about to take its first step.
    fn started(&mut self, _trainer: &Trainer) {}
    /// A step was applied.
    fn stepped(&mut self, _stats: &StepStats, _progress: &Progress) {}
    /// Something else happened.
    fn event(&mut self, _event: &RunEvent) {}
}

/// An [`Observer`] that ignores everything.
#[derive(Clone, Copy, Debug, Default)]
pub struct Silent;

impl Observer for Silent {}

/// A training run in a directory, holding its lock; see the module documentation.
pub struct Run {
    dir: PathBuf,
    /// Held by rank 0 only.
    _lock: Option<DirLock>,
    trainer: Trainer,
    /// Rank 0's metrics.csv (the other ranks write nothing).
    metrics: Option<Metrics>,
    group: Box<dyn Collective>,
    options: RunOptions,
    notices: Vec<String>,
    last_saved_step: Option<u64>,
    scoring: Option<Scoring>,
}

impl Run {
    /// Starts a new run of `config` on `dataset` (loaded from `spec`) in `dir`, created if
    /// needed. The directory is locked for the run's life.
    ///
    /// # Errors
    /// [`Error::Locked`] if another process holds the directory; [`Error::InvalidConfig`] if it
    /// already holds a checkpoint (resume it instead), or the configuration or options are
    /// invalid; [`Error::Io`] if the directory cannot be written.
    pub fn create(
        dir: &Path,
        config: TrainConfig,
        spec: DataSpec,
        dataset: Arc<Dataset>,
        options: RunOptions,
    ) -> Result<Self> {
        Self::create_in(dir, config, spec, dataset, options, Box::new(SingleProcess))
    }

    /// [`Run::create`] as one rank of `group` (docs/distributed.md): every rank builds the same
    /// trainer; rank 0 alone locks and writes the directory. The ranks agree before returning:
    /// if any rank fails, every rank returns an error.
    ///
    /// # Errors
    /// As [`Run::create`]; [`Error::Distributed`] if another rank failed or the ranks' weights
    /// differ.
    pub fn create_in(
        dir: &Path,
        config: TrainConfig,
        spec: DataSpec,
        dataset: Arc<Dataset>,
        options: RunOptions,
        group: Box<dyn Collective>,
    ) -> Result<Self> {
        let built = Self::create_parts(dir, config, spec, dataset, &options, group.rank() == 0);
        let (lock, trainer) = agree(&*group, built)?;
        Run::assemble(dir, lock, trainer, options, vec![], None, group)
    }

    fn create_parts(
        dir: &Path,
        config: TrainConfig,
        spec: DataSpec,
        dataset: Arc<Dataset>,
        options: &RunOptions,
        rank0: bool,
    ) -> Result<(Option<DirLock>, Trainer)> {
        options.validate()?;
        let lock = if rank0 { Some(lock_dir(dir)?) } else { None };
        for name in [CHECKPOINT, PREVIOUS_CHECKPOINT] {
            let path = dir.join(name);
            if path.exists() {
                return Err(Error::config(
                    "output directory",
                    format!(
                        "{} already exists: resume that run, or choose another directory",
                        path.display()
                    ),
                ));
            }
        }
        // A resume reloads the labels exactly when the fingerprint covers them.
        let spec = DataSpec { labels: dataset.labels().is_some(), ..spec.canonical()? };
        let fingerprint = dataset.fingerprint();
        let mut trainer = Trainer::new(config, dataset)?;
        trainer.state_mut().data = Some(DataRecord { spec, fingerprint });
        Ok((lock, trainer))
    }

    /// Continues the run in `dir` from its checkpoint, on the data `data` says. The directory
    /// is locked for the run's life.
    ///
    /// # Errors
    /// [`Error::Locked`] if another process holds the directory; [`Error::BadFile`] if the
    /// checkpoint is missing or refused (the message points to the previous one);
    /// [`Error::DataChanged`] if the data is not what the checkpoint was trained on (and that
    /// was not allowed); the errors of loading the recorded data.
    pub fn resume(dir: &Path, data: ResumeData, options: RunOptions) -> Result<Self> {
        Self::resume_in(dir, data, options, Box::new(SingleProcess))
    }

    /// [`Run::resume`] as one rank of `group`: every rank reads the checkpoint (the directory
    /// must be visible to every rank); rank 0 alone locks it and writes. A checkpoint written by
    /// any number of ranks resumes on any other.
    ///
    /// # Errors
    /// As [`Run::resume`]; [`Error::Distributed`] if another rank failed or the ranks' weights
    /// differ.
    pub fn resume_in(
        dir: &Path,
        data: ResumeData,
        options: RunOptions,
        group: Box<dyn Collective>,
    ) -> Result<Self> {
        let built = Self::resume_parts(dir, data, &options, group.rank() == 0);
        let (lock, trainer, notices) = agree(&*group, built)?;
        let step = trainer.step_count();
        Run::assemble(dir, lock, trainer, options, notices, Some(step), group)
    }

    fn resume_parts(
        dir: &Path,
        data: ResumeData,
        options: &RunOptions,
        rank0: bool,
    ) -> Result<(Option<DirLock>, Trainer, Vec<String>)> {
        options.validate()?;
        let lock = if rank0 { Some(lock_dir(dir)?) } else { None };
        let ckpt = dir.join(CHECKPOINT);
        let prev = dir.join(PREVIOUS_CHECKPOINT);
        if !ckpt.is_file() {
            let reason = if prev.is_file() {
                format!(
                    "missing, but the checkpoint before it is there: rename {} to {CHECKPOINT} to resume from it",
                    prev.display()
                )
            } else {
                "no checkpoint to resume from; start the run without resuming".into()
            };
            return Err(Error::bad_file(&ckpt, reason));
        }
        let mut state = checkpoint::load(&ckpt).map_err(|e| match e {
            Error::BadFile { path, reason } if prev.is_file() => Error::bad_file(
                path,
                format!(
                    "{reason}; the checkpoint before it is {}: rename it to {CHECKPOINT} to resume from it",
                    prev.display()
                ),
            ),
            other => other,
        })?;
        let mut notices = vec![];
        let dataset = match (data, &state.data) {
            (ResumeData::Recorded, None) => {
                return Err(Error::config(
                    "training data",
                    format!(
                        "{} does not record its training data (an imported or older checkpoint); \
                         give the data explicitly",
                        ckpt.display()
                    ),
                ))
            }
            (ResumeData::Recorded, Some(record)) => {
                let dataset = record.spec.load().map_err(|e| {
                    Error::config(
                        "training data",
                        format!(
                            "cannot reload the data this run was trained on, {}: {e}; give it explicitly",
                            record.spec.describe()
                        ),
                    )
                })?;
                let found = dataset.fingerprint();
                if found != record.fingerprint {
                    return Err(Error::DataChanged {
                        recorded: format!("{}: {}", record.spec.describe(), record.fingerprint),
                        found: found.to_string(),
                    });
                }
                Arc::new(dataset)
            }
            (ResumeData::Given { spec, dataset, allow_different }, recorded) => {
                let spec = spec.canonical()?;
                let conditional = state.config.unet.num_classes.is_some();
                // A class-conditional run needs the labels even if the data was given without.
                let (spec, dataset) = if conditional && dataset.labels().is_none() {
                    let spec = DataSpec { labels: true, ..spec };
                    let labelled = spec.load()?;
                    (spec, Arc::new(labelled))
                } else {
                    (DataSpec { labels: conditional, ..spec }, dataset)
                };
                let mut found = dataset.fingerprint();
                if !conditional {
                    // Labels an unconditional run does not use are not part of its data.
                    found.labels = None;
                }
                match recorded {
                    Some(r) if r.fingerprint != found && !allow_different => {
                        return Err(Error::DataChanged {
                            recorded: format!("{}: {}", r.spec.describe(), r.fingerprint),
                            found: format!("{}: {found}", spec.describe()),
                        })
                    }
                    Some(r) if r.fingerprint != found => notices.push(format!(
                        "training on {} ({found}), not on the data of the checkpoint ({}: {}), as allowed",
                        spec.describe(),
                        r.spec.describe(),
                        r.fingerprint
                    )),
                    Some(_) => {}
                    None => notices.push(format!(
                        "{} does not record its training data, so {} cannot be checked against it",
                        ckpt.display(),
                        spec.describe()
                    )),
                }
                state.data = Some(DataRecord { spec, fingerprint: found });
                dataset
            }
        };
        let trainer = Trainer::from_state(state, dataset)?;
        Ok((lock, trainer, notices))
    }

    /// The run over its parts, with metrics.csv cut back to the trainer's step.
    /// The ranks check that they hold the same weights (a hash of every parameter, Adam moment
    /// and EMA value), and rank 0 opens metrics.csv.
    fn assemble(
        dir: &Path,
        lock: Option<DirLock>,
        trainer: Trainer,
        options: RunOptions,
        notices: Vec<String>,
        last_saved_step: Option<u64>,
        group: Box<dyn Collective>,
    ) -> Result<Self> {
        if group.size() > 1 {
            let hashes = group.all_gather_u64(trainer.state().weights_hash())?;
            let differ: Vec<usize> = (0..hashes.len()).filter(|&r| hashes[r] != hashes[0]).collect();
            if !differ.is_empty() {
                return Err(Error::Distributed(format!(
                    "ranks {differ:?} hold other weights than rank 0 (hashes {hashes:x?}); every rank must read \
                     the same checkpoint"
                )));
            }
        }
        let opened =
            lock.as_ref().map(|_| Metrics::open_at(&dir.join(METRICS), trainer.step_count())).transpose();
        let metrics = agree(&*group, opened)?;
        Ok(Run {
            dir: dir.to_path_buf(),
            _lock: lock,
            trainer,
            metrics,
            group,
            options,
            notices,
            last_saved_step,
            scoring: None,
        })
    }

    /// Scores the run's samples with `scorer` every [`RunOptions::score_every`] steps: embeds
    /// the reference from the training images now (a few seconds), once. On ranks other than 0
    /// of a data-parallel run this does nothing.
    ///
    /// # Errors
    /// As [`Scoring::new`]: a scorer that does not fit the images, or a bad sample count.
    pub fn enable_scoring(&mut self, scorer: crate::score::Scorer) -> Result<()> {
        if self.metrics.is_none() {
            // A rank other than 0 of a data-parallel run: rank 0 alone draws and scores.
            return Ok(());
        }
        self.scoring = Some(Scoring::new(scorer, self.trainer.dataset(), self.options.score_samples)?);
        Ok(())
    }

    /// The trainer.
    pub fn trainer(&self) -> &Trainer {
        &self.trainer
    }

    /// The run directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Trains until the step target, the time budget or a stop request, saving on the way and at
    /// the end. A step with a non-finite loss or gradient norm is skipped (see
    /// [`Trainer::step`]); after [`RunOptions::max_bad_steps`] in a row the run ends with
    /// [`Error::Diverged`] and writes nothing more, so the last checkpoint stays the last good
    /// one.
    ///
    /// # Errors
    /// [`Error::Diverged`] as above; [`Error::Io`] if a file cannot be written; errors of
    /// sampling the grids.
    pub fn run(&mut self, stop: &StopFlag, observer: &mut dyn Observer) -> Result<RunOutcome> {
        for notice in self.notices.drain(..) {
            observer.event(&RunEvent::DataNotice(notice));
        }
        if self.options.score_every > 0 && self.scoring.is_none() && self.metrics.is_some() {
            return Err(Error::config(
                "score interval (--score-every)",
                "scoring needs a scorer; call Run::enable_scoring first",
            ));
        }
        observer.started(&self.trainer);
        let start = Instant::now();
        let batch = self.trainer.config().batch_size as f64;
        let mut consecutive_bad = 0;
        let reason = loop {
            if self.options.steps.is_some_and(|n| self.trainer.step_count() >= n) {
                break StopReason::StepsReached;
            }
            let time_up = self.options.duration.is_some_and(|d| start.elapsed() >= d);
            match self.verdict(time_up, stop.requested())? {
                Some(StopReason::Requested(code)) => {
                    observer.event(&RunEvent::Stopping(code));
                    break StopReason::Requested(code);
                }
                Some(other) => break other,
                None => {}
            }
            let began = Instant::now();
            let stats = self.trainer.step_with(&*self.group).map_err(|e| self.with_checkpoint_note(e))?;
            if !stats.applied {
                consecutive_bad += 1;
                observer.event(&RunEvent::Skipped {
                    step: stats.step,
                    loss: stats.loss,
                    grad_norm: stats.grad_norm,
                    consecutive: consecutive_bad,
                });
                if consecutive_bad >= self.options.max_bad_steps {
                    let what = if stats.loss.is_finite() {
                        "a non-finite gradient norm"
                    } else {
                        "a non-finite loss"
                    };
                    return Err(self.with_checkpoint_note(Error::Diverged {
                        step: stats.step,
                        what: what.into(),
                        consecutive: consecutive_bad,
                        checkpoint: String::new(),
                    }));
                }
                continue;
            }
            consecutive_bad = 0;
            let images_per_sec = batch / began.elapsed().as_secs_f64().max(1e-9);
            let elapsed = start.elapsed();
            let skipped = self.trainer.state().skipped_steps;
            let every = self.options.score_every;
            let score = match (&self.scoring, &self.metrics) {
                (Some(scoring), Some(_)) if every > 0 && stats.step % every == 0 => {
                    scoring.score(&self.trainer, stop)?
                }
                _ => None,
            };
            if let Some(m) = &mut self.metrics {
                m.record(&stats, images_per_sec, elapsed.as_secs_f64(), skipped, score.as_ref())?;
            }
            if let Some(score) = score {
                self.save_score_plot()?;
                observer.event(&RunEvent::Scored { step: stats.step, score });
            }
            let progress = Progress {
                elapsed,
                images_per_sec,
                target_steps: self.options.steps,
                budget: self.options.duration,
            };
            observer.stepped(&stats, &progress);
            if stats.step % self.options.checkpoint_every == 0 {
                self.save(observer)?;
            }
            let o = &self.options;
            let rank0 = self.metrics.is_some();
            if rank0 && o.sample_every > 0 && stats.step % o.sample_every == 0 && o.sample_count > 0 {
                // A stop requested while the grid is drawn ends the grid at once (a batch
                // scheduler's grace period is short) and the loop at its next check.
                if let Some(path) = self.sample_grid(stop)? {
                    observer.event(&RunEvent::Sampled(path));
                }
            }
        };
        let checkpoint = self.save(observer)?;
        let mut reason = reason;
        let final_samples = match reason {
            StopReason::Requested(_) => None,
            StopReason::StepsReached | StopReason::TimeUp
                if self.options.sample_count > 0 && self.metrics.is_some() =>
            {
                let path = self.sample_grid(stop)?;
                match (&path, stop.requested()) {
                    (Some(p), _) => observer.event(&RunEvent::Sampled(p.clone())),
                    (None, Some(code)) => {
                        observer.event(&RunEvent::Stopping(code));
                        reason = StopReason::Requested(code);
                    }
                    (None, None) => {}
                }
                path
            }
            StopReason::StepsReached | StopReason::TimeUp => None,
        };
        Ok(RunOutcome {
            checkpoint,
            steps: self.trainer.step_count(),
            skipped_steps: self.trainer.state().skipped_steps,
            reason,
            final_samples,
        })
    }

    /// Writes the checkpoint (keeping the previous one) and the loss curve. Skipped when the
    /// checkpoint already holds this step.
    fn save(&mut self, observer: &mut dyn Observer) -> Result<PathBuf> {
        let path = self.dir.join(CHECKPOINT);
        let step = self.trainer.step_count();
        if self.last_saved_step == Some(step) && path.is_file() {
            return Ok(path);
        }
        let state = self.trainer.state();
        if let Some(name) = state.first_non_finite() {
            return Err(self.with_checkpoint_note(Error::Diverged {
                step,
                what: format!("`{name}` became non-finite"),
                consecutive: 0,
                checkpoint: String::new(),
            }));
        }
        let Some(metrics) = &self.metrics else {
            // Not rank 0: rank 0 writes the checkpoint of the same state.
            self.last_saved_step = Some(step);
            return Ok(path);
        };
        checkpoint::save_keeping_previous(&path, &self.dir.join(PREVIOUS_CHECKPOINT), state)?;
        self.last_saved_step = Some(step);
        let history = metrics.history();
        if history.len() >= 2 {
            let (steps, losses): (Vec<u64>, Vec<f64>) = history.iter().copied().unzip();
            crate::io::plot::save_loss_curve(&self.dir.join(LOSS_PLOT), &steps, &losses)?;
        }
        observer.event(&RunEvent::Saved { path: path.clone(), step });
        Ok(path)
    }

    /// Redraws `score.png`: the Fréchet distance and the percentage of samples not classified
    /// with ≥ 0.9 confidence against the step, on a log axis (both fall as the model improves).
    fn save_score_plot(&self) -> Result<()> {
        let Some(metrics) = &self.metrics else { return Ok(()) };
        let scores = metrics.scores();
        if scores.len() < 2 {
            return Ok(());
        }
        let fd: Vec<(f64, f64)> = scores.iter().map(|(s, c)| (*s as f64, c.fd)).collect();
        let unsure: Vec<(f64, f64)> =
            scores.iter().map(|(s, c)| (*s as f64, (100.0 * (1.0 - c.frac_conf90)).max(0.1))).collect();
        crate::io::plot::save_line_chart(
            &self.dir.join(SCORE_PLOT),
            &format!("Sample score ({} images, EMA weights)", self.options.score_samples),
            "step",
            "lower is better",
            true,
            &[
                crate::io::plot::Series { label: "FD (scorer features)", points: &fd },
                crate::io::plot::Series { label: "% not classified with p >= 0.9", points: &unsure },
            ],
        )
    }

    /// Adds where the last good checkpoint is to a [`Error::Diverged`].
    fn with_checkpoint_note(&self, e: Error) -> Error {
        match e {
            Error::Diverged { step, what, consecutive, .. } => Error::Diverged {
                step,
                what,
                consecutive,
                checkpoint: match self.last_saved_step {
                    Some(s) => format!(" (step {s}, in {})", self.dir.join(CHECKPOINT).display()),
                    None => " (none was written yet)".into(),
                },
            },
            other => other,
        }
    }

    /// A grid of samples from the EMA weights with DDIM (η = 0), seeded by the step, written to
    /// `samples/step_NNNNNN.png`; `None` if `stop` was raised before it was done.
    ///
    /// For a class-conditional model each row is one class: rows for classes `0..min(K, n)` and
    /// `⌈n / rows⌉` images per row (so `n` is rounded up to fill the rows; 100 images of a
    /// 10-class model are a 10 × 10 grid, class 0 on top).
    fn sample_grid(&self, stop: &StopFlag) -> Result<Option<PathBuf>> {
        let t = &self.trainer;
        let n = self.options.sample_count;
        let mut rng = crate::rng_from_seed(t.step_count());
        let param = t.config().diffusion.parameterization();
        let (ema, net, schedule) = (t.ema_params(), t.net(), t.schedule());
        let cfg = |class: Option<usize>| SampleConfig {
            sampler: SamplerKind::Ddim,
            steps: Some(self.options.sample_steps.min(t.config().diffusion.timesteps)),
            stop: Some(stop.clone()),
            class,
            ..SampleConfig::ancestral()
        };
        let (images, cols) = match t.config().unet.num_classes {
            None => {
                let s = match sample(net, &ema, schedule, &param, n, &cfg(None), &mut rng, |_, _| {}) {
                    Err(Error::Interrupted) => return Ok(None),
                    other => other?,
                };
                (s.images, (n as f64).sqrt().ceil() as usize)
            }
            Some(k) => {
                let rows = k.min(n);
                let cols = n.div_ceil(rows);
                let mut parts = Vec::with_capacity(rows);
                for class in 0..rows {
                    let c = cfg(Some(class));
                    match sample(net, &ema, schedule, &param, cols, &c, &mut rng, |_, _| {}) {
                        Err(Error::Interrupted) => return Ok(None),
                        other => parts.push(other?.images),
                    }
                }
                let views: Vec<_> = parts.iter().map(|p| p.view()).collect();
                let all = ndarray::concatenate(ndarray::Axis(0), &views)
                    .expect("every class's samples are [cols, C, H, W]");
                (all, cols)
            }
        };
        let dir = self.dir.join("samples");
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let path = dir.join(format!("step_{:06}.png", t.step_count()));
        let view = images.view().into_dimensionality::<ndarray::Ix4>().expect("samples are [N, C, H, W]");
        crate::io::png::save_grid(&path, view, cols)?;
        Ok(Some(path))
    }
}

impl Run {
    /// Whether to stop before the next step, decided the same on every rank: rank 0's clock
    /// rules on the time budget, and a stop request seen by any rank stops them all (the
    /// lowest-ranked request's signal is reported). One process decides alone.
    fn verdict(&self, time_up: bool, requested: Option<usize>) -> Result<Option<StopReason>> {
        if self.group.size() == 1 {
            return Ok(match (time_up, requested) {
                (true, _) => Some(StopReason::TimeUp),
                (false, Some(code)) => Some(StopReason::Requested(code)),
                (false, None) => None,
            });
        }
        // Bit 40: rank 0's budget is spent; bits 0..32: the signal + 1 (0: none).
        let mine = (u64::from(time_up) << 40) | requested.map_or(0, |c| (c as u64 & 0xffff_ffff) + 1);
        let all = self.group.all_gather_u64(mine)?;
        if all[0] >> 40 & 1 == 1 {
            return Ok(Some(StopReason::TimeUp));
        }
        Ok(all
            .iter()
            .map(|v| v & 0xffff_ffff)
            .find(|&c| c > 0)
            .map(|c| StopReason::Requested((c - 1) as usize)))
    }

    /// This process's rank in the run's group (0 alone writes files).
    pub fn rank(&self) -> usize {
        self.group.rank()
    }
}

/// Every rank's `result`, agreed: if any rank failed, every rank returns an error (its own, or
/// one naming the first rank that failed).
fn agree<T>(group: &dyn Collective, result: Result<T>) -> Result<T> {
    if group.size() == 1 {
        return result;
    }
    let failed = group.all_gather_u64(u64::from(result.is_err()))?;
    match (result, failed.iter().position(|&f| f == 1)) {
        (Err(e), _) => Err(e),
        (Ok(_), Some(rank)) => {
            Err(Error::Distributed(format!("rank {rank} could not start the run (its message says why)")))
        }
        (Ok(v), None) => Ok(v),
    }
}

/// Creates `dir` if needed, locks it, and removes temporaries a killed run left there.
fn lock_dir(dir: &Path) -> Result<DirLock> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let lock = DirLock::acquire(dir, "ddpm train")?;
    crate::files::remove_stale_temporaries(dir)?;
    Ok(lock)
}
