//! What the criterion benches share: the group settings and the allocator, as the `ddpm`
//! binary has them.

use std::time::Duration;

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion};

/// The binary's allocator: the heap on 2 MiB pages (`ddpm::HugePageHeap`).
#[global_allocator]
static ALLOCATOR: ddpm::HugePageHeap = ddpm::HugePageHeap;

/// A benchmark group of 10 samples after a 0.3 s warm-up, measured for `measure_ms`. The first
/// call also sets the allocator as the `ddpm` binary does (`ddpm::keep_freed_memory`), so freed
/// buffers are reused rather than page-faulted in again.
pub fn group<'a>(c: &'a mut Criterion, name: &str, measure_ms: u64) -> BenchmarkGroup<'a, WallTime> {
    ddpm::keep_freed_memory();
    let mut group = c.benchmark_group(name);
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_millis(measure_ms));
    group
}
