"""Print the plan for a job without running it: `python -m flexgen_dist.plan --help` (see `cli/plan.py`)."""
import sys

from .cli.plan import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
