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
import threading
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


def broadcast(ctx: DistContext, obj):
    """Rank 0's `obj` on every rank."""
    if ctx.world_size == 1:
        return obj
    if ctx.mpi is not None:
        return ctx.mpi.bcast(obj, root=0)
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(ctx: DistContext, obj) -> list:
    """Every rank's `obj`, in rank order, on rank 0 (an empty list elsewhere)."""
    if ctx.world_size == 1:
        return [obj]
    if ctx.mpi is not None:
        return ctx.mpi.gather(obj, root=0) or []
    out = [None] * ctx.world_size if ctx.first else None
    dist.gather_object(obj, out, dst=0)
    return out or []


def shutdown(ctx: DistContext) -> None:
    if ctx.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()


class PeerLost(RuntimeError):
    """A neighbouring rank stopped answering (it died, or its process group broke)."""


def watch_for_failures(ctx: DistContext) -> None:
    """On rank 0 (under MPI): a thread that waits for another rank's failure report, prints it and
    ends the job, even while the main thread is blocked waiting on that rank's stage."""
    if not (ctx.first and ctx.mpi is not None and ctx.world_size > 1):
        return

    def watch():
        message = ctx.mpi.recv(source=-1, tag=ERROR_TAG)  # MPI.ANY_SOURCE
        if message is not None:
            print(f"error: {message}", file=sys.stderr, flush=True)
            os._exit(2)
    threading.Thread(target=watch, name="flexgen-failure-watch", daemon=True).start()


def stop_watching(ctx: DistContext) -> None:
    if ctx.first and ctx.mpi is not None and ctx.world_size > 1:
        ctx.mpi.send(None, dest=0, tag=ERROR_TAG)


def fail(ctx: DistContext, error: BaseException) -> None:
    """End the job because of `error`, without waiting on peers. Other ranks send their report to
    rank 0, which prints it and exits; the launcher then stops everyone. Rank 0 that only lost a
    neighbour first gives the rank that caused it a moment to report its own error."""
    message = str(error) if isinstance(error, PeerLost) else f"rank {ctx.rank}: {type(error).__name__}: {error}"
    message = message.replace("\n", " ")
    if not ctx.first and ctx.mpi is not None:
        try:
            ctx.mpi.send(message, dest=0, tag=ERROR_TAG)  # small: delivered eagerly
        except Exception:
            pass
        time.sleep(10.0)  # rank 0 prints and exits; the launcher then ends this process
        os._exit(1)
    if ctx.first and isinstance(error, PeerLost) and ctx.mpi is not None:
        time.sleep(2.0)  # the watcher prints a better report if one comes
    print(f"error: {message}", file=sys.stderr, flush=True)
    os._exit(2 if ctx.first else 1)
