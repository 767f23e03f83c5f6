"""Launched under mpirun by the fault tests: the real CLI, with one rank made to fail mid-run.

FLEXGEN_TEST_FAULT="RANK:CALL:KIND" makes rank RANK, on its CALL-th stage step, either raise
(KIND=raise) or kill itself with SIGKILL (KIND=kill), as a crashed or OOM-killed process would;
KIND=start makes it fail while building its stage, as with missing weights. For the resume tests:
KIND=loadkill SIGKILLs it while building its stage, KIND=writekill on its CALL-th write of finished
rows to the output journal, after half of the bytes are written (a torn line)."""
import os
import signal
import sys

from flexgen_dist import FlexGenError
from flexgen_dist.dist.context import detect
from flexgen_dist.formats.outputs import JobOutput
from flexgen_dist.run import main
from flexgen_dist.runtime.executor import LocalExecutor
from flexgen_dist.system.workdir import exit_cleanly_on_signals


def profiling() -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_name == "measure_executor_overhead":
            return True
        frame = frame.f_back
    return False


def inject(rank: int, call: int, kind: str) -> None:
    original, calls = LocalExecutor.forward_step, [0]

    def forward_step(self, *args, **kwargs):
        if profiling():  # the hardware profile times the executor too: those are not the job's steps
            return original(self, *args, **kwargs)
        calls[0] += 1
        if calls[0] == call:
            if kind == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"injected fault on step {call}")
        return original(self, *args, **kwargs)

    def cannot_start(self, *args, **kwargs):
        raise FlexGenError("injected start failure")

    def write_half_and_die(self, data: bytes):
        writes[0] += 1
        if writes[0] == call:
            os.write(self.fd, data[:len(data) // 2])
            os.fsync(self.fd)
            os.kill(os.getpid(), signal.SIGKILL)
        return original_write(self, data)

    def die_loading(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    original_write, writes = JobOutput._write, [0]
    if detect().rank == rank:
        if kind == "writekill":
            JobOutput._write = write_half_and_die
        elif kind == "loadkill":
            LocalExecutor.__init__ = die_loading
        elif kind == "start":
            LocalExecutor.__init__ = cannot_start
        else:
            LocalExecutor.forward_step = forward_step


if __name__ == "__main__":
    exit_cleanly_on_signals()  # as the real command line does (run.cli)
    rank, call, kind = os.environ["FLEXGEN_TEST_FAULT"].split(":")
    inject(int(rank), int(call), kind)
    sys.exit(main())
