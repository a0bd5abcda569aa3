"""Tests of the FP8 (e4m3) quantisation of attention inputs (:mod:`sparse_compile.kernels.fp8_quant`).

- The specification's scale: ``amax * SCALE_PER_AMAX`` rounded to fp32, the same on every device.
"""

import torch

from sparse_compile.kernels.fp8_quant import FP8_MAX, SCALE_PER_AMAX, quantize_channels, quantize_row_blocks


def test_scale_is_amax_times_the_fp32_reciprocal_of_448() -> None:
    """A multiply by fl32(1 / 448), not a division by 448 (which differs by an ulp for about half the
    amaxes): torch multiplies the same on CPU and CUDA, so the specification does not depend on the device."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 256, 64, generator=gen) * torch.logspace(-3, 3, 256).unsqueeze(-1)
    reciprocal = torch.tensor(SCALE_PER_AMAX, dtype=torch.float32)
    _, scale = quantize_row_blocks(x, 32)
    amax = x.abs().view(2, 3, 8, 32 * 64).amax(-1)
    assert torch.equal(scale, amax * reciprocal) and not torch.equal(scale, amax / FP8_MAX)
    _, v_scale = quantize_channels(x)
    assert torch.equal(v_scale, x.abs().amax(dim=2) * reciprocal)
