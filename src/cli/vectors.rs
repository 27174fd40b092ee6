//! `ddpm vectors`: write the reference vectors (schedule tables and one seeded batch) to an npz.

use std::path::PathBuf;

use anyhow::{bail, Context};
use ddpm::diffusion::convention::{Convention, NormalCdf};
use ddpm::diffusion::schedule::{read_betas_file, BetaSchedule};
use ddpm::diffusion::vectors::{ReferenceVectors, VectorsConfig, CASE_ENTRIES, TABLE_ENTRIES};

use super::common::check_out_folder;

/// Write float64 reference vectors of the diffusion math to an .npz file.
///
/// The file holds the schedule tables under improved-diffusion's names and one seeded batch of
/// cases (x0, t, noise, x_t, a stand-in ε prediction, posterior and model means/log-variances,
/// the bound's term in bits/dim, the prior term). docs/vectors.md documents every entry.
/// Another implementation can load the inputs, recompute the outputs and check them with
/// `ddpm compare`.
#[derive(clap::Args, Debug)]
pub struct VectorsArgs {
    /// β schedule: linear, cosine, quadratic, sigmoid, constant, or file:PATH (a 1-D float64
    /// .npy, or text with one β per line).
    #[arg(long, default_value = "linear", value_parser = clap::value_parser!(BetaSchedule))]
    pub schedule: BetaSchedule,

    /// Number of diffusion steps T (at least 2). Default: 1000, or the length of a file schedule.
    #[arg(long)]
    pub timesteps: Option<usize>,

    /// Where the references disagree, whose choices to follow: ho2020 (the authors' code),
    /// improved-diffusion, or diffusers. docs/conventions.md lists what each changes.
    #[arg(long, default_value = "ho2020", value_parser = clap::value_parser!(Convention))]
    pub convention: Convention,

    /// Override the convention's normal CDF in the decoder: tanh (the reference code's
    /// approximation) or erf (exact).
    #[arg(long, value_enum)]
    pub normal_cdf: Option<CdfArg>,

    /// Seed of the batch's random draws (x0, the extra timesteps, the noise, the stand-in output).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,

    /// Number of cases N (at least 4: t covers 0, 1, T/2 and T−1, the rest is drawn).
    #[arg(long, default_value_t = 8)]
    pub batch: usize,

    /// Shape of one case, C,H,W.
    #[arg(long, value_delimiter = ',', default_value = "3,4,4")]
    pub shape: Vec<usize>,

    /// Output .npz file (overwritten; its folder must exist).
    #[arg(long)]
    pub out: PathBuf,
}

/// The normal CDF choices on the command line.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum CdfArg {
    /// ½(1 + tanh(√(2/π)(x + 0.044715 x³))), as the reference code.
    Tanh,
    /// ½ erfc(−x/√2), exact.
    Erf,
}

/// Builds the vectors and writes them.
pub fn run(args: VectorsArgs) -> anyhow::Result<()> {
    let [c, h, w] = match args.shape[..] {
        [c, h, w] => [c, h, w],
        _ => bail!("--shape takes three numbers C,H,W, got {:?}", args.shape),
    };
    check_out_folder(&args.out)?;
    // The case arrays hold a dozen float64 arrays of the batch's shape.
    let elements = [args.batch, c, h, w].iter().try_fold(1u64, |acc, &d| acc.checked_mul(d as u64));
    let cap = ddpm::files::memory_cap() / (16 * 8);
    if args.batch == 0 || c == 0 || h == 0 || w == 0 || elements.is_none_or(|e| e > cap) {
        bail!(
            "--batch {} with --shape {c},{h},{w}: every size must be at least 1 and the batch at most {cap} \
             numbers in all",
            args.batch
        );
    }
    let timesteps = match (&args.schedule, args.timesteps) {
        (_, Some(t)) => t,
        (BetaSchedule::File(path), None) => {
            read_betas_file(path).with_context(|| format!("reading the β schedule {}", path.display()))?.len()
        }
        (_, None) => 1000,
    };
    let mut conventions = args.convention.settings();
    if let Some(cdf) = args.normal_cdf {
        conventions.normal_cdf = match cdf {
            CdfArg::Tanh => NormalCdf::TanhApprox,
            CdfArg::Erf => NormalCdf::Erf,
        };
    }
    let config = VectorsConfig {
        schedule: args.schedule.clone(),
        timesteps,
        conventions,
        seed: args.seed,
        batch: args.batch,
        sample_shape: [c, h, w],
    };
    let vectors = ReferenceVectors::build(&config).with_context(|| {
        format!("building reference vectors for schedule {} with T = {timesteps}", args.schedule)
    })?;
    vectors.write_npz(&args.out).with_context(|| format!("writing {}", args.out.display()))?;
    out!(
        "wrote {}: {} schedule tables (T = {timesteps}, schedule {}, convention {}) and {} case arrays \
         (N = {}, x0 [{}, {c}, {h}, {w}], t = {:?})",
        args.out.display(),
        TABLE_ENTRIES.len(),
        args.schedule,
        args.convention,
        CASE_ENTRIES.len(),
        args.batch,
        args.batch,
        vectors.t.to_vec(),
    );
    Ok(())
}
