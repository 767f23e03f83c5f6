"""Placement rules as plain data: no model runs here."""
import pytest
from flexgen_dist.core.policy import (
    Policy,
    PolicyError,
    assign_weight_tiers,
    split_rows,
)
from flexgen_dist.core.types import Tier


def test_weights_go_where_their_byte_midpoint_falls():
    sizes = [10, 10, 10, 10]  # midpoints at 12.5, 37.5, 62.5, 87.5 percent
    # (compute 30, host 30, disk 40): bytes laid out disk [0, 40), host [40, 70), compute [70, 100)
    assert assign_weight_tiers(sizes, (30, 30, 40)) == [Tier.DISK, Tier.DISK, Tier.HOST, Tier.COMPUTE]
    assert assign_weight_tiers(sizes, (100, 0, 0)) == [Tier.COMPUTE] * 4
    assert assign_weight_tiers(sizes, (0, 0, 100)) == [Tier.DISK] * 4
    assert assign_weight_tiers(sizes, (0, 100, 0)) == [Tier.HOST] * 4
    # a big tensor goes by its own midpoint (51/104 = 49 %), not by where it ends
    assert assign_weight_tiers([1, 100, 3], (50, 0, 50)) == [Tier.DISK, Tier.DISK, Tier.COMPUTE]


def test_cache_rows_split_into_whole_sequences():
    assert split_rows(8, (50, 25, 25)) == [(Tier.COMPUTE, 0, 4), (Tier.HOST, 4, 6), (Tier.DISK, 6, 8)]
    assert split_rows(3, (50, 50, 0)) == [(Tier.COMPUTE, 0, 1), (Tier.HOST, 1, 3)]
    assert split_rows(4, (0, 0, 100)) == [(Tier.DISK, 0, 4)]
    assert split_rows(5, (100, 0, 0)) == [(Tier.COMPUTE, 0, 5)]


def test_percent_mapping_and_tiers():
    p = Policy.from_percent([20, 30, 40, 50, 0, 100]).validate()
    assert p.tier_percents("w") == (20, 30, 50)
    assert p.tier_percents("cache") == (40, 50, 10)
    assert p.act_tier is Tier.HOST
    assert Policy.from_percent([100, 0, 100, 0, 0, 0]).act_tier is Tier.DISK


@pytest.mark.parametrize("kwargs,message", [
    (dict(gpu_batch_size=0), "gpu_batch_size must be a positive integer"),
    (dict(num_gpu_batches=-1), "num_gpu_batches must be a positive integer"),
    (dict(w_gpu_percent=101), "outside 0-100"),
    (dict(cache_gpu_percent=60, cache_cpu_percent=41), "sum to more than 100"),
])
def test_validation_messages(kwargs, message):
    with pytest.raises(PolicyError, match=message):
        Policy(**kwargs).validate()
