"""How a failure on any rank ends the whole job with one message instead of a hang: reports to
rank 0, a watch on the launcher, and an exit that still removes this rank's temporary files."""
from __future__ import annotations


from ..system import workdir

import os
import sys
import threading
import time
from .context import DistContext


ERROR_TAG = 7701  # MPI tag of failure reports sent to rank 0


LAUNCHER_POLL_S = 1.0  # how often a rank checks that its launcher is still there


# ----- ending the process --------------------------------------------------------------------------
_exit_hooks: list = []


_exit_lock = threading.Lock()


def on_exit(callback) -> None:
    """Run `callback()` before this module ends the process with os._exit (a failure report, a lost
    launcher). Such an exit skips atexit handlers and finally blocks, so whatever must not outlive
    the process (work files) registers here. Callbacks run once, in order; their errors are ignored."""
    _exit_hooks.append(callback)


on_exit(workdir.remove_all_before_exit)  # a rank that ends abruptly still removes its KV-cache and activation files


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


class PeerLost(RuntimeError):
    """A neighbouring rank stopped answering (it died, or its process group broke)."""


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
    workdir.remove_all_before_exit()  # now: the launcher may SIGKILL this process while it waits below
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
