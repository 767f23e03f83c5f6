"""One block through this rank's stage: every micro-batch, every token step, until all rows are
finished.

Messages around the ring carry one control value after their payload: hidden states travel
flattened with a trailing flag, tokens as (rows + 1,) with the flag last. The last rank marks its
tokens FINISHED once every row of the block is finished (its own length, stop token or stop
sequence). Rank 0, on seeing FINISHED, sends STOP downstream in place of the next hidden state;
each rank forwards STOP (the last rank back to rank 0 as a token message) and leaves the block.
So every rank leaves at the same position of the schedule. A receiver has at most one receive
posted beyond the one it waits on (see `Ring.receive`), so whoever sends STOP also sends one
filler when the schedule has a next position, and the receiver takes it in `Ring.abandon`.
"""
from __future__ import annotations

import time

import torch

from ..core.config import RowParams
from ..models.base import StepInputs
from .sampling import TokenChooser

FINISHED, STOP = 1, 2


def left_pad(prompts: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.bool)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[r, width - len(p):] = True
    return ids, mask


def pack(payload: torch.Tensor, flag: int) -> torch.Tensor:
    return torch.cat([payload.reshape(-1), payload.new_tensor([flag])])


def unpack(message: torch.Tensor, shape) -> tuple[torch.Tensor, int]:
    return message[:-1].view(shape), int(message[-1])


def step_inputs(mask: torch.Tensor, new: int, dtype: torch.dtype, device, targets=None) -> StepInputs:
    """Positions, the additive attention bias and which positions are padding (None where none
    is: a decode step, an unpadded prefill) for the last `new` columns of `mask` (and, when
    scoring, the target tokens of the last positions: see `StepInputs.targets`)."""
    total = mask.shape[1]
    start = total - new
    positions = ((mask.long().cumsum(1) - 1) * mask)[:, start:]
    causal = torch.arange(total)[None, :] <= torch.arange(start, total)[:, None]  # (new, total)
    visible = causal[None, None] & mask[:, None, None, :]
    bias = torch.zeros(visible.shape, dtype=dtype).masked_fill_(~visible, torch.finfo(dtype).min)
    return StepInputs(positions.to(device), bias.to(device), start,
                      None if targets is None else targets.to(device), padding_marks(mask[:, start:], device))


def padding_marks(is_token: torch.Tensor, device) -> torch.Tensor | None:
    """`StepInputs.is_token`: None where every position holds a token, so the layers that skip
    padding need not look (on a GPU each look would wait for the device)."""
    return None if bool(is_token.all()) else is_token.to(device)


def pieces(width: int, chunks: int) -> list[tuple[int, int]]:
    """Token ranges [start, end) cutting a prompt of `width` tokens into `chunks` near-equal pieces
    (fewer when the prompt is shorter), in order; every rank computes the same ones."""
    n = max(1, min(chunks, width))
    edges = [width * q // n for q in range(n + 1)]
    return list(zip(edges[:-1], edges[1:]))


class BlockRun:
    """State of one block on one rank. `prompts` and `params` have `micro_batches * block_size`
    rows (the caller fills a short block); `forced` (rows, steps) replaces chosen tokens.

    The prefill of each micro-batch runs in `engine.prefill_chunks` pieces along the prompt (see
    `pieces`), each sent downstream as soon as it is computed, so the next stage starts before the
    whole prompt has passed this one; the last rank chooses the first token after the last piece.
    Decode steps are one piece of one token."""

    def __init__(self, engine, prompts: list[list[int]], params: list[RowParams], forced=None,
                 keep_logits: bool = False):
        self.engine, self.ctx, self.ring, self.ex = engine, engine.ctx, engine.ring, engine.executor
        self.rows, self.gbs, self.count = engine.policy.block_size, engine.policy.gpu_batch_size, engine.micro_batches
        self.pad, self.hidden = engine.spec.pad_id, engine.spec.hidden_size
        self.steps = max(p.max_tokens for p in params)
        self.micro = [left_pad(prompts[t * self.rows:(t + 1) * self.rows], self.pad) for t in range(self.count)]
        self.masks = [mask for _, mask in self.micro]
        self.chooser = TokenChooser(params, self.pad, self.rows, self.count, forced, keep_logits,
                                    self.ctx.rank) if self.ctx.last else None
        self.received = [[] for _ in self.micro]
        self.prefill_pieces = [pieces(ids.shape[1], engine.prefill_chunks) for ids, _ in self.micro]
        self.stopping, self.prefill_end = False, None

    def run(self, stats, bar=None):
        """(tokens (rows, steps run), per-step logits) on rank 0; (None, []) elsewhere."""
        width = max(ids.shape[1] for ids, _ in self.micro)
        self.engine._check_block_fits(width, self.steps)
        caches = [self.ex.allocate_caches([self.gbs] * self.engine.policy.num_gpu_batches, ids.shape[1] + self.steps)
                  for ids, _ in self.micro]
        self._expect_inputs()
        t0 = time.perf_counter()
        try:
            done = self._steps(caches, bar)
            if self.ctx.first:
                self._collect()
        finally:
            self.ex.drain()
            for c in caches:
                self.ex.free_caches(c)
        if bar is not None:
            bar.update(self.steps - done)
        end = time.perf_counter()
        stats.prefill_time += (self.prefill_end or end) - t0
        stats.decode_time += end - (self.prefill_end or end)
        return self._result()

    def _steps(self, caches, bar) -> int:
        """Run token steps until the schedule ends or the block is finished; the steps begun."""
        for i in range(self.steps):
            for t in range(self.count):
                for start, end in self._pieces(t, i):
                    x = self._input(t, i, start, end)
                    if x is None:
                        return i
                    self._compute(x, t, i, caches[t], end)
            if bar is not None:
                bar.update(1)
            if self.ctx.world_size == 1 and self.chooser.all_finished():
                return i + 1
        return self.steps

    def _pieces(self, t: int, i: int) -> list[tuple[int, int]]:
        """Micro-batch t's token ranges at step i (mask columns): the prompt's pieces, then one token."""
        if i == 0:
            return self.prefill_pieces[t]
        width = self.micro[t][0].shape[1] + i
        return [(width - 1, width)]

    def _input(self, t: int, i: int, start: int, end: int):
        """The input of this piece of a micro-step, or None when the block ends here."""
        ids, _ = self.micro[t]
        if self.ctx.first and i == 0:
            return ids[:, start:end]
        if self.ctx.first:
            tokens, flag = unpack(self.ring.receive(), (len(ids),))
            self.received[t].append(tokens.cpu())
            if t == self.count - 1 and self.prefill_end is None:
                self.prefill_end = time.perf_counter()
            if flag == FINISHED and self.ctx.world_size > 1:
                self._stop_downstream(t, i)
                self.stopping = True
                return None
            return tokens[:, None]
        x, flag = unpack(self.ring.receive(), (len(ids), end - start, self.hidden))
        if flag == STOP:
            self._stop_downstream(t, i)
            self.ring.abandon()
            return None
        return x

    def _compute(self, x: torch.Tensor, t: int, i: int, cache, end: int) -> None:
        """Run this stage over x, the tokens up to mask column `end` (exclusive) not yet computed."""
        device, gbs = self.engine.devices.compute, self.gbs
        seen = self.masks[t][:, :end]
        inputs = [step_inputs(m, x.shape[1], self.engine.dtype, device) for m in seen.split(gbs)]
        y = torch.cat(self.ex.forward_step([c.to(device) for c in x.split(gbs)], inputs, cache))
        step_done = end == self.masks[t].shape[1]
        if self.ctx.last and step_done:
            chosen = self.chooser.choose(y, t, i)
            self.ring.send(pack(chosen, FINISHED if self.chooser.all_finished() else 0))
        elif not self.ctx.last:
            self.ring.send(pack(y, 0))
        if step_done:
            self.masks[t] = torch.cat([self.masks[t], torch.ones((len(self.masks[t]), 1), dtype=torch.bool)], dim=1)

    def _stop_downstream(self, t: int, i: int) -> None:
        """Send STOP for position (t, i) and, when the schedule has a next position, one filler
        (the receiver may have posted its receive already)."""
        has_next = not (t == self.count - 1 and i == self.steps - 1)
        shape = (self.rows,) if self.ctx.last else (self.rows, 1, self.hidden)
        dtype = torch.long if self.ctx.last else self.engine.dtype
        for _ in range(2 if has_next else 1):
            self.ring.send(pack(torch.zeros(shape, dtype=dtype), STOP))

    def _collect(self) -> None:
        """Rank 0: the tokens still on their way around the ring."""
        if not self.stopping:  # the last step's tokens, one message per micro-batch
            for t in range(self.count):
                self.received[t].append(unpack(self.ring.receive(), (self.rows,))[0].cpu())
            return
        got = sum(map(len, self.received))
        while True:  # every position sent before the STOP comes back as tokens, then the STOP
            tokens, flag = unpack(self.ring.receive(), (self.rows,))
            if flag == STOP:
                break
            self.received[got % self.count].append(tokens.cpu())
            got += 1
        self.ring.abandon()

    def _result(self):
        if not self.ctx.first:
            return None, []
        width = max(map(len, self.received))
        filler = torch.full((self.rows,), self.pad, dtype=torch.long)  # finished rows choose the pad token
        gens = torch.cat([torch.stack(r + [filler] * (width - len(r)), dim=1) for r in self.received])
        keep = self.ctx.world_size == 1 and self.chooser.keep_logits
        logits = [torch.cat(step) for step in zip(*self.chooser.logits)] if keep else []
        return gens, logits

    def _expect_inputs(self) -> None:
        """Tell the ring, in order, what this rank will receive during the block."""
        for i in range(self.steps):
            for t, (ids, _) in enumerate(self.micro):
                if self.ctx.first:
                    self.ring.expect((len(ids) + 1,), torch.long)
                    continue
                for start, end in self._pieces(t, i):
                    self.ring.expect((len(ids) * (end - start) * self.hidden + 1,), self.engine.dtype)
