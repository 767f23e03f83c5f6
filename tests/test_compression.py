"""Group-wise quantization: error bounds, exact corner cases, a stable packed layout."""
import pytest
import torch
from flexgen_dist.core.compression import CompressionConfig
from flexgen_dist.kernels.quantize import (
    compressed_nbytes,
    dequantize,
    fake_quantize,
    quantize,
)


def group_steps(x, config):
    """Each element's group step, broadcast back to x's shape (for the error bound)."""
    c = quantize(x, config)
    steps = c.steps.float()[..., None].expand(*c.steps.shape, config.group_size).flatten(-2)
    dim = config.dim % x.dim()
    return steps[..., :x.shape[dim]].movedim(-1, dim)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape,dim,group", [((128, 96), 0, 64), ((96, 128), 1, 64), ((3, 5, 70), -1, 16),
                                             ((200, 8), 0, 64), ((4, 6, 33), 2, 8)])
def test_error_within_half_a_step(bits, shape, dim, group):
    torch.manual_seed(0)
    x = torch.randn(shape) * torch.rand(shape[0], *[1] * (len(shape) - 1)) * 10
    config = CompressionConfig(bits, group, dim)
    y = fake_quantize(x, config)
    assert y.shape == x.shape and y.dtype == x.dtype
    err = (y - x).abs()
    assert bool((err <= group_steps(x, config) / 2 + 1e-6).all()), err.max()


def test_bfloat16_scales_keep_the_bound():
    """min rounded down and step rounded up in bf16: the reconstruction in fp32 stays within half a
    step; the final cast to bf16 adds at most half a bf16 ulp."""
    torch.manual_seed(1)
    x = (torch.randn(256, 64) * 3 + 100).to(torch.bfloat16)  # large offset: bf16 rounding of min matters
    config = CompressionConfig(4, 64, 0)
    c = quantize(x, config)
    codes = torch.stack([c.data >> 4, c.data & 0xF], dim=-1).flatten(-2).float()
    recon = (codes * c.steps.float()[..., None] + c.mins.float()[..., None]).flatten(-2).movedim(-1, 0)
    assert bool(((recon - x.float()).abs() <= group_steps(x, config) / 2 + 1e-6).all())


def test_constant_groups_round_trip_exactly():
    x = torch.full((64, 10), 3.25)
    x[:, 5] = -7.0
    y = fake_quantize(x, CompressionConfig(4, 64, 0))
    assert torch.equal(y, x) and not torch.isnan(y).any()
    z = torch.zeros(3, 128)
    assert torch.equal(fake_quantize(z, CompressionConfig(4, 64, 1)), z)


def test_padded_tail_round_trips():
    x = torch.linspace(-1, 1, 70 * 3).reshape(70, 3)  # 70 = one full group of 64 and a tail of 6
    config = CompressionConfig(4, 64, 0)
    c = quantize(x, config)
    assert c.data.shape == (3, 2, 32)  # dim moved last, 2 groups, 2 codes per byte
    y = dequantize(c)
    assert y.shape == x.shape
    assert bool(((y - x).abs() <= group_steps(x, config) / 2 + 1e-6).all())
    tail = torch.tensor([[5.0], [5.0], [5.0]])  # a tail group of equal values comes back exactly
    assert torch.equal(fake_quantize(torch.cat([x[:64, :1], tail]), config)[64:], tail)


def test_packing_order_is_stable():
    x = torch.arange(16, dtype=torch.float32)[:, None]  # one group: min 0, step 1, codes 0..15
    c = quantize(x, CompressionConfig(4, 16, 0))
    assert c.data.flatten().tolist() == [0x01, 0x23, 0x45, 0x67, 0x89, 0xAB, 0xCD, 0xEF]
    assert c.mins.item() == 0 and c.steps.item() == 1
    c8 = quantize(x, CompressionConfig(8, 16, 0))
    assert c8.data.flatten().tolist() == [round(i * 255 / 15) for i in range(16)]


@pytest.mark.parametrize("shape,dtype", [((768, 768), torch.bfloat16), ((50272, 768), torch.float16),
                                         ((100, 30), torch.float32)])
def test_compressed_size_formula(shape, dtype):
    config = CompressionConfig(4, 64, 0)
    assert compressed_nbytes(shape, dtype, config) == quantize(torch.zeros(shape, dtype=dtype), config).nbytes
    if dtype != torch.float32:  # 4 bits + two 16-bit numbers per 64 values: 28 % of 16-bit
        assert abs(compressed_nbytes(shape, dtype, config) / (torch.Size(shape).numel() * 2) - 0.28125) < 0.01


@pytest.mark.parametrize("bits,group,message", [(3, 64, "bits must be 4 or 8"), (4, 7, "even number")])
def test_bad_configs(bits, group, message):
    with pytest.raises(Exception, match=message):
        CompressionConfig(bits, group)
