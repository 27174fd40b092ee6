//! Pieces shared by the subcommands: threads, data, checkpoints, progress bars, schedules.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use ddpm::data::{DataSpec, Dataset};
use ddpm::device::{Device, DeviceChoice};
use indicatif::{ProgressBar, ProgressStyle};

/// The checkpoint file name inside a run directory.
pub use ddpm::train::run::CHECKPOINT;

/// The most worker threads allowed per core: more only adds switching.
const THREADS_PER_CORE_MAX: usize = 8;

/// Sizes rayon's global pool (0 = one thread per core).
pub fn set_threads(threads: usize) -> anyhow::Result<()> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if threads > THREADS_PER_CORE_MAX * cores {
        bail!(
            "--threads {threads} is more than {THREADS_PER_CORE_MAX} per core on this machine's {cores}; \
             use 0 (one per core) or at most {}",
            THREADS_PER_CORE_MAX * cores
        );
    }
    let threads = if threads == 0 { cores } else { threads };
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .use_current_thread()
        .build_global()
        .context("could not size the thread pool")?;
    Ok(())
}

/// Where the large products run (`--device`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DeviceArg {
    /// The CPU kernels (the default).
    Cpu,
    /// The GPU, through wgpu (a binary built with `--features wgpu` and a Vulkan, Metal or DX12
    /// driver); an error if there is none.
    Gpu,
    /// A hardware GPU if there is one, else the CPU with a one-line notice.
    Auto,
}

/// `--device`, shared by train, sample and bench.
#[derive(Args, Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceArgs {
    /// Where the matrix products and convolutions run: cpu, gpu (needs a binary built with
    /// `--features wgpu` and a GPU driver; docs/gpu.md) or auto (a hardware GPU if there is one,
    /// else the CPU).
    #[arg(long, value_enum, env = "DDPM_DEVICE", default_value = "cpu")]
    pub device: DeviceArg,
}

/// Selects the device per `--device` (or DDPM_DEVICE) and says on stderr which one runs.
pub fn select_device(args: DeviceArgs) -> anyhow::Result<()> {
    let choice = match args.device {
        DeviceArg::Cpu => DeviceChoice::Cpu,
        DeviceArg::Gpu => DeviceChoice::Gpu,
        DeviceArg::Auto => DeviceChoice::Auto,
    };
    let selected = ddpm::device::select(choice).with_context(|| format!("--device {choice}"))?;
    if let Some(notice) = &selected.notice {
        say!("{notice}");
    }
    if let Some(adapter) = &selected.adapter {
        say!(
            "device: gpu, {adapter}; products of at least {} multiply-adds run there",
            ddpm::device::gpu_min_macs()
        );
    }
    Ok(())
}

/// One line on stderr saying how much ran on the GPU (nothing when the CPU was selected).
pub fn report_gpu_use() {
    if ddpm::device::current() == Device::Gpu {
        say!("gpu: {} products and convolutions ran on the GPU", ddpm::device::gpu_calls());
    }
}

/// Loads `--data` (or the embedded MNIST when the spec has no path).
pub fn load_data(spec: &DataSpec) -> anyhow::Result<Dataset> {
    if let Some(p) = &spec.path {
        if !p.exists() {
            bail!(
                "{}: no such file or directory (give --data a folder of images, an IDX file or CIFAR-10 batches)",
                p.display()
            );
        }
    }
    let d = spec.load().with_context(|| format!("loading {}", spec.describe()))?;
    if d.is_empty() {
        bail!("{}: the dataset holds no images", d.source().display());
    }
    Ok(d)
}

/// A clap parser for a count in `range`, e.g. `value_parser = count(1..=4096)`: out-of-range
/// values are refused at parsing, naming the flag and the range.
pub fn count(range: std::ops::RangeInclusive<u64>) -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::<usize>::new().range(range)
}

/// Parses `--minutes`: a finite number of minutes above 0 and at most ten years.
pub fn parse_minutes(s: &str) -> Result<f64, String> {
    const MAX: f64 = 10.0 * 365.25 * 24.0 * 60.0;
    let m: f64 = s.trim().parse().map_err(|_| format!("{s:?} is not a number of minutes"))?;
    if !(m.is_finite() && m > 0.0 && m <= MAX) {
        return Err(format!("{s} minutes: give a number above 0 and at most {MAX} (ten years)"));
    }
    Ok(m)
}

/// Parses a value in [0, 1] (DDIM's η).
pub fn parse_unit_interval(s: &str) -> Result<f64, String> {
    let v: f64 = s.trim().parse().map_err(|_| format!("{s:?} is not a number"))?;
    if !(0.0..=1.0).contains(&v) {
        return Err(format!("{s} is outside [0, 1]"));
    }
    Ok(v)
}

/// Refuses an output file whose folder does not exist, before any work is done.
pub fn check_out_folder(out: &Path) -> anyhow::Result<()> {
    match out.parent() {
        Some(dir) if !dir.as_os_str().is_empty() && !dir.is_dir() => {
            bail!(
                "{}: the folder {} does not exist; create it or choose another --out",
                out.display(),
                dir.display()
            )
        }
        _ => Ok(()),
    }
}

/// The checkpoint file `path` names ([`ddpm::interop::resolve_checkpoint`]).
pub fn resolve_checkpoint(path: &Path) -> anyhow::Result<PathBuf> {
    Ok(ddpm::interop::resolve_checkpoint(path)?)
}

/// A progress bar with position, rate and ETA, drawn on stderr (hidden when not a terminal).
pub fn progress_bar(len: u64, what: &str) -> ProgressBar {
    if quiet_rank() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "{{spinner}} {what} [{{elapsed_precise}}] [{{wide_bar}}] {{pos}}/{{len}} ({{per_sec}}, ETA {{eta}}) {{msg}}"
        ))
        .expect("static template is valid")
        .progress_chars("=> "),
    );
    bar.enable_steady_tick(Duration::from_millis(250));
    bar
}

/// A comma-separated list of sizes on the command line, e.g. `1,2,2` (empty for none).
#[derive(Clone, Debug)]
pub struct SizeList(pub Vec<usize>);

/// Parses `1,2,2` into a [`SizeList`].
pub fn parse_list(s: &str) -> Result<SizeList, String> {
    if s.trim().is_empty() {
        return Ok(SizeList(vec![]));
    }
    s.split(',')
        .map(|x| x.trim().parse::<usize>().map_err(|e| format!("{x:?}: {e}")))
        .collect::<Result<_, _>>()
        .map(SizeList)
}

/// A loaded network ([`ddpm::interop::LoadedModel`]).
pub type Model = ddpm::interop::LoadedModel;

/// Loads `path`: a diffusers folder, a ddpm run directory or a ddpm checkpoint file
/// ([`ddpm::interop::load_model`]).
pub fn load_model(path: &Path, no_ema: bool) -> anyhow::Result<Model> {
    Ok(ddpm::interop::load_model(path, no_ema)?)
}

/// The rank of this process in a distributed run and the run's size, once known (0 and 1 until
/// then, and in every single-process command).
static RANK: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
static SIZE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(1);

/// True on the ranks other than 0 of a distributed run: they print no status (rank 0 speaks for
/// the job), only their errors.
pub fn quiet_rank() -> bool {
    RANK.load(std::sync::atomic::Ordering::Relaxed) != 0
}

/// `"rank R of P: "` in a distributed run, else empty.
pub fn rank_prefix() -> String {
    use std::sync::atomic::Ordering::Relaxed;
    match SIZE.load(Relaxed) {
        1 => String::new(),
        p => format!("rank {} of {p}: ", RANK.load(Relaxed)),
    }
}

/// Whether an MPI launcher (MPICH's Hydra, Open MPI's mpirun, PMIx, Slurm's srun) started this
/// process as one rank of a job, and the job's size if the launcher says it (0 if not).
pub fn launched_size() -> Option<usize> {
    let var = |names: &[&str]| names.iter().find_map(|v| std::env::var(v).ok());
    var(&["PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK"])?;
    let size = var(&["PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "SLURM_STEP_NUM_TASKS"]);
    Some(size.and_then(|s| s.trim().parse().ok()).unwrap_or(0))
}

/// The group this command runs in: the ranks of the MPI job when the binary has the `mpi`
/// feature and was started by a launcher, else this process alone. A launch of several ranks
/// of a binary without the feature is refused (each would run the whole job on its own).
pub fn process_group() -> anyhow::Result<Box<dyn ddpm::distributed::Collective>> {
    use std::sync::atomic::Ordering::Relaxed;
    let launched = launched_size();
    #[cfg(feature = "mpi")]
    if launched.is_some() {
        let world = ddpm::distributed::mpi::MpiWorld::init().context("starting MPI")?;
        use ddpm::distributed::Collective as _;
        RANK.store(world.rank(), Relaxed);
        SIZE.store(world.size(), Relaxed);
        return Ok(Box::new(world));
    }
    if let Some(p) = launched.filter(|&p| p != 1) {
        let p = if p == 0 { "several".to_string() } else { p.to_string() };
        bail!(
            "started as one of {p} MPI ranks, but this ddpm was built without MPI: build it with \
             `cargo build --release --features mpi` (docs/distributed.md)"
        );
    }
    let _ = Relaxed;
    Ok(Box::new(ddpm::distributed::SingleProcess))
}
