#!/usr/bin/env bash
# The sampler study of docs/sampling.md: CPU seconds against steps for every sampler on one
# checkpoint, each sampler judged against its own limit.
#
#   benches/sampler-study.sh CHECKPOINT OUT_DIR [N_ODE] [N_SDE]
#
# - ODE samplers (deterministic): x_0 from the same x_T (seed 0, N_ODE images, default 64) is
#   compared with DDIM η = 0 over all T steps, the probability-flow ODE's solution; the figure is
#   the RMS difference per pixel on [-1, 1].
# - Stochastic samplers: N_SDE images (default 256) are compared with 1000 ancestral steps by
#   the RMS difference of the per-pixel mean and per-pixel standard deviation maps; the floor is
#   1000 ancestral steps against themselves with another seed.
# Each run is `ddpm trace` keeping one evaluation (x_0 in float64); its wall time is the
# sampler's cost (the same code `ddpm sample` runs). Nothing else may run meanwhile.
# Needs a python3 with numpy for benches/sampler_study.py (PYTHON=/path/to/python to choose one).
set -euo pipefail
ckpt=$1
out=$2
n_ode=${3:-64}
n_sde=${4:-256}
bin=${DDPM_BIN:-target/release/ddpm}
mkdir -p "$out"
grep -m1 "model name" /proc/cpuinfo | sed 's/.*: /cpu: /' > "$out/machine.txt"
nproc >> "$out/machine.txt"
: > "$out/runs.tsv"
run() { # name n seed args...
  local name=$1 n=$2 seed=$3
  shift 3
  local t0 t1
  t0=$(date +%s.%N)
  "$bin" trace --checkpoint "$ckpt" --num "$n" --seed "$seed" --threads 2 --keep 0 --out "$out/$name.npz" "$@" > /dev/null 2>&1
  t1=$(date +%s.%N)
  printf '%s\t%s\t%s\t%s\n' "$name" "$n" "$(echo "$t1 - $t0" | bc)" "$*" >> "$out/runs.tsv"
}
run ode_ref "$n_ode" 0 --sampler ddim --steps 1000
for k in 5 10 20 50 100; do
  for s in ddim pndm plms dpm-solver-1 dpm-solver-2 dpm-solver-3 dpm-solver-2m dpm-solver-3m dpm++2s dpm++2m dpm++3m euler heun; do
    if [ "$s" = pndm ] && [ "$k" -lt 4 ]; then continue; fi
    run "ode_${s}_k$k" "$n_ode" 0 --sampler "$s" --steps "$k"
  done
  for s in dpm++2m euler heun; do
    run "ode_${s}_karras_k$k" "$n_ode" 0 --sampler "$s" --steps "$k" --karras
  done
done
run sde_ref "$n_sde" 1 --sampler ddpm
run sde_ref2 "$n_sde" 2 --sampler ddpm
for k in 10 20 50 100 250; do
  run "sde_ddpm_k$k" "$n_sde" 1 --sampler ddpm --steps "$k"
  run "sde_ddim-eta1_k$k" "$n_sde" 1 --sampler ddim --eta 1 --steps "$k"
  run "sde_dpm++2m-sde_k$k" "$n_sde" 1 --sampler dpm++2m-sde --steps "$k"
  run "sde_euler-ancestral_k$k" "$n_sde" 1 --sampler euler-ancestral --steps "$k"
done
"${PYTHON:-python3}" "$(dirname "$0")/sampler_study.py" "$out"
