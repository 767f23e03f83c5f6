"""How micro-batches travel between pipeline stages: hidden states to the next rank, the last rank's
chosen tokens back to rank 0 (the token ring), receives posted ahead so they overlap compute.
With one rank the ring is a local queue and the same loop is the single-device engine.
"""
from __future__ import annotations


from collections import deque
from datetime import timedelta
import time
import torch
import torch.distributed as dist
from .failures import PeerLost
from .context import DistContext


def _short(error: Exception) -> str:
    """gloo's message without its source location and advice: 'Connection closed by peer ...'."""
    text = str(error).splitlines()[0]
    text = text.rsplit("] ", 1)[-1]
    return text.split(". ")[0]


class Ring:
    """Receives a stage's inputs and sends its outputs, in job order, with receives posted ahead so
    they overlap compute. `idle` accumulates the time spent waiting for an input."""

    def __init__(self, ctx: DistContext, device: torch.device, timeout_s: float):
        self.ctx, self.timeout = ctx, timedelta(seconds=timeout_s)
        self.comm_device = torch.device("cuda", torch.cuda.current_device()) if ctx.backend == "nccl" else torch.device("cpu")
        self.device = device
        self.local: deque = deque()  # one rank: the token ring is a queue
        self.posted: deque = deque()  # (work, buffer) of receives already started
        self.expected: deque = deque()  # (shape, dtype) of receives not started yet
        self.sends: list = []
        self.idle = 0.0

    @property
    def source(self) -> int:
        return (self.ctx.rank - 1) % self.ctx.world_size

    @property
    def destination(self) -> int:
        return (self.ctx.rank + 1) % self.ctx.world_size

    def expect(self, shape, dtype) -> None:
        """Announce the next input this rank will receive (in order)."""
        if self.ctx.world_size > 1:
            self.expected.append((tuple(shape), dtype))
            self._post(2)

    def _post(self, window: int) -> None:
        while self.expected and len(self.posted) < window:
            shape, dtype = self.expected.popleft()
            buf = torch.empty(shape, dtype=dtype, device=self.comm_device)
            self.posted.append((dist.irecv(buf, src=self.source), buf))

    def receive(self) -> torch.Tensor:
        """The next input. Invariant: when it returns, at most one later receive is posted, so a
        sender that ends the block early (see block.py) knows it owes exactly one filler."""
        t0 = time.perf_counter()
        if self.ctx.world_size == 1:
            return self.local.popleft()
        self._post(2)  # the one after this is posted before we wait, so it overlaps our compute
        work, buf = self.posted.popleft()
        self._await(work)
        self.idle += time.perf_counter() - t0
        return buf.to(self.device)

    def abandon(self) -> None:
        """Leave the block early: take the receives already posted (their fillers arrive) and
        forget the inputs announced but never to be sent."""
        while self.posted:
            self._await(self.posted.popleft()[0])
        self.expected.clear()

    def _await(self, work) -> None:
        try:
            work.wait(self.timeout)
        except RuntimeError as e:  # the peer died, or sent nothing within the timeout
            raise PeerLost(f"rank {self.source} is gone (rank {self.ctx.rank} receiving: {_short(e)})") from None

    def send(self, tensor: torch.Tensor) -> None:
        if self.ctx.world_size == 1:
            self.local.append(tensor)
            return
        out = tensor.to(self.comm_device).contiguous()
        try:
            self.sends.append((dist.isend(out, dst=self.destination), out))
            while len(self.sends) > 4:  # keep a few in flight, release the buffers of finished ones
                self.sends.pop(0)[0].wait(self.timeout)
        except RuntimeError as e:
            raise PeerLost(f"rank {self.destination} is gone (rank {self.ctx.rank} sending: {_short(e)})") from None

    def flush(self) -> None:
        try:
            for work, _ in self.sends:
                work.wait(self.timeout)
        except RuntimeError as e:
            raise PeerLost(f"rank {self.destination} is gone (rank {self.ctx.rank} sending: {_short(e)})") from None
        self.sends.clear()
