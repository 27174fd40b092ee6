#!/usr/bin/env bash
# Sampling latency, ddpm vs the PyTorch peer (../shared/bench/peer/ddpm_peer.py): the time of one
# sampling step (a network evaluation and the update) of the `mnist` preset at small batches, on
# each instruction-set level, ddpm and PyTorch run alternately, ROUNDS times. Against ddpm's avx2
# and scalar levels PyTorch is capped likewise (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA); against
# avx512 it runs uncapped, at its best on the machine. Prints per level and batch the
# median over rounds of each side's per-round median, and their ratio ddpm/PyTorch.
#
#   benches/compare-latency.sh [ROUNDS] [THREADS] [LEVELS] [BATCHES]
#   e.g. benches/compare-latency.sh 5 2 "avx512 avx2" "1 4 16"
#
# The peer's virtual environment as in compare-pytorch.sh ($PEER_VENV, default /tmp/peer-venv).
# Run it on an otherwise idle machine.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-5}; threads=${2:-2}; levels=${3:-"avx512 avx2"}; batches=${4:-"1 4 16"}
peer_dir=${PEER_DIR:-../shared/bench/peer}
venv=${PEER_VENV:-/tmp/peer-venv}
[ -f "$peer_dir/ddpm_peer.py" ] || { echo "$peer_dir/ddpm_peer.py not found (set PEER_DIR)" >&2; exit 1; }
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet torch numpy
fi
cargo build --release --quiet
out=$(mktemp)
for r in $(seq "$rounds"); do
  for level in $levels; do
    case "$level" in
      avx512) torch_env=() ;;  # PyTorch at its best on this machine
      avx2) torch_env=(ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2) ;;
      *) torch_env=(ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=DEFAULT) ;;
    esac
    for b in $batches; do
      DDPM_CPU=$level ./target/release/ddpm bench --preset mnist --mode sample --batch "$b" \
        --sample-batch "$b" --reps 15 --threads "$threads" --json | sed "s/^{/{\"level\":\"$level\",/" >> "$out"
      env "${torch_env[@]}" "$venv/bin/python" "$peer_dir/ddpm_peer.py" --config mnist-small \
        --threads "$threads" --batch "$b" --sample-batch "$b" --mode sample \
        | grep -E '"bench": ?"sample_step"' | sed "s/^{/{\"level\":\"$level\",/" >> "$out"
    done
  done
done
python3 - "$out" "$threads" <<'PY'
import collections, json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
runs = collections.defaultdict(list)
for r in rows:
    runs[(r["level"], r["batch"], r.get("impl") == "ddpm")].append(r["median_ms"])
print(f"mnist sampling step, threads {sys.argv[2]}, medians over rounds (ms)")
print(f"{'level':<8}{'batch':>6}{'ddpm':>10}{'pytorch':>10}{'ratio':>8}   ddpm rounds / pytorch rounds")
for level, batch in sorted({(k[0], k[1]) for k in runs}, key=lambda k: (k[0], k[1])):
    d, t = runs[(level, batch, True)], runs[(level, batch, False)]
    a, b = statistics.median(d), statistics.median(t)
    print(f"{level:<8}{batch:>6}{a:>10.2f}{b:>10.2f}{a / b:>8.2f}   {d} / {t}")
PY
rm -f "$out"
