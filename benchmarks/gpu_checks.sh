#!/usr/bin/env bash
# The checks only a GPU can show, in one command, on a GPT-2-small-sized model (12 layers x 768,
# T = 1024, byte vocabulary, about 85M parameters) in bf16:
#   1. no host sync on quiet steps: every non-logging step runs under
#      torch.cuda.set_sync_debug_mode("error") with ScaleWatch attached (detectors on); any sync raises;
#   2. the callback's step-time overhead, interleaved (hooks on/off in alternate 2-step blocks);
#   3. the noise scale's overhead (accumulation capture, 4 micro-batches) and per-example capture;
#   4. throughput and MFU next to Lightning's ThroughputMonitor, and each one's step cost.
# Usage, from the repository root with the project installed:  bash benchmarks/gpu_checks.sh [OUTDIR]
# DRY=1 runs the same commands on the CPU with a tiny model (a check of this script, not of a GPU).
set -uo pipefail
OUT=${1:-${OUT:-gpu_results}}
mkdir -p "$OUT"
PY=${PYTHON:-python}
if [ "${DRY:-0}" = 1 ]; then
  M="--device cpu --precision 32-true --n-layer 2 --n-embd 64 --block-size 64 --batch-size 4 --threads 1"
  SYNC=""; STEPS=12; EVERY=5
else
  M="--device cuda --precision bf16-mixed --n-layer 12 --n-embd 768 --block-size 1024 --batch-size 8"
  SYNC="--sync-debug"; STEPS=60; EVERY=20
fi
status=0
run() {  # name, command...: output to the console and to $OUT/name.txt; a failure is reported, the rest still run
  local name=$1; shift
  echo "== $name: $*"
  "$@" 2>&1 | grep -v "^INFO\|litlogger\|available: \|LeafSpec" | tee "$OUT/$name.txt"
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || { echo "!! $name failed (exit $rc)"; status=1; }
}
run nvidia_smi bash -c "nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>/dev/null || echo 'no nvidia-smi'"
run sync_debug $PY benchmarks/overhead.py $M --rounds 2 --steps $STEPS --log-every $EVERY $SYNC
run overhead_interleaved $PY benchmarks/overhead.py $M --interleaved --rounds 8 --steps $((STEPS / 2)) --log-every 50
run gns_accumulation $PY benchmarks/gns_overhead.py $M --method accumulation --accumulate 4 --steps $STEPS --log-every $EVERY
run gns_per_example $PY benchmarks/gns_overhead.py $M --method per_example --steps $STEPS --log-every $EVERY
run mfu_compare $PY benchmarks/mfu_compare.py $M --rounds 3 --steps $STEPS --log-every $EVERY
echo "results in $OUT/"
exit $status
