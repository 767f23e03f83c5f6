"""Print the plan for a job without running it:

    python -m flexgen_dist.plan --model opt-1.3b --prompt-len 512 --gen-len 32 --num-prompts 64 --cpu-mem 4

It takes `run`'s model and workload flags (`--prompts FILE` plans for that file's requests).

where each tensor class lives, batches, stages, predicted memory per tier per rank, predicted
prefill and decode time and throughput, and the bottleneck. `--ranks N` plans an N-rank pipeline
on this machine (its cores shared by the ranks, as `launch/run_local.sh` does); `--rank-mem`
gives the ranks unequal memory. The first run on a machine measures it (see hardware.py).

The functions here are also what `flexgen_dist.run` uses to plan on every rank of a job.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace

import torch

from ..core.config import JobConfig, PlannerConfig, pick
from ..core.errors import FlexGenError
from ..core.policy import Policy
from ..formats.requests import read_requests
from ..kernels.probe import dtype_candidates
from ..models import family_of
from ..planning.costmodel import Workload
from ..planning.optimizer import Model, plan
from ..planning.plan import (
    check_workload,
    job_workload,
    model_spec,
    options_for,
    this_rank,
)
from ..planning.report import describe
from ..storage.devices import Devices
from ..system.workdir import prepare_offload_dir
from .flags import (
    DefaultsHelpFormatter,
    OneLineErrorParser,
    add_fields,
    add_shared_fields,
)


# ----- the command line ------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """`run`'s model and workload flags (one definition, `add_shared_fields`), the planner's own,
    and the pipeline's rank count."""
    p = OneLineErrorParser(prog="python -m flexgen_dist.plan", description=__doc__,
                           formatter_class=DefaultsHelpFormatter)
    add_shared_fields(p)
    p.add_argument("--ranks", type=int, default=1, help="pipeline ranks on this machine")
    add_fields(p, PlannerConfig, skip=("policy",), title="planner")
    return p


def workload_of(args, spec) -> tuple[Workload, int | None]:
    """The lengths to plan for and the prompt count (None: as many as the best block holds): from
    the prompts file's requests that will run, as `run` plans them, else the synthetic ones'."""
    if not args.prompts:
        return Workload(args.prompt_len, args.max_new_tokens), args.num_prompts
    path = os.path.expanduser(args.model)
    tokenizer = args.tokenizer or (path if os.path.isdir(path) else None)
    job = JobConfig(**pick(JobConfig, args))
    return job_workload(job, args.max_new_tokens, read_requests(args.prompts), tokenizer, spec.max_positions)


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
        config = PlannerConfig(**pick(PlannerConfig, args))
        check_workload(args.prompt_len, args.max_new_tokens, args.num_prompts)
        if args.ranks < 1:
            raise FlexGenError(f"--ranks must be at least 1, got {args.ranks}")
        spec = model_spec(args.model)  # the plan needs the shape only: any weights (--dummy-weights) plan alike
        if config.rank_mem and len(config.rank_mem) != args.ranks:
            raise FlexGenError(f"--rank-mem needs one value per rank ({args.ranks})")
        workload, num_prompts = workload_of(args, spec)
        # a first run's default dir does not exist yet; the plan is rank 0's view of {rank}
        offload_dir = prepare_offload_dir(args.offload_dir.format(rank=0, local_rank=0))
        device = Devices.detect().compute
        dtypes = dtype_candidates(args.dtype, device, spec.hidden_size)
        threads = torch.get_num_threads()
        torch.set_num_threads(max(threads // args.ranks, 1))  # each rank's share of the cores
        options = options_for(config, Policy(), dtypes)
        ranks = [this_rank(spec, config, offload_dir, dtypes, r, announce=r == 0, options=options)
                 for r in range(args.ranks)]
        model = Model(spec, family_of(spec))
        best = plan(model, ranks, workload, num_prompts or 4096, options)
        if num_prompts is None:
            best = replace(best, num_prompts=best.block_rows)
        print(describe(best, ranks, model))
    except FlexGenError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
