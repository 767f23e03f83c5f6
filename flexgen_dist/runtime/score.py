"""One scoring block through this rank's stage: a prefill-only pass.

Every row is a token sequence and the tokens its last positions should predict (a continuation).
Each micro-batch's whole sequence goes through the stage once (no decode step, no prefill pieces);
its keys and values are scratch on the compute device. The last rank's output head turns only the
positions that predict a target into logits and sends back, per row and scored position, the
target's log-probability, whether it was the most likely token and the most likely tokens'
log-probabilities (`models.base.token_scores`),
which rank 0 collects. Messages carry a trailing flag as in `block.py` (always 0 here).
"""
from __future__ import annotations

import itertools
import time

import torch

from ..models.base import SCORE_WIDTH
from .block import left_pad, pack, step_inputs, unpack


def right_aligned(targets: list[list[int]], width: int) -> torch.Tensor:
    """(rows, width) target ids, each row's at the right end, -1 before them."""
    out = torch.full((len(targets), width), -1, dtype=torch.long)
    for r, t in enumerate(targets):
        if t:
            out[r, width - len(t):] = torch.tensor(t, dtype=torch.long)
    return out


def micro_slices(rows: int, micro_batches: int) -> list[slice]:
    """`rows` rows cut into at most `micro_batches` near-equal micro-batches, in order."""
    n = max(1, min(micro_batches, rows))
    edges = [rows * q // n for q in range(n + 1)]
    return [slice(a, b) for a, b in itertools.pairwise(edges)]


class ScoreRun:
    """State of one scoring block on one rank: at most `micro_batches * block_size` rows (a short
    block is not filled: a prefill-only pass needs no fixed shape, so no filler row is computed).
    Row r's targets are what its last `len(targets[r])` positions predict."""

    def __init__(self, engine, inputs: list[list[int]], targets: list[list[int]]):
        self.engine, self.ctx, self.ring, self.ex = engine, engine.ctx, engine.ring, engine.executor
        self.gbs, self.hidden = engine.policy.gpu_batch_size, engine.spec.hidden_size
        self.scored = max(1, max(map(len, targets)))
        cuts = micro_slices(len(inputs), engine.micro_batches)
        self.micro = [left_pad(inputs[c], engine.spec.pad_id) for c in cuts]
        self.targets = [right_aligned(targets[c], self.scored) for c in cuts]

    def run(self, stats) -> torch.Tensor | None:
        """(rows, scored, SCORE_WIDTH) float32 scores on rank 0 (see `models.base.token_scores`); None elsewhere."""
        width = max(ids.shape[1] for ids, _ in self.micro)
        self.engine._check_block_fits(width, 0, scored=self.scored)
        caches = [self.ex.allocate_caches([len(piece) for piece in ids.split(self.gbs)], ids.shape[1], scratch=True)
                  for ids, _ in self.micro]
        self._expect_inputs()
        t0 = time.perf_counter()
        try:
            for t in range(len(self.micro)):
                self._compute(self._input(t), t, caches[t])
            result = None
            if self.ctx.first:
                result = torch.cat([unpack(self.ring.receive(), (len(ids), self.scored, SCORE_WIDTH))[0].cpu()
                                    for ids, _ in self.micro])
        finally:
            self.ex.drain()
            for c in caches:
                self.ex.free_caches(c)
        stats.prefill_time += time.perf_counter() - t0
        return result

    def _input(self, t: int) -> torch.Tensor:
        ids, _ = self.micro[t]
        if self.ctx.first:
            return ids
        return unpack(self.ring.receive(), (len(ids), ids.shape[1], self.hidden))[0]

    def _compute(self, x: torch.Tensor, t: int, cache) -> None:
        device, gbs = self.engine.devices.compute, self.gbs
        mask, width = self.micro[t][1], x.shape[1]
        masks = mask.split(gbs)
        targets = self.targets[t].split(gbs) if self.ctx.last else [None] * len(masks)  # only the head reads them
        inputs = [step_inputs(m, width, self.engine.dtype, device, tg) for m, tg in zip(masks, targets)]
        y = torch.cat(self.ex.forward_step([c.to(device) for c in x.split(gbs)], inputs, cache))
        self.ring.send(pack(y.float() if self.ctx.last else y, 0))

    def _expect_inputs(self) -> None:
        """Tell the ring, in order, what this rank will receive during the block."""
        if not self.ctx.first:
            for ids, _ in self.micro:
                self.ring.expect((ids.numel() * self.hidden + 1,), self.engine.dtype)
        if self.ctx.first:  # the scores, one message per micro-batch, after rank 0 sent them all
            for ids, _ in self.micro:
                self.ring.expect((len(ids) * self.scored * SCORE_WIDTH + 1,), torch.float32)
