"""Local lm-eval tasks for the evaluation tests (no hub): a multiple-choice task, a rolling
perplexity task over documents longer than the tiny models' 64 positions, and a generation task
with stop strings; plus lm-eval runs of any backend that return the per-sample responses."""
from __future__ import annotations

import json
import os

from conftest import CORPUS

MC = [{"question": "the quick brown", "choices": [" fox", " dog", " time"], "label": 0},
      {"question": "a stitch in time saves", "choices": [" nine", " weights", " the lazy dog"], "label": 0},
      {"question": "offloading moves weights between the compute device,", "choices": [" host memory", " disk"],
       "label": 0}]
ROLLING = [{"text": CORPUS[:900]}, {"text": "Offloading: " + CORPUS[200:700].upper()}, {"text": "the lazy dog."}]
GEN = [{"prompt": "the quick brown", "answer": " fox"}, {"prompt": "a stitch in time", "answer": " saves"},
       {"prompt": "offloading moves", "answer": " weights"}]
TASKS = ["fg_mc", "fg_rolling", "fg_gen"]

YAML = {
    "fg_mc": """task: fg_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
""",
    "fg_rolling": """task: fg_rolling
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
""",
    "fg_gen": """task: fg_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: [" the", "."]
  max_gen_toks: 10
  do_sample: false
metric_list:
  - metric: exact_match
""",
}


def write_tasks(directory) -> str:
    """The three tasks' data and YAML files under `directory` (lm-eval's --include_path)."""
    for name, docs in (("fg_mc", MC), ("fg_rolling", ROLLING), ("fg_gen", GEN)):
        data = os.path.join(directory, f"{name}.jsonl")
        with open(data, "w") as f:
            f.writelines(json.dumps(d) + "\n" for d in docs)
        with open(os.path.join(directory, f"{name}.yaml"), "w") as f:
            f.write(YAML[name].format(data=data))
    return str(directory)


def responses(samples: dict) -> dict:
    """{task: [per-doc responses, by doc id]} from lm-eval's logged samples."""
    return {task: [s["resps"] for s in sorted(docs, key=lambda s: s["doc_id"])] for task, docs in samples.items()}


def evaluate(model: str, model_args: dict, task_dir: str, tasks=TASKS) -> dict:
    """lm-eval's own evaluation (in this process) of `tasks`; the per-sample responses."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    import flexgen_dist.cli.eval  # noqa: F401  registers the flexgen backend
    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=list(tasks), batch_size=4,
                                  task_manager=TaskManager(include_path=task_dir), log_samples=True)
    return responses(out["samples"])
