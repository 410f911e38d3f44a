"""Mask-aware up-sampling of LR gene maps: the SR3-style condition and the residual-diffusion baseline."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["fill_unobserved", "upsample_lr"]


def fill_unobserved(lr: Tensor, mask: Tensor, *, iterations: int = 3, fill_value: float = -1.0) -> Tensor:
    """Fill unobserved LR pixels from their observed neighbours (iterated 3x3 normalised convolution).

    Each iteration sets every still-empty pixel to the mask-weighted mean of its filled 3x3
    neighbours, ``sum(lr m) / sum(m)``, and gives it that mean weight, so holes up to ``iterations``
    pixels from an observation are filled; the rest get ``fill_value`` (-1 = no counts).
    Observed pixels (``mask > 0``) are never changed, so a fully observed map is returned as is.

    Parameters
    ----------
    lr
        ``(B, G, h, w)`` normalised LR maps (per HR-pixel units; any value where unobserved).
    mask
        ``(B, 1, h, w)`` observed fraction of each LR pixel in [0, 1].
    iterations
        Number of 3x3 dilation steps.
    fill_value
        Value of pixels still empty after the last step.

    """
    weight = mask.clamp(0.0, 1.0)
    value = torch.where(weight > 0, lr, torch.zeros_like(lr))
    for _ in range(iterations):
        num = F.avg_pool2d(value * weight, 3, stride=1, padding=1)
        den = F.avg_pool2d(weight, 3, stride=1, padding=1)
        grow = (weight == 0) & (den > 0)
        value = torch.where(grow, num / den.clamp_min(1e-12), value)
        weight = torch.where(grow, den, weight)
    return torch.where(weight > 0, value, torch.full_like(value, fill_value))


def upsample_lr(lr: Tensor, mask: Tensor, scale: int, *, mode: str = "bicubic") -> Tensor:
    """Up-sample LR maps to the HR grid, ignoring unobserved pixels.

    :func:`fill_unobserved`, then ``F.interpolate(..., mode, align_corners=False)``. Where everything is
    observed (sum-pooling degradation) this is exactly bicubic up-sampling; for Visium-like masks the
    gaps between spots are filled from neighbouring spots instead of pulling the baseline to -1.

    Parameters
    ----------
    lr
        ``(B, G, h, w)`` normalised LR maps.
    mask
        ``(B, 1, h, w)`` observed fraction of each LR pixel.
    scale
        Integer SR factor.
    mode
        Interpolation mode of :func:`torch.nn.functional.interpolate`.

    Returns
    -------
    ``(B, G, scale h, scale w)`` maps.

    """
    corners = {} if mode in ("nearest", "area", "nearest-exact") else {"align_corners": False}
    return F.interpolate(fill_unobserved(lr, mask), scale_factor=scale, mode=mode, **corners)
