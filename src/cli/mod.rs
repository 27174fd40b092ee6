//! Argument parsing and dispatch for the `ddpm` binary: args -> validated configs -> library calls.

mod compare;
mod vectors;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Denoising Diffusion Probabilistic Models (Ho et al. 2020) on the CPU.
#[derive(Parser, Debug)]
#[command(name = "ddpm", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Write float64 reference vectors (schedule tables + one seeded batch) to an .npz.
    Vectors(vectors::VectorsArgs),
    /// Compare a candidate .npz with a reference .npz array by array; exit 1 on any mismatch.
    Compare(compare::CompareArgs),
}

/// Parses the command line, runs the command, prints any error chain on one line.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result: anyhow::Result<()> = match cli.command {
        Command::Vectors(args) => vectors::run(args),
        Command::Compare(args) => compare::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
