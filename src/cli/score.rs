//! `ddpm score`: how good a set of images is, judged by a small classifier's features against
//! the reference data, beside the same figures for real held-out images; and `--train-scorer`,
//! which trains that classifier for a labelled dataset.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Args;
use ddpm::data::{find_images, load_image_paths, load_labels, DataSpec, Dataset, Split};
use ddpm::score::{score, train_scorer, Figures, Report, ScoreConfig, Scorer, ScorerTrainConfig};
use rand::seq::SliceRandom;

use super::common::{check_out_folder, count, load_data, progress_bar, set_threads};

/// `ddpm score` arguments.
#[derive(Args, Debug, Clone)]
#[command(after_help = "Examples:\n  ddpm sample --checkpoint runs/x --num 256 --out runs/x/s256\n  \
ddpm score runs/x/s256                     # against the embedded MNIST\n  \
ddpm score data/mnist/t10k-images-idx3-ubyte.gz --n 1000   # real images: near the floor\n  \
ddpm score --train-scorer --data cifar-10-batches-bin --out scorer-cifar.safetensors\n\n\
FD is a Fréchet distance in the scorer's 128-d feature space, not Inception FID: compare it \
only with scores from the same scorer (docs/score.md).")]
pub struct ScoreArgs {
    /// The images to score: a folder of PNG/JPEG (what `ddpm sample` writes; its grid.png and
    /// trajectory.png are skipped), an IDX file or CIFAR-10 batches.
    #[arg(required_unless_present = "train_scorer")]
    pub samples: Option<PathBuf>,
    /// The reference data (same formats as `train --data`; its training split is the reference,
    /// its test split, where it has one, gives the floor). Default: the embedded MNIST.
    #[arg(long)]
    pub against: Option<PathBuf>,
    /// The scorer's weights (from `--train-scorer`). Default: the shipped MNIST scorer.
    #[arg(long)]
    pub scorer: Option<PathBuf>,
    /// Score N images chosen at random by --seed (default: all).
    #[arg(long, value_parser = count(4..=1_000_000))]
    pub n: Option<usize>,
    /// Training images whose features form the reference (a seeded random subset).
    #[arg(long, default_value_t = 10_000, value_parser = count(4..=10_000_000))]
    pub reference: usize,
    /// Seed of the reference subset, the floor's images and KID's subsets.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print JSON (keys n, fd, kid, kid_se, precision, recall, class_hist, class_entropy,
    /// frac_conf90, the floor's as real_fd, real_kid, …, and floor_source).
    #[arg(long)]
    pub json: bool,
    /// Train a scorer instead: on --data (with --labels, or the labels that come with it),
    /// written to --out.
    #[arg(long, requires = "out", conflicts_with_all = ["samples", "against", "scorer", "json"])]
    pub train_scorer: bool,
    /// The labelled training images of --train-scorer (same formats as `train --data`).
    /// Default: the embedded MNIST.
    #[arg(long, requires = "train_scorer")]
    pub data: Option<PathBuf>,
    /// An IDX label file for --data (default: the one next to IDX images, or CIFAR's own labels).
    #[arg(long, requires = "train_scorer")]
    pub labels: Option<PathBuf>,
    /// Where --train-scorer writes the weights (.safetensors).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Passes over the data for --train-scorer.
    #[arg(long, default_value_t = 8, value_parser = count(1..=1000))]
    pub epochs: usize,
    /// Adam's peak learning rate for --train-scorer.
    #[arg(long, default_value_t = 2e-3)]
    pub lr: f64,
    /// Worker threads (0 = one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
}

/// `ddpm score`.
pub fn run(args: ScoreArgs) -> anyhow::Result<()> {
    set_threads(args.threads)?;
    if args.train_scorer {
        return run_train(&args);
    }
    let scorer = match &args.scorer {
        Some(p) => Scorer::load(p).with_context(|| format!("loading the scorer {}", p.display()))?,
        None => Scorer::mnist().context("loading the shipped MNIST scorer")?,
    };
    let c = scorer.config.clone();
    // Cannot fail: SAMPLES is `required_unless_present = "train_scorer"`, and --train-scorer
    // returned above.
    let samples_path = args.samples.as_deref().expect("clap requires SAMPLES without --train-scorer");
    let mut samples = load_samples(samples_path, c.resolution, c.in_channels)?;
    if let Some(n) = args.n {
        if n > samples.len() {
            bail!("--n {n}: {} holds only {} images", samples_path.display(), samples.len());
        }
        // A seeded random choice: the first N of a file need not be typical (MNIST's first
        // 5,000 test digits come from other writers than its last 5,000).
        let mut order: Vec<usize> = (0..samples.len()).collect();
        order.shuffle(&mut <ddpm::Rng as rand::SeedableRng>::seed_from_u64(args.seed ^ 0x5a));
        order.truncate(n);
        samples = samples.select(&order)?;
    }
    let spec = |split| DataSpec {
        path: args.against.clone(),
        split,
        image_size: Some(c.resolution),
        channels: Some(c.in_channels),
        labels: false,
    };
    if let Some(p) = args.against.as_deref().filter(|p| !p.exists()) {
        bail!("--against {}: no such file or directory (give the data the model was trained on: a folder of images, an IDX file or CIFAR-10 batches)", p.display());
    }
    let train = load_data(&spec(Split::Train)).context("loading the reference data (--against)")?;
    let held_out = held_out_split(&args.against, &spec(Split::Test))?;
    let config = ScoreConfig { reference_count: args.reference, seed: args.seed, ..ScoreConfig::default() };
    say!(
        "scoring {} images of {} against {} reference images of {}",
        samples.len(),
        samples_path.display(),
        config.reference_count.min(train.len()),
        train.source().display()
    );
    let report = score(&scorer, &samples, &train, held_out.as_ref(), &config)?;
    if args.json {
        out!("{}", serde_json::to_string_pretty(&report.to_json())?);
    } else {
        print_report(&report)?;
    }
    Ok(())
}

/// Scores a folder of 28×28 digits (what `ddpm sample` writes) with the shipped MNIST scorer
/// against the embedded MNIST and the default settings: what `ddpm score DIR` prints.
pub fn score_mnist_folder(dir: &Path) -> anyhow::Result<Report> {
    let scorer = Scorer::mnist().context("loading the shipped MNIST scorer")?;
    let c = &scorer.config;
    let samples = load_samples(dir, c.resolution, c.in_channels)?;
    let spec = |split| DataSpec {
        path: None,
        split,
        image_size: Some(c.resolution),
        channels: Some(c.in_channels),
        labels: false,
    };
    let train = load_data(&spec(Split::Train))?;
    let test = load_data(&spec(Split::Test))?;
    Ok(score(&scorer, &samples, &train, Some(&test), &ScoreConfig::default())?)
}

/// The test split of the reference data when it has its own (the embedded MNIST, an MNIST or
/// CIFAR-10 folder); `None` for a single file or a folder of images, whose floor is then drawn
/// from the training images outside the reference.
fn held_out_split(against: &Option<PathBuf>, test: &DataSpec) -> anyhow::Result<Option<Dataset>> {
    match against {
        None => Ok(Some(load_data(test)?)),
        Some(p) if p.is_dir() => Ok(test.load().ok().filter(|d| d.source() != p.as_path())),
        Some(_) => Ok(None),
    }
}

/// Images to score: a folder of PNG/JPEG (skipping the grid.png and trajectory.png that `ddpm
/// sample` writes beside its images), else any dataset `train --data` takes.
fn load_samples(path: &Path, resolution: usize, channels: usize) -> anyhow::Result<Dataset> {
    if !path.exists() {
        bail!("{}: no such file or directory (give a folder of sampled images, an IDX file or CIFAR-10 batches)", path.display());
    }
    if path.is_dir() {
        let overview = |p: &Path| {
            p.parent() == Some(path)
                && matches!(p.file_name().and_then(|n| n.to_str()), Some("grid.png" | "trajectory.png"))
        };
        let images: Vec<PathBuf> = find_images(path)?.into_iter().filter(|p| !overview(p)).collect();
        if !images.is_empty() {
            return load_image_paths(path, &images, resolution, channels)
                .with_context(|| format!("loading the images to score from {}", path.display()));
        }
    }
    let spec = DataSpec {
        path: Some(path.to_path_buf()),
        split: Split::Test,
        image_size: Some(resolution),
        channels: Some(channels),
        labels: false,
    };
    load_data(&spec).context("loading the images to score")
}

/// The human-readable report: one row per figure, the samples beside the floor.
fn print_report(r: &Report) -> anyhow::Result<()> {
    let (s, f) = (&r.samples, &r.floor);
    out!("{:<16} {:>22} {:>22}", "", format!("samples (n = {})", r.n), "real held-out (floor)");
    let row = |name: &str, a: String, b: String| format!("{name:<16} {a:>22} {b:>22}");
    out!("{}", row("FD", format!("{:.3}", s.fd), format!("{:.3}", f.fd)));
    out!("{}", row("KID", kid(s), kid(f)));
    out!("{}", row("precision", format!("{:.3}", s.precision), format!("{:.3}", f.precision)));
    out!("{}", row("recall", format!("{:.3}", s.recall), format!("{:.3}", f.recall)));
    out!(
        "{}",
        row("class entropy", format!("{:.3} nats", s.class_entropy), format!("{:.3} nats", f.class_entropy))
    );
    out!(
        "{}",
        row(
            "confident ≥ 0.9",
            format!("{:.1}%", 100.0 * s.frac_conf90),
            format!("{:.1}%", 100.0 * f.frac_conf90)
        )
    );
    out!("class histogram  samples {:?}", s.class_hist);
    out!("                 floor   {:?}", f.class_hist);
    out!("floor images: {}", r.floor_source);
    Ok(())
}

/// KID ± its standard error.
fn kid(f: &Figures) -> String {
    format!("{:.5} ± {:.5}", f.kid, f.kid_se)
}

/// `ddpm score --train-scorer`.
fn run_train(args: &ScoreArgs) -> anyhow::Result<()> {
    // Cannot fail: --train-scorer `requires = "out"`, and only --train-scorer calls this.
    let out = args.out.as_deref().expect("clap requires --out with --train-scorer");
    check_out_folder(out)?;
    if !(args.lr.is_finite() && args.lr > 0.0) {
        bail!("--lr {}: give a learning rate above 0", args.lr);
    }
    let spec =
        |split, labels| DataSpec { path: args.data.clone(), split, image_size: None, channels: None, labels };
    let data = match &args.labels {
        None => {
            load_data(&spec(Split::Train, true)).context("loading the scorer's training data (--data)")?
        }
        Some(l) => {
            let images = load_data(&spec(Split::Train, false))?;
            let labels = load_labels(l, images.len())?;
            images.with_labels(labels.into_iter().map(u32::from).collect())?
        }
    };
    let test = if args.labels.is_none() {
        held_out_split(&args.data, &spec(Split::Test, true)).ok().flatten()
    } else {
        None
    };
    if data.height() != data.width() {
        bail!(
            "{}: {}×{} images; the scorer takes square images",
            data.source().display(),
            data.height(),
            data.width()
        );
    }
    let config = ScorerTrainConfig {
        epochs: args.epochs,
        lr: args.lr,
        seed: args.seed,
        ..ScorerTrainConfig::default()
    };
    say!(
        "training a scorer on {} images of {} ({} epochs)",
        data.len(),
        data.source().display(),
        config.epochs
    );
    let bar = progress_bar(0, "training the scorer");
    let mut scorer = train_scorer(&data, &config, |s| {
        bar.set_length(s.total as u64);
        bar.set_position(s.step as u64);
        bar.set_message(format!("loss {:.4}", s.loss));
    })?;
    bar.finish_and_clear();
    let accuracy = match &test {
        Some(t) => {
            let a = scorer.accuracy(t)?;
            say!("test accuracy {:.2}% on {} images of {}", 100.0 * a, t.len(), t.source().display());
            format!("test accuracy {:.4} on {} images of {}", a, t.len(), t.source().display())
        }
        None => "no test split to measure accuracy on".to_string(),
    };
    let train_acc = scorer.accuracy(&data)?;
    say!("training accuracy {:.2}%", 100.0 * train_acc);
    scorer.provenance = format!(
        "ddpm score --train-scorer (ddpm {}) on {} ({} images), epochs {}, batch {}, lr {}, seed {}; training accuracy {:.4}; {}",
        env!("CARGO_PKG_VERSION"),
        data.source().display(),
        data.len(),
        config.epochs,
        config.batch_size,
        config.lr,
        config.seed,
        train_acc,
        accuracy
    );
    scorer.save(out).with_context(|| format!("writing {}", out.display()))?;
    say!("wrote {}", out.display());
    Ok(())
}
