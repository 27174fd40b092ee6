//! Argument parsing and dispatch for the `ddpm` binary: args -> validated configs -> library calls.

mod bench;
mod common;
mod compare;
mod demo;
mod eval;
mod interop;
mod predict;
mod sample;
mod trace;
mod train;
mod vectors;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Denoising Diffusion Probabilistic Models (Ho et al. 2020) on the CPU.
#[derive(Parser, Debug)]
#[command(name = "ddpm", version, about, long_about = None, after_help = EXIT_CODES)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Train on the embedded MNIST within a time budget, then write a grid of new digits, the
    /// x_T → x_0 trajectory and the loss curve (the README's main command).
    Demo(demo::DemoArgs),
    /// Train a U-Net on a dataset (checkpoints, metrics.csv, loss.png, sample grids).
    Train(Box<train::TrainArgs>),
    /// Generate images from a checkpoint (grid.png, NNNNNN.png, trajectory.png).
    Sample(sample::SampleArgs),
    /// Time training and sampling steps of a preset (ms/step, images/s, GFLOP/s, peak RSS).
    Bench(bench::BenchArgs),
    /// Bits/dim of a checkpoint on a dataset: L_T, Σ L_(t-1), L_0 and their sum.
    Eval(eval::EvalArgs),
    /// Write float64 reference vectors (schedule tables + one seeded batch) to an .npz.
    Vectors(vectors::VectorsArgs),
    /// Compare a candidate .npz with a reference .npz array by array; exit 1 on any mismatch.
    Compare(compare::CompareArgs),
    /// The network's raw output (ε_θ) for a float32 .npy batch at timestep T, from a ddpm
    /// checkpoint or a diffusers model folder.
    Predict(predict::PredictArgs),
    /// Every intermediate of a seeded ancestral sampling run at chosen steps, as an .npz.
    Trace(trace::TraceArgs),
    /// Read a diffusers UNet2DModel (+ DDPMScheduler) folder into a ddpm checkpoint.
    Import(interop::ImportArgs),
    /// Write a ddpm checkpoint as a diffusers folder (UNet2DModel and DDPMPipeline load it).
    Export(interop::ExportArgs),
}

/// What the exit status means, shown by `ddpm --help`.
const EXIT_CODES: &str =
    "Exit status: 0 success; 1 an error (a bad file, flag or path: the message names it and \
the fix); 2 a usage error; 3 training diverged (non-finite loss or weights; the last good checkpoint is \
kept); 4 the output directory is in use by another run; 128+N stopped by signal N (2 Ctrl-C, 15 SIGTERM, \
1 SIGHUP) after saving a checkpoint.";

/// Exit status for an error whose cause is a training divergence.
const EXIT_DIVERGED: u8 = 3;
/// Exit status for an error whose cause is another process holding the directory.
const EXIT_LOCKED: u8 = 4;

/// Parses the command line, runs the command, prints any error chain on one line.
pub fn main() -> ExitCode {
    use clap::{CommandFactory, FromArgMatches};
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let result: anyhow::Result<()> = match cli.command {
        Command::Demo(args) => demo::run(args),
        Command::Train(args) => {
            let given = matches.subcommand_matches("train").map(train::explicit_flags).unwrap_or_default();
            train::run(*args, &given)
        }
        Command::Sample(args) => sample::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Vectors(args) => vectors::run(args),
        Command::Compare(args) => compare::run(args),
        Command::Predict(args) => predict::run(args),
        Command::Trace(args) => trace::run(args),
        Command::Import(args) => interop::run_import(args),
        Command::Export(args) => interop::run_export(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            match e.chain().find_map(|c| c.downcast_ref::<ddpm::Error>()) {
                Some(ddpm::Error::Diverged { .. }) => ExitCode::from(EXIT_DIVERGED),
                Some(ddpm::Error::Locked { .. }) => ExitCode::from(EXIT_LOCKED),
                _ => ExitCode::FAILURE,
            }
        }
    }
}
