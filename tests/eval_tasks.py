"""Local lm-eval tasks for the evaluation tests (no hub): a multiple-choice task, a rolling
perplexity task over documents longer than the tiny models' 64 positions, and a generation task
with stop strings; plus lm-eval runs of any backend that return the per-sample responses."""
from __future__ import annotations

import ast
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
REAL_MC = [  # for a real model: answers it may get right or wrong, but the same ones as `hf`
    {"question": "The capital of France is", "choices": [" Paris", " London", " Berlin", " Madrid"], "label": 0},
    {"question": "Water freezes at a temperature of", "choices": [" zero degrees Celsius", " one hundred degrees Celsius",
                                                                  " fifty degrees Celsius"], "label": 0},
    {"question": "The largest planet in the solar system is", "choices": [" Mars", " Jupiter", " Venus"], "label": 1},
    {"question": "def add(a, b):\n    return", "choices": [" a + b", " a * b", " None"], "label": 0},
    {"question": "Cats are animals that like to", "choices": [" sleep", " fly", " photosynthesize"], "label": 0},
]

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
    for name, docs in (("fg_mc", MC), ("fg_rolling", ROLLING), ("fg_gen", GEN), ("fg_real_mc", REAL_MC)):
        data = os.path.join(directory, f"{name}.jsonl")
        with open(data, "w") as f:
            f.writelines(json.dumps(d) + "\n" for d in docs)
        with open(os.path.join(directory, f"{name}.yaml"), "w") as f:
            f.write(YAML[name.replace("real_", "")].format(data=data).replace("task: fg_mc", f"task: {name}"))
    return str(directory)


def responses(samples: dict) -> dict:
    """{task: [per-doc responses, by doc id]} from lm-eval's logged samples (a samples file writes
    each number and flag of a log-likelihood response as text)."""
    def value(task, r):
        if task == "fg_gen" or not isinstance(r, (str, list)):
            return r
        return [value(task, x) for x in r] if isinstance(r, list) else ast.literal_eval(r)
    return {task: [[value(task, resp) for resp in s["resps"]]
                   for s in sorted(docs, key=lambda s: s["doc_id"])] for task, docs in samples.items()}


def evaluate(model: str, model_args: dict, task_dir: str, tasks=TASKS) -> dict:
    """lm-eval's own evaluation (in this process) of `tasks`; the per-sample responses."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    import flexgen_dist.cli.eval  # noqa: F401  registers the flexgen backend
    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=list(tasks), batch_size=4,
                                  task_manager=TaskManager(include_path=task_dir), log_samples=True)
    return responses(out["samples"])
