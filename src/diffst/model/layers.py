"""Building blocks shared by the encoders and the UNet (improved-diffusion style)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["AttentionBlock", "ResBlock", "group_norm", "strided_stem", "timestep_embedding", "zero_module"]


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with up to 32 groups (improved-diffusion uses 32; small widths get fewer)."""
    return nn.GroupNorm(math.gcd(32, channels), channels)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a module's parameters, so a residual branch or the output starts as the identity / zero."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of (integer or fractional) timesteps, as in improved-diffusion.

    Parameters
    ----------
    t
        ``(B,)`` timesteps.
    dim
        Embedding size.
    max_period
        Lowest frequency is ``1 / max_period``.

    Returns
    -------
    ``(B, dim)`` embedding ``[cos(t f), sin(t f)]``.

    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv residual block with an optional scale-shift timestep conditioning.

    improved-diffusion's ``ResBlock`` with ``use_scale_shift_norm=True``:
    ``h = conv(SiLU(GN(x))); h = GN(h) * (1 + scale(emb)) + shift(emb); out = x + conv(SiLU(h))``,
    the second conv zero-initialised so every block starts as the identity.

    Parameters
    ----------
    in_channels, out_channels
        Channels in and out (a 1x1 conv matches the skip path when they differ).
    emb_dim
        Size of the timestep embedding, or ``None`` for an unconditional block (image encoders).
    dropout
        Dropout before the second conv.

    """

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int | None = None, dropout: float = 0.0):
        super().__init__()
        self.in_layers = nn.Sequential(
            group_norm(in_channels), nn.SiLU(), nn.Conv2d(in_channels, out_channels, 3, padding=1)
        )
        self.emb_layers = (
            nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * out_channels)) if emb_dim is not None else None
        )
        self.out_norm = group_norm(out_channels)
        self.out_layers = nn.Sequential(
            nn.SiLU(), nn.Dropout(dropout), zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        )
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        """Apply the block; ``emb`` is ``(B, emb_dim)`` or ``None``."""
        h = self.out_norm(self.in_layers(x))
        if self.emb_layers is not None and emb is not None:
            scale, shift = self.emb_layers(emb)[:, :, None, None].chunk(2, dim=1)
            h = h * (1 + scale) + shift
        return self.skip(x) + self.out_layers(h)


class AttentionBlock(nn.Module):
    """Multi-head self-attention over pixels with a residual connection (zero-initialised output)."""

    def __init__(self, channels: int, num_heads: int = 4):
        super().__init__()
        self.num_heads = num_heads if channels % num_heads == 0 else 1
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = zero_module(nn.Conv2d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        """Apply self-attention to ``(B, C, H, W)`` features."""
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, h * w).unbind(1)
        out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


def strided_stem(in_channels: int, out_channels: int, factor: int) -> nn.Sequential:
    """Patchify-style stem that reduces resolution by an integer ``factor`` (ViT patch embedding, split up).

    ``factor`` is factored into 2s and a remainder; each factor ``f`` is a conv with kernel = stride = ``f``
    followed by GroupNorm + SiLU, widening geometrically to ``out_channels``. A factor of 1 is a 3x3 conv.
    Non-overlapping strides keep it cheap on large images (the image at 0.5 µm/px is 20x the HR grid).
    """
    factors = []
    rest = factor
    while rest % 2 == 0 and rest > 2:
        factors.append(2)
        rest //= 2
    if rest > 1:
        factors.append(rest)
    layers: list[nn.Module] = []
    if not factors:
        return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1), group_norm(out_channels), nn.SiLU())
    channels = in_channels
    for i, f in enumerate(factors):
        # widen towards out_channels: the last conv always reaches it
        nxt = out_channels if i == len(factors) - 1 else max(8, out_channels >> (len(factors) - 1 - i))
        layers += [nn.Conv2d(channels, nxt, f, stride=f), group_norm(nxt), nn.SiLU()]
        channels = nxt
    return nn.Sequential(*layers)
