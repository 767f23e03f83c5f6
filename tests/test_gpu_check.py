"""benchmark/gpu_check.sh's argument handling, and that it fails loudly (never skips) without CUDA."""
import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmark" / "gpu_check.sh"


def run(*args, env=None):
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": "", **(env or {})}
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], capture_output=True, text=True, env=env, timeout=120)


def test_help_and_bad_arguments():
    shown = run("--help")
    assert shown.returncode == 0 and shown.stdout.startswith("usage: benchmark/gpu_check.sh")
    for args, message in ((["--bogus"], "unknown argument '--bogus'"), (["--out"], "--out needs a file"),
                          (["--models"], "--models needs a list")):
        p = run(*args)
        assert p.returncode == 2, args
        assert p.stderr.strip().startswith("error: ") and message in p.stderr and "\n" not in p.stderr.strip()


def test_without_cuda_it_fails_and_says_so(tmp_path):
    out = tmp_path / "gpu.json"
    p = run("--out", out, "--skip-throughput")
    assert p.returncode == 3
    assert p.stderr.strip().startswith("error: CUDA is not available") and "\n" not in p.stderr.strip()
    record = json.loads(out.read_text())
    assert record["ok"] is False and "CUDA is not available" in record["error"] and record["steps"] == {}
