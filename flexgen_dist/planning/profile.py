"""What this machine can do, measured once and cached: the numbers the cost model runs on.

A profile is a JSON file per machine identity (CPU model and flags, cores, RAM, torch version, GPU,
the compiled int4 kernel's source)
under `~/.cache/flexgen_dist/hardware/`; a changed identity or profile version is a different file,
so it is measured afresh, as is any measurement not yet in the file (a new model's matmul shapes, a
new disk; see `measure.py`). It is measured with all the machine's cores, by one process at a time
(`locked`: ranks starting together measure once, the others wait and read it); a process given
fewer threads (a rank of `launch/run_local.sh N`) derives its compute rates from it in proportion
(`share`), so 1- and N-rank runs on one machine share one profile. `reprofile=True` (`--reprofile`)
measures everything again. Memory budgets are not part of the profile: they are what the machine
and its cgroup allow now (see `budgets`), less a margin, unless given (`--gpu-mem`, `--cpu-mem`,
`--disk-mem`).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import psutil
import torch

from ..core.types import GiB, dtype_name
from ..kernels import compiled
from ..runtime.budget import MARGIN
from ..system.limits import FREE_RAM, code_reserve, host_available
from ..system.workdir import partial_file

PROFILE_VERSION = 8  # 7: medians instead of the fastest call; 8: measured with all cores, one per machine


COMPUTE_RATES = ("matmul ", "attention ", "decompress ", "compress ", "token choice ")  # scale with threads


def machine_threads() -> int:
    """The threads a profile is measured with: the machine's cores (torch's own default)."""
    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


MATMUL_ROWS = (1, 8, 32, 128, 512)  # rows of a product measured; others are interpolated


def machine_identity(device: torch.device) -> dict:
    """What makes two machines' measurements interchangeable."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
        model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
        flags = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("flags")), "")
    except OSError:
        model = platform.processor()
    identity = {"cpu": model, "cpu_flags": hashlib.sha256(flags.encode()).hexdigest()[:16],
                "cores": machine_threads(), "ram": psutil.virtual_memory().total,
                "torch": torch.__version__, "device": device.type, "int4_kernel": compiled.source_digest()}
    if device.type == "cuda":
        identity["gpu"] = torch.cuda.get_device_name(device)
    return identity


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "flexgen_dist", "hardware")


@dataclass
class HardwareProfile:
    """Measured rates, keyed by what was measured (see the `*_key` functions)."""

    identity: dict
    rates: dict[str, float] = field(default_factory=dict)
    path: str | None = None
    measured_s: float = 0.0  # time spent measuring in this process
    threads: int = 0  # this process's compute threads (0: all the machine's), which its rates are for
    history: list = field(default_factory=list)  # one entry per process that measured and saved
    fresh: bool = False  # `reprofile`: measure everything again, whatever the file holds
    # called once, before the first measurement this process makes (a status line: it may take a minute)
    on_first_measurement: Callable[[], None] | None = field(default=None, repr=False, compare=False)
    _points: dict = field(default_factory=dict, repr=False, compare=False)

    # ----- lookups the cost model uses ---------------------------------------------------------
    @property
    def share(self) -> float:
        """This process's part of the cores the profile was measured with: its compute rates are
        the measured ones times this (the other ranks on the machine run at the same time)."""
        return min(self.threads, machine_threads()) / machine_threads() if self.threads else 1.0

    def matmul_s(self, dtype: torch.dtype, rows: int, k: int, n: int, packed: bool = False) -> float:
        """Seconds for a (rows, k) x (k, n) product; `packed`: with the weight in the layout the
        engine gives resident weights where the device has one (else the same as plain)."""
        return 2.0 * rows * k * n / self.matmul_rate(dtype, rows, k, n, packed)

    def matmul_rate(self, dtype: torch.dtype, rows: int, k: int, n: int, packed: bool = False) -> float:
        """FLOP/s, interpolated between measured row counts; a profile written by hand may give one
        rate for every shape as `matmul DTYPE any`."""
        return self.share * self._measured_matmul_rate(dtype, rows, k, n, packed)

    def _measured_matmul_rate(self, dtype: torch.dtype, rows: int, k: int, n: int, packed: bool) -> float:
        flat = self.rates.get(f"matmul {dtype_name(dtype)} any")
        if flat is not None:
            return flat
        keys = [matmul_key(dtype, r, k, n, packed) for r in MATMUL_ROWS]
        if packed and keys[0] not in self.rates:
            keys = [matmul_key(dtype, r, k, n) for r in MATMUL_ROWS]
        points = [(r, self.rates[key]) for r, key in zip(MATMUL_ROWS, keys) if key in self.rates]
        if not points:
            raise KeyError(f"no matmul measurement for {k}x{n} in {dtype}")
        if rows <= points[0][0]:
            return points[0][1] * rows / points[0][0]  # below the smallest: same time per call
        for (r0, v0), (r1, v1) in zip(points, points[1:]):
            if rows <= r1:
                return v0 + (rows - r0) / (r1 - r0) * (v1 - v0)
        return points[-1][1]

    def rate(self, key: str, default: float | None = None) -> float:
        """The rate `key` names, for this process's threads (`default` where it was not measured)."""
        if default is not None and key not in self.rates:
            return default
        return self.rates[key] * (self.share if key.startswith(COMPUTE_RATES) else 1.0)

    def layer_points(self, key: str) -> list[tuple[int, float]]:
        """(size, seconds) of every measurement of the layer `key` names at any size, by size."""
        body, layout = _split_layout(key)
        prefix = body.rsplit(" ", 1)[0] + " "
        if (prefix, layout) not in self._points:
            found = []
            for k, v in self.rates.items():
                other, other_layout = _split_layout(k)
                if other.startswith(prefix) and other_layout == layout:
                    found.append((int(other.rsplit(" ", 1)[1]), v))
            self._points[(prefix, layout)] = sorted(found)
        return [(size, seconds / self.share) for size, seconds in self._points[(prefix, layout)]]

    # ----- measuring ---------------------------------------------------------------------------
    def ensure(self, key: str, measure: Callable[[], float]) -> float:
        if key not in self.rates:
            self.about_to_measure()
            t0 = time.perf_counter()
            self.rates[key] = float(measure())
            self.measured_s += time.perf_counter() - t0
            self._points.clear()
        return self.rates[key]

    def about_to_measure(self) -> None:
        """Every measurement calls this first: the first one announces itself."""
        if self.on_first_measurement is not None:
            self.on_first_measurement()
            self.on_first_measurement = None

    def __getstate__(self) -> dict:
        """A profile travels to rank 0 pickled: without its callback (often a lambda, unpicklable)."""
        return {**self.__dict__, "on_first_measurement": None}

    def save(self) -> None:
        if self.path is None:
            return
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        body = json.dumps({"version": PROFILE_VERSION, "identity": self.identity, "rates": self.rates,
                           "history": self.history}, indent=1, sort_keys=True)
        temp = f"{self.path}.{os.getpid()}.new"  # ranks on one machine may save at once
        with partial_file(temp), open(temp, "w") as f:
            f.write(body)
        os.replace(temp, self.path)

    @contextlib.contextmanager
    def locked(self):
        """Held by one process of the machine at a time (an advisory lock beside the file), with
        what others measured meanwhile read back in (unless `fresh`): ranks starting together
        measure once."""
        if self.path is None:
            yield self
            return
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(f"{self.path}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                if not self.fresh:
                    stored = _read(self.path, self.identity)
                    if stored is not None:
                        self.rates = {**stored[0], **self.rates}
                        self.history = stored[1]
                        self._points.clear()
                yield self
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def matmul_key(dtype: torch.dtype, rows: int, k: int, n: int, packed: bool = False) -> str:
    return f"matmul {dtype_name(dtype)} {rows}x{k}x{n}" + (" packed" if packed else "")


def load_profile(device: torch.device, cache_dir: str | None = None, reprofile: bool = False) -> HardwareProfile:
    """This machine's cached profile (empty where nothing is cached yet, or with `reprofile`)."""
    identity = machine_identity(device)
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir or default_cache_dir(), f"{digest}.json")
    profile = HardwareProfile(identity, path=path, threads=torch.get_num_threads(), fresh=reprofile)
    stored = None if reprofile else _read(path, identity)
    if stored is not None:
        profile.rates, profile.history = stored
    return profile


def _read(path: str, identity: dict) -> tuple[dict, list] | None:
    """(rates, history) of the profile file at `path`, if it is one of this machine and version."""
    try:
        with open(path) as f:
            data = json.load(f)
        if data.get("version") == PROFILE_VERSION and data.get("identity") == identity:
            return {k: float(v) for k, v in data["rates"].items()}, list(data.get("history", []))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass  # unreadable or damaged: measure again
    return None


LAYOUTS = ("plain", "packed", "int4")  # how a measured layer's matmul weights were held


def layer_key(dtype: torch.dtype, spec, kind: str, phase: str, tokens: int, layout: str | bool) -> str:
    """The key of a block layer's measured seconds; `layout` one of LAYOUTS (True: "packed", the
    bf16 weights in oneDNN's layout; "int4": 4-bit weights multiplied from their codes)."""
    layout = {True: "packed", False: "plain"}.get(layout, layout)
    dims = f"{spec.family} {spec.hidden_size}/{spec.ffn_dim}/{spec.num_heads}/{spec.kv_heads}"
    return f"layer {dtype_name(dtype)} {dims} {kind} {phase} {tokens}" + ("" if layout == "plain" else f" {layout}")


def _split_layout(key: str) -> tuple[str, str]:
    """(the key without its layout suffix, the layout)."""
    last = key.rsplit(" ", 1)[-1]
    return (key.rsplit(" ", 1)[0], last) if last in LAYOUTS[1:] else (key, "plain")


def layer_kind(layer) -> str:
    return "attention" if layer.has_cache else "moe" if layer.top_k else "mlp"


def choice_key(vocab: int) -> str:
    return f"token choice {vocab}"


def overhead_key(dtype: torch.dtype, spec) -> str:
    return f"layer overhead {dtype_name(dtype)} {spec.hidden_size}"


def disk_key(directory: str, what: str) -> str:
    return f"disk {what} {os.stat(directory).st_dev}"


@dataclass(frozen=True)
class Budgets:
    """Bytes each tier may hold for one rank's plan (before the engine's own MARGIN)."""

    compute: int
    host: int
    disk: int
    source: str = ""


def budgets(device: torch.device, offload_dir: str, gpu_mem: float | None = None, cpu_mem: float | None = None,
            disk_mem: float | None = None) -> Budgets:
    """What this process may use now on each tier, less the engine's margin; overrides in GiB.
    `cpu_mem` is the whole process's host memory: what it already holds is taken off. Without a
    GPU the compute tier is host memory, and the two share the host budget."""
    rss = psutil.Process().memory_info().rss
    available, source = host_available()
    if cpu_mem is not None and int(cpu_mem * GiB) - rss < available:
        available, source = max(int(cpu_mem * GiB) - rss, 0), f"--cpu-mem {cpu_mem:g} GiB"
    host = int(max(available - code_reserve(resident_counted=source != FREE_RAM), 0) / MARGIN)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        compute = int((gpu_mem * GiB if gpu_mem is not None else free) / MARGIN)
    else:
        compute = host
    os.makedirs(offload_dir, exist_ok=True)
    disk = shutil.disk_usage(offload_dir).free if disk_mem is None else int(disk_mem * GiB)
    return Budgets(compute, host, disk, source)
