#!/usr/bin/env bash
# One rank with both cores against a 2-rank pipeline (one core each), both planned by --policy
# auto for the same prompts, dummy OPT-1.3b in memory; then a 2-rank run whose ranks get unequal
# memory (--rank-mem). Appends the CLI's metrics lines.
#   NUM_PROMPTS=512 PROMPT_LEN=64 GEN_LEN=32 (a batch job: the planner may fill large blocks);
#   NUM_PROMPTS=32 PROMPT_LEN=128 (few sequences: decode reads every stage's weights per micro-batch)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmark/results-pipeline.jsonl}
MODEL=${MODEL:-opt-1.3b}
REPS=${REPS:-2}
common=(--model "$MODEL" --dummy-weights --prompt-len "${PROMPT_LEN:-64}" --gen-len "${GEN_LEN:-32}"
        --num-prompts "${NUM_PROMPTS:-512}" --ignore-eos --quiet)
python -m flexgen_dist.run "${common[@]}" --gen-len 2 >/dev/null  # convert the store once, untimed
for rep in $(seq "$REPS"); do
    OMP_NUM_THREADS=$(nproc) python -m flexgen_dist.run "${common[@]}" --log-file "$OUT" | grep -E "^(plan|  batches|  rank|predicted|total)" || true
    launch/run_local.sh 2 "${common[@]}" --log-file "$OUT" | grep -E "^(plan|  batches|  rank|predicted|total)" || true
done
[ "${UNEQUAL:-1}" = 1 ] || exit 0
# unequal ranks: rank 0 may hold about a third of the weights, rank 1 all of them
launch/run_local.sh 2 "${common[@]}" --rank-mem "${RANK_MEM:-1.9,4.5}" --log-file "$OUT" | grep -E "^(plan|  batches|  rank|predicted|total|    predicted memory)"
# the same memory with the stages balanced by bytes and everything in memory: refused on rank 0
launch/run_local.sh 2 "${common[@]}" --rank-mem "${RANK_MEM:-1.9,4.5}" --percent 100 0 100 0 100 0 2>&1 | grep -E "^error" || true
