"""Process-group bootstrap for pipeline stages (rank and size come from `context.detect`). Under
MPI, rank 0 opens the rendezvous port itself, bound to one address, and tells the others over MPI:

* all ranks on one node: the rendezvous store and gloo's (or NCCL's) sockets listen on loopback
  only, so the job opens no port reachable from another host;
* several nodes: they listen on the address of `FLEXGEN_MASTER_ADDR`, else of the interface named
  by `IFACE`, else of this host's name (resolved only when neither is given). Neither the store nor
  gloo authenticates its peers: the network between the nodes must be trusted.

Every rank also watches its launcher: if it vanishes (mpirun SIGKILLed), the rank ends itself
within seconds instead of waiting for a peer until --comm-timeout.
"""
from __future__ import annotations
from .context import DistContext

from dataclasses import dataclass
from datetime import timedelta
import fcntl
import os
import socket
import struct
import torch
import torch.distributed as dist
from ..core.errors import FlexGenError
from .failures import watch_launcher




LOOPBACK = "127.0.0.1"


def interface_address(name: str) -> str:
    """The IPv4 address of network interface `name` (Linux SIOCGIFADDR), without any name lookup."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))  # SIOCGIFADDR
        except OSError as e:
            raise FlexGenError(f"IFACE={name}: no IPv4 address on that interface ({e.strerror})") from None
    return socket.inet_ntoa(packed[20:24])


def master_address(ctx: DistContext) -> str:
    """The address rank 0 listens on and announces. The host name is resolved only when nothing
    else says which address to use (an unresolvable host name is common in containers)."""
    if ctx.one_node:
        return LOOPBACK
    if os.environ.get("FLEXGEN_MASTER_ADDR"):
        return os.environ["FLEXGEN_MASTER_ADDR"]
    if os.environ.get("IFACE"):
        return interface_address(os.environ["IFACE"])
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError as e:
        raise FlexGenError(f"cannot resolve this host's name {socket.gethostname()!r} ({e}); set "
                           "FLEXGEN_MASTER_ADDR or IFACE (see launch/README.md)") from None


def listen_on(address: str) -> socket.socket:
    """A listening TCP socket bound to `address` only (the kernel picks a free port)."""
    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(address, 0, type=socket.SOCK_STREAM)[0]
        s = socket.socket(family, kind, proto)
    except OSError as e:
        raise FlexGenError(f"rendezvous address {address!r} is not usable ({e})") from None
    try:
        s.bind(sockaddr[:2] if family == socket.AF_INET else sockaddr)
        s.listen(128)
    except OSError as e:
        s.close()
        raise FlexGenError(f"cannot listen on {address} for the rendezvous ({e.strerror}): it must be an "
                           "address of rank 0's host (FLEXGEN_MASTER_ADDR / IFACE)") from None
    return s


def _mpi_store(ctx: DistContext, timeout: timedelta) -> dist.Store:
    """A TCPStore served by rank 0 on a socket it bound itself, so it listens on one address (torch's
    own server would listen on every interface); the address and port travel over MPI."""
    listener, error = None, None
    if ctx.first:
        try:
            listener = listen_on(master_address(ctx))
        except FlexGenError as e:
            error = e
    announced = ctx.mpi.bcast(None if listener is None else listener.getsockname()[:2], root=0)
    if error is not None:
        raise error
    if announced is None:
        raise FlexGenError("rank 0 could not open the rendezvous port (see its error)")
    host, port = announced
    if ctx.first:  # the store takes the socket over (and closes it)
        return dist.TCPStore(host, port, ctx.world_size, True, timeout, master_listen_fd=listener.detach(),
                             use_libuv=True)
    return dist.TCPStore(host, port, ctx.world_size, False, timeout)


def pin_interfaces(ctx: DistContext) -> None:
    """Make gloo and NCCL open their sockets on loopback when every rank is on this node, or on
    `IFACE` when given; an interface the user already chose for them is kept."""
    iface = _loopback_interface() if ctx.one_node else os.environ.get("IFACE")
    if iface:
        for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
            os.environ.setdefault(var, iface)


def _loopback_interface() -> str:
    names = [name for _, name in socket.if_nameindex()]
    return next((n for n in names if n.startswith("lo")), "lo")


def init(ctx: DistContext, comm_device: str | None, timeout_s: float) -> DistContext:
    """Join the process group (gloo on CPU, NCCL between GPUs) with an explicit timeout."""
    if ctx.world_size == 1:
        return ctx
    watch_launcher(ctx)
    use_gpu = comm_device == "gpu" or (comm_device is None and torch.cuda.is_available())
    if use_gpu and not torch.cuda.is_available():
        raise FlexGenError("--comm-device gpu needs CUDA, which this machine does not have")
    if use_gpu:
        torch.cuda.set_device(ctx.local_rank % torch.cuda.device_count())
    ctx.backend = "nccl" if use_gpu else "gloo"
    if "OMP_NUM_THREADS" not in os.environ:  # ranks sharing a node share its cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // ctx.local_size))
    pin_interfaces(ctx)
    timeout = timedelta(seconds=timeout_s)
    env = os.environ
    if "MASTER_ADDR" in env and "MASTER_PORT" in env:  # torchrun / Slurm: their store, their address
        dist.init_process_group(ctx.backend, init_method=f"tcp://{env['MASTER_ADDR']}:{env['MASTER_PORT']}",
                                rank=ctx.rank, world_size=ctx.world_size, timeout=timeout)
    elif ctx.mpi is None:
        raise FlexGenError("MASTER_ADDR and MASTER_PORT must be set when not launched by mpirun")
    else:
        dist.init_process_group(ctx.backend, store=_mpi_store(ctx, timeout), rank=ctx.rank,
                                world_size=ctx.world_size, timeout=timeout)
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


# ----- the launcher's terminal ---------------------------------------------------------------------
def launcher_stderr_is_terminal() -> bool:
    """Whether this process's parent writes its stderr to a terminal: Open MPI's mpirun when rank 0
    runs on the launching node. Elsewhere (a remote daemon, srun, MPICH's hydra, a wrapper script
    that does not exec) it says no, and rank 0 shows no bar: the safe side."""
    try:
        return os.readlink(f"/proc/{os.getppid()}/fd/2").startswith(("/dev/pts/", "/dev/tty"))
    except OSError:  # no /proc, or another user's launcher
        return False
