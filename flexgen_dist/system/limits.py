"""What this process may use: host memory (the machine, its memory cgroup, --cpu-mem), disk space,
its own peak, and the C allocator it shares with torch."""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil

import psutil

from ..core.errors import FlexGenError
from ..core.types import GiB


def cgroup_memory_available() -> int | None:
    """What the tightest memory cgroup around this process still lets it use (v1 or v2), counting
    the group's inactive page cache as free; None without a limit."""
    best = None
    for directory in _cgroup_dirs():
        limit = _read_int(directory, "memory.max", "memory.limit_in_bytes")
        usage = _read_int(directory, "memory.current", "memory.usage_in_bytes")
        if limit is None or usage is None or limit >= 1 << 60:
            continue
        reclaimable = _stat(directory).get("inactive_file", _stat(directory).get("total_inactive_file", 0))
        left = max(limit - usage + reclaimable, 0)
        best = left if best is None else min(best, left)
    return best


def _cgroup_dirs() -> list[str]:
    """This process's memory cgroup directory and its ancestors (a limit may sit on any of them)."""
    try:
        with open("/proc/self/cgroup") as f:
            lines = [line.rstrip("\n").split(":", 2) for line in f]
    except OSError:
        return []
    out = []
    for _, controllers, path in lines:
        base = "/sys/fs/cgroup/memory" if "memory" in controllers.split(",") else \
            "/sys/fs/cgroup" if controllers == "" else None
        if base is None or not os.path.isdir(base):
            continue
        parts = [p for p in path.split("/") if p]
        out += [os.path.join(base, *parts[:i]) for i in range(len(parts), 0, -1)]
    return out


def _read_int(directory: str, *names: str) -> int | None:
    for name in names:
        try:
            with open(os.path.join(directory, name)) as f:
                text = f.read().strip()
        except OSError:
            continue
        return 1 << 62 if text == "max" else int(text)
    return None


def _stat(directory: str) -> dict[str, int]:
    try:
        with open(os.path.join(directory, "memory.stat")) as f:
            return {k: int(v) for k, v in (line.split() for line in f)}
    except (OSError, ValueError):
        return {}


_HOST_LIMIT: list[int] = []  # bytes of host memory this process may use in all (--cpu-mem), if set


def limit_host_memory(total_bytes: int | None) -> None:
    """Hold this process to `total_bytes` of host memory in all (None: no limit of our own)."""
    _HOST_LIMIT[:] = [] if total_bytes is None else [int(total_bytes)]


FREE_RAM = "available RAM"  # host_available's source when no limit is tighter: it counts no page as ours


def host_available() -> tuple[int, str]:
    """(bytes this process may still allocate in host memory, where that number comes from)."""
    found = [(psutil.virtual_memory().available, FREE_RAM)]
    cgroup = cgroup_memory_available()
    if cgroup is not None:
        found.append((cgroup, "memory cgroup limit"))
    if _HOST_LIMIT:
        rss = psutil.Process().memory_info().rss
        found.append((max(_HOST_LIMIT[0] - rss, 0), f"--cpu-mem {_HOST_LIMIT[0] / GiB:g} GiB"))
    return min(found, key=lambda f: f[0])


def require_disk_space(need: int, directory: str, what: str, also: str = "") -> None:
    """Refuse, in one line naming both numbers, `need` bytes that `directory`'s filesystem lacks."""
    free = shutil.disk_usage(directory).free
    if need > free:
        raise FlexGenError(f"not enough disk space in {directory} for {what}: needs {need / 1e9:.2f} GB, "
                           f"{free / 1e9:.2f} GB free; free some space, use --offload-dir on a larger disk"
                           + (f", {also}" if also else ""))


def peak_rss_bytes() -> int:
    """This process's peak resident set. Linux's VmHWM starts afresh at exec; getrusage's
    ru_maxrss does not (a child of a large process starts at its parent's size), so it is only
    the fallback."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _glibc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:  # not glibc: its allocator needs none of this
        return None


_GLIBC = _glibc()


_M_ARENA_MAX = -8


def share_one_allocator_arena() -> None:
    """Tensors are allocated on I/O threads (reads, decompression) and freed on the compute
    thread. With glibc's per-thread arenas each thread keeps its own pile of freed blocks, which
    other threads cannot reuse: hundreds of MB more at peak, under a memory limit a smaller batch.
    One shared arena lets every block be reused; its lock is taken a few hundred times a step."""
    if _GLIBC is not None:
        _GLIBC.mallopt(_M_ARENA_MAX, 1)


def trim_allocator() -> None:
    """Give freed heap memory back to the OS (between steps: the pages are faulted in again)."""
    if _GLIBC is not None:
        _GLIBC.malloc_trim(0)


# ----- memory budgets -----------------------------------------------------------------------
CODE_RESERVE = 128 << 20  # libraries' pages a run touches after planning (oneDNN kernels, ...)


def code_reserve(resident_counted: bool = False) -> int:
    """Memory a plan must leave to the program's own files (torch's libraries are mapped, and their
    pages count against a memory cgroup like the page cache does): what is resident now, plus
    room for what the run will touch. Planning that memory away evicts them, and a run that
    re-reads its own code from disk in every step is several times slower. `resident_counted`:
    the budget it is taken from already counts the resident pages as used (a cgroup's usage, or
    --cpu-mem less the process's RSS), so only the room to grow is reserved."""
    if resident_counted:
        return CODE_RESERVE
    try:
        with open("/proc/self/status") as f:
            resident = next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssFile:"))
    except (OSError, StopIteration, ValueError):
        resident = 0
    return resident + CODE_RESERVE
