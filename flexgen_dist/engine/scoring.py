"""Scoring: log-likelihoods of continuations given contexts (lm-eval's `loglikelihood`) and of whole
documents over windows of the model's context (`loglikelihood_rolling`), through the same block
schedule as generation but prefill-only (`runtime.score.ScoreRun`).

Requests are packed into model rows (`packing`): a context shared by several requests (the
choices of one multiple-choice question) once, then each continuation as a segment that sees the
context and itself only; short rows side by side instead of padded. The attention bias keeps
segments apart and each token keeps the position it would have alone, so each request's scores are
those of its own sequence.

Model rows are sorted longest first and cut into blocks of `micro_batches * block_size` rows, so
rows of a block have similar lengths; results come back in request order. Every rank calls with the
same requests; rank 0 gets the results.
"""
from __future__ import annotations

from tqdm import tqdm

from ..core.errors import FlexGenError
from ..runtime.score import ScoreRun
from ..runtime.stats import GenerationStats
from .packing import fill, fill_width, model_rows


def model_input(context: list[int], continuation: list[int], max_len: int) -> tuple[list[int], list[int]]:
    """(input ids, targets) of one request, cut to the model's context as lm-eval's `hf` backend
    cuts it: the last `max_len + 1` tokens of context + continuation, less the last one."""
    return (list(context) + list(continuation))[-(max_len + 1):][:-1], list(continuation)


def _checked(engine, requests) -> list[tuple[list[int], list[int]]]:
    if engine.closed:
        raise FlexGenError("this Engine is closed; make a new one with Engine.from_pretrained")
    out, limit, vocab = [], engine.spec.max_positions, engine.spec.vocab_size
    for i, pair in enumerate(requests):
        context, continuation = (list(map(int, part)) for part in pair)
        if not continuation:
            raise FlexGenError(f"scoring request {i} has an empty continuation")
        if not context:
            raise FlexGenError(f"scoring request {i} has an empty context (give at least one token, e.g. BOS)")
        if len(continuation) > limit:
            raise FlexGenError(f"scoring request {i}'s continuation has {len(continuation)} tokens; the model "
                               f"has {limit} positions")
        bad = [t for t in context + continuation if not 0 <= t < vocab]
        if bad:
            raise FlexGenError(f"scoring request {i} has token id {bad[0]} outside the vocabulary (0-{vocab - 1})")
        out.append(model_input(context, continuation, limit))
    return out


def score(engine, requests, pack: bool = True) -> list[tuple[float, bool]] | None:
    """(summed log-probability, greedy) per (context, continuation) request, in request order."""
    scores = position_scores(engine, _checked(engine, requests), pack=pack)
    if scores is None:
        return None
    return [(float(part[:, 0].double().sum()), bool(part[:, 1].all())) for part in scores]


def position_scores(engine, rows: list[tuple[list[int], list[int]]], job_stats=None,
                    pack: bool = True) -> list | None:
    """Per (input ids, targets) row, a (len(targets), SCORE_WIDTH) float32 tensor of what the
    model gives the targets, predicted by the input's last positions (`models.base.token_scores`),
    in row order, on rank 0 (None elsewhere). Every rank calls with the same rows. With
    `job_stats` (a batch job's), the time counts there, silently. `pack`: several rows in one
    model row where that saves work (see `packing`); else one model row each."""
    if not rows:
        return [] if engine.ctx.first else None
    cheap = fill_width(engine.spec)
    units = model_rows(rows, engine.spec.max_positions, pack, cheap)
    if pack:
        units = fill(units, min(max(len(row.tokens) for row, _ in units), cheap))
    units.sort(key=lambda unit: -len(unit[0].tokens))
    block = engine.micro_batches * engine.policy.block_size
    stats = job_stats or GenerationStats(prompts=len(rows), prompt_tokens=sum(len(inp) for inp, _ in rows))
    bar = tqdm(total=len(rows), unit="req", desc="scoring", disable=not engine.progress or job_stats is not None)
    results: list = [None] * len(rows)
    for b0 in range(0, len(units), block):
        chunk = units[b0:b0 + block]
        scores = ScoreRun(engine, [row for row, _ in chunk]).run(stats)
        for r, (row, members) in enumerate(chunk):
            if scores is not None:
                _split(scores[r, scores.shape[1] - len(row.targets):], members, rows, results)
            bar.update(len(members))
    bar.close()
    engine.ring.flush()
    if job_stats is None:
        engine.last_stats = stats
    return results if engine.ctx.first else None


def _split(scores, members: list[tuple[int, int]], rows, results: list) -> None:
    """A model row's scores, (its targets, SCORE_WIDTH), to the rows it scores."""
    for i, start in members:
        results[i] = scores[start:start + len(rows[i][1])]


def rolling_windows(tokens: list[int], prefix_token: int, max_len: int) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) pairs covering `tokens` as lm-eval's `get_rolling_token_windows`
    (context_len=1) followed by `make_disjoint_window` cuts them: every token is predicted once,
    each window with as much preceding text as the model's context holds."""
    windows, predicted, total = [], 0, len(tokens)
    first = min(max_len, total)
    windows.append(([prefix_token] + tokens[:first - 1], tokens[:first]))
    predicted += first
    while predicted < total:
        span = min(total - predicted, max_len)
        end = predicted + span
        windows.append((tokens[max(end - max_len - 1, 0):end - 1], tokens[end - span:end]))
        predicted += span
    return [(inp[:len(inp) - (len(cont) - 1)], cont) for inp, cont in windows]


def score_rolling(engine, docs, prefix_token: int | None = None) -> list[float] | None:
    """Summed log-likelihood of each document (token ids), predicted from `prefix_token` (default:
    the model's BOS, else its EOS) over windows of the model's context."""
    spec = engine.spec
    prefix = prefix_token if prefix_token is not None else (
        spec.bos_token_id if spec.bos_token_id is not None else spec.pad_id)
    pairs, owner = [], []
    for d, doc in enumerate(docs):
        tokens = list(map(int, doc))
        if not tokens:
            raise FlexGenError(f"document {d} is empty")
        for pair in rolling_windows(tokens, prefix, spec.max_positions):
            pairs.append(pair)
            owner.append(d)
    scored = score(engine, pairs)
    if scored is None:
        return None
    totals = [0.0] * len(docs)
    for d, (logprob, _) in zip(owner, scored):
        totals[d] += logprob
    return totals
