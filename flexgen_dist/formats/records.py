"""Output records of a batch job, one per request, as JSON objects.

- OpenAI batch requests get the Batch API's output line: `id` ("batch_req_<index>"),
  `custom_id`, `response` {`status_code` 200, `request_id`, `body`: a completion or chat
  completion with `choices` and `usage`}, `error` null; a bad request gets `response` null and
  `error` {`code`, `message`}.
- Simple formats get {`index`, `id`/`custom_id` if given, `output_ids`, `prompt` or `messages`,
  `text`, `finish_reason`}; a bad request {`index`, ids, `error`}.
Every record also holds `_index` (the request's input position) until it is written.
"""
from __future__ import annotations

import itertools


def public(r: dict) -> dict:
    """The record as written: without the private `_index`."""
    return {k: v for k, v in r.items() if k != "_index"}


def finish(request, tokens: list[int], tokenizer) -> tuple[str | None, str]:
    """(text, finish_reason): the text ends before the first stop string, as OpenAI's does."""
    p = request.row
    stopped = bool(tokens) and (tokens[-1] in p.stop or any(tokens[-len(s):] == s for s in p.stop_sequences))
    text = tokenizer.decode(tokens, skip_special_tokens=True) if tokenizer is not None else None
    if text is not None:
        cuts = [text.find(s) for s in request.stop_strings if s in text]
        if cuts:
            text, stopped = text[:min(cuts)], True
    return text, "stop" if stopped or len(tokens) < p.max_tokens else "length"


def record(request, tokens: list[int], tokenizer, model: str | None, created: int | None, scores=None) -> dict:
    """The answer to a resolved request whose generated tokens are `tokens`; `scores`, for a
    completion with `logprobs`, holds (log-probability, top log-probabilities, their ids) of each
    scored token: the echoed prompt's from its second token, then the generated ones."""
    text, reason = finish(request, tokens, tokenizer)
    if request.params.get("max_tokens") == 0:
        reason = "length"
    if request.kind == "plain":
        out = {"index": request.index, **request.carry, "output_ids": tokens}
        if request.prompt.text is not None:
            out["prompt"] = request.prompt.text
        if request.prompt.messages is not None:
            out["messages"] = request.prompt.messages
        if text is not None:
            out["text"] = text
        return {**out, "finish_reason": reason, "_index": request.index}
    prompt_tokens = len(request.ids)
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(tokens), "total_tokens": prompt_tokens + len(tokens)}
    if request.kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text or ""}, "logprobs": None,
                  "finish_reason": reason}
        body = {"id": f"chatcmpl-{request.index}", "object": "chat.completion"}
    else:
        choice = {"index": 0, **completion_text(request, tokens, text or "", tokenizer, scores), "finish_reason": reason}
        body = {"id": f"cmpl-{request.index}", "object": "text_completion"}
    body.update(created=created or 0, model=model, choices=[choice], usage=usage)
    return _openai(request, {"status_code": 200, "request_id": f"req_{request.index}", "body": body}, None)


def token_strings(ids: list[int], tokenizer, skip_special: bool = False, window: int = 8) -> list[str]:
    """Each token's text as it reads after the tokens before it (the last `window` of them give the
    context: a tokenizer may drop a word's leading space at the start of a text); special tokens
    by name, or as "" with `skip_special` (as the returned text has them)."""
    if tokenizer is None:
        return ["" if skip_special else f"token_id:{t}" for t in ids]
    out = []
    for i, t in enumerate(ids):
        before = tokenizer.decode(ids[max(0, i - window):i], skip_special_tokens=skip_special)
        out.append(tokenizer.decode(ids[max(0, i - window):i] + [t], skip_special_tokens=skip_special)[len(before):])
    return out


def completion_text(request, tokens: list[int], text: str, tokenizer, scores) -> dict:
    """`text` (after the prompt's text with `echo`) and `logprobs` in the completions API's shape:
    `tokens`, `token_logprobs`, `top_logprobs` ({token text: log-probability}, the top `logprobs`
    of them, special tokens by name) and `text_offset` (into the prompt's text followed by the
    completion's, which show no special tokens); the echoed
    prompt's first token has none (null). Tokens past a stop string that cut the text are left out."""
    echo, n = request.params.get("echo", False), request.params.get("logprobs")
    context = list(request.ids) + list(tokens)
    shown = token_strings(context, tokenizer, skip_special=True)  # as in the text
    prompt_text = "".join(shown[:len(request.ids)])
    if n is None:
        return {"text": (prompt_text if echo else "") + text, "logprobs": None}
    strings, generated, kept = token_strings(context, tokenizer), shown[len(request.ids):], len(tokens)
    if len(text) < len("".join(generated)):
        kept = next(k for k in range(len(generated) + 1) if len("".join(generated[:k])) >= len(text))
    first, offsets = 0 if echo else len(request.ids), [0, *itertools.accumulate(map(len, shown))]
    positions = range(first, len(request.ids) + kept)
    scored = ([None] if echo else []) + list(scores or [])
    top = []
    for i in positions:
        s = scored[i - first]
        top.append(None if s is None else _alternatives(context[max(0, i - 8):i], s[1][:n], s[2][:n], tokenizer))
    return {"text": (prompt_text if echo else "") + text, "logprobs": {
        "tokens": [strings[i] for i in positions],
        "token_logprobs": [None if scored[i - first] is None else scored[i - first][0] for i in positions],
        "top_logprobs": top, "text_offset": [offsets[i] for i in positions]}}


def _alternatives(before: list[int], logps: list[float], ids: list[int], tokenizer) -> dict[str, float]:
    """{token text: log-probability} of the most likely tokens after `before`, most likely first; of
    tokens reading the same, the likelier."""
    out: dict[str, float] = {}
    for logp, t in zip(logps, ids):
        out.setdefault(token_strings(before + [t], tokenizer)[-1], logp)
    return out


def error_record(request, message: str, model: str | None) -> dict:
    if request.kind == "plain":
        return {"index": request.index, **request.carry, "error": message, "_index": request.index}
    return _openai(request, None, {"code": "invalid_request", "message": message})


def _openai(request, response, error) -> dict:
    return {"id": f"batch_req_{request.index}", "custom_id": request.carry.get("custom_id"), "response": response,
            "error": error, "_index": request.index}
