"""Next-token choice: greedy, or temperature + top-p sampling with one generator per sequence,
so a seeded run gives the same tokens whatever the batching."""
from __future__ import annotations

import torch


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
