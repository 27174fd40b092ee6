//! The `ddpm` command line. Binary-only code lives in `src/cli/`.

mod cli;

use std::process::ExitCode;

fn main() -> ExitCode {
    ddpm::keep_freed_memory();
    cli::main()
}
