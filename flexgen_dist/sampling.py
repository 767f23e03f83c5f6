"""Next-token choice: greedy, or temperature + top-p sampling with one generator per sequence,
so a seeded run gives the same tokens whatever the batching; stop tokens and where output ends."""
from __future__ import annotations

import torch

from .config import GenerationConfig
from .errors import FlexGenError


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
    """The last rank's sampling state for one block: generators, stop tracking, forced tokens."""

    def __init__(self, config: GenerationConfig, pad: int, b0: int, rows: int, micro: int, forced,
                 keep_logits: bool = False, rank: int = 0):
        self.config, self.pad, self.rows, self.forced = config, pad, rows, forced
        self.keep_logits, self.rank = keep_logits, rank
        self.generators = [sequence_generators(config.seed, list(range(b0 + t * rows, b0 + (t + 1) * rows)))
                           if config.do_sample else None for t in range(micro)]
        self.stopped = [torch.zeros(rows, dtype=torch.bool) for _ in range(micro)]
        self.stop = torch.tensor(config.stop, dtype=torch.long)
        self.logits: list[list[torch.Tensor]] = [[] for _ in range(micro)]

    def choose(self, logits: torch.Tensor, t: int, step: int) -> torch.Tensor:
        """Token ids (rows,) on the host. Logits stay where they are computed unless sampling or
        `keep_logits` needs them on the host in float32."""
        if not bool(torch.isfinite(logits).all()):
            raise FlexGenError(f"non-finite logits (NaN or inf) at token step {step} on rank {self.rank}: the "
                               "weights are damaged or overflow this dtype (try --dtype float32)")
        if self.keep_logits:
            self.logits[t].append(logits.float().cpu())
        c = self.config
        if self.forced is not None:
            chosen = self.forced[t * self.rows:(t + 1) * self.rows, step]
        elif c.do_sample:
            chosen = choose_tokens(logits.float().cpu(), True, c.temperature, c.top_p, self.generators[t])
        else:
            chosen = logits.argmax(dim=-1).cpu()
        chosen = chosen.masked_fill(self.stopped[t], self.pad)
        self.stopped[t] |= torch.isin(chosen, self.stop)
        return chosen

    def all_stopped(self) -> bool:
        return all(bool(s.all()) for s in self.stopped)


def generated_length(tokens: list[int], stop: list[int]) -> int:
    """Tokens really generated: up to and including the first stop token."""
    for i, t in enumerate(tokens):
        if t in stop:
            return i + 1
    return len(tokens)


def trim_after_stop(gens: list[torch.Tensor], stop: list[int]) -> list[torch.Tensor]:
    """Drop trailing steps in which every sequence had already stopped (as transformers does)."""
    width = max(generated_length(g.tolist(), stop) for g in gens)
    return [g[:width] for g in gens]
