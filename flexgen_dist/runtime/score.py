"""One scoring block through this rank's stage: a prefill-only pass.

Every row is a token sequence and the tokens its last positions should predict (a continuation).
A row may be packed (`ScoreRow.segments`): e.g. a shared context (segment 0) followed by several
continuations (segments 1, 2, ...), each seeing the context and itself only, at the positions it
would have alone (`ScoreRow.positions`), so the context is computed once for all of them; or
several sequences side by side, each seeing only itself.
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
from dataclasses import dataclass

import torch

from ..models.base import SCORE_WIDTH, StepInputs
from .block import left_pad, pack, padding_marks, unpack


@dataclass
class ScoreRow:
    """One row of a scoring block: `tokens`, the `targets` its last positions predict (-1: a
    position between them that predicts nothing), and for a packed row each token's position id,
    segment and `context`: token q sees the earlier tokens of its own segment and of segment
    `context[q]`. None: positions 0, 1, ... and one segment (a plain sequence)."""

    tokens: list[int]
    targets: list[int]
    positions: list[int] | None = None
    segments: list[int] | None = None
    context: list[int] | None = None

    def layout(self) -> tuple[list[int], list[int], list[int]]:
        """(positions, segments, context), the defaults filled in."""
        n = len(self.tokens)
        segments = self.segments or [0] * n
        return self.positions or list(range(n)), segments, self.context or segments


def row_inputs(rows: list[ScoreRow], width: int) -> list[torch.Tensor]:
    """[positions, segments, context, mask], each (rows, width), left-padded (pads: 0, masked)."""
    out = [torch.zeros((len(rows), width), dtype=torch.long) for _ in range(3)]
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for r, row in enumerate(rows):
        n = len(row.tokens)
        for tensor, values in zip(out, row.layout()):
            tensor[r, width - n:] = torch.tensor(values)
        mask[r, width - n:] = True
    return out + [mask]


def score_inputs(positions, segments, context, mask, dtype: torch.dtype, device, targets) -> StepInputs:
    """Whole-sequence inputs: token q sees token k <= q when k is a token (not padding) of q's own
    segment or of segment `context[q]`. With one segment this is the causal mask
    `block.step_inputs` makes. `mask` also marks the padding (`StepInputs.is_token`)."""
    total = mask.shape[1]
    causal = torch.arange(total)[None, :] <= torch.arange(total)[:, None]  # (query, key)
    keys = segments[:, None, :]
    visible = causal[None] & mask[:, None, :] & ((keys == segments[:, :, None]) | (keys == context[:, :, None]))
    bias = torch.zeros((len(mask), 1, total, total), dtype=dtype).masked_fill_(~visible[:, None], torch.finfo(dtype).min)
    return StepInputs(positions.to(device), bias.to(device), 0, targets.to(device) if targets is not None else None,
                      padding_marks(mask, device))


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

    def __init__(self, engine, rows: list[ScoreRow]):
        self.engine, self.ctx, self.ring, self.ex = engine, engine.ctx, engine.ring, engine.executor
        self.gbs, self.hidden = engine.policy.gpu_batch_size, engine.spec.hidden_size
        self.scored = max(1, max(len(row.targets) for row in rows))
        cuts = micro_slices(len(rows), engine.micro_batches)
        self.micro = [left_pad([row.tokens for row in rows[c]], engine.spec.pad_id) for c in cuts]
        self.layouts = [row_inputs(rows[c], ids.shape[1]) for c, (ids, _) in zip(cuts, self.micro)]
        self.targets = [right_aligned([row.targets for row in rows[c]], self.scored) for c in cuts]

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
        pieces = [part.split(gbs) for part in self.layouts[t]]
        targets = self.targets[t].split(gbs) if self.ctx.last else [None] * len(pieces[0])  # only the head reads them
        inputs = [score_inputs(*parts, self.engine.dtype, device, tg) for *parts, tg in zip(*pieces, targets)]
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
