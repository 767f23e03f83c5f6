"""Next-token choice: greedy, or temperature + top-p sampling with one generator per sequence,
so a seeded run gives the same tokens whatever the batching; stop tokens and where output ends.

Every row of a block carries its own `RowParams` (a batch job's requests differ in length, stop
tokens, temperature, top-p and seed); `generate` gives every row the same ones."""
from __future__ import annotations

import torch

from ..core.config import RowParams
from ..core.errors import FlexGenError


def sequence_generators(seed: int, indices: list[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed * 1_000_003 + i) for i in indices]


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability reaches `top_p` (as transformers does)."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1 - top_p)
    remove[..., -1] = False  # always keep the most likely token
    return logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))


def choose_tokens(logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float,
                  generators: list[torch.Generator] | None) -> torch.Tensor:
    """(b, vocab) float logits -> (b,) token ids."""
    if not do_sample:
        return logits.argmax(dim=-1)
    probs = top_p_filter(logits.float() / temperature, top_p).softmax(dim=-1).cpu()
    picks = [torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generators)]
    return torch.cat(picks).to(logits.device)


class TokenChooser:
    """The last rank's sampling state for one block of `micro` micro-batches of `rows` rows:
    generators, which rows are finished, forced tokens. `params` has one entry per row."""

    def __init__(self, params: list[RowParams], pad: int, rows: int, micro: int, forced=None,
                 keep_logits: bool = False, rank: int = 0):
        self.params, self.pad, self.rows, self.forced = params, pad, rows, forced
        self.keep_logits, self.rank = keep_logits, rank
        self.generators = {r: sequence_generators(p.seed, [p.key])[0] for r, p in enumerate(params) if p.do_sample}
        self.finished = torch.zeros(rows * micro, dtype=torch.bool)
        self.history: list[list[int]] = [[] for _ in params]  # kept only for rows with stop sequences
        self.logits: list[list[torch.Tensor]] = [[] for _ in range(micro)]
        # rows sampled alike are sampled together (one softmax for the group)
        self.groups: dict[tuple, list[int]] = {}
        for r, p in enumerate(params):
            if p.do_sample:
                self.groups.setdefault((p.temperature, p.top_p), []).append(r)

    def choose(self, logits: torch.Tensor, t: int, step: int) -> torch.Tensor:
        """Token ids (rows,) on the host for micro-batch `t`. Logits stay where they are computed
        unless sampling or `keep_logits` needs them on the host in float32."""
        if not bool(torch.isfinite(logits.sum(dim=-1)).all()):  # a NaN or inf anywhere: a fraction of the cost
            raise FlexGenError(f"non-finite logits (NaN or inf) at token step {step} on rank {self.rank}: the "
                               "weights are damaged or overflow this dtype (try --dtype float32)")
        if self.keep_logits:
            self.logits[t].append(logits.float().cpu())
        lo = t * self.rows
        if self.forced is not None:
            chosen = self.forced[lo:lo + self.rows, step].clone()
        else:
            chosen = self._pick(logits, lo)
        done = self.finished[lo:lo + self.rows]
        chosen = chosen.masked_fill(done, self.pad)
        self._mark_finished(chosen, lo, step)
        return chosen

    def _pick(self, logits: torch.Tensor, lo: int) -> torch.Tensor:
        chosen = logits.argmax(dim=-1).cpu()  # greedy on the device: no host copy of the vocabulary
        for (temperature, top_p), members in self.groups.items():
            local = [r - lo for r in members if lo <= r < lo + self.rows]
            if local:
                picks = choose_tokens(logits[local].float().cpu(), True, temperature, top_p,
                                      [self.generators[lo + r] for r in local])
                chosen[local] = picks.cpu()
        return chosen

    def _mark_finished(self, chosen: torch.Tensor, lo: int, step: int) -> None:
        for r in range(self.rows):
            row = lo + r
            if self.finished[row]:
                continue
            p, token = self.params[row], int(chosen[r])
            if p.stop_sequences:
                self.history[row].append(token)
            if token in p.stop or step + 1 >= p.max_tokens or ends_with_any(self.history[row], p.stop_sequences):
                self.finished[row] = True

    def all_finished(self) -> bool:
        return bool(self.finished.all())


def ends_with_any(tokens: list[int], sequences: list[list[int]]) -> bool:
    return any(seq and tokens[-len(seq):] == seq for seq in sequences)


def generated_length(tokens: list[int], stop: list[int], stop_sequences: list[list[int]] = ()) -> int:
    """Tokens really generated: up to and including the first stop token or stop sequence."""
    for i, t in enumerate(tokens):
        if t in stop or (stop_sequences and ends_with_any(tokens[:i + 1], stop_sequences)):
            return i + 1
    return len(tokens)


def trim_after_stop(gens: list[torch.Tensor], stop: list[int]) -> list[torch.Tensor]:
    """Drop trailing steps in which every sequence had already stopped (as transformers does)."""
    width = max(generated_length(g.tolist(), stop) for g in gens)
    return [g[:width] for g in gens]
