"""Launched under mpirun by the pipeline tests: every run of a job file, in one launch, on every rank.

    mpirun -n N python tests/pipeline_job.py job.json

Rank 0 writes the token ids of each run (or, for a job with `score` pairs, their log-likelihoods and
greedy flags) to the job's `output` file."""
import json
import sys

from flexgen_dist import Engine, Policy
from flexgen_dist.dist.context import detect
from flexgen_dist.dist.group import init, shutdown


def main(path: str) -> None:
    with open(path) as f:
        job = json.load(f)
    ctx = init(detect(), "cpu", 60)
    results = []
    for i, run in enumerate(job["runs"]):
        policy = Policy.from_percent(run["percent"], **run.get("policy", {}))
        engine = Engine.from_pretrained(job["model"], policy=policy, offload_dir=f"{job['offload']}/{i}",
                                        dtype="float32", dist=ctx, stage_layers=run.get("stage_layers"),
                                        micro_batches=run.get("micro_batches"),
                                        prefill_chunks=run.get("prefill_chunks", 1), comm_timeout=60)
        if "score" in job:  # (context, continuation) pairs: (log-likelihood, greedy) per pair
            out = engine.score(job["score"])
        else:
            out = engine.generate(job["prompts"], max_new_tokens=job["new_tokens"], **run.get("generate", {}))
        engine.close()
        if ctx.first:
            results.append(out if "score" in job else out.tolist())
    if ctx.first:
        with open(job["output"], "w") as f:
            json.dump(results, f)
    shutdown(ctx)


if __name__ == "__main__":
    main(sys.argv[1])
