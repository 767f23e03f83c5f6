"""How a model's layers are cut into contiguous pipeline stages, one per rank."""
from __future__ import annotations

from ..core.errors import FlexGenError
from ..dist.group import DistContext
from ..models.base import stage_costs


def partition_stages(costs: list[float], first_extra: float, last_extra: float, stages: int) -> list[int]:
    """Layers per stage, contiguous, minimising the most expensive stage.

    `costs` are the transformer layers' costs (bytes); the first stage also pays for the embedding
    and the last for the output head."""
    n = len(costs)
    if stages > n:
        raise FlexGenError(f"{stages} pipeline stages but the model has only {n} layers")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    def stage_cost(a: int, b: int, index: int) -> float:
        return prefix[b] - prefix[a] + (first_extra if index == 0 else 0) + (last_extra if index == stages - 1 else 0)

    # best[s][i]: the smallest achievable max cost putting layers [0, i) on stages [0, s)
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for s in range(1, stages + 1):
        for i in range(s, n - (stages - s) + 1):
            for j in range(s - 1, i):
                value = max(best[s - 1][j], stage_cost(j, i, s - 1))
                if value < best[s][i]:
                    best[s][i], cut[s][i] = value, j
    sizes, i = [], n
    for s in range(stages, 0, -1):
        sizes.append(i - cut[s][i])
        i = cut[s][i]
    return sizes[::-1]


def check_stage_layers(sizes: list[int], layers: int, stages: int) -> list[int]:
    """Layers per rank as given by the user: one positive count per rank, summing to the model's."""
    if len(sizes) != stages or sum(sizes) != layers or min(sizes) < 1:
        text = ",".join(map(str, sizes))
        raise FlexGenError(f"--stage-layers {text}: needs {stages} positive counts summing to {layers}")
    return list(sizes)


def stage_range(spec, family, ctx: DistContext, stage_layers: list[int] | None) -> tuple[int, int]:
    """This rank's transformer layers [first, last), balanced by weight bytes unless given."""
    if ctx.world_size == 1:
        return 0, spec.num_layers
    if stage_layers is None:
        blocks, embed, head = stage_costs(family.build_layers(spec), spec.num_layers)
        stage_layers = partition_stages(blocks, embed, head, ctx.world_size)
    first = sum(stage_layers[:ctx.rank])
    return first, first + stage_layers[ctx.rank]
