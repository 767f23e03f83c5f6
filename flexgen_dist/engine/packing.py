"""Scoring requests packed into model rows (`runtime.score.ScoreRow`), so fewer tokens go through
the model:

- requests sharing their input before the first scored position (the choices of one question; at
  least `SHARED_MIN` tokens) become one row: that context once, then each request's scored
  positions as a segment that sees the context and itself only (`model_rows`);
- rows shorter than the longest are put side by side in one row of at most that width, each seeing
  only itself (`fill`), instead of being left-padded to it: the padding was computed as if it were
  tokens. A row is never made wider than `fill_width`, where attention would start to cost more
  than a small share of a token's matmuls.

Every row carries the positions its tokens would have alone, so each request's scores are those of
its own sequence. A unit is (row, members): the requests it scores, as (request index, where its
targets start in the row's targets)."""
from __future__ import annotations

import bisect

from ..models import family_of
from ..runtime.score import ScoreRow

SHARED_MIN = 16  # context tokens shared by several requests worth computing once
ATTENTION_SHARE = 0.25  # a filled row is at most as wide as makes attention this share of the matmuls

Unit = tuple[ScoreRow, list[tuple[int, int]]]


def model_rows(rows: list[tuple[list[int], list[int]]], limit: int, share: bool = True,
               cheap: int | None = None) -> list[Unit]:
    """The units that score (input ids, targets) rows: rows sharing the input before their first
    scored position (at least `SHARED_MIN` tokens) packed together, the others alone. A packed row
    grows up to `cheap` tokens (`fill_width`: attention still cheap) or to twice its first
    request's own width, whichever is more, never past `limit` (the model's positions): many
    continuations of one context make several rows rather than one whose attention outweighs
    what sharing saves."""
    groups: dict[tuple, list[int]] = {}
    for i, (inp, targets) in enumerate(rows):
        shared = len(inp) - len(targets)
        key = tuple(inp[:shared]) if share and shared >= SHARED_MIN else (i,)
        groups.setdefault(key, []).append(i)
    out = []
    for members in groups.values():
        width, widest, current = 0, limit, []
        for i in members:
            if current and width + len(rows[i][1]) > widest:
                out.append(packed(rows, current))
                current = []
            if not current:
                width = len(rows[i][0]) - len(rows[i][1])
                widest = min(limit, max(cheap or limit, 2 * len(rows[i][0])))
            current.append(i)
            width += len(rows[i][1])
        out.append(packed(rows, current))
    return out


def packed(rows, members: list[int]) -> Unit:
    """One unit for `members` (rows sharing their input before the first scored position): that
    input once, then each member's scored positions as a segment of its own."""
    if len(members) == 1:
        inp, targets = rows[members[0]]
        return ScoreRow(list(inp), list(targets)), [(members[0], 0)]
    first = rows[members[0]][0]
    shared = len(first) - len(rows[members[0]][1])
    row = ScoreRow(list(first[:shared]), [], list(range(shared)), [0] * shared, [0] * shared)
    starts = []
    for s, i in enumerate(members, start=1):
        inp, targets = rows[i]
        starts.append((i, len(row.targets)))
        row.tokens += inp[shared:]
        row.targets += targets
        row.positions += range(shared, len(inp))
        row.segments += [s] * len(targets)
        row.context += [0] * len(targets)
    return row, starts


def fill_width(spec) -> int:
    """The widest row `fill` makes for this model: where attention over the row costs
    `ATTENTION_SHARE` of a token's other work (the family's own FLOP count)."""
    flops = family_of(spec).flops_per_token
    base, wide = flops(spec, 0)[0], flops(spec, 1024)[0]
    return max(1, int(ATTENTION_SHARE * base * 1024 / max(wide - base, 1)))


def fill(units: list[Unit], width: int) -> list[Unit]:
    """Units side by side in rows of at most `width` tokens (best fit, longest first); wider units
    stay alone."""
    out, bins, free = [], [], []  # free: (room left, bin) of the bins that can take more, sorted
    for unit in sorted(units, key=lambda u: -len(u[0].tokens)):
        n = len(unit[0].tokens)
        if n > width:
            out.append(unit)
            continue
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            room, b = free.pop(k)
            bins[b].append(unit)
        else:
            room, b = width, len(bins)
            bins.append([unit])
        if room - n > 0:
            bisect.insort(free, (room - n, b))
    return out + [combined(parts) for parts in bins]


def combined(parts: list[Unit]) -> Unit:
    """Units one after the other in one row, each seeing only itself."""
    if len(parts) == 1:
        return parts[0]
    row, members = ScoreRow([], [], [], [], []), []
    for unit, unit_members in parts:
        positions, segments, context = unit.layout()
        offset = max(row.segments, default=-1) + 1
        gap = [] if not row.tokens else [-1] * (len(unit.tokens) - len(unit.targets))
        base = len(row.targets) + len(gap)
        members += [(i, base + start) for i, start in unit_members]
        row.targets += gap + unit.targets
        row.tokens += unit.tokens
        row.positions += positions
        row.segments += [s + offset for s in segments]
        row.context += [c + offset for c in context]
    return row, members
