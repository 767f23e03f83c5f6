"""A bounded cache of routed experts' tensors on the compute device.

Experts homed on a slower tier (disk; host memory when the compute device is a GPU) are read when
a block routes to them. Kept here, in the form the math uses, the next block that routes to the
same expert reads nothing. The cache keeps the experts used most: every expert asked for is
counted (cached or not); a newcomer that does not fit displaces the least used entries (the least
recently used among equals) only if it has been used more than they have, else it is not kept.
So a scan over more experts than fit (a large block touches most experts of every layer, layer
after layer) does not flush the cache, as it would under plain LRU: under uniform routing the
cache keeps a stable share of the experts and hits in that proportion. The bytes held are
counted on the compute tier (`Devices.usage`). The capacity is fixed when the engine is built
(`budget.sized_expert_cache`) and only shrinks, when a block needs the memory (`shrink`).
"""
from __future__ import annotations

import heapq
import itertools
import threading

from ..storage.devices import Usage


def _layer_of(name: str) -> str:
    """The layer part of an expert weight's store name (`layers.3.mlp.experts.5.up_proj.weight`)."""
    return name.split(".experts.")[0]


class ExpertCache:
    def __init__(self, capacity: int, usage: Usage):
        self.capacity, self.usage = int(capacity), usage
        self.entries: dict[str, tuple[object, int]] = {}
        self.uses: dict[str, tuple[int, int]] = {}  # name -> (times asked for, when last), cached or not
        self._heap: list[tuple[int, int, str]] = []  # (uses, when, name) of entries; stale ones skipped
        self._clock = itertools.count()
        self.used = 0
        self.hits = self.misses = 0  # tensors asked for
        self.hit_bytes = 0
        self.lock = threading.Lock()

    def get(self, name: str):
        """The cached tensor of `name`, or None; either way `name` counts one more use."""
        with self.lock:
            count, _ = self.uses.get(name, (0, 0))
            self.uses[name] = (count + 1, next(self._clock))
            entry = self.entries.get(name)
            if entry is None:
                self.misses += 1
                return None
            heapq.heappush(self._heap, (*self.uses[name], name))
            if len(self._heap) > 4 * len(self.entries) + 64:  # mostly stale records: rebuild
                self._heap = [(*self.uses[n], n) for n in self.entries]
                heapq.heapify(self._heap)
            self.hits += 1
            self.hit_bytes += entry[1]
            return entry[0]

    def put(self, name: str, value, nbytes: int) -> bool:
        """Keep `value` if there is room, or if the entries it must displace were used less;
        whether it was kept."""
        with self.lock:
            if nbytes > self.capacity or name in self.entries:
                return False
            mine = self.uses.setdefault(name, (1, next(self._clock)))
            victims = self._least_used(self.used + nbytes - self.capacity, mine[0], _layer_of(name))
            if victims is None:
                return False
            for victim in victims:
                self._drop(victim)
            self.entries[name] = (value, nbytes)
            heapq.heappush(self._heap, (*mine, name))
            self.used += nbytes
            self.usage.add(nbytes)
            return True

    def shrink(self, capacity: int) -> None:
        """Hold at most `capacity` bytes from now on (the least used dropped first)."""
        with self.lock:
            self.capacity = max(0, min(self.capacity, int(capacity)))
            for victim in self._least_used(self.used - self.capacity, None) or []:
                self._drop(victim)

    def clear(self) -> None:
        with self.lock:
            for name in list(self.entries):
                self._drop(name)
            self._heap.clear()

    def _least_used(self, need: int, below: int | None, layer: str | None = None) -> list[str] | None:
        """Entries, least used first, that free `need` bytes, each used fewer than `below` times
        (None: any) and none of `layer` (whose use may still hold them: dropped, they would stay
        in memory uncounted); None if they cannot. Entries are not dropped here."""
        chosen, freed, kept = [], 0, []
        while freed < need and self._heap:
            count, when, name = heapq.heappop(self._heap)
            if name not in self.entries or self.uses[name] != (count, when) or name in chosen:
                continue  # a stale heap record
            kept.append((count, when, name))
            if below is not None and count >= below:
                break
            if layer is not None and _layer_of(name) == layer:
                continue
            chosen.append(name)
            freed += self.entries[name][1]
        for record in kept:
            heapq.heappush(self._heap, record)
        return chosen if freed >= need else None

    def _drop(self, name: str) -> None:
        _, nbytes = self.entries.pop(name)
        self.used -= nbytes
        self.usage.sub(nbytes)

    def describe(self) -> str:
        asked = self.hits + self.misses
        rate = f", {self.hits / asked:.0%} of {asked} expert tensors asked for were hits" if asked else ""
        return f"expert cache: {self.capacity / 2**30:.2f} GiB, {self.used / 2**30:.2f} GiB held{rate}"
