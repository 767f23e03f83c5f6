"""Evaluation with lm-evaluation-harness: `python -m flexgen_dist.eval run --model flexgen
--model_args pretrained=DIR dtype=float32 percent=0:100:100:0:100:0 --tasks hellaswag`.

lm-eval 0.4 has no plugin entry point, so this module registers the `flexgen` backend with
`lm_eval.api.registry.register_model` and then runs lm-eval's own command line (every lm-eval flag
works; `--model flexgen` is added when no `--model` is given). `model_args` keys are the `run`
command's flags with `_` for `-` (list values joined with `:`), so every engine option is reachable;
without `percent` (or `policy=manual`) the planner chooses the policy, as in `run`, for the
workload of the first requests lm-eval sends and as many rows as they make (prefill-only for
scoring).

Under `mpirun -n N` rank 0 runs lm-eval; every request set it sends is broadcast to the other
ranks, which serve their pipeline stages until rank 0 is done; results are written once, by rank 0.
"""
from __future__ import annotations

import sys
import time
from dataclasses import replace

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import _add_special_kwargs, has_bos_prefix

from ..core.config import EngineConfig, JobConfig, PlannerConfig, pick
from ..core.errors import FlexGenError
from ..dist.context import DistContext, detect
from ..dist.failures import fail, stop_watching, watch_for_failures
from ..dist.group import broadcast, init, shutdown
from ..engine.engine import Engine
from ..engine.packing import fill_width, model_rows
from ..engine.scoring import model_input, rolling_windows
from ..models.checkpoint import resolve_model
from ..planning.costmodel import Workload
from ..planning.plan import plan_run, plans_policy
from .flags import flag_name
from .run import parse_args, policy_from_args

NOT_ENGINE_OPTIONS = {"batch_size", "max_batch_size", "device"}  # lm-eval's own, passed to every backend


def run_argv(pretrained: str, options: dict) -> list[str]:
    """`run` flags from lm-eval `model_args` (keys with `_`, list values joined with `:`)."""
    argv = ["--model", str(pretrained), "--quiet"]
    for key, value in options.items():
        if key in NOT_ENGINE_OPTIONS or value is None:
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            argv += [flag, "1" if value else "0"]
        elif key == "percent":
            argv += [flag, *str(value).split(":")]
        else:
            argv += [flag, str(value).replace(":", ",")]
    return argv


def build_engine(argv: list[str], ctx: DistContext, workload: Workload, rows: int) -> tuple[Engine, DistContext]:
    """The engine `run` would build from these flags, planned (unless the policy is given) for
    `rows` model rows of `workload` (a block no larger than the requests need; `num_prompts` in
    `model_args` overrides); every rank calls it with the same arguments."""
    args = parse_args(argv)
    policy = policy_from_args(args)
    engine_config = EngineConfig(**pick(EngineConfig, args)).validate(flag_name)
    ctx = init(ctx, engine_config.comm_device, engine_config.comm_timeout)
    watch_for_failures(ctx)
    engine_config.offload_dir = engine_config.offload_dir.format(rank=ctx.rank, local_rank=ctx.local_rank)
    planner = PlannerConfig(**pick(PlannerConfig, args))
    if plans_policy(planner, args.given):  # a given policy needs no measuring (there is no job to compare)
        job = JobConfig(**pick(JobConfig, args))
        job = replace(job, num_prompts=job.num_prompts or rows)
        planned = plan_run(ctx, job, planner, engine_config, workload.gen_len, policy, None, args.given, workload)
        policy = planned.decision.policies[ctx.rank]
        engine_config.stage_layers = planned.decision.stage_layers
        engine_config.micro_batches = planned.decision.micro_batches
        engine_config.prefill_chunks = planned.decision.prefill_chunks
        if len(planned.options.dtypes) > 1:
            engine_config.dtype = planned.decision.dtype
    return Engine.from_pretrained(args.model, policy=policy, config=engine_config, dist=ctx), ctx


def execute(engine: Engine, command: tuple):
    """Run one broadcast command on this rank: ("score", pairs), ("rolling", docs, prefix) or
    ("generate", prompts, max_new_tokens, sampling options)."""
    kind, *payload = command
    if kind == "score":
        return engine.score(payload[0])
    if kind == "rolling":
        return engine.score_rolling(payload[0], payload[1])
    prompts, max_new, options = payload
    return engine.generate(prompts, new_tokens_only=True, max_new_tokens=max_new, **options)


class Session:
    """The engine behind the backend on this rank, built at the first command (when the workload
    to plan for is known) and driven by rank 0's commands. It is planned once: later request sets
    of another kind or size run with the first one's policy."""

    def __init__(self, ctx: DistContext):
        self.ctx, self.engine, self.argv = ctx, None, None

    def call(self, command: tuple, workload: Workload, rows: int):
        """Rank 0: send `command` (`rows` model rows of `workload`) to every rank and run it here;
        its result."""
        if self.engine is None:
            broadcast(self.ctx, ("start", self.argv, workload, rows))
            self.engine, self.ctx = build_engine(self.argv, self.ctx, workload, rows)
        broadcast(self.ctx, command)
        return execute(self.engine, command)

    def serve(self) -> None:
        """Ranks other than 0: follow rank 0's commands until it says it is done."""
        while True:
            command = broadcast(self.ctx, None)
            if command[0] == "end":
                return
            if command[0] == "start":
                self.engine, self.ctx = build_engine(command[1], self.ctx, *command[2:])
                continue
            execute(self.engine, command)

    def end(self) -> None:
        if self.ctx.first and self.ctx.world_size > 1:
            broadcast(self.ctx, ("end",))
        if self.engine is not None:
            self.engine.close()


SESSION: Session | None = None  # this process's, set by `main` (lm-eval builds the backend itself)


@register_model("flexgen")
class FlexGenLM(TemplateLM):
    """lm-eval's `flexgen` model: loglikelihood, loglikelihood_rolling and generate_until through
    the engine (see the module's docstring for `model_args`)."""

    def __init__(self, pretrained: str | None = None, max_gen_toks: int = 256, add_bos_token: bool | None = None,
                 **options):
        super().__init__()
        if pretrained is None:
            raise FlexGenError("model_args needs pretrained=DIR (the model directory or name)")
        self.session = SESSION or Session(DistContext())
        self.session.argv = run_argv(pretrained, options)
        model = resolve_model(str(pretrained), dummy_weights=bool(options.get("dummy_weights")))
        self.max_length, self.max_gen_toks, self.add_bos_token = model.spec.max_positions, max_gen_toks, add_bos_token
        self.eos_ids = model.eos_token_ids
        self.cheap = fill_width(model.spec)
        from transformers import AutoTokenizer
        path = options.get("tokenizer") or model.tokenizer_path
        if path is None:
            raise FlexGenError(f"{pretrained} has no tokenizer; give model_args tokenizer=DIR")
        self.tokenizer = AutoTokenizer.from_pretrained(path)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """As lm-eval's `hf` backend encodes (its defaults, its BOS rule), so requests agree."""
        special = _add_special_kwargs(add_special_tokens, self.add_bos_token)
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            special["add_special_tokens"] = False
        return self.tokenizer.encode(string, **special)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        pairs = [(list(context), list(continuation)) for _, context, continuation in requests]
        rows = [model_input(c, t, self.max_length) for c, t in pairs]
        inputs = [inp for inp, _ in rows]
        units = [row for row, _ in model_rows(rows, self.max_length, cheap=self.cheap)]  # the rows the engine will run
        workload = Workload(max(len(row.tokens) for row in units), 1, scored=max(len(row.targets) for row in units))
        t0 = time.perf_counter()
        results = self.session.call(("score", pairs), workload, len(units))
        summary("scored", len(pairs), sum(map(len, inputs)), time.perf_counter() - t0)
        for request, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", request[0], result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        docs = [self.tok_encode(request.args[0]) for request in requests]
        width = max(1, min(self.max_length, max(map(len, docs))))  # (an empty document is refused by the engine)
        t0 = time.perf_counter()
        windows = sum(len(rolling_windows(doc, self.prefix_token_id, self.max_length)) for doc in docs)
        results = self.session.call(("rolling", docs, self.prefix_token_id), Workload(width, 1, scored=width),
                                    windows)  # model rows at most: short windows may share one
        summary("scored (rolling)", len(docs), sum(map(len, docs)), time.perf_counter() - t0)
        for request, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood_rolling", (request.args[0],), result)
        return results

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups: dict[tuple, list[int]] = {}
        settings = [self._generation(request.args[1]) for request in requests]
        for i, (until, max_new, options) in enumerate(settings):
            groups.setdefault((max_new, tuple(sorted(options.items()))), []).append(i)
        out: list[str] = [""] * len(requests)
        for (max_new, options), members in groups.items():
            limit = max(1, self.max_length - max_new)
            prompts = [self.tok_encode(requests[i].args[0])[-limit:] for i in members]
            t0 = time.perf_counter()
            new = self.session.call(("generate", prompts, max_new, dict(options)),
                                    Workload(max(map(len, prompts)), max_new), len(requests))
            summary("generated for", len(prompts), sum(map(len, new)), time.perf_counter() - t0)
            for i, tokens in zip(members, new):
                out[i] = cut_at(self.tokenizer.decode(tokens, skip_special_tokens=True), settings[i][0])
                self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
        return out

    def _generation(self, kwargs: dict) -> tuple[list[str], int, dict]:
        """(stop strings, new tokens, engine sampling options) of one request's `gen_kwargs`, read
        as the `hf` backend reads them (the EOS text always stops)."""
        kwargs = dict(kwargs or {})
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        until.append(self.tokenizer.decode(self.eot_token_id))
        max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
        temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
        sample = bool(kwargs.pop("do_sample", False)) or temperature > 0
        options = {"do_sample": sample}
        if sample:
            options.update(temperature=temperature or 1.0, top_p=float(kwargs.pop("top_p", 1.0) or 1.0))
        return until, max_new, options


def cut_at(text: str, until: list[str]) -> str:
    """The text before the first occurrence of each stop string (as lm-eval's `hf` cuts it)."""
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text


def summary(what: str, requests: int, tokens: int, seconds: float) -> None:
    print(f"flexgen: {what} {requests} requests, {tokens} tokens in {seconds:.2f} s "
          f"({requests / max(seconds, 1e-9):.2f} requests/s, {tokens / max(seconds, 1e-9):.1f} tokens/s)",
          file=sys.stderr)


def main(argv=None) -> int:
    """Rank 0: lm-eval's command line with the `flexgen` backend; other ranks: serve it."""
    global SESSION
    ctx = detect()
    SESSION = Session(ctx)
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--model" not in argv:
        argv += ["--model", "flexgen"]
    try:
        if ctx.first:
            from lm_eval.__main__ import cli_evaluate
            sys.argv = ["lm-eval", *argv]
            try:
                cli_evaluate()
            finally:
                SESSION.end()
        else:
            SESSION.serve()
            SESSION.end()
    except FlexGenError as e:
        if ctx.world_size > 1:
            fail(ctx, e)
        print(f"error: {e}", file=sys.stderr)
        return 2
    if SESSION.ctx.world_size > 1:
        stop_watching(SESSION.ctx)
        shutdown(SESSION.ctx)
    return 0
