"""Offload dirs shared by concurrent jobs and by other local users: a store rebuild never pulls files
from under a live reader, stale versions go once unused, and nothing another user planted is
followed, truncated or trusted."""
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import PROMPTS, make_checkpoint, reference_generate
from flexgen_dist import FlexGenError
from flexgen_dist.core.errors import StoreError
from flexgen_dist.models.base import WeightSpec
from flexgen_dist.models.checkpoint import resolve_model
from flexgen_dist.storage.store import TensorStore, store_versions
from flexgen_dist.system.workdir import open_lock, prepare_offload_dir

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="acting as another local user needs root")
NOBODY = 65534
SPECS = [WeightSpec("w", f"layer.{i}.w", (4, 8)) for i in range(3)]


class Source:
    """Tensors filled with one value per fingerprint, so a version's files say whose they are."""

    def __init__(self, value: float):
        self.value, self.fingerprint = value, f"test:{value}"

    def get(self, name, shape, dtype):
        return torch.full(shape, self.value, dtype=dtype)


def store(off: Path, value: float, specs=SPECS, rebuild=False) -> TensorStore:
    s = TensorStore(str(off / "weights" / "m-float32"), f"test:{value}", torch.float32, rebuild=rebuild)
    s.ensure(specs, Source(value), progress=False)
    return s


def test_a_changed_store_is_built_beside_the_one_in_use_and_the_old_one_goes_once_unused(tmp_path):
    reader = store(tmp_path, 1.0)
    writer = store(tmp_path, 2.0)  # the checkpoint changed while `reader`'s job runs
    assert writer.root != reader.root and os.path.isdir(reader.root)
    assert float(reader.read("layer.0.w")[0, 0]) == 1.0  # its files are all still there
    assert float(writer.read("layer.0.w")[0, 0]) == 2.0
    writer.close()
    reader.close()  # the reader's job ends
    later = store(tmp_path, 2.0)
    assert later.root == writer.root and not os.path.exists(reader.root)
    assert [p for _, _, p in store_versions(later.base)] == [later.root]
    later.close()


def test_pipeline_ranks_add_their_stages_to_one_version(tmp_path):
    first = store(tmp_path, 1.0, SPECS[:2])
    second = store(tmp_path, 1.0, SPECS[2:])
    assert first.root == second.root
    manifest = json.loads(Path(first.root, "manifest.json").read_text())
    assert sorted(manifest["tensors"]) == sorted(s.name for s in SPECS)
    first.close(), second.close()


def test_a_rebuild_or_a_damaged_manifest_never_rewrites_a_version_in_use(tmp_path):
    reader = store(tmp_path, 1.0)
    rebuilt = store(tmp_path, 1.0, rebuild=True)
    assert rebuilt.root != reader.root and os.path.isdir(reader.root)
    Path(rebuilt.root, "manifest.json").write_text("{not json")
    mended = store(tmp_path, 1.0)
    assert mended.root not in (reader.root, rebuilt.root)
    assert float(reader.read("layer.1.w")[0, 0]) == 1.0 and float(mended.read("layer.1.w")[0, 0]) == 1.0
    for s in (reader, rebuilt, mended):
        s.close()


def test_lock_files_are_never_truncated_and_private(tmp_path):
    lock = tmp_path / "m.lock"
    lock.write_text("kept")
    os.close(open_lock(str(lock)))
    assert lock.read_text() == "kept"
    fresh = tmp_path / "new.lock"
    os.close(open_lock(str(fresh)))
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o600


# ----- the CLI, as concurrent jobs ------------------------------------------------------------------
# job A's wrapper: the real CLI, paused in its third stage step until the test opens the gate, so
# job B provably runs (and rebuilds) while A is mid-generation, reading weights from disk
PAUSED_JOB = textwrap.dedent("""
    import os, sys, time
    from flexgen_dist.runtime.executor import LocalExecutor
    from flexgen_dist.run import main
    ready, gate = sys.argv[1], sys.argv[2]
    original, calls = LocalExecutor.forward_step, [0]
    def forward_step(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 3:
            open(ready, "w").close()
            deadline = time.monotonic() + 120
            while not os.path.exists(gate) and time.monotonic() < deadline:
                time.sleep(0.05)
        return original(self, *args, **kwargs)
    LocalExecutor.forward_step = forward_step
    sys.exit(main(sys.argv[3:]))
""")
NEW_TOKENS = 8


def job_args(ckpt, off, prompts, out):
    return ["--model", ckpt, "--prompts", prompts, "--output", out, "--gen-len", NEW_TOKENS, "--ignore-eos",
            "--dtype", "float32", "--offload-dir", off, "--percent", 0, 0, 100, 0, 100, 0, "--gpu-batch-size", len(PROMPTS)]


def outputs(path: Path) -> list[list[int]]:
    return [json.loads(line)["output_ids"] for line in path.read_text().splitlines()]


def expected(model) -> list[list[int]]:
    width = max(map(len, PROMPTS))
    return reference_generate(model, PROMPTS, NEW_TOKENS)[0][:, width:].tolist()


def wait_for(path: Path, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


@pytest.mark.timeout(300)
def test_a_job_finishes_while_another_rebuilds_its_store_and_a_later_one_cleans_up(tmp_path):
    from flexgen_dist.run import main
    ckpt, off = tmp_path / "ckpt", tmp_path / "off"
    old_model = make_checkpoint(ckpt, post_ln=False, seed=1, layers=2)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"input_ids": p}) + "\n" for p in PROMPTS))
    base = str(off / "weights" / f"{resolve_model(str(ckpt)).store_key}-float32")
    ready, gate = tmp_path / "ready", tmp_path / "gate"
    a = subprocess.Popen([sys.executable, "-c", PAUSED_JOB, ready, gate,
                          *map(str, job_args(ckpt, off, prompts, tmp_path / "a.jsonl"))],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    try:
        wait_for(ready, a, 120)  # A has converted its store and is generating from it
        (a_version,) = [p for _, _, p in store_versions(base)]
        for f in ckpt.glob("*.safetensors"):
            f.unlink()
        new_model = make_checkpoint(ckpt, post_ln=False, seed=2, layers=2)  # same path, new weights
        assert main(list(map(str, job_args(ckpt, off, prompts, tmp_path / "b.jsonl")))) == 0
        assert outputs(tmp_path / "b.jsonl") == expected(new_model)
        versions = [p for _, _, p in store_versions(base)]
        assert len(versions) == 2 and a_version in versions  # B's is new; A's stays: A reads it
        gate.touch()
        out, err = a.communicate(timeout=120)
    finally:
        a.kill()
    assert a.returncode == 0, out + err
    assert outputs(tmp_path / "a.jsonl") == expected(old_model)
    assert main(list(map(str, job_args(ckpt, off, prompts, tmp_path / "c.jsonl")))) == 0
    left = [p for _, _, p in store_versions(base)]
    assert left == [v for v in versions if v != a_version], left  # A's version is gone, B's is reused
    assert outputs(tmp_path / "c.jsonl") == expected(new_model)


# ----- another local user ---------------------------------------------------------------------------
def as_nobody(*command) -> None:
    subprocess.run(list(map(str, command)), user=NOBODY, group=NOBODY, check=True, timeout=60, cwd="/")


@pytest.fixture
def shared_offload():
    """An offload dir whose `weights` is world-writable with the sticky bit, like /tmp: what an
    offload dir shared on purpose (or left open) looks like to another local user."""
    # under /tmp itself: a private TMPDIR (mode 0700) would keep the other user out of the path
    root = Path(tempfile.mkdtemp(prefix="flexgen-shared-", dir="/tmp"))
    try:
        root.chmod(0o755)
        (root / "weights").mkdir(mode=0o777)
        (root / "weights").chmod(0o1777)
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    make_checkpoint(path, post_ln=False, layers=2)
    return str(path)


def bad(args, capsys) -> str:
    from flexgen_dist.run import main
    assert main([str(a) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def cli(tiny, off):
    return ["--model", tiny, "--prompt-len", 3, "--gen-len", 2, "--dtype", "float32", "--offload-dir", off]


@needs_root
def test_a_lock_symlink_planted_by_another_user_is_refused_and_its_target_untouched(tiny, shared_offload, capsys):
    victim = Path(tempfile.mkdtemp(prefix="flexgen-victim-")) / "precious.txt"
    try:
        victim.write_text("precious")
        lock = shared_offload / "weights" / f"{resolve_model(tiny).store_key}-float32.lock"
        as_nobody("ln", "-s", victim, lock)
        assert lock.is_symlink() and lock.lstat().st_uid == NOBODY
        err = bad(cli(tiny, shared_offload), capsys)
        assert f"lock file {lock} is a symbolic link" in err
        assert victim.read_text() == "precious"
    finally:
        shutil.rmtree(victim.parent)


@needs_root
def test_a_store_or_offload_dir_of_another_user_is_refused_naming_it(tiny, tmp_path, capsys):
    from flexgen_dist.run import main
    off = tmp_path / "off"
    assert main([str(a) for a in cli(tiny, off)]) == 0
    version = next(p for p in (off / "weights").iterdir() if p.is_dir())
    os.chown(version, NOBODY, NOBODY)  # as if another user had made it first
    capsys.readouterr()
    err = bad(cli(tiny, off), capsys)
    assert f"weight store {version} belongs to user nobody" in err
    os.chown(off, NOBODY, NOBODY)
    with pytest.raises(StoreError, match=f"offload dir {off} belongs to user nobody"):
        prepare_offload_dir(str(off))


def test_directories_the_engine_creates_are_private(tiny, tmp_path):
    from flexgen_dist.run import main
    top = tmp_path / "new"
    off = top / "deeper" / "off"
    assert main([str(a) for a in cli(tiny, off)]) == 0
    made = [top, *(p for p in top.rglob("*") if p.is_dir())]
    assert len(made) >= 5  # new, deeper, off, weights, work, the store version
    for d in made:
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
    for f in (off / "weights").glob("*.lock"):
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f


def test_an_offload_path_through_a_file_is_still_reported_as_not_writable(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(FlexGenError, match="is not writable"):
        prepare_offload_dir(str(tmp_path / "file" / "off"))
