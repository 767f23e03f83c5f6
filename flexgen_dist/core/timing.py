"""How the engine times what it decides on (the probe's dtype and kernel choices, the planner's
hardware profile): the median of a few calls after a warm-up, which is what a run meets from call
to call. (The fastest call, used once, made every prediction 10-20 % optimistic; the median still
ignores the odd call another process disturbed.)"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def typical_time(fn: Callable[[], object], budget_s: float = 0.15, at_most: int = 20, at_least: int = 3) -> float:
    """Seconds of one call of `fn`: the median of at least `at_least` calls after a warm-up one,
    more while they take less than `budget_s` in all (at most `at_most`)."""
    fn()
    times: list[float] = []
    while len(times) < at_least or (sum(times) < budget_s and len(times) < at_most):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def typical_times(fns: list[Callable[[], object]], rounds: int) -> list[float]:
    """Seconds of one call of each function: the median of `rounds` calls after a warm-up one, the
    calls interleaved so that load from other processes falls on all of them alike (what a ratio of
    two of them needs)."""
    for fn in fns:
        fn()  # first call: allocation and any one-time kernel setup
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]
