//! Argument parsing and dispatch for the `ddpm` binary: args -> validated configs -> library calls.

/// `eprintln!` for status lines that ignores a failed write: a closed or full stderr must not
/// end (or panic) a run that is otherwise fine.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if !crate::cli::common::quiet_rank() {
            let _ = writeln!(std::io::stderr(), $($arg)*);
        }
    }};
}

/// `println!` for a command's results on stdout, in a function returning `anyhow::Result`: a
/// failed write (a full disk, a closed pipe) is that command's error, not a panic.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout(), $($arg)*)
            .map_err(|e| anyhow::anyhow!("writing to standard output: {e}"))?;
    }};
}

mod bench;
mod common;
mod compare;
mod demo;
mod eval;
mod interop;
mod predict;
mod sample;
mod sampling;
mod score;
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
    /// How good a set of images is: FD, KID, precision/recall and class statistics in a small
    /// classifier's feature space, beside real held-out images (or train that classifier).
    Score(Box<score::ScoreArgs>),
    /// Every intermediate of a seeded ancestral sampling run at chosen steps, as an .npz.
    Trace(trace::TraceArgs),
    /// Read another implementation's model into a ddpm checkpoint: a diffusers UNet2DModel
    /// (+ DDPMScheduler) folder, or an improved-/guided-diffusion .pt with its flags.
    Import(interop::ImportArgs),
    /// Write a ddpm checkpoint as a diffusers folder (UNet2DModel and DDPMPipeline load it).
    Export(interop::ExportArgs),
}

/// What the exit status means, shown by `ddpm --help`.
const EXIT_CODES: &str =
    "Exit status: 0 success; 1 an error (a bad file, flag or path: the message names it and \
the fix); 2 a usage error; 3 training diverged (non-finite loss or weights; the last good checkpoint is \
kept); 4 the output directory is in use by another run; 128+N stopped by signal N (2 Ctrl-C, 15 SIGTERM, \
1 SIGHUP) after saving a checkpoint (a second signal, a second or more after the first, exits at \
once without saving). DDPM_MAX_DATA_MIB caps what a file may make ddpm allocate (default: half \
the memory the process may use). DDPM_CPU=avx512|avx2|neon|scalar caps the instruction set of the \
kernels (default: the best this machine has; docs/cpu.md). docs/reliability.md lists the guarantees.";

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
    // Refused here, once, rather than ignored wherever the cap is read.
    if let Err(e) = ddpm::files::memory_cap_setting() {
        say!("error: {e}");
        return ExitCode::FAILURE;
    }
    if let Err(e) = ddpm::cpu::setting() {
        say!("error: {e}");
        return ExitCode::FAILURE;
    }
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
        Command::Score(args) => score::run(*args),
        Command::Import(args) => interop::run_import(args),
        Command::Export(args) => interop::run_export(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Every rank of a distributed run says why it failed, naming itself.
            use std::io::Write as _;
            let _ = writeln!(std::io::stderr(), "{}error: {}", common::rank_prefix(), one_line(&e));
            match e.chain().find_map(|c| c.downcast_ref::<ddpm::Error>()) {
                Some(ddpm::Error::Diverged { .. }) => ExitCode::from(EXIT_DIVERGED),
                Some(ddpm::Error::Locked { .. }) => ExitCode::from(EXIT_LOCKED),
                _ => ExitCode::FAILURE,
            }
        }
    }
}

/// The error chain on one line, `outer: inner: …`, leaving out a cause whose text the line
/// already ends with (the library's errors say what their source said) and folding any line
/// breaks a foreign error carries.
fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string().split_whitespace().collect::<Vec<_>>().join(" ");
        if line.ends_with(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    const MAX: usize = 2000;
    if line.len() > MAX {
        let cut = (0..=MAX).rev().find(|&i| line.is_char_boundary(i)).unwrap_or(0);
        line.truncate(cut);
        line.push_str(" …");
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_chain_is_one_line_without_repeats() {
        let io = std::io::Error::other("File exists (os error 17)");
        let lib = ddpm::Error::io("/x/afile", io);
        let e = anyhow::Error::from(lib).context("writing\nthe output");
        assert_eq!(one_line(&e), "writing the output: /x/afile: File exists (os error 17)");
        let long = anyhow::anyhow!("{}", "é".repeat(3000));
        assert!(one_line(&long).chars().count() < 1100);
    }
}
