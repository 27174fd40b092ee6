#!/usr/bin/env bash
# CPU vs GPU training-step and sampling-step times of the `mnist` and `cifar10` presets
# (docs/gpu.md). Run it on a machine with a GPU and its Vulkan (or Metal / DX12) driver:
#
#     benches/gpu-bench.sh [OUT.jsonl]        # default: gpu-bench.jsonl
#
# Environment: PRESETS (default "mnist cifar10"), BATCH (64), REPS (5), WARMUP (2),
# DEVICES (default "cpu gpu"). Each line of OUT is one `ddpm bench --json` record, with the
# device, the adapter and the machine added; the summary lines go to stderr.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu-bench.jsonl}
presets=${PRESETS:-mnist cifar10}
devices=${DEVICES:-cpu gpu}
batch=${BATCH:-64}
reps=${REPS:-5}
warmup=${WARMUP:-2}

cargo build --release --features wgpu --quiet
bin=target/release/ddpm
cpu=$(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ *//' || echo unknown)
gpu=$(command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name --format=csv,noheader | head -1 || echo unknown)
echo "machine: $(nproc) cores, $cpu; gpu: $gpu" >&2
: >"$out"
for preset in $presets; do
    for device in $devices; do
        echo "== $preset on $device" >&2
        # --json prints one record per mode on stdout; stderr keeps the device line.
        "$bin" bench --preset "$preset" --batch "$batch" --warmup "$warmup" --reps "$reps" \
            --device "$device" --json 2> >(grep -E 'device|gpu:' >&2) |
            while read -r line; do
                echo "${line%\}},\"cores\":$(nproc),\"cpu\":\"$cpu\",\"gpu\":\"$gpu\"}" >>"$out"
                echo "$line" >&2
            done
    done
done
echo "wrote $out" >&2
