#!/usr/bin/env bash
# The peer comparison of benchmark/RESULTS.md from scratch: a virtual environment (made here if
# none is active), the package with its benchmark extras, then the measurements, the tables, the
# figures and RESULTS.md's section. Run as root so the memory limit and page-cache drops are real.
#
#     benchmark/run_peers.sh [PRESET] [bench_peers.py run options]    (default preset: cpu-quick)
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z ${VIRTUAL_ENV:-} ]]; then
    [[ -x .venv/bin/python ]] || python3 -m venv .venv
    . .venv/bin/activate
fi
# torch first, pinned to the CPU build the results were taken with; drop the pin on a GPU machine
python -c "import torch" 2>/dev/null || pip install -q "torch==${TORCH_VERSION:-2.13.0}"
pip install -q -e '.[bench]'
preset=${1:-cpu-quick}
shift || true
python benchmark/bench_peers.py run --preset "$preset" "$@"
