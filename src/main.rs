//! The `ddpm` command line. Binary-only code lives in `src/cli/`.

mod cli;

/// The system allocator with the heap on 2 MiB pages (see `ddpm::HugePageHeap`).
#[global_allocator]
static ALLOCATOR: ddpm::HugePageHeap = ddpm::HugePageHeap;

use std::process::ExitCode;

fn main() -> ExitCode {
    ddpm::keep_freed_memory();
    cli::main()
}
