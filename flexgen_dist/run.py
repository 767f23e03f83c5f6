"""Batch generation with offloading: `python -m flexgen_dist.run --help` (see `cli/run.py`)."""
import sys

from .cli.run import cli, main

__all__ = ["cli", "main"]

if __name__ == "__main__":
    sys.exit(cli())
