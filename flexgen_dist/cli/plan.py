"""Print the plan for a job without running it:

    python -m flexgen_dist.plan --model opt-1.3b --prompt-len 512 --gen-len 32 --num-prompts 64 --cpu-mem 4

where each tensor class lives, batches, stages, predicted memory per tier per rank, predicted
prefill and decode time and throughput, and the bottleneck. `--ranks N` plans an N-rank pipeline
on this machine (its cores shared by the ranks, as `launch/run_local.sh` does); `--rank-mem`
gives the ranks unequal memory. The first run on a machine measures it (see hardware.py).

The functions here are also what `flexgen_dist.run` uses to plan on every rank of a job.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace

import torch

from ..core.config import DEFAULT_OFFLOAD_DIR, PlannerConfig, pick
from ..core.errors import FlexGenError
from ..core.policy import Policy
from ..core.types import DTYPES
from ..kernels.probe import dtype_candidates
from ..models import family_of
from ..planning.costmodel import Workload
from ..planning.optimizer import Model, plan
from ..planning.plan import check_workload, model_spec, options_for, this_rank
from ..planning.report import describe
from ..storage.devices import Devices
from ..system.workdir import prepare_offload_dir
from .flags import DefaultsHelpFormatter, OneLineErrorParser, add_fields


# ----- the command line ------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(prog="python -m flexgen_dist.plan", description=__doc__,
                           formatter_class=DefaultsHelpFormatter)
    p.add_argument("--model", default="opt-125m", help="built-in name or local Hugging Face directory")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--gen-len", type=int, default=32)
    p.add_argument("--num-prompts", type=int, default=None, help="prompts in the job (default: as many as the best block holds, up to 4096)")
    p.add_argument("--ranks", type=int, default=1, help="pipeline ranks on this machine")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES])
    p.add_argument("--offload-dir", default=DEFAULT_OFFLOAD_DIR)
    add_fields(p, PlannerConfig, skip=("policy",), title="planner")
    return p


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
        config = PlannerConfig(**pick(PlannerConfig, args))
        check_workload(args.prompt_len, args.gen_len, args.num_prompts)
        if args.ranks < 1:
            raise FlexGenError(f"--ranks must be at least 1, got {args.ranks}")
        spec = model_spec(args.model)
        if config.rank_mem and len(config.rank_mem) != args.ranks:
            raise FlexGenError(f"--rank-mem needs one value per rank ({args.ranks})")
        offload_dir = prepare_offload_dir(args.offload_dir)  # a first run's default dir does not exist yet
        device = Devices.detect().compute
        dtypes = dtype_candidates(args.dtype, device, spec.hidden_size)
        threads = torch.get_num_threads()
        torch.set_num_threads(max(threads // args.ranks, 1))  # each rank's share of the cores
        ranks = [this_rank(spec, config, offload_dir, dtypes, r, announce=r == 0) for r in range(args.ranks)]
        num_prompts = args.num_prompts or 4096
        options = options_for(config, Policy(), dtypes)
        model = Model(spec, family_of(spec))
        best = plan(model, ranks, Workload(args.prompt_len, args.gen_len), num_prompts, options)
        if args.num_prompts is None:
            best = replace(best, num_prompts=best.block_rows)
        print(describe(best, ranks, model))
    except FlexGenError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
