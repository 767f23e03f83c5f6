"""Batch requests: the OpenAI Batch API's lines and the simple formats (text lines; JSONL with
`prompt`, `input_ids` or `messages`), each with its own generation parameters.

A problem with one request (an unsupported URL or parameter, a bad value, a prompt too long for
the model) is kept on the request as `error` and becomes that request's error record; problems
with the file itself (not UTF-8, not JSON, no prompt at all in a simple line) end the job.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from ..core.config import RowParams
from ..core.errors import FlexGenError
from .prompts import Prompt, checked_messages, prompt_from_object, prompt_lines

URLS = {"/v1/completions": "completion", "/v1/chat/completions": "chat"}


PARAMS = ("max_tokens", "temperature", "top_p", "stop", "seed")


COMPLETION_ONLY = ("logprobs", "echo")  # /v1/completions: token log-probabilities, the prompt echoed


MAX_LOGPROBS = 5  # OpenAI's completions API caps `logprobs` at 5 (models.base.TOP_LOGPROBS)


IGNORED = {"model", "user", "n", "stream", "max_completion_tokens", "prompt", "messages"}


CARRIED = ("id", "custom_id")


class RequestError(ValueError):
    """This request cannot run; the job goes on (an error record) unless --strict."""


@dataclass
class Request:
    """One prompt to answer, and its state through the job: read (`prompt`, `params` as given,
    `carry`, or the `error` that stops it), then resolved for the model (`ids`, `row`,
    `stop_strings`), then answered (a record). `index` is its position among the input's requests
    (the key of its sampling generator and of resume); `kind` is completion, chat or plain (the
    simple formats)."""

    index: int
    prompt: Prompt
    kind: str = "plain"
    params: dict = field(default_factory=dict)  # per-request max_tokens, temperature, ... (PARAMS, COMPLETION_ONLY)
    carry: dict = field(default_factory=dict)  # id / custom_id, returned as given
    error: str | None = None
    ids: list[int] | None = None  # the prompt's token ids, once resolved
    row: RowParams | None = None  # how its tokens are generated, once resolved
    stop_strings: list[str] = field(default_factory=list)  # stop strings the text is cut at

    @classmethod
    def of(cls, value, index: int) -> "Request":
        """A request from an API value: a Request, a prompt string, a list of token ids, or a dict
        as one line of a request file."""
        if isinstance(value, Request):
            return value
        if isinstance(value, str):
            return cls(index, Prompt(index, text=value))
        if isinstance(value, (list, tuple)):
            return cls(index, Prompt(index, ids=[int(t) for t in value]))
        if isinstance(value, dict):
            return parse_object(value, index, "request", index + 1)
        raise FlexGenError(f"request {index}: expected a string, token ids or a dict, got {type(value).__name__}")


def read_requests(path: str) -> list[Request]:
    """Every non-empty line of `path` as a request, in order."""
    filled, jsonl = prompt_lines(path)
    if not jsonl:
        return [Request(i, Prompt(i, text=line)) for i, (_, line) in enumerate(filled)]
    return [parse_line(path, n, line, i) for i, (n, line) in enumerate(filled)]


def parse_line(path: str, line_no: int, line: str, index: int) -> Request:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise FlexGenError(f"{path} line {line_no}: not valid JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise FlexGenError(f"{path} line {line_no}: needs a JSON object")
    return parse_object(obj, index, path, line_no)


def parse_object(obj: dict, index: int, path: str, line_no: int) -> Request:
    carry = {k: obj[k] for k in CARRIED if k in obj}
    if "body" in obj or "url" in obj:
        return _openai_request(obj, index, carry)
    prompt = prompt_from_object(path, line_no, obj, index)
    request = Request(index, prompt, params={k: obj[k] for k in PARAMS if k in obj}, carry=carry)
    return _checked_params(request)


def _openai_request(obj: dict, index: int, carry: dict) -> Request:
    """A line of an OpenAI batch file; what is wrong with it is kept as the request's error."""
    request = Request(index, Prompt(index), kind=URLS.get(obj.get("url"), "completion"), carry=carry)
    try:
        body = obj.get("body")
        if obj.get("method", "POST") != "POST":
            raise RequestError(f"method {obj.get('method')!r} is not supported (only POST)")
        if obj.get("url") not in URLS:
            raise RequestError(f"url {obj.get('url')!r} is not supported (only {', '.join(URLS)})")
        if not isinstance(body, dict):
            raise RequestError("'body' must be a JSON object")
        request.prompt = _body_prompt(body, request.kind, index)
        request.params = _body_params(body, request.kind)
    except (RequestError, FlexGenError) as e:
        request.error = str(e)
        return request
    return _checked_params(request)


def _body_prompt(body: dict, kind: str, index: int) -> Prompt:
    if kind == "chat":
        try:
            return Prompt(index, messages=checked_messages("body", 0, body.get("messages")))
        except FlexGenError:
            raise RequestError("'messages' must be a non-empty list of {\"role\", \"content\"} objects with string values") from None
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return Prompt(index, text=prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return Prompt(index, ids=prompt)
    raise RequestError("'prompt' must be a string or a non-empty list of token ids (one prompt per request)")


def _body_params(body: dict, kind: str) -> dict:
    supported = PARAMS + (COMPLETION_ONLY if kind == "completion" else ())
    if kind == "chat" and (body.get("logprobs") or body.get("top_logprobs") is not None):
        raise RequestError("logprobs are not supported for chat completions (use /v1/completions with 'logprobs')")
    unknown = sorted(set(body) - set(supported) - IGNORED - ({"logprobs", "top_logprobs"} if kind == "chat" else set()))
    if unknown:
        raise RequestError(f"parameter {unknown[0]!r} is not supported (supported: {', '.join(supported)})")
    if body.get("n", 1) != 1:
        raise RequestError(f"n={body['n']!r} is not supported (one choice per request)")
    if body.get("stream", False):
        raise RequestError("stream=true is not supported in a batch")
    params = {k: body[k] for k in supported if k in body}
    if "max_tokens" not in params and "max_completion_tokens" in body:
        params["max_tokens"] = body["max_completion_tokens"]
    return params


def _checked_params(request: Request) -> Request:
    try:
        check_params(request.params)
    except RequestError as e:
        request.error = str(e)
    return request


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_params(p: dict) -> None:
    """Raise RequestError for a value this engine cannot honour."""
    if "echo" in p and not isinstance(p["echo"], bool):
        raise RequestError(f"echo must be true or false, got {p['echo']!r}")
    least = 0 if p.get("echo") else 1  # max_tokens 0 with echo: the prompt scored, nothing generated
    if "max_tokens" in p and not (_is_int(p["max_tokens"]) and p["max_tokens"] >= least):
        raise RequestError(f"max_tokens must be a positive integer (or 0 with echo), got {p['max_tokens']!r}")
    logprobs = p.get("logprobs")
    if logprobs is not None and not (_is_int(logprobs) and 0 <= logprobs <= MAX_LOGPROBS):
        raise RequestError(f"logprobs must be an integer in [0, {MAX_LOGPROBS}] or null, got {logprobs!r}")
    if "temperature" in p and not (isinstance(p["temperature"], (int, float)) and 0 <= p["temperature"] <= 2):
        raise RequestError(f"temperature must be a number in [0, 2], got {p['temperature']!r}")
    if "top_p" in p and not (isinstance(p["top_p"], (int, float)) and 0 < p["top_p"] <= 1):
        raise RequestError(f"top_p must be in (0, 1], got {p['top_p']!r}")
    if "seed" in p and not _is_int(p["seed"]):
        raise RequestError(f"seed must be an integer, got {p['seed']!r}")
    stop = p.get("stop")
    stops = [stop] if isinstance(stop, (str, int)) else stop
    if stop is not None and not (isinstance(stops, list) and len(stops) <= 4
                                 and all(isinstance(s, str) and s or _is_int(s) for s in stops)):
        raise RequestError(f"stop must be a non-empty string, a token id or a list of up to 4 of them, got {stop!r}")
