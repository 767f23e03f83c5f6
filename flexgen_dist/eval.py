"""Evaluation with lm-evaluation-harness: `python -m flexgen_dist.eval run --model flexgen
--model_args pretrained=DIR --tasks TASKS` (see `cli/eval.py`; needs `pip install -e '.[eval]'`)."""
import sys

from .cli.eval import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
