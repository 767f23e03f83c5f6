#!/usr/bin/env bash
# One row per dtype this CPU offers, and the probe's own choice (--dtype auto), everything in
# memory: opt-125m (prompt 512, 32 sequences) and opt-1.3b (prompt 128, 16 sequences), 32 new
# tokens each. The dtypes alternate run by run so that machine drift falls on all of them.
# Rows (with the probe's reason) go to $OUT as JSON lines.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmark/results-dtype.jsonl}
OFFLOAD=${OFFLOAD:-$HOME/flexgen_offload_dir}
B="python benchmark/bench_throughput.py --offload-dir $OFFLOAD --json $OUT --gen-len 32"
for round in 1 2; do
    for dtype in auto float32 bfloat16; do
        $B --model opt-125m --prompt-len 512 --batches 32x1 --dtype $dtype
        $B --model opt-1.3b --prompt-len 128 --batches 16x1 --dtype $dtype
    done
done
