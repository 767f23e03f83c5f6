"""Who this process is in the job: rank, world size and local rank, as the launcher (MPI, torchrun,
Slurm) says, read before any communication starts."""
from __future__ import annotations


import os
from dataclasses import dataclass

MPI_ENV = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MV2_COMM_WORLD_SIZE", "MPI_LOCALNRANKS")


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

    @property
    def one_node(self) -> bool:
        """Every rank runs on this node (nothing needs to be reachable from another host)."""
        return self.local_size == self.world_size


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


# ----- rendezvous ----------------------------------------------------------------------------------
