"""How ranks meet: a one-node job opens no port reachable from another host, the announced address
never needs the host name to resolve, and no rank outlives its launcher."""
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
from conftest import make_checkpoint
from flexgen_dist import FlexGenError
from flexgen_dist.dist import group
from flexgen_dist.dist.context import DistContext

ROOT = Path(__file__).resolve().parent.parent
MPIRUN = os.path.join(os.path.dirname(sys.executable), "mpirun")
needs_mpi = pytest.mark.skipif(not os.path.exists(MPIRUN), reason="mpirun not installed next to python")
needs_proc = pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="needs Linux /proc/net/tcp")
LOOPBACK = {"127.0.0.1", "::1"}


# ----- listeners, from /proc ------------------------------------------------------------------------
def _ip(hex_address: str) -> str:
    raw = bytes.fromhex(hex_address)
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw[::-1])
    ip = socket.inet_ntop(socket.AF_INET6, b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))
    return ip[7:] if ip.startswith("::ffff:") else ip  # an IPv4-mapped address


def tcp_listeners() -> dict[str, tuple[str, int]]:
    """Socket inode -> (address, port) of every listening TCP socket (IPv4 and IPv6)."""
    found = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A":  # TCP_LISTEN
                    address, port = fields[1].split(":")
                    found[fields[9]] = (_ip(address), int(port, 16))
    return found


def socket_inodes(pid: int) -> set[str]:
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    except OSError:
        pass
    return inodes


def listeners_of(pids) -> set[tuple[str, int]]:
    table = tcp_listeners()
    return {table[i] for pid in pids for i in socket_inodes(pid) if i in table}


def descendants(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = [int(p) for p in f.read().split()]
    except OSError:
        return []
    return kids + [d for k in kids for d in descendants(k)]


def command_line(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except OSError:
        return False


# ----- the announced address ------------------------------------------------------------------------
def unresolvable(monkeypatch):
    def fail(*args):
        raise socket.gaierror(-2, "Name or service not known")
    monkeypatch.setattr(socket, "gethostbyname", fail)
    monkeypatch.setattr(socket, "gethostname", lambda: "no-such-host.invalid")


def test_master_addr_is_honoured_without_resolving_the_host_name(monkeypatch):
    unresolvable(monkeypatch)
    two_nodes = DistContext(rank=0, world_size=4, local_size=2)
    monkeypatch.setenv("FLEXGEN_MASTER_ADDR", "10.1.2.3")
    monkeypatch.setenv("IFACE", "no-such-interface")
    assert group.master_address(two_nodes) == "10.1.2.3"
    monkeypatch.delenv("FLEXGEN_MASTER_ADDR")
    monkeypatch.setenv("IFACE", "lo")
    assert group.master_address(two_nodes) == "127.0.0.1"  # the interface's own address
    monkeypatch.delenv("IFACE")
    with pytest.raises(FlexGenError, match="cannot resolve this host's name .*set FLEXGEN_MASTER_ADDR or IFACE"):
        group.master_address(two_nodes)
    assert group.master_address(DistContext(rank=0, world_size=2, local_size=2)) == "127.0.0.1"


def test_an_address_that_is_not_this_hosts_is_refused_in_one_line():
    with pytest.raises(FlexGenError, match="cannot listen on 192.0.2.123 .*FLEXGEN_MASTER_ADDR"):
        group.listen_on("192.0.2.123")  # TEST-NET-1: never a local address


class FakeMPI:
    """bcast between two threads standing in for two ranks."""

    def __init__(self):
        self.value, self.ready = None, threading.Event()

    def bcast(self, obj, root=0):
        if obj is not None:
            self.value = obj
            self.ready.set()
        self.ready.wait(30)
        return self.value


@needs_proc
@pytest.mark.parametrize("nodes", [1, 2])
def test_the_rendezvous_store_listens_on_one_address_only(nodes, monkeypatch):
    """One node: loopback. Two nodes (as rank 0 sees it): FLEXGEN_MASTER_ADDR, with the host name
    unresolvable (127.0.0.2 stands in for a cluster address: it is local, and not the default)."""
    expected = "127.0.0.1" if nodes == 1 else "127.0.0.2"
    if nodes == 2:
        unresolvable(monkeypatch)
        monkeypatch.setenv("FLEXGEN_MASTER_ADDR", expected)
    mpi, stores = FakeMPI(), {}

    def rank(r):
        ctx = DistContext(rank=r, world_size=2, local_size=2 // nodes, mpi=mpi)
        stores[r] = group._mpi_store(ctx, timedelta(seconds=30))
    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert set(stores) == {0, 1}
    stores[0].set("hello", "world")
    assert stores[1].get("hello") == b"world"
    port = stores[0].port
    assert [a for a, p in tcp_listeners().values() if p == port] == [expected]


# ----- a real job under mpirun ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_layers(tmp_path_factory):
    path = tmp_path_factory.mktemp("rdzv-ckpt")
    make_checkpoint(path, post_ln=False, layers=2)
    return str(path)


@needs_mpi
@needs_proc
@pytest.mark.timeout(240)
def test_a_one_node_job_listens_on_loopback_only_and_ends_with_its_launcher(two_layers, tmp_path):
    """launch/run_local.sh 2: while it runs, no socket of a rank process listens outside loopback
    (MPI's own daemon, prterun, is the launcher's business and not counted); then mpirun is
    SIGKILLed mid-run and every rank is gone well within 60 s (not at --comm-timeout, 600 s)."""
    off = tmp_path / "off"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    args = ["--model", two_layers, "--dtype", "float32", "--prompt-len", 4, "--gen-len", 40,
            "--num-prompts", 100000, "--gpu-batch-size", 1, "--offload-dir", off, "--comm-timeout", 600]
    job = subprocess.Popen([str(ROOT / "launch/run_local.sh"), "2", *map(str, args)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=ROOT,
                           start_new_session=True)
    try:
        ranks, seen = [], set()
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline:  # until both ranks have joined the process group
            assert job.poll() is None, job.communicate()[1]
            ranks = [p for p in descendants(job.pid) if b"flexgen_dist.run" in command_line(p)]
            seen |= listeners_of(ranks)
            if len(ranks) == 2 and all(listeners_of([p]) for p in ranks):
                break
            time.sleep(0.2)
        for _ in range(5):  # a few more looks while it generates
            seen |= listeners_of(ranks)
            time.sleep(0.2)
        assert len(ranks) == 2 and seen, "the ranks never started listening"
        exposed = {(a, p) for a, p in seen if a not in LOOPBACK}
        assert not exposed, f"rank processes listen beyond loopback: {exposed}"
        assert all(alive(p) for p in ranks), "the job ended before its launcher was killed"
        os.kill(job.pid, signal.SIGKILL)  # mpirun (prterun: exec'd by the script) dies without warning
        start = time.monotonic()
        while any(alive(p) for p in ranks) and time.monotonic() - start < 60:
            time.sleep(0.2)
        left = [p for p in ranks if alive(p)]
        assert not left, f"ranks {left} outlived their launcher by 60 s"
    finally:
        try:
            os.killpg(job.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        job.wait(30)


WATCHED = textwrap.dedent("""
    import sys, time
    from flexgen_dist.dist import failures
    from flexgen_dist.dist.context import DistContext
    failures.on_exit(lambda: open(sys.argv[1], "w").write("hook ran"))
    failures.watch_launcher(DistContext(rank=3, world_size=4), poll_s=0.1)
    print("watching", flush=True)
    time.sleep(120)
""")
LAUNCHER = textwrap.dedent("""
    import subprocess, sys
    child = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]], stdout=subprocess.PIPE,
                             stderr=open(sys.argv[3], "w"), text=True)
    assert child.stdout.readline() == "watching\\n"
    print(child.pid, flush=True)
    child.wait()
""")


@pytest.mark.timeout(120)
def test_a_rank_whose_launcher_vanishes_ends_itself_with_one_line(tmp_path):
    hook, err = tmp_path / "hook", tmp_path / "stderr"
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, WATCHED, hook, err], stdout=subprocess.PIPE,
                                text=True, cwd=ROOT)
    rank = None
    try:
        rank = int(launcher.stdout.readline())
        launcher.kill()
        launcher.wait(10)
        deadline = time.monotonic() + 30
        while alive(rank) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(rank), "the rank outlived its launcher"
    finally:
        launcher.kill()
        if rank is not None and alive(rank):
            os.kill(rank, signal.SIGKILL)
    assert err.read_text() == f"error: rank 3: its launcher (pid {launcher.pid}) is gone; stopping\n"
    assert hook.read_text() == "hook ran"
