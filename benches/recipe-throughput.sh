#!/usr/bin/env bash
# Training throughput of the demo's recipe variants (docs/demo.md, "The recipe at equal wall
# time"): each variant trains 150 steps, twice, alternating; the median seconds per step of
# steps 21–150 from metrics.csv (batch / images_per_sec). Run it on a quiet machine.
#
#   benches/recipe-throughput.sh [OUT_DIR]
set -euo pipefail
out=${1:-target/recipe-throughput}
ddpm=${DDPM:-target/release/ddpm}
mkdir -p "$out"
echo "variant,round,step_s" > "$out/throughput.csv"
variants=(
  "small-b32|--batch 32"
  "small-b64|--batch 64"
  "ch32|--batch 32 --ch 32"
  "nrb2|--batch 32 --num-res-blocks 2"
  "attn14|--batch 32 --attn-res 14"
)
for round in 1 2; do
  for v in "${variants[@]}"; do
    name=${v%%|*}
    flags=${v#*|}
    batch=$(echo "$flags" | sed -E 's/.*--batch ([0-9]+).*/\1/')
    dir="$out/$name-$round"
    rm -rf "$dir"
    # shellcheck disable=SC2086
    "$ddpm" train --preset small --mean-type v --lr 2e-3 --warmup 100 --ema-decay 0.999 --steps 150 \
      --sample-count 0 --checkpoint-every 100000 --out "$dir" $flags > /dev/null 2>&1
    s=$(awk -F, -v b="$batch" 'NR > 21 { print b / $5 }' "$dir/metrics.csv" | sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}')
    echo "$name,$round,$s" | tee -a "$out/throughput.csv"
  done
done
