"""Pipeline stages: how layers are cut across ranks, and how micro-batches travel between them.

Each rank runs its contiguous stage of layers with its own LocalExecutor. Hidden states go to the
next rank; the last rank samples and sends the chosen tokens back to rank 0 (the token ring).
With one rank the ring is a local queue and the same loop is the single-device engine.
"""
from __future__ import annotations

import time
from collections import deque
from datetime import timedelta

import torch
import torch.distributed as dist

from .dist import DistContext, PeerLost
from .errors import FlexGenError


def partition_stages(costs: list[float], first_extra: float, last_extra: float, stages: int) -> list[int]:
    """Layers per stage, contiguous, minimising the most expensive stage.

    `costs` are the transformer layers' costs (bytes); the first stage also pays for the embedding
    and the last for the output head."""
    n = len(costs)
    if stages > n:
        raise FlexGenError(f"{stages} pipeline stages but the model has only {n} layers")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    def stage_cost(a: int, b: int, index: int) -> float:
        return prefix[b] - prefix[a] + (first_extra if index == 0 else 0) + (last_extra if index == stages - 1 else 0)

    # best[s][i]: the smallest achievable max cost putting layers [0, i) on stages [0, s)
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for s in range(1, stages + 1):
        for i in range(s, n - (stages - s) + 1):
            for j in range(s - 1, i):
                value = max(best[s - 1][j], stage_cost(j, i, s - 1))
                if value < best[s][i]:
                    best[s][i], cut[s][i] = value, j
    sizes, i = [], n
    for s in range(stages, 0, -1):
        sizes.append(i - cut[s][i])
        i = cut[s][i]
    return sizes[::-1]


def check_stage_layers(sizes: list[int], layers: int, stages: int) -> list[int]:
    """Layers per rank as given by the user: one positive count per rank, summing to the model's."""
    if len(sizes) != stages or sum(sizes) != layers or min(sizes) < 1:
        text = ",".join(map(str, sizes))
        raise FlexGenError(f"--stage-layers {text}: needs {stages} positive counts summing to {layers}")
    return list(sizes)


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
