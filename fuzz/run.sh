#!/usr/bin/env bash
# Coverage-guided fuzzing of every parser that reads users' files (targets.rs), with libFuzzer
# on the stable toolchain: rustc's SanitizerCoverage instruments the code (-Cpasses=sancov-module,
# stable flags), the libfuzzer-sys crate builds libFuzzer itself with the system C++ compiler.
# Overflow checks and debug assertions are on, so a wrapping size is a crash too.
#
#   fuzz/run.sh [SECONDS_PER_TARGET] [TARGET...]      (default: 60 s, every target)
#
# Writes fuzz/seeds/TARGET/ (small valid files made by targets.rs), fuzz/corpus/TARGET/ (the
# corpus libFuzzer grows from them), fuzz/logs/TARGET.log,
# and crash-*/oom-*/timeout-* files in fuzz/artifacts/TARGET/ if anything fails; prints the
# executions and crashes per target. A crashing input, once fixed, becomes a named test of the
# parser it broke. docs/reliability.md records the last long run.
set -euo pipefail
cd "$(dirname "$0")"
seconds=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(dataset image checkpoint diffusers_config npy npz betas torch_pt scorer)
host=$(rustc -vV | sed -n 's/^host: //p')
# --target keeps RUSTFLAGS off the build scripts, which must not be instrumented.
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks"
cargo build --release --locked --target "$host" --bins
bin=target/$host/release
mkdir -p logs
status=0
printf '%-18s %12s %10s %8s\n' target executions "exec/s" crashes
for t in "${targets[@]}"; do
    mkdir -p "artifacts/$t" "corpus/$t"
    set +e
    DDPM_FUZZ_SEEDS="seeds/$t" "$bin/$t" "corpus/$t" "seeds/$t" -max_total_time="$seconds" -rss_limit_mb=2048 -malloc_limit_mb=2048 \
        -timeout=20 -print_final_stats=1 -artifact_prefix="artifacts/$t/" >"logs/$t.log" 2>&1
    code=$?
    set -e
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "logs/$t.log" | tail -1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "logs/$t.log" | tail -1)
    crashes=$(find "artifacts/$t" -type f | wc -l)
    printf '%-18s %12s %10s %8s\n' "$t" "${execs:-?}" "${rate:-?}" "$crashes"
    if [ "$code" -ne 0 ] || [ "$crashes" -ne 0 ]; then
        status=1
        echo "  $t failed (exit $code); see fuzz/logs/$t.log and fuzz/artifacts/$t/" >&2
    fi
done
exit $status
