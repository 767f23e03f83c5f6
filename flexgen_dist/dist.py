"""Process-group bootstrap for pipeline stages: who am I, who are my neighbours, and how a failure
on any rank ends the whole job with a message instead of a hang.

Rank, world size and local rank come from MPI (any implementation, through mpi4py) when launched by
mpirun/mpiexec, from torchrun's or Slurm's variables otherwise. Rank 0 picks a free port and tells
the others over MPI, so no fixed port is needed.
"""
from __future__ import annotations

import os
import socket
import sys
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .errors import FlexGenError

MPI_ENV = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MV2_COMM_WORLD_SIZE", "MPI_LOCALNRANKS")
ERROR_TAG = 7701  # MPI tag of failure reports sent to rank 0


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_size: int = 1
    mpi: object = None  # mpi4py's COMM_WORLD when launched by MPI
    backend: str | None = None

    @property
    def first(self) -> bool:
        return self.rank == 0

    @property
    def last(self) -> bool:
        return self.rank == self.world_size - 1


def detect() -> DistContext:
    """Read the launcher's view of this process, without starting any communication yet."""
    if any(v in os.environ for v in MPI_ENV):
        from mpi4py import MPI
        world = MPI.COMM_WORLD
        node = world.Split_type(MPI.COMM_TYPE_SHARED)
        return DistContext(world.Get_rank(), world.Get_size(), node.Get_rank(), node.Get_size(), world)
    env = os.environ
    if "WORLD_SIZE" in env and "RANK" in env:  # torchrun
        return DistContext(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                           int(env.get("LOCAL_WORLD_SIZE", 1)))
    if "SLURM_NTASKS" in env and "SLURM_PROCID" in env:
        return DistContext(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)),
                           int(env.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0]))
    return DistContext()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _rendezvous(ctx: DistContext) -> str:
    if "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ:
        return f"tcp://{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    if ctx.mpi is None:
        raise FlexGenError("MASTER_ADDR and MASTER_PORT must be set when not launched by mpirun")
    address = None
    if ctx.first:
        host = "127.0.0.1" if ctx.local_size == ctx.world_size else socket.gethostbyname(socket.gethostname())
        address = f"tcp://{os.environ.get('FLEXGEN_MASTER_ADDR', host)}:{_free_port()}"
    return ctx.mpi.bcast(address, root=0)


def init(ctx: DistContext, comm_device: str | None, timeout_s: float) -> DistContext:
    """Join the process group (gloo on CPU, NCCL between GPUs) with an explicit timeout."""
    if ctx.world_size == 1:
        return ctx
    use_gpu = comm_device == "gpu" or (comm_device is None and torch.cuda.is_available())
    if use_gpu and not torch.cuda.is_available():
        raise FlexGenError("--comm-device gpu needs CUDA, which this machine does not have")
    if use_gpu:
        torch.cuda.set_device(ctx.local_rank % torch.cuda.device_count())
    ctx.backend = "nccl" if use_gpu else "gloo"
    if "OMP_NUM_THREADS" not in os.environ:  # ranks sharing a node share its cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // ctx.local_size))
    dist.init_process_group(ctx.backend, init_method=_rendezvous(ctx), rank=ctx.rank,
                            world_size=ctx.world_size, timeout=timedelta(seconds=timeout_s))
    return ctx


def shutdown(ctx: DistContext) -> None:
    if ctx.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def report_failure(ctx: DistContext, error: BaseException) -> str:
    """Tell rank 0 why this rank is failing; rank 0 collects what the others said.
    Returns the message to print (on rank 0: the most telling report from any rank)."""
    mine = f"rank {ctx.rank}: {type(error).__name__}: {error}".replace("\n", " ")
    if ctx.mpi is None or ctx.world_size == 1:
        return mine
    if not ctx.first:
        try:
            ctx.mpi.send(mine, dest=0, tag=ERROR_TAG)  # small: delivered eagerly, no receiver needed yet
        except Exception:
            pass
        return mine
    reports, deadline = [], time.monotonic() + 3.0
    while time.monotonic() < deadline:
        if ctx.mpi.iprobe(source=-1, tag=ERROR_TAG):  # MPI.ANY_SOURCE
            reports.append(ctx.mpi.recv(source=-1, tag=ERROR_TAG))
            deadline = min(deadline, time.monotonic() + 0.5)
        else:
            time.sleep(0.05)
    # a rank that raised an error of its own explains more than one that only lost a peer
    candidates = [mine] + reports
    own = [r for r in candidates if "PeerLost" not in r]
    return (own or candidates)[0]


class PeerLost(RuntimeError):
    """A neighbouring rank stopped answering (it died, or its process group broke)."""


def fail(ctx: DistContext, error: BaseException) -> None:
    """Print the failure (rank 0 speaks for the job), then leave without waiting on peers."""
    message = report_failure(ctx, error)
    if ctx.first or ctx.world_size == 1:
        print(f"error: {message}", file=sys.stderr, flush=True)
    if not ctx.first:
        time.sleep(2.0)  # give rank 0 time to receive this rank's report before the launcher reacts
    sys.stderr.flush()
    os._exit(2 if ctx.first else 1)
