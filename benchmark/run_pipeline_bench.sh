#!/usr/bin/env bash
# One rank with all cores against a 2-rank pipeline with half the cores each, same effective batch
# (16 sequences in flight), dummy OPT-1.3b with everything in memory. Appends the CLI's metrics
# lines (with per-stage compute and idle time, and per-rank peak memory) to $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmark/results-pipeline.jsonl}
OFFLOAD=${OFFLOAD:-$HOME/flexgen_offload_dir}
MODEL=${MODEL:-opt-1.3b}
common=(--model "$MODEL" --dummy-weights --prompt-len 128 --gen-len 32 --num-prompts 32 --gpu-batch-size 8 --ignore-eos
        --offload-dir "$OFFLOAD")
python -m flexgen_dist.run "${common[@]}" --gen-len 2 >/dev/null  # convert the store once, untimed
OMP_NUM_THREADS=$(nproc) python -m flexgen_dist.run "${common[@]}" --num-gpu-batches 2 --log-file "$OUT"
launch/run_local.sh 2 "${common[@]}" --num-gpu-batches 1 --micro-batches 2 --log-file "$OUT"
