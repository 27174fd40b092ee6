#!/usr/bin/env bash
# The demo recipe's score against training steps (docs/demo.md): trains the demo's network and
# recipe in chunks of steps (resume is bit-exact, so the chunks make one uninterrupted run), and
# at each point draws 256 digits with each sampler and scores them with `ddpm score`.
#
#   benches/demo-study.sh OUT_DIR "1500 3000 6000" [extra train flags...]
#   LR=4e-3 BATCH=64 benches/demo-study.sh ...   # the demo's lr and batch, changed
#   EMA="--ema-sigma-rel 0.1" benches/demo-study.sh ...   # its EMA (default --ema-decay 0.999)
#   SAMPLERS="dpm++2m-sde --steps 20" benches/demo-study.sh ...   # only these samplers (';'-separated)
#
# Writes OUT_DIR/study.csv: steps, sampler, seconds to sample, and the score's figures.
set -euo pipefail
out=${1:?output directory}
points=${2:?step counts, e.g. "1500 3000 6000"}
shift 2
ddpm=${DDPM:-target/release/ddpm}
mkdir -p "$out"
csv="$out/study.csv"
[ -f "$csv" ] || echo "steps,train_s,sampler,sample_s,fd,real_fd,kid,precision,recall,class_entropy,frac_conf90,real_frac_conf90" > "$csv"
run="$out/run"
samplers=("ddim --eta 1 --steps 20" "dpm++2m-sde --steps 20" "euler-ancestral --steps 20" "ddim --eta 0 --steps 20")
if [ -n "${SAMPLERS:-}" ]; then IFS=';' read -r -a samplers <<< "$SAMPLERS"; fi
for n in $points; do
  t0=$(date +%s.%N)
  if [ -f "$run/checkpoint.safetensors" ]; then
    "$ddpm" train --out "$run" --resume --steps "$n" > "$out/train-$n.log" 2>&1
  else
    "$ddpm" train --out "$run" --preset small --batch "${BATCH:-32}" --lr "${LR:-2e-3}" --warmup 100 --grad-clip 1 \
      ${EMA:---ema-decay 0.999} --sample-count 0 --checkpoint-every 500 --seed 0 --steps "$n" "$@" > "$out/train-$n.log" 2>&1
  fi
  t1=$(date +%s.%N)
  for s in "${samplers[@]}"; do
    name=$(echo "$s" | tr ' ' '_' | tr -d -- '-' )
    dir="$out/s$n-$name"
    rm -rf "$dir"
    a=$(date +%s.%N)
    # shellcheck disable=SC2086
    "$ddpm" sample --checkpoint "$run" --num 256 --seed 1 --out "$dir" --sampler $s > /dev/null 2>&1
    b=$(date +%s.%N)
    "$ddpm" score "$dir" --json > "$dir/score.json" 2>/dev/null
    python3 - "$dir/score.json" "$n" "$(echo "$t1 - $t0" | bc)" "$s" "$(echo "$b - $a" | bc)" >> "$csv" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
print(",".join([sys.argv[2], f"{float(sys.argv[3]):.1f}", '"' + sys.argv[4] + '"', f"{float(sys.argv[5]):.1f}"]
               + [f"{d[k]:.4f}" for k in ["fd", "real_fd", "kid", "precision", "recall", "class_entropy", "frac_conf90", "real_frac_conf90"]]))
PY
  done
  tail -n ${#samplers[@]} "$csv"
done
