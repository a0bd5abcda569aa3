"""Video similarity: PSNR and SSIM between videos ``(N, 3, F, H, W)`` with pixels in ``[-1, 1]``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

_SSIM_WINDOW = 11
_SSIM_SIGMA = 1.5
_SSIM_C1 = 0.01**2
_SSIM_C2 = 0.03**2


def psnr(video: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per video ``(N,)`` (peak-to-peak 2; ``inf`` when identical)."""
    mse = (video.float().clamp(-1, 1) - reference.float().clamp(-1, 1)).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse)


def _gaussian_window(device: torch.device) -> torch.Tensor:
    x = torch.arange(_SSIM_WINDOW, dtype=torch.float32, device=device) - (_SSIM_WINDOW - 1) / 2
    g = torch.exp(-x * x / (2 * _SSIM_SIGMA**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(3, 1, _SSIM_WINDOW, _SSIM_WINDOW)


def ssim(video: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Mean structural similarity per video ``(N,)`` over frames and RGB channels.

    Wang et al. 2004 on ``[0, 1]`` intensities: 11x11 Gaussian window (sigma 1.5), ``K1 = 0.01``,
    ``K2 = 0.03``, valid positions only (frames must be at least 11x11).
    """
    n, c, f, h, w = video.shape
    if h < _SSIM_WINDOW or w < _SSIM_WINDOW:
        raise ValueError(f"ssim needs frames of at least {_SSIM_WINDOW}x{_SSIM_WINDOW}, got {h}x{w}")
    to_frames = lambda v: ((v.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 1, 3, 4).reshape(n * f, c, h, w)  # noqa: E731
    a, b = to_frames(video), to_frames(reference)
    window = _gaussian_window(a.device)
    blur = lambda x: F.conv2d(x, window, groups=c)  # noqa: E731
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + _SSIM_C1) * (2 * cov + _SSIM_C2)) / (
        (mu_a**2 + mu_b**2 + _SSIM_C1) * (var_a + var_b + _SSIM_C2)
    )
    return ssim_map.reshape(n, -1).mean(1)
