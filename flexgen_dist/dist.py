"""Process-group bootstrap for pipeline stages: who am I, who are my neighbours, and how a failure
on any rank ends the whole job with a message instead of a hang.

Rank, world size and local rank come from MPI (any implementation, through mpi4py) when launched by
mpirun/mpiexec, from torchrun's or Slurm's variables otherwise. Under MPI, rank 0 opens the
rendezvous port itself, bound to one address, and tells the others over MPI:

* all ranks on one node: the rendezvous store and gloo's (or NCCL's) sockets listen on loopback
  only, so the job opens no port reachable from another host;
* several nodes: they listen on the address of `FLEXGEN_MASTER_ADDR`, else of the interface named
  by `IFACE`, else of this host's name (resolved only when neither is given). Neither the store nor
  gloo authenticates its peers: the network between the nodes must be trusted.

Every rank also watches its launcher: if it vanishes (mpirun SIGKILLed), the rank ends itself
within seconds instead of waiting for a peer until --comm-timeout.
"""
from __future__ import annotations

import fcntl
import os
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from . import workdir
from .errors import FlexGenError

MPI_ENV = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MV2_COMM_WORLD_SIZE", "MPI_LOCALNRANKS")
ERROR_TAG = 7701  # MPI tag of failure reports sent to rank 0
LOOPBACK = "127.0.0.1"
LAUNCHER_POLL_S = 1.0  # how often a rank checks that its launcher is still there


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


# ----- ending the process --------------------------------------------------------------------------
_exit_hooks: list = []
_exit_lock = threading.Lock()


def on_exit(callback) -> None:
    """Run `callback()` before this module ends the process with os._exit (a failure report, a lost
    launcher). Such an exit skips atexit handlers and finally blocks, so whatever must not outlive
    the process (work files) registers here. Callbacks run once, in order; their errors are ignored."""
    _exit_hooks.append(callback)


on_exit(workdir.remove_all)  # a rank that ends abruptly still removes its KV-cache and activation files


def exit_now(code: int, message: str | None = None) -> None:
    """Print `message` (one line) to stderr, run the on_exit callbacks, end the process."""
    if message:
        try:
            print(message, file=sys.stderr, flush=True)
        except (OSError, ValueError):  # stderr was the launcher's pipe, and the launcher is gone
            pass
    with _exit_lock:  # a second thread ending the process waits here until the first one has
        while _exit_hooks:
            try:
                _exit_hooks.pop(0)()
            except Exception:
                pass
        os._exit(code)


# ----- rendezvous ----------------------------------------------------------------------------------
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


class PeerLost(RuntimeError):
    """A neighbouring rank stopped answering (it died, or its process group broke)."""


# ----- the launcher's terminal ---------------------------------------------------------------------
def launcher_stderr_is_terminal() -> bool:
    """Whether this process's parent writes its stderr to a terminal: Open MPI's mpirun when rank 0
    runs on the launching node. Elsewhere (a remote daemon, srun, MPICH's hydra, a wrapper script
    that does not exec) it says no, and rank 0 shows no bar: the safe side."""
    try:
        return os.readlink(f"/proc/{os.getppid()}/fd/2").startswith(("/dev/pts/", "/dev/tty"))
    except OSError:  # no /proc, or another user's launcher
        return False


# ----- failures ------------------------------------------------------------------------------------
def watch_launcher(ctx: DistContext, poll_s: float = LAUNCHER_POLL_S) -> None:
    """A daemon thread that ends this rank when its launcher (the parent process: mpirun, torchrun,
    srun's step daemon) is gone. A rank blocked on a peer would otherwise linger, orphaned, until
    --comm-timeout. The parent is gone when this process has been re-parented (getppid changed)."""
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(poll_s)
        exit_now(1, f"error: rank {ctx.rank}: its launcher (pid {parent}) is gone; stopping")
    threading.Thread(target=watch, name="flexgen-launcher-watch", daemon=True).start()


FAILURE_POLL_S = 0.05


def watch_for_failures(ctx: DistContext) -> None:
    """On rank 0 (under MPI): a thread that waits for another rank's failure report, prints it and
    ends the job, even while the main thread is blocked waiting on that rank's stage."""
    if not (ctx.first and ctx.mpi is not None and ctx.world_size > 1):
        return

    def watch():
        # a blocking receive would spin a core in MPI's progress loop for the whole job (a rank's
        # share of the cores where ranks share a node): probe and sleep instead
        while not ctx.mpi.iprobe(source=-1, tag=ERROR_TAG):  # MPI.ANY_SOURCE
            time.sleep(FAILURE_POLL_S)
        message = ctx.mpi.recv(source=-1, tag=ERROR_TAG)
        if message is not None:
            exit_now(2, f"error: {message}")
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
    workdir.remove_all()  # now: the launcher may SIGKILL this process while it waits below
    if not ctx.first and ctx.mpi is not None:
        try:
            ctx.mpi.send(message, dest=0, tag=ERROR_TAG)  # small: delivered eagerly
        except Exception:
            pass
        time.sleep(10.0)  # rank 0 prints and exits; the launcher then ends this process
        exit_now(1)
    if ctx.first and isinstance(error, PeerLost) and ctx.mpi is not None:
        time.sleep(2.0)  # the watcher prints a better report if one comes
    exit_now(2 if ctx.first else 1, f"error: {message}")
