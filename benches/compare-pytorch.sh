#!/usr/bin/env bash
# ddpm vs the PyTorch peer (../shared/bench/peer/ddpm_peer.py) on the same preset, batch and
# threads, run alternately, ROUNDS times; prints the median of each and the ratio ddpm/PyTorch.
#
#   benches/compare-pytorch.sh [mnist|cifar10] [BATCH] [THREADS] [ROUNDS]
#
# Sets up the peer's virtual environment (torch, numpy) in $PEER_VENV (default /tmp/peer-venv)
# if it is missing. Run it on an otherwise idle machine: the figures mean nothing otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
preset=${1:-mnist}; batch=${2:-64}; threads=${3:-2}; rounds=${4:-3}
peer_dir=${PEER_DIR:-../shared/bench/peer}
venv=${PEER_VENV:-/tmp/peer-venv}
case "$preset" in
  mnist) config=mnist-small ;;
  cifar10) config=cifar-ddpm ;;
  *) echo "preset must be mnist or cifar10" >&2; exit 2 ;;
esac
[ -f "$peer_dir/ddpm_peer.py" ] || { echo "$peer_dir/ddpm_peer.py not found (set PEER_DIR)" >&2; exit 1; }
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet torch numpy
fi
cargo build --release --quiet
out=$(mktemp)
for r in $(seq "$rounds"); do
  ./target/release/ddpm bench --preset "$preset" --batch "$batch" --threads "$threads" --json >> "$out"
  "$venv/bin/python" "$peer_dir/ddpm_peer.py" --config "$config" --threads "$threads" \
    --batch "$batch" --sample-batch "$batch" --mode both | grep -E '"bench": ?"(train|sample)_step"' >> "$out"
done
python3 - "$out" "$preset" "$batch" "$threads" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
def med(impl, bench, key):
    v = [r[key] for r in rows if r.get("bench") == bench and (r.get("impl") == "ddpm") == (impl == "ddpm")]
    return statistics.median(v) if v else float("nan")
print(f"preset {sys.argv[2]}, batch {sys.argv[3]}, threads {sys.argv[4]}, medians over rounds")
print(f"{'figure':<22}{'ddpm':>12}{'pytorch':>12}{'ddpm/pytorch':>14}")
for bench, key in [("train_step", "median_ms"), ("sample_step", "median_ms"), ("train_step", "maxrss_mib")]:
    a, b = med("ddpm", bench, key), med("torch", bench, key)
    print(f"{bench + ' ' + key:<22}{a:>12.1f}{b:>12.1f}{a / b:>14.2f}")
PY
rm -f "$out"
