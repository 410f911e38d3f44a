"""Cross-modal adaptive modulation (CAM) and multi-modal disentangling (paper Section 2.2, part 3)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import group_norm

__all__ = ["ConcatFusion", "CrossModalModulation", "DisentangledFusion", "disentangling_loss"]

#: ε of the disentangling loss. Head outputs are GroupNorm-ed, so ``||U_y - U_h||`` is of order
#: ``sqrt(numel)`` (hundreds); ε only guards the degenerate case ``U_y == U_h``.
DIS_EPS = 1e-6


def disentangling_loss(s_y: Tensor, s_h: Tensor, u_y: Tensor, u_h: Tensor, eps: float = DIS_EPS) -> Tensor:
    """Cross-modal disentangling loss ``L_dis = ||S_y - S_h||_2 / (||U_y - U_h||_2 + ε)``.

    Norms are per sample (over channels and pixels); the ratio is averaged over the batch.
    Minimising it pulls the shared features of the two modalities together and pushes the unique
    ones apart.

    Parameters
    ----------
    s_y, s_h, u_y, u_h
        ``(B, ...)`` shared and unique features of the ST (``y``) and histology (``h``) branches.
    eps
        Added to the denominator.

    Returns
    -------
    Scalar loss.

    """
    num = (s_y - s_h).flatten(1).norm(dim=1)
    den = (u_y - u_h).flatten(1).norm(dim=1)
    return (num / (den + eps)).mean()


def _windows(x: Tensor, a: int) -> Tensor:
    """``(B, c, Ha, Wa)`` with ``Ha, Wa`` multiples of ``a`` -> ``(B, n_windows, a*a, c)``."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // a, a, w // a, a).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, (h // a) * (w // a), a * a, c)


def _unwindows(x: Tensor, a: int, h: int, w: int) -> Tensor:
    """Inverse of :func:`_windows` for a ``(h, w)`` padded map."""
    b, _, _, c = x.shape
    x = x.reshape(b, h // a, w // a, a, a, c).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, c, h, w)


class CrossModalModulation(nn.Module):
    """Window-wise cross-modal adaptive modulation in both directions (paper Eq. 3).

    For each non-overlapping ``a x a`` window with ST features ``A_y`` and image features ``A_h``
    (``a² x c`` each): histology-to-ST ``A'_y = A_y FC(A_y^T A_h)`` and ST-to-histology
    ``A'_h = A_h FC'(A_h^T A_y)``. The cross-covariance is divided by the number of (unpadded) pixels
    in the window so its scale does not depend on ``a``. Each FC maps the flattened ``c x c``
    covariance to a ``c x c`` filter (``c² -> c²`` weights, hence a small ``c``); its bias starts at the
    identity matrix so the modulation starts close to the identity. Maps whose side is not a multiple
    of ``a`` are zero-padded and cropped back.
    """

    def __init__(self, channels: int, window: int):
        super().__init__()
        self.window = window
        self.fc_h2y = nn.Linear(channels * channels, channels * channels)
        self.fc_y2h = nn.Linear(channels * channels, channels * channels)
        with torch.no_grad():
            for fc in (self.fc_h2y, self.fc_y2h):
                fc.bias.copy_(torch.eye(channels).flatten())

    def forward(self, f_y: Tensor, f_h: Tensor) -> tuple[Tensor, Tensor]:
        """Modulate ``(B, c, H, W)`` ST and image features by each other; returns ``(F'_y, F'_h)``."""
        b, c, h, w = f_y.shape
        a = self.window
        ph, pw = -h % a, -w % a
        a_y = _windows(F.pad(f_y, (0, pw, 0, ph)), a)  # (B, n, a², c)
        a_h = _windows(F.pad(f_h, (0, pw, 0, ph)), a)
        valid = _windows(F.pad(f_y.new_ones(1, 1, h, w), (0, pw, 0, ph)), a).sum(dim=2, keepdim=True)  # (1, n, 1, 1)
        cov = a_y.transpose(-1, -2) @ a_h / valid  # (B, n, c, c) = A_y^T A_h
        w_h2y = self.fc_h2y(cov.flatten(-2)).unflatten(-1, (c, c))
        w_y2h = self.fc_y2h(cov.transpose(-1, -2).flatten(-2)).unflatten(-1, (c, c))
        y_mod = _unwindows(a_y @ w_h2y, a, h + ph, w + pw)[..., :h, :w]
        h_mod = _unwindows(a_h @ w_y2h, a, h + ph, w + pw)[..., :h, :w]
        return y_mod, h_mod


def _head(channels: int) -> nn.Sequential:
    # The output GroupNorm has no affine scale, so L_dis cannot be lowered just by inflating U.
    return nn.Sequential(
        nn.Conv2d(channels, channels, 3, padding=1), nn.GroupNorm(math.gcd(32, channels), channels, affine=False)
    )


class DisentangledFusion(nn.Module):
    """CAM + disentangling + fusion: the multi-modal condition of the denoiser (paper Fig. 2, Section 2.2).

    ``F_y`` and ``F_h`` are projected (1x1 conv + GroupNorm) to ``c = cam_dim`` channels and modulated
    by ``CrossModalModulation``. Unique and shared heads (3x3 conv + GroupNorm) give
    ``U_y, S_y`` from the modulated ST features and ``U_h, S_h`` from the modulated image features; the
    condition is ``conv3x3(concat(U_y, (S_y + S_h) / 2, U_h))`` and :func:`disentangling_loss` is returned
    for the objective.
    """

    def __init__(self, st_channels: int, image_channels: int, cam_dim: int, window: int, out_channels: int):
        super().__init__()
        self.proj_y = nn.Sequential(nn.Conv2d(st_channels, cam_dim, 1), group_norm(cam_dim))
        self.proj_h = nn.Sequential(nn.Conv2d(image_channels, cam_dim, 1), group_norm(cam_dim))
        self.modulation = CrossModalModulation(cam_dim, window)
        self.unique_y, self.shared_y = _head(cam_dim), _head(cam_dim)
        self.unique_h, self.shared_h = _head(cam_dim), _head(cam_dim)
        self.fuse = nn.Conv2d(3 * cam_dim, out_channels, 3, padding=1)

    def forward(self, f_y: Tensor, f_h: Tensor) -> tuple[Tensor, Tensor]:
        """Fuse ``(B, ·, H, W)`` ST and image features; returns ``(condition, L_dis)``."""
        y_mod, h_mod = self.modulation(self.proj_y(f_y), self.proj_h(f_h))
        u_y, s_y = self.unique_y(y_mod), self.shared_y(y_mod)
        u_h, s_h = self.unique_h(h_mod), self.shared_h(h_mod)
        cond = self.fuse(torch.cat([u_y, 0.5 * (s_y + s_h), u_h], dim=1))
        return cond, disentangling_loss(s_y, s_h, u_y, u_h)


class ConcatFusion(nn.Module):
    """The ``cam=False`` ablation: ``conv3x3(concat(F_y, F_h))`` and no disentangling loss."""

    def __init__(self, st_channels: int, image_channels: int, out_channels: int):
        super().__init__()
        self.fuse = nn.Conv2d(st_channels + image_channels, out_channels, 3, padding=1)

    def forward(self, f_y: Tensor, f_h: Tensor) -> tuple[Tensor, Tensor]:
        """Fuse by concatenation; returns ``(condition, 0)``."""
        return self.fuse(torch.cat([f_y, f_h], dim=1)), f_y.new_zeros(())
