#!/usr/bin/env bash
# Run the pipeline across several nodes listed in a hostfile (see hostfile.example).
#   IFACE=eth0 launch/run_hostfile.sh launch/hostfile.example 4 --model facebook/opt-30b ...
# IFACE pins every kind of traffic (MPI, gloo, NCCL, the rendezvous) to one network interface; on
# multi-homed hosts (docker0, lo, several NICs) leaving it unset can make ranks try an unreachable
# address and hang until --comm-timeout. Nothing listening there authenticates its peers: use an
# interface of a trusted network (see launch/README.md, "Network exposure").
set -euo pipefail
if [ $# -lt 2 ]; then
    echo "usage: [IFACE=eth0] $0 HOSTFILE NUM_RANKS [flexgen_dist.run arguments...]" >&2
    exit 2
fi
hostfile=$1 ranks=$2; shift 2
here=$(cd "$(dirname "$0")" && pwd)
. "$here/mpi_env.sh"
net=()
if [ -n "${IFACE:-}" ]; then
    # rank 0 listens on, and announces, IFACE's address on its own node (which need not be this one)
    net=(--mca btl_tcp_if_include "$IFACE" --mca oob_tcp_if_include "$IFACE" -x IFACE
         -x GLOO_SOCKET_IFNAME="$IFACE" -x NCCL_SOCKET_IFNAME="$IFACE")
fi
if [ -n "${FLEXGEN_MASTER_ADDR:-}" ]; then
    net+=(-x FLEXGEN_MASTER_ADDR)  # an address of rank 0's node; wins over IFACE
fi
exec "$MPIRUN" --hostfile "$hostfile" -n "$ranks" --bind-to none "${net[@]}" \
    -x PATH -x LD_LIBRARY_PATH -x OMP_NUM_THREADS \
    "$PYTHON" -m flexgen_dist.run "$@"
