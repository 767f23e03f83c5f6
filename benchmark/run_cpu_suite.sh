#!/usr/bin/env bash
# The single-rank CPU measurements recorded in benchmark/RESULTS.md, in one go (about 25 minutes
# on 2 cores). Results are appended as JSON lines to $OUT (default benchmark/results-cpu.jsonl).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmark/results-cpu.jsonl}
OFFLOAD=${OFFLOAD:-$HOME/flexgen_offload_dir}
python benchmark/roofline.py --json benchmark/roofline-cpu.json
B="python benchmark/bench_throughput.py --roofline benchmark/roofline-cpu.json --offload-dir $OFFLOAD --json $OUT"
# everything in memory, prompt 512 / gen 32, several effective batches, and transformers' generate
$B --model opt-125m --batches 8x1,32x1,16x4,64x2 --hf-baseline 8 32
$B --model opt-1.3b --batches 8x1,16x2 --hf-baseline 8 32
# every weight on disk, page cache dropped before each timed run (needs root; said in the output)
$B --model opt-1.3b --batches 8x1 --percent 0 0 100 0 100 0 --drop-cache
$B --model opt-1.3b --prompt-len 32 --batches 32x1,64x4 --percent 0 0 100 0 100 0 --drop-cache
# the same with 4-bit weights
$B --model opt-1.3b --batches 8x1 --percent 0 0 100 0 100 0 --drop-cache --compress-weight
$B --model opt-1.3b --prompt-len 32 --batches 32x1,64x4 --percent 0 0 100 0 100 0 --drop-cache --compress-weight
