//! The `ddpm` command line. Binary-only code lives in `src/cli/`.

mod cli;

use std::process::ExitCode;

fn main() -> ExitCode {
    keep_freed_memory();
    cli::main()
}

/// Asks glibc's allocator to keep freed blocks for reuse instead of returning them to the
/// kernel. A training step frees and re-allocates the same large activation buffers every
/// step; by default glibc serves each with fresh `mmap` pages, and the page faults that zero
/// them cost several percent of a step. Memory use is then the peak of one step, held.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; it is called before any other thread
    // exists.
    unsafe {
        // Blocks up to 32 MiB (glibc's largest allowed threshold on 64-bit) come from the
        // heap, and the heap is never trimmed.
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}
