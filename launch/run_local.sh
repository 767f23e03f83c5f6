#!/usr/bin/env bash
# Run the pipeline on this machine: N ranks, one stage each (one GPU per rank where there are GPUs).
#   launch/run_local.sh 2 --model opt-125m --dummy-weights --prompt-len 64 --gen-len 16
set -euo pipefail
if [ $# -lt 1 ] || ! [[ $1 =~ ^[0-9]+$ ]]; then
    echo "usage: $0 NUM_RANKS [flexgen_dist.run arguments...]" >&2
    exit 2
fi
ranks=$1; shift
here=$(cd "$(dirname "$0")" && pwd)
. "$here/mpi_env.sh"
cores=$(nproc)
# ranks share the node's cores evenly; more ranks than cores is allowed (oversubscribed)
threads=$(( cores / ranks )); [ "$threads" -ge 1 ] || threads=1
# every rank is on this node: MPI talks through shared memory, and its TCP transport (which would
# listen on every interface in each rank) is left out; OMPI_MCA_btl overrides
exec "$MPIRUN" -n "$ranks" --oversubscribe --bind-to none --mca btl "${OMPI_MCA_btl:-^tcp}" \
    -x OMP_NUM_THREADS="$threads" \
    "$PYTHON" -m flexgen_dist.run "$@"
