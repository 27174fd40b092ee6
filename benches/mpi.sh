#!/usr/bin/env bash
# Data-parallel training on one machine (docs/distributed.md): the `mnist` and `cifar10` presets,
# one process with 2 threads against `mpirun -n 2` with 1 thread each, alternating, and the time
# each step spends exchanging gradients (metrics.csv's comm_s). Layouts: 1x2 (one process, two
# threads), 2x1 (two ranks, gradients sent in 16 MB buckets while the backward pass runs),
# 2x1-after (two ranks, one bucket sent after the backward pass: DDPM_MPI_BUCKET_MB=0). Then the
# exchange alone (examples/mpi_sum) at each preset's size. Needs `cargo build --release
# --features mpi --bin ddpm --example mpi_sum` and mpirun on the PATH.
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
  case "$layout" in
    1x2) "$ddpm" "${train[@]}" --threads 2 > /dev/null 2>&1 ;;
    2x1) mpirun -n 2 "$ddpm" "${train[@]}" --threads 1 > /dev/null 2>&1 ;;
    2x1-after) DDPM_MPI_BUCKET_MB=0 mpirun -n 2 "$ddpm" "${train[@]}" --threads 1 > /dev/null 2>&1 ;;
  esac
  # Per-step seconds (the batch over the images per second of each step, communication
  # included), skipping the first two steps (warm-up).
  local step comm
  step=$(awk -F, -v b="$batch" 'NR > 3 { print b / $5 }' "$dir/metrics.csv" | median)
  comm=$(awk -F, 'NR > 3 { print $8 }' "$dir/metrics.csv" | median)
  echo "$preset,$layout,$round,$step,$comm" | tee -a "$csv"
}
for round in $(seq "$rounds"); do
  for layout in 1x2 2x1 2x1-after; do
    run mnist "$layout" "$round" 40 64
    run cifar10 "$layout" "$round" 8 16 --data "$cifar"
  done
done
# The exchange alone, both ranks arriving together: 1,112,801 and 35,746,307 values.
sum=${MPI_SUM:-target/release/examples/mpi_sum}
for bucket in 16 0; do
  for n in 1112801 35746307; do
    echo "exchange, DDPM_MPI_BUCKET_MB=$bucket: $(DDPM_MPI_BUCKET_MB=$bucket mpirun -n 2 "$sum" "$n" 9)"
  done
done | tee "$out/exchange.txt"
