#!/usr/bin/env bash
# GPU readiness in one run (about 8 minutes on one CUDA GPU): transformers-equivalence tests on CUDA
# for every placement and compression (packed int4 included), a 2-rank pipeline, throughput lines
# for dummy OPT-1.3b and OPT-6.7b with FlexGen's settings, and packed int4 against dense: the
# kernel at decode shapes and in-memory decode at batch 1, 8 and 32. Writes one JSON result file.
# Without CUDA it fails loudly.
set -uo pipefail
cd "$(dirname "$0")/.."

usage() {
    cat <<EOF
usage: benchmark/gpu_check.sh [--out FILE] [--offload-dir DIR] [--skip-throughput] [--skip-int4]
                              [--models "M1 M2"]

  --out FILE          JSON result file (default: benchmark/results-gpu-check.json)
  --offload-dir DIR   where converted weights go (default: a fresh temporary directory)
  --skip-throughput   no FlexGen-settings throughput lines
  --skip-int4         no packed int4 kernel and decode comparison
  --models "M1 M2"    built-in models for the throughput lines (default: "opt-1.3b opt-6.7b")
EOF
}

OUT=benchmark/results-gpu-check.json
OFFLOAD=""
THROUGHPUT=1
INT4=1
MODELS="opt-1.3b opt-6.7b"
while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --out) [ $# -ge 2 ] || { echo "error: --out needs a file" >&2; exit 2; }; OUT=$2; shift 2 ;;
        --offload-dir) [ $# -ge 2 ] || { echo "error: --offload-dir needs a directory" >&2; exit 2; }
                       OFFLOAD=$2; shift 2 ;;
        --skip-throughput) THROUGHPUT=0; shift ;;
        --skip-int4) INT4=0; shift ;;
        --models) [ $# -ge 2 ] || { echo "error: --models needs a list" >&2; exit 2; }; MODELS=$2; shift 2 ;;
        *) echo "error: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done

PYTHON=${PYTHON:-python}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
OFFLOAD=${OFFLOAD:-$WORK/offload}
mkdir -p "$(dirname "$OUT")"

result() {  # result OK ERROR: the JSON file from the step logs gathered so far
    "$PYTHON" - "$OUT" "$WORK" "$1" "$2" <<'EOF'
import json, os, sys, time
out, work, ok, error = sys.argv[1:]
steps = {}
for name in sorted(os.listdir(work)):
    if name.endswith(".json"):
        with open(os.path.join(work, name)) as f:
            steps[name[:-5]] = json.load(f)
try:
    import torch
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    versions = {"torch": torch.__version__, "cuda": torch.version.cuda}
except Exception as e:  # torch itself may be what is broken
    device, versions = None, {"torch": f"unavailable: {e}"}
record = {"date": time.strftime("%Y-%m-%dT%H:%M:%S"), "device": device, **versions,
          "ok": ok == "1", "error": error or None, "steps": steps}
with open(out, "w") as f:
    json.dump(record, f, indent=1)
EOF
}

if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    message="CUDA is not available to $PYTHON (no GPU, or a CPU-only torch): nothing was checked"
    result 0 "$message"
    echo "error: $message; result in $OUT" >&2
    exit 3
fi

step() {  # step NAME COMMAND...: run it, keep its status and output tail as WORK/NAME.json
    local name=$1; shift
    local t0=$SECONDS
    "$@" >"$WORK/$name.log" 2>&1
    local status=$?
    "$PYTHON" - "$WORK/$name" "$status" "$((SECONDS - t0))" <<'EOF'
import json, sys
base, status, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
with open(base + ".log", errors="replace") as f:
    tail = f.read()[-3000:]
with open(base + ".json", "w") as f:
    json.dump({"status": status, "seconds": seconds, "output_tail": tail}, f)
EOF
    echo "$name: exit $status in $((SECONDS - t0)) s"
    result 0 "unfinished: stopped after step $name"  # a check killed midway still leaves its steps
    return $status
}

failed=0
# 1. every placement and compression against transformers, on the GPU (the engine picks CUDA)
step equivalence "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_equivalence.py \
    tests/test_compressed_equivalence.py tests/test_int4.py || failed=1
# 2. a 2-rank pipeline: NCCL between two GPUs, gloo when both ranks share one
COMM=cpu
[ "$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ] && COMM=gpu
step pipeline launch/run_local.sh 2 --model opt-125m --dummy-weights --prompt-len 64 --gen-len 16 \
    --num-prompts 16 --gpu-batch-size 4 --num-gpu-batches 2 --comm-device "$COMM" --ignore-eos \
    --offload-dir "$OFFLOAD" --log-file "$WORK/pipeline-metrics.jsonl" || failed=1
# 3. throughput with FlexGen's settings: everything on the GPU, prompt 512, 32 new tokens
if [ "$THROUGHPUT" = 1 ]; then
    for model in $MODELS; do
        step "throughput-$model" "$PYTHON" -m flexgen_dist.run --model "$model" --dummy-weights \
            --percent 100 0 100 0 100 0 --gpu-batch-size 32 --num-gpu-batches 1 --prompt-len 512 \
            --gen-len 32 --ignore-eos --offload-dir "$OFFLOAD" --log-file "$WORK/throughput-metrics.jsonl" \
            || failed=1
    done
fi
# 4. packed int4 against dense: the kernel at decode shapes, then decode with everything in memory
if [ "$INT4" = 1 ]; then
    step int4-kernel "$PYTHON" benchmark/bench_int4_kernel.py --device cuda --json "$WORK/int4-kernel-metrics.jsonl" \
        || failed=1
    for model in $MODELS; do
        for weights in dense int4; do
            flag=(); [ "$weights" = int4 ] && flag=(--compress-weight)
            step "int4-decode-$model-$weights" "$PYTHON" benchmark/bench_throughput.py --model "$model" \
                --prompt-len 32 --gen-len 32 --batches 1x1,8x1,32x1 "${flag[@]}" --offload-dir "$OFFLOAD" \
                --json "$WORK/int4-decode-metrics.jsonl" || failed=1
        done
    done
fi
"$PYTHON" - "$WORK" <<'EOF'
import json, os, sys
work = sys.argv[1]
for name in ("pipeline-metrics", "throughput-metrics", "int4-kernel-metrics", "int4-decode-metrics"):
    path = os.path.join(work, name + ".jsonl")
    if os.path.exists(path):
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        with open(os.path.join(work, name + ".json"), "w") as f:
            json.dump(rows, f)
EOF
if [ $failed = 0 ]; then result 1 ""; else result 0 "a step failed (see steps)"; fi
echo "result in $OUT"
exit $failed
