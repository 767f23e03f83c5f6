"""Batch jobs: requests -> resolved for the model -> blocks grouped by length -> output records.

Invariants:
- a request's output depends only on the request (its prompt, parameters and input index), not on
  the block it runs in: greedy rows are independent of their neighbours, and a sampled row draws
  from its own generator keyed by its index. So blocks may be formed in any order (bucketing)
  and a resumed job runs only the missing requests, with the same results.
- rank 0 reads, tokenizes and plans; every rank runs the same blocks in the same order.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from tqdm import tqdm

from ..core.config import GenerationConfig, RowParams, make
from ..core.errors import FlexGenError
from ..dist.group import broadcast
from ..formats.prompts import encode
from ..formats.records import error_record, public, record
from ..formats.requests import Request, RequestError
from ..models.base import TOP_LOGPROBS
from ..runtime.block import BlockRun
from ..runtime.sampling import generated_length
from ..runtime.stats import GenerationStats
from . import scoring


@dataclass
class BatchInfo:
    """What a batch job did, for the summary and the log record."""

    requests: int = 0
    skipped: int = 0  # already done (resume)
    errors: int = 0
    blocks: int = 0
    padding_unbucketed: float = 0.0  # share of block positions that are padding, in input order
    padding: float = 0.0  # the same for the blocks run
    max_prompt_len: int = 0
    first_error: str | None = None  # `request INDEX (ID): why`, of the first request that failed

    @property
    def succeeded(self) -> int:
        """Requests answered by this run (not skipped, not failed)."""
        return self.requests - self.skipped - self.errors


def resolve(request: Request, engine, gen: GenerationConfig, tokenizer) -> Request:
    """`request` with its token ids and row parameters (job defaults from `gen`); RequestError if
    it cannot run on this model."""
    if request.error:
        raise RequestError(request.error)
    try:
        ids = request.prompt.ids if request.prompt.ids is not None else encode(request.prompt, tokenizer)
    except FlexGenError as e:
        raise RequestError(str(e)) from None
    p = request.params
    sample = p["temperature"] > 0 if "temperature" in p else gen.do_sample  # temperature 0 is greedy
    temperature = p["temperature"] if p.get("temperature") else gen.temperature
    stop, sequences, strings = list(gen.stop), [], []
    for s in ([p["stop"]] if isinstance(p.get("stop"), (str, int)) else p.get("stop") or []):
        if isinstance(s, int):
            stop.append(s)
            continue
        strings.append(s)
        encoded = tokenizer(s, add_special_tokens=False)["input_ids"] if tokenizer is not None else []
        (stop.extend if len(encoded) == 1 else sequences.append)(encoded)
    params = RowParams(max_tokens=max(1, p.get("max_tokens", gen.max_new_tokens)), stop=stop,
                       stop_sequences=[s for s in sequences if s], do_sample=sample, temperature=temperature,
                       top_p=p.get("top_p", gen.top_p), seed=p.get("seed", gen.seed), key=request.index)
    try:
        engine._check_prompts([ids], params.max_tokens)
    except FlexGenError as e:
        raise RequestError(str(e).replace("prompt 0", "the prompt")) from None
    request.ids, request.row, request.stop_strings = ids, params, strings
    return request


def plan(items: list[Request], block: int, bucket: bool) -> list[list[Request]]:
    """Blocks of `block` items: sorted by prompt length, then requested length, when bucketing
    (rows of a block are padded to its longest prompt and run to its longest request)."""
    order = sorted(items, key=lambda it: (len(it.ids), it.row.max_tokens, it.index)) if bucket else items
    return [order[i:i + block] for i in range(0, len(order), block)]


def padding_share(blocks: list[list[Request]]) -> float:
    """Share of the positions blocks compute (rows × (widest prompt + longest request)) that no
    request needs."""
    used = total = 0
    for b in blocks:
        total += len(b) * (max(len(it.ids) for it in b) + max(it.row.max_tokens for it in b))
        used += sum(len(it.ids) + it.row.max_tokens for it in b)
    return 1 - used / total if total else 0.0


def generate_batch(engine, requests, *, bucket: bool = True, strict: bool = False, done=(), on_records=None,
                   progress: bool | None = None, model_name: str | None = None, created: int | None = None,
                   **options):
    """Answer `requests` (strings, token-id lists, dicts as lines of a request file, or Requests)
    in blocks; `options` are GenerationConfig fields, the defaults of every request. Requests whose
    index is in `done` are skipped. Each finished block's records (dicts) go to `on_records`, on
    rank 0; without it they are collected and returned in input order. Under mpirun every rank
    calls this; only rank 0's `requests` are read, and the others get None."""
    if engine.closed:
        raise FlexGenError("this Engine is closed; make a new one with Engine.from_pretrained")
    ctx = engine.ctx
    stats, info = GenerationStats(), BatchInfo()
    job = _prepare(engine, requests, options, bucket, strict, set(done), info) if ctx.first else None
    blocks = broadcast(ctx, None if job is None else [[(it.ids, it.row, _wants(it)) for it in b] for b in job["blocks"]])
    collected = []
    emit = on_records or collected.extend
    bar = None
    if ctx.first:
        emit([error_record(r, e, model_name) for r, e in job["errors"]])
        bar = tqdm(total=info.requests, initial=info.skipped + info.errors, unit="req", desc="requests",
                   disable=not (engine.progress if progress is None else progress), dynamic_ncols=True)
    t0 = time.perf_counter()
    for k, payload in enumerate(blocks):
        rows = _run_block(engine, payload, stats)
        scores = _scores(engine, payload, rows, stats)
        if ctx.first:
            emit([record(it, row, engine.tokenizer, model_name, created, lp)
                  for it, row, lp in zip(job["blocks"][k], rows, scores)])
            rate = stats.generated_tokens / max(time.perf_counter() - t0, 1e-9)
            _advance(bar, len(rows), f"{rate:.1f} tok/s", last=k == len(blocks) - 1)
    engine.ring.flush()
    if bar is not None:
        bar.close()
    engine._finish_stats(stats, [], [], 0)
    engine.last_batch = info
    if not ctx.first or on_records:
        return None
    return [public(r) for r in sorted(collected, key=lambda r: r["_index"])]


def _advance(bar: tqdm, rows: int, postfix: str, last: bool) -> None:
    """Count a finished block on the bar, drawing it once: the last block's count is drawn by the
    bar's `close` (a relayed stderr, as under mpirun, shows every draw as a line of its own)."""
    bar.set_postfix_str(postfix, refresh=False)
    if last:
        bar.n += rows
    else:
        bar.update(rows)


def _prepare(engine, requests, options, bucket, strict, done, info: BatchInfo) -> dict:
    """Rank 0: resolve every request not done; the blocks to run and the error records."""
    gen = make(GenerationConfig, dict(options), "generate_batch").validate()
    gen.stop = engine.stop_tokens(gen)
    requests = [Request.of(r, i) for i, r in enumerate(requests)]
    info.requests = len(requests)
    tokenizer = engine.tokenizer
    if tokenizer is None and any(r.prompt.ids is None and not r.error for r in requests):
        raise FlexGenError("text prompts need a tokenizer: the model directory has none; pass --tokenizer "
                           "DIR or give JSONL prompts with 'input_ids'")
    items, errors = [], []
    for r in requests:
        if r.index in done:
            info.skipped += 1
            continue
        try:
            items.append(resolve(r, engine, gen, tokenizer))
        except RequestError as e:
            if strict:
                raise FlexGenError(f"request {r.index}{_named(r)}: {e}") from None
            errors.append((r, str(e)))
            info.first_error = info.first_error or f"request {r.index}{_named(r)}: {e}"
    info.errors = len(errors)
    info.max_prompt_len = max((len(it.ids) for it in items), default=0)
    block = engine.micro_batches * engine.policy.block_size
    unbucketed = plan(items, block, False)
    info.padding_unbucketed = padding_share(unbucketed)
    blocks = plan(items, block, True) if bucket else unbucketed
    if padding_share(blocks) > info.padding_unbucketed:  # sorting can lose on a few mixed requests
        blocks = unbucketed
    info.blocks, info.padding = len(blocks), padding_share(blocks)
    return {"blocks": blocks, "errors": errors}


def _named(r: Request) -> str:
    name = r.carry.get("custom_id", r.carry.get("id"))
    return "" if name is None else f" ({name})"


def _wants(request: Request) -> tuple[int, bool, bool]:
    """(tokens to keep, echo, token log-probabilities) of a resolved request: a completion with
    `max_tokens` 0 generates one token (the block's shape) and keeps none."""
    p = request.params
    return p.get("max_tokens", request.row.max_tokens), bool(p.get("echo")), p.get("logprobs") is not None


def _scores(engine, payload, rows, stats) -> list:
    """Rank 0: per row of the block, None or the scores of its echoed prompt tokens (from the
    second) and its generated ones, as (target log-probability, top log-probabilities, their token
    ids) per token (see `scoring.position_scores`), from one prefill-only pass over prompt and
    generated tokens. Every rank takes part when a row asks for log-probabilities."""
    if not any(scored for _, _, (_, _, scored) in payload):
        return [None] * len(rows)
    rows = broadcast(engine.ctx, rows)
    asked, pairs = [], []
    for (ids, _, (_, echo, scored)), gen in zip(payload, rows):
        full = list(ids) + list(gen)
        targets = full[1:] if echo else list(gen)
        if scored and targets:
            asked.append(len(pairs))
            pairs.append((full[:-1], targets))
        else:
            asked.append(None if not scored else -1)
    got = scoring.position_scores(engine, pairs, stats)
    if got is None:
        return []
    out = []
    for a in asked:
        part = got[a].tolist() if a is not None and a >= 0 else []
        out.append(None if a is None else [(s[0], s[2:2 + TOP_LOGPROBS], [int(t) for t in s[2 + TOP_LOGPROBS:]])
                                           for s in part])
    return out


def _run_block(engine, payload, stats) -> list[list[int]]:
    """Run one block of (ids, params, wants) rows on this rank; rank 0 gets each row's tokens."""
    block = engine.micro_batches * engine.policy.block_size
    ids = [p for p, _, _ in payload]
    keep = [w[0] for _, _, w in payload]
    params = [q for _, q, _ in payload]
    filled = ids + [ids[-1]] * (block - len(ids))  # a short block is filled; the fillers end at once
    params = params + [RowParams(max_tokens=1, key=-1)] * (block - len(ids))
    stats.prompts += len(payload)
    stats.prompt_tokens += sum(map(len, ids))
    gens, _ = BlockRun(engine, filled, params).run(stats)
    if gens is None:
        return []
    rows = []
    for row, p, most in zip(gens[:len(payload)].tolist(), params, keep):
        n = min(generated_length(row, p.stop, p.stop_sequences), p.max_tokens, most)
        stats.generated_tokens += n
        stats.decode_tokens += max(n - 1, 0)
        rows.append(row[:n])
    return rows
