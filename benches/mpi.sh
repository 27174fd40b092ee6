#!/usr/bin/env bash
# Data-parallel training on one machine (docs/distributed.md): the `mnist` and `cifar10` presets,
# one process with 2 threads against `mpirun -n 2` with 1 thread each, alternating, and the time
# each step spends exchanging gradients (metrics.csv's comm_s). Needs a binary built with
# `--features mpi` and mpirun on the PATH.
#
#   benches/mpi.sh [OUT_DIR] [ROUNDS]
#
# Writes OUT_DIR/mpi.csv: preset, layout, round, median step seconds, median comm seconds.
set -euo pipefail
out=${1:-target/mpi-bench}
rounds=${2:-3}
ddpm=${DDPM:-target/release/ddpm}
mkdir -p "$out"
# Any 3x32x32 images do for timing: 64 random ones in the CIFAR-10 binary format.
cifar="$out/cifar-10-batches-bin"
if [ ! -f "$cifar/data_batch_1.bin" ]; then
  mkdir -p "$cifar"
  python3 -c "import os,sys; sys.stdout.buffer.write(b''.join(bytes([i % 10]) + os.urandom(3072) for i in range(64)))" > "$cifar/data_batch_1.bin"
fi
csv="$out/mpi.csv"
echo "preset,layout,round,step_s,comm_s" > "$csv"
median() { sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
run() { # preset layout round steps batch data...
  local preset=$1 layout=$2 round=$3 steps=$4 batch=$5; shift 5
  local dir="$out/run-$preset-$layout-$round"
  rm -rf "$dir"
  local train=(train --preset "$preset" --steps "$steps" --batch "$batch" --sample-count 0 --checkpoint-every 100000 --out "$dir" "$@")
  if [ "$layout" = "1x2" ]; then
    "$ddpm" "${train[@]}" --threads 2 > /dev/null 2>&1
  else
    mpirun -n 2 "$ddpm" "${train[@]}" --threads 1 > /dev/null 2>&1
  fi
  # Per-step seconds (the batch over the images per second of each step, communication
  # included), skipping the first two steps (warm-up).
  local step comm
  step=$(awk -F, -v b="$batch" 'NR > 3 { print b / $5 }' "$dir/metrics.csv" | median)
  comm=$(awk -F, 'NR > 3 { print $8 }' "$dir/metrics.csv" | median)
  echo "$preset,$layout,$round,$step,$comm" | tee -a "$csv"
}
for round in $(seq "$rounds"); do
  for layout in 1x2 2x1; do
    run mnist "$layout" "$round" 40 64
    run cifar10 "$layout" "$round" 8 16 --data "$cifar"
  done
done
