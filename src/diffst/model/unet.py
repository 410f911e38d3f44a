"""The denoiser backbone: an improved-diffusion style UNet with timestep conditioning."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import AttentionBlock, ResBlock, group_norm, timestep_embedding, zero_module

__all__ = ["UNet"]


class UNet(nn.Module):
    """UNet denoiser ``ε_θ(x_t, t, condition)`` (improved-diffusion's ``UNetModel``, trimmed).

    The condition enters by concatenation at the input (improved-diffusion's ``SuperResModel`` / SR3).
    The sinusoidal timestep embedding goes through an MLP into every ``ResBlock`` as a
    scale-shift of its normalised activations. Each level after the first halves the resolution;
    self-attention sits at the lowest resolution. The last conv is zero-initialised so the untrained
    network outputs 0 (with residual x0-prediction: exactly the up-sampled LR baseline).

    Parameters
    ----------
    in_channels, out_channels
        Input channels (noisy maps + conditions) and output channels (genes).
    base_channels, channel_mult, num_res_blocks
        Width of the first level, multiplier per level, ResBlocks per level on the way down
        (``num_res_blocks + 1`` on the way up, one per skip connection).
    attention
        Self-attention in the middle block.
    dropout
        Dropout inside the ResBlocks.

    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        base_channels: int = 32,
        channel_mult: tuple[int, ...] = (1, 2, 2),
        num_res_blocks: int = 1,
        attention: bool = True,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.base_channels = base_channels
        self.levels = len(channel_mult)
        emb = 4 * base_channels
        self.time_embed = nn.Sequential(nn.Linear(base_channels, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.input_conv = nn.Conv2d(in_channels, base_channels, 3, padding=1)

        ch = base_channels
        skips = [ch]
        self.down = nn.ModuleList()
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                self.down.append(ResBlock(ch, mult * base_channels, emb, dropout))
                ch = mult * base_channels
                skips.append(ch)
            if level < self.levels - 1:
                self.down.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                skips.append(ch)

        self.middle = nn.ModuleList(
            [
                ResBlock(ch, ch, emb, dropout),
                AttentionBlock(ch) if attention else nn.Identity(),
                ResBlock(ch, ch, emb, dropout),
            ]
        )

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                self.up.append(ResBlock(ch + skips.pop(), mult * base_channels, emb, dropout))
                ch = mult * base_channels
                if level > 0 and i == num_res_blocks:
                    self.up.append(_Upsample(ch))
        self.out = nn.Sequential(group_norm(ch), nn.SiLU(), zero_module(nn.Conv2d(ch, out_channels, 3, padding=1)))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """Denoise ``(B, in_channels, H, W)`` at timesteps ``t`` ``(B,)``; any ``H, W`` (padded internally)."""
        h_in, w_in = x.shape[-2:]
        k = 2 ** (self.levels - 1)
        x = F.pad(x, (0, -w_in % k, 0, -h_in % k), mode="replicate")
        emb = self.time_embed(timestep_embedding(t, self.base_channels))

        h = self.input_conv(x)
        hs = [h]
        for layer in self.down:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
            hs.append(h)
        for layer in self.middle:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        for layer in self.up:
            if isinstance(layer, ResBlock):
                h = layer(torch.cat([h, hs.pop()], dim=1), emb)
            else:
                h = layer(h)
        return self.out(h)[..., :h_in, :w_in]


class _Upsample(nn.Module):
    """Nearest-neighbour 2x up-sampling followed by a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))
