"""Faults injected for real: damaged store files, bad outputs, signals, a full disk, a memory limit,
bad prompt files. Each ends in one line `error: ...` (or a clean stop) with nothing left behind."""
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import PROMPTS, make_checkpoint, run_cli
from flexgen_dist import Engine, FlexGenError
from flexgen_dist.storage.store import TensorStore
from flexgen_dist.system.workdir import sweep

ROOT = Path(__file__).resolve().parent.parent
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("faults-ckpt")
    make_checkpoint(path, post_ln=False)
    return str(path)


def store_files(offload: Path) -> list[Path]:
    return sorted(p for p in (offload / "weights").rglob("*.bin"))


def test_a_damaged_store_file_is_named_and_rebuild_store_mends_it(ckpt, tmp_path, capsys):
    from flexgen_dist.run import main
    off = tmp_path / "off"
    args = ["--model", ckpt, "--prompt-len", "5", "--gen-len", "4", "--dtype", "float32", "--offload-dir", str(off),
            "--percent", "0", "0", "100", "0", "100", "0", "--output", str(tmp_path / "a.jsonl")]
    assert main(args) == 0
    good = (tmp_path / "a.jsonl").read_text()
    victim = max(store_files(off), key=lambda p: p.stat().st_size)
    with open(victim, "r+b") as f:  # flip every bit of 4 KiB in the middle of the file
        f.seek(victim.stat().st_size // 2 // 4096 * 4096)
        block = bytearray(f.read(4096))
        f.seek(-len(block), os.SEEK_CUR)
        f.write(bytes(b ^ 0xFF for b in block))
    capsys.readouterr()
    assert main(args[:-1] + [str(tmp_path / "b.jsonl")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert str(victim) in err and "damaged" in err and "--rebuild-store" in err
    assert not (tmp_path / "b.jsonl").exists()
    assert main(args[:-1] + [str(tmp_path / "c.jsonl"), "--rebuild-store"]) == 0
    assert (tmp_path / "c.jsonl").read_text() == good


def test_non_finite_logits_end_the_run_naming_the_step(tmp_path):
    path = tmp_path / "nan"
    model = make_checkpoint(path, post_ln=False)
    with torch.no_grad():
        model.model.decoder.layers[1].fc2.weight[0, 0] = float("inf")
    model.save_pretrained(path, max_shard_size="200KB")
    with Engine.from_pretrained(str(path), offload_dir=tmp_path / "off", dtype="float32") as engine:
        with pytest.raises(FlexGenError, match=r"non-finite logits \(NaN or inf\) at token step 0 on rank 0"):
            engine.generate(PROMPTS, max_new_tokens=3)


@pytest.mark.parametrize("target", ["missing-dir", "a-directory", "read-only"])
@pytest.mark.parametrize("flag", ["--output", "--log-file"])
def test_unwritable_outputs_are_refused_before_any_work(ckpt, tmp_path, capsys, flag, target, request):
    from flexgen_dist.run import main
    if target == "missing-dir":
        path = tmp_path / "nowhere" / "out.jsonl"
    elif target == "a-directory":
        path = tmp_path
    else:
        path = request.getfixturevalue("read_only_dir") / "out.jsonl"
    off = tmp_path / "off"
    assert main(["--model", ckpt, "--offload-dir", str(off), "--gen-len", "2", flag, str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {flag} ") and "\n" not in err
    assert not off.exists()  # refused before anything was loaded or converted


def tmpfs(path: Path, options: str, why: str):
    """`path` as a fresh tmpfs mount with `options` for the test, unmounted after (root only)."""
    path.mkdir()
    if not IS_ROOT or subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)]).returncode:
        pytest.skip(f"needs root to mount {why}")
    yield path
    subprocess.run(["umount", "-l", str(path)])


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Path:
    """A directory nobody may write to, root included (root ignores a mode-0555 directory)."""
    yield from tmpfs(tmp_path / "ro", "ro,size=1m", "a read-only filesystem")


def test_a_failed_run_keeps_the_old_output_whole(tmp_path, capsys):
    from flexgen_dist.run import main
    path = tmp_path / "nan"
    model = make_checkpoint(path, post_ln=False)
    with torch.no_grad():
        model.model.decoder.final_layer_norm.weight[0] = float("nan")
    model.save_pretrained(path, max_shard_size="200KB")
    out = tmp_path / "out.jsonl"
    out.write_text('{"index": 0, "output_ids": [1, 2, 3]}\n')
    assert main(["--model", str(path), "--offload-dir", str(tmp_path / "off"), "--gen-len", "3",
                 "--dtype", "float32", "--output", str(out)]) == 2
    assert "non-finite logits" in capsys.readouterr().err
    assert out.read_text() == '{"index": 0, "output_ids": [1, 2, 3]}\n'
    # no temporary file left; the job's manifest and (empty) journal stay, so a rerun resumes it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan", "off", "out.jsonl", "out.jsonl.manifest.json",
                                                          "out.jsonl.partial"]
    assert (tmp_path / "out.jsonl.partial").read_text() == ""


def long_job(ckpt: str, offload: Path, gen_len: int = 60, extra=()) -> subprocess.Popen:
    """A CLI run that keeps KV cache and activations on disk for a while."""
    cmd = [sys.executable, "-m", "flexgen_dist.run", "--model", ckpt, "--prompt-len", "4", "--gen-len", str(gen_len),
           "--num-prompts", "2", "--gpu-batch-size", "1", "--num-gpu-batches", "2", "--dtype", "float32",
           "--percent", "100", "0", "0", "0", "0", "0", "--overlap", "0", "--offload-dir", str(offload), *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def work_files(offload: Path) -> list[Path]:
    return [p for p in (offload / "work").rglob("*") if p.is_file() and p.name != "owner"]


def wait_for_work_files(offload: Path, proc: subprocess.Popen, timeout: float = 60, besides=()) -> set[Path]:
    """The work dirs holding KV files once `proc` has written some (dirs in `besides` not counted)."""
    deadline = time.monotonic() + timeout
    while True:
        dirs = {p.parent for p in work_files(offload) if p.name.startswith("kv.")} - set(besides)
        if dirs:
            return dirs
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the job never wrote its KV cache to disk"
        time.sleep(0.1)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_decode_removes_every_temporary_file(ckpt, tmp_path, sig):
    proc = long_job(ckpt, tmp_path, gen_len=50)
    wait_for_work_files(tmp_path, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + sig, err
    assert f"{signal.Signals(sig).name}: stopped; temporary files removed" in err
    assert list((tmp_path / "work").iterdir()) == []


CHILD_WITH_A_WORK_DIR = """
import sys, time
from flexgen_dist.system.workdir import exit_cleanly_on_signals, open_work_dir
exit_cleanly_on_signals()
print(open_work_dir(sys.argv[1]), flush=True)
time.sleep(60)
"""


@contextlib.contextmanager
def child_with_a_work_dir(script: str, root: Path):
    """`script` run in a child that prints the work dir it opened under `root` first: (process,
    work dir). A child still running at the end (hung) is killed, so it cannot outlive the test."""
    proc = subprocess.Popen([sys.executable, "-c", script, str(root)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        yield proc, Path(proc.stdout.readline().strip())
    finally:
        proc.kill()


@pytest.mark.timeout(60)
def test_a_signal_after_the_launcher_died_still_ends_the_process(tmp_path):
    """With the launcher gone its stderr pipe is broken: the stop message cannot be written, and
    the process must still remove its files and exit (before, it kept the stop lock and hung)."""
    with child_with_a_work_dir(CHILD_WITH_A_WORK_DIR, tmp_path) as (proc, work_dir):
        assert work_dir.is_dir()
        proc.stderr.close()  # the launcher's end of the pipe, gone with it
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 128 + signal.SIGTERM
        assert not work_dir.exists()


SIGNAL_DURING_CLEANUP = """
import os, signal, sys, time
from flexgen_dist.system import workdir
workdir.exit_cleanly_on_signals()
work_dir = workdir.open_work_dir(sys.argv[1])
remove_all, calls = workdir.remove_all, []

def slow_remove_all():  # a second Ctrl-C arrives while the first one's cleanup runs
    calls.append(1)
    if len(calls) == 1:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.5)  # the main thread's handler runs here
    remove_all()

workdir.remove_all = slow_remove_all
print(work_dir, flush=True)
workdir._stop(signal.SIGINT)  # as the main thread's handler does when it wins the race to the first signal
"""


NOTHING_AFTER_THE_FINAL_CLEANUP = """
import os, sys, threading
from flexgen_dist.system import workdir
root, partial = sys.argv[1], os.path.join(sys.argv[1], "out.tmp")
workdir.remove_all_before_exit()  # what a rank's exit (a failure report, a signal) runs before os._exit
made = []

def open_files():  # the main thread, still starting its stage meanwhile
    made.append(workdir.open_work_dir(root))
    with workdir.partial_file(partial), open(partial, "w"):
        made.append(partial)
thread = threading.Thread(target=open_files, daemon=True)
thread.start()
thread.join(1.0)
print("waits" if thread.is_alive() else f"made {made}", sorted(os.listdir(root)), flush=True)
os._exit(2)
"""


@pytest.mark.timeout(60)
def test_no_work_dir_appears_once_the_final_cleanup_has_run(tmp_path):
    """A rank ending on a peer's failure report or a signal runs its cleanup on another thread while
    its main thread may be opening its work dir: the dir must be removed by that cleanup or never
    made, not left behind by the os._exit that follows."""
    root = tmp_path / "work"
    root.mkdir()
    done = subprocess.run([sys.executable, "-c", NOTHING_AFTER_THE_FINAL_CLEANUP, str(root)], capture_output=True,
                          text=True, timeout=30)
    assert done.stdout.strip() == "waits []", done.stdout + done.stderr
    assert list(root.iterdir()) == []


@pytest.mark.timeout(60)
def test_a_second_signal_during_the_cleanup_still_ends_the_process(tmp_path):
    with child_with_a_work_dir(SIGNAL_DURING_CLEANUP, tmp_path) as (proc, work_dir):
        assert proc.wait(timeout=20) == 128 + signal.SIGINT
        assert not work_dir.exists()


@pytest.mark.timeout(240)
def test_files_of_killed_processes_are_removed_by_the_next_run_never_a_live_ones(ckpt, tmp_path):
    dead = long_job(ckpt, tmp_path)
    left = wait_for_work_files(tmp_path, dead)
    dead.kill()
    dead.wait()
    assert all(d.exists() for d in left), "SIGKILL leaves its files (nothing could remove them)"
    # eight blocks: still generating when the other run ends, even where a block takes 3 s
    live = long_job(ckpt, tmp_path, gen_len=59, extra=("--num-prompts", "16"))
    try:
        mine = wait_for_work_files(tmp_path, live, besides=left)
        assert not any(d.exists() for d in left), "the next run did not remove the dead process's files"
        code, _, err = run_cli("--model", ckpt, "--prompt-len", 4, "--gen-len", 2, "--dtype", "float32",
                               "--offload-dir", tmp_path)
        assert code == 0, err
        assert all(d.exists() for d in mine) and live.poll() is None, "a live process's files were removed"
    finally:
        live.kill()
        live.wait()
        sweep(str(tmp_path / "work"))  # what this test's own SIGKILL left


@pytest.fixture
def small_disk(tmp_path):
    """A 30 MB filesystem, as a full disk would be."""
    yield from tmpfs(tmp_path / "small", "size=30m", "a size-limited filesystem")


def test_a_store_that_does_not_fit_is_refused_before_writing(small_disk, capsys):
    from flexgen_dist.run import main
    assert main(["--model", "opt-125m", "--dummy-weights", "--dtype", "float32", "--offload-dir", str(small_disk),
                 "--percent", "0", "0", "100", "0", "100", "0", "--gen-len", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: not enough disk space in ") and "\n" not in err
    assert "GB free" in err and str(small_disk) in err
    assert store_files(small_disk) == []


def test_a_disk_that_fills_up_mid_conversion_leaves_no_partial_file(small_disk, monkeypatch, capsys):
    from flexgen_dist.run import main
    monkeypatch.setattr(TensorStore, "_check_free_space", lambda self, missing: None)  # as if another job filled it
    assert main(["--model", "opt-125m", "--dummy-weights", "--dtype", "float32", "--offload-dir", str(small_disk),
                 "--gen-len", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: disk full in ") and "\n" not in err
    manifest = next((small_disk / "weights").rglob("manifest.json"))
    listed = set(json.loads(manifest.read_text())["tensors"])
    names = {str(p.relative_to(manifest.parent)).removesuffix(".bin").removesuffix(".q").removesuffix(".s")
             for p in store_files(small_disk)}
    assert names <= listed, "a tensor file the manifest does not list was left behind"


def test_kv_cache_on_a_disk_too_small_is_refused(ckpt, small_disk, capsys):
    from flexgen_dist.run import main
    (small_disk / "filler").write_bytes(b"\0" * (28 << 20))
    assert main(["--model", ckpt, "--dtype", "float32", "--offload-dir", str(small_disk), "--gen-len", "40",
                 "--prompt-len", "20", "--gpu-batch-size", "64", "--percent", "100", "0", "0", "0", "100", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: not enough disk space in ") and "KV cache" in err and "\n" not in err
    assert list((small_disk / "work").rglob("kv.*")) == []


@pytest.mark.timeout(120)
def test_weights_that_exceed_a_memory_limit_are_refused_not_oom_killed(tmp_path):
    if not IS_ROOT:
        pytest.skip("memory cgroups need root")
    report = tmp_path / "limit.json"
    env = {**os.environ, "MEMLIMIT_REPORT": str(report), "FLEXGEN_CPU_BF16": "0"}
    p = subprocess.run(["bash", str(ROOT / "benchmark" / "with_memory_limit.sh"), "2G", "--", sys.executable, "-m",
                        "flexgen_dist.run", "--model", "opt-1.3b", "--dummy-weights", "--offload-dir", str(tmp_path),
                        "--percent", "100", "0", "100", "0", "100", "0", "--gen-len", "2"],
                       capture_output=True, text=True, env=env, timeout=110)
    if "WITHOUT a memory limit" in p.stderr:
        pytest.skip("no writable memory cgroup on this machine")
    assert p.returncode == 2, p.stderr
    line = next(x for x in p.stderr.splitlines() if x.startswith("error:"))
    assert "not enough host memory for the weights" in line and "memory cgroup limit" in line and "--percent" in line
    assert json.loads(report.read_text())["oom_kills"] == 0
    assert store_files(tmp_path) == []  # refused before converting anything


@pytest.mark.parametrize("content,message", [
    (b"caf\xe9 au lait\n", "line 1 is not UTF-8"),
    ('{"prompt": "a\u2028b"}\n'.encode() + json.dumps({"prompt": "c\x0cd\x1ee"}).encode() + b"\r\n", None),
])
def test_prompt_files_split_on_newlines_only(tmp_path, content, message, capsys):
    from flexgen_dist.formats.prompts import read_prompts
    path = tmp_path / "p.jsonl"
    path.write_bytes(content)
    if message:
        with pytest.raises(FlexGenError, match=message):
            read_prompts(str(path))
    else:
        assert [p.text for p in read_prompts(str(path))] == ["a\u2028b", "c\x0cd\x1ee"]


def test_text_prompts_keep_form_feeds_and_separators(tmp_path):
    from flexgen_dist.formats.prompts import read_prompts
    path = tmp_path / "p.txt"
    path.write_text("one\x0cstill one\u2028still one\nTwo\n", encoding="utf-8")
    assert [p.text for p in read_prompts(str(path))] == ["one\x0cstill one\u2028still one", "Two"]


@pytest.mark.parametrize("count", ["0", "-1"])
def test_num_prompts_must_be_positive(count, tmp_path, capsys):
    from flexgen_dist.run import main
    assert main(["--dummy-weights", "--num-prompts", count, "--offload-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: --num-prompts must be at least 1, got {count}"
