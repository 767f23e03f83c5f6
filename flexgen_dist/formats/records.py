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


def record(request, tokens: list[int], tokenizer, model: str | None, created: int | None) -> dict:
    """The answer to a resolved request whose generated tokens are `tokens`."""
    text, reason = finish(request, tokens, tokenizer)
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
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
        body = {"id": f"cmpl-{request.index}", "object": "text_completion"}
    body.update(created=created or 0, model=model, choices=[choice], usage=usage)
    return _openai(request, {"status_code": 200, "request_id": f"req_{request.index}", "body": body}, None)


def error_record(request, message: str, model: str | None) -> dict:
    if request.kind == "plain":
        return {"index": request.index, **request.carry, "error": message, "_index": request.index}
    return _openai(request, None, {"code": "invalid_request", "message": message})


def _openai(request, response, error) -> dict:
    return {"id": f"batch_req_{request.index}", "custom_id": request.carry.get("custom_id"), "response": response,
            "error": error, "_index": request.index}
