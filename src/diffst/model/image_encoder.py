"""Hierarchical cell-to-tissue image encoder with the entropy curriculum (paper Section 2.2, part 2)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import DiffSTConfig
from .layers import ResBlock, group_norm, strided_stem

__all__ = [
    "CellEncoder",
    "CellToTissueAttention",
    "FeatureTissueEncoder",
    "HierarchicalImageEncoder",
    "TissueEncoder",
    "curriculum_quantile",
    "extract_patches",
    "n_kept",
    "patch_entropy",
    "select_patches",
]


def patch_entropy(patches: Tensor, bins: int = 32) -> Tensor:
    """Entropy-based complexity ``E(h_m)`` of image patches, in bits (no gradient).

    ``E(h) = -sum_k p_k log2 p_k`` where ``p_k`` is the share of the patch's pixels whose grey level
    (mean over channels, so it works for RGB H&E and any number of fluorescence channels) falls in
    bin ``k`` of ``bins`` equal bins over [0, 1]. A constant patch has entropy 0; two equally
    frequent grey levels in different bins give 1 bit; the maximum is ``log2(bins)`` (5 bits for 32 bins).

    Parameters
    ----------
    patches
        ``(..., C, P, P)`` patches with values in [0, 1] (values outside are clamped).
    bins
        Number of grey-level bins.

    Returns
    -------
    ``(...)`` entropies in bits.

    """
    with torch.no_grad():
        grey = patches.float().mean(dim=-3).flatten(-2).clamp(0.0, 1.0)  # (..., P*P)
        idx = (grey * bins).long().clamp_(max=bins - 1)
        counts = torch.zeros(*idx.shape[:-1], bins, device=idx.device).scatter_add_(-1, idx, torch.ones_like(grey))
        p = counts / idx.shape[-1]
        return -(p * torch.log2(p.clamp_min(1e-12))).sum(-1)


def patch_starts(size: int, patch: int, n: int) -> list[int]:
    """``n`` evenly spaced start offsets of ``patch``-long windows covering ``[0, size)`` (overlapping if needed)."""
    if n == 1:
        return [max(0, (size - patch) // 2)]
    return [round(i * (size - patch) / (n - 1)) for i in range(n)]


def extract_patches(image: Tensor, patch: int, grid: int) -> Tensor:
    """Crop a ``grid x grid`` set of evenly spaced ``patch x patch`` patches covering the image.

    Parameters
    ----------
    image
        ``(B, C, H, W)`` image.
    patch
        Patch side in pixels (clipped to the image size).
    grid
        Patches per side; ``M = grid**2``.

    Returns
    -------
    ``(B, M, C, patch, patch)`` patches, row-major over the grid.

    """
    b, c, h, w = image.shape
    patch = min(patch, h, w)
    offs = torch.arange(patch, device=image.device)
    rows = torch.tensor(patch_starts(h, patch, grid), device=image.device)[:, None] + offs  # (grid, P)
    cols = torch.tensor(patch_starts(w, patch, grid), device=image.device)[:, None] + offs
    # one gather for all patches: (B, C, grid, P, grid, P)
    out = image[:, :, rows[:, :, None, None], cols[None, None, :, :]]
    return out.permute(0, 2, 4, 1, 3, 5).reshape(b, grid * grid, c, patch, patch)


def curriculum_quantile(progress: float, start: float, end: float) -> float:
    """Entropy quantile ``q`` used as the curriculum threshold γ, linear in training progress."""
    return start + (end - start) * min(max(progress, 0.0), 1.0)


def n_kept(m: int, q: float) -> int:
    """Number of patches kept out of ``m`` at quantile ``q``: ``max(1, ceil((1 - q) m))``."""
    return max(1, math.ceil((1.0 - q) * m - 1e-9))


def select_patches(entropy: Tensor, q: float) -> Tensor:
    """Keep the patches whose entropy is above the per-tile ``q``-quantile: ``E(h_m) > γ``.

    γ is the per-tile ``q``-quantile of the patch entropies, so the rule reads the same on any stain
    and image scale. In rank form: the ``k = max(1, ceil((1 - q) M))`` most complex patches are kept
    (ties broken by patch order), so ``q = 0`` keeps all patches and at least one is always kept.

    Parameters
    ----------
    entropy
        ``(B, M)`` patch entropies.
    q
        Quantile in [0, 1).

    Returns
    -------
    ``(B, M)`` boolean keep mask with the same number of kept patches in every tile.

    """
    k = n_kept(entropy.shape[-1], q)
    order = torch.argsort(entropy, dim=-1, descending=True, stable=True)
    keep = torch.zeros_like(entropy, dtype=torch.bool)
    return keep.scatter_(-1, order[:, :k], True)


class TissueEncoder(nn.Module):
    """Tissue-level encoder: the whole tile image -> F_tissue ``(B, d_t, H, W)`` on the HR grid."""

    def __init__(self, in_channels: int, d_tissue: int, factor: int, blocks: int = 1):
        super().__init__()
        self.stem = strided_stem(in_channels, d_tissue, factor)
        self.blocks = nn.ModuleList(ResBlock(d_tissue, d_tissue) for _ in range(blocks))

    def forward(self, image: Tensor) -> Tensor:
        """Encode ``(B, C_img, H_img, W_img)`` to ``(B, d_t, H_img / factor, W_img / factor)``."""
        h = self.stem(image)
        for block in self.blocks:
            h = block(h)
        return h


class FeatureTissueEncoder(TissueEncoder):
    """Tissue level from precomputed features (:func:`diffst.pp.image_features`): ``(B, F, H, W)`` → F_tissue.

    A 1 × 1 projection to ``d_t`` channels and ResBlocks at the HR grid: the pretrained or weight-free encoder has
    done the seeing, this adapts its features to the genes of the slide.
    """

    def __init__(self, in_channels: int, d_tissue: int, blocks: int = 1):
        super().__init__(in_channels, d_tissue, 1, blocks)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, d_tissue, 1), group_norm(d_tissue), nn.SiLU())


class CellEncoder(nn.Module):
    """Cell-level encoder shared by all patches: ``(N, C_img, P, P)`` -> ``(N, d_c)``.

    A patchify stem to the HR-pixel scale (one token per 10 µm, about a cell), stride-2 convs down to
    at most 4 x 4, global average pooling and a linear map to ``d_c``.
    """

    def __init__(self, in_channels: int, d_cell: int, factor: int, patch_px: int):
        super().__init__()
        layers: list[nn.Module] = [strided_stem(in_channels, d_cell, factor)]
        size = patch_px // factor
        while size > 4:
            layers += [nn.Conv2d(d_cell, d_cell, 3, stride=2, padding=1), group_norm(d_cell), nn.SiLU()]
            size = (size + 1) // 2
        self.convs = nn.Sequential(*layers)
        self.proj = nn.Linear(d_cell, d_cell)

    def forward(self, patches: Tensor) -> Tensor:
        """Encode a batch of patches to one feature vector each."""
        return self.proj(self.convs(patches).mean(dim=(-2, -1)))


class CellToTissueAttention(nn.Module):
    """Cross-attention from tissue pixels to the kept cell patches (paper Section 2.2).

    ``Atten(Q, K, V) = softmax(Q K^T / sqrt(d)) V`` with ``Q = f(F_tissue) W_Q`` (d_t -> d),
    ``K = f(F_cell^s) W_K`` (d_c -> d), ``V = f(F_cell^s) W_V`` (d_c -> d_t); dropped patches are masked
    out of the softmax, and the result is added to F_tissue. Features are normalised before the
    projections (pre-norm) so the softmax temperature does not drift with the encoders' scale.
    """

    def __init__(self, d_tissue: int, d_cell: int, d_attn: int):
        super().__init__()
        self.norm_tissue = group_norm(d_tissue)
        self.norm_cell = nn.LayerNorm(d_cell)
        self.w_q = nn.Linear(d_tissue, d_attn, bias=False)
        self.w_k = nn.Linear(d_cell, d_attn, bias=False)
        self.w_v = nn.Linear(d_cell, d_tissue, bias=False)

    def forward(self, f_tissue: Tensor, f_cell: Tensor, keep: Tensor) -> Tensor:
        """Attend ``(B, d_t, H, W)`` tissue features to ``(B, M, d_c)`` cell features where ``keep`` ``(B, M)``."""
        b, c, h, w = f_tissue.shape
        q = self.w_q(self.norm_tissue(f_tissue).flatten(2).transpose(1, 2))  # (B, HW, d)
        cell = self.norm_cell(f_cell)
        k, v = self.w_k(cell), self.w_v(cell)  # (B, M, d), (B, M, d_t)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, :])  # boolean: True = attend
        return f_tissue + out.transpose(1, 2).reshape(b, c, h, w)


class HierarchicalImageEncoder(nn.Module):
    """Hierarchical cell-to-tissue image features ``F_h`` with the entropy curriculum (paper Section 2.2).

    Tissue level: ``TissueEncoder`` on the whole tile. Cell level: ``M`` evenly spaced patches of
    ``cell_patch_um`` encoded by the shared ``CellEncoder``. Curriculum: a patch is kept when its
    grey-level entropy :func:`patch_entropy` exceeds γ, the per-tile ``q``-quantile of the entropies,
    where ``q`` rises linearly from ``curriculum_start`` (progress 0) to ``curriculum_end`` (progress 1;
    also used at inference). So as training progresses fewer, more complex patches are kept, as the paper
    describes ("γ gradually increases, indicating increased complexity of sampled patches"); the released
    code hard-wired the selection off. Kept cell features enter the tissue features by
    ``CellToTissueAttention``. With ``hierarchical=False`` only the tissue level exists.

    With precomputed image features (``feature_channels > 0``), they arrive as the image's last channels and the
    tissue level is ``FeatureTissueEncoder`` on them; the cell level still reads the image.
    """

    def __init__(self, config: DiffSTConfig):
        super().__init__()
        self.config = config
        factor = config.image_per_hr
        if config.feature_channels:
            self.tissue = FeatureTissueEncoder(config.feature_channels, config.d_tissue, config.tissue_blocks)
        else:
            self.tissue = TissueEncoder(config.image_channels, config.d_tissue, factor, config.tissue_blocks)
        if config.hierarchical:
            self.cell = CellEncoder(config.image_channels, config.d_cell, factor, config.cell_patch_px)
            self.attention = CellToTissueAttention(config.d_tissue, config.d_cell, config.d_attn)

    def forward(self, image: Tensor, progress: float = 1.0) -> tuple[Tensor, float]:
        """Image features on the HR grid.

        Parameters
        ----------
        image
            ``(B, C_img, H_img, W_img)`` tile image in [0, 1] (and the ``feature_channels`` feature maps after it).
        progress
            Training progress in [0, 1] for the curriculum (1.0 at inference).

        Returns
        -------
        ``(F_h, kept_fraction)``: ``(B, d_t, H, W)`` features and the share of cell patches kept.

        """
        c = self.config.image_channels
        if self.config.feature_channels:
            f_tissue = self.tissue(F.avg_pool2d(image[:, c:], self.config.image_per_hr))
        else:
            f_tissue = self.tissue(image)
        image = image[:, :c]
        if not self.config.hierarchical:
            return f_tissue, 0.0
        patches, _, keep = self.curriculum(image, progress)
        b, m = patches.shape[:2]
        # Dropped patches are masked in attention; encoding all keeps shapes static (no per-sample loops).
        f_cell = self.cell(patches.flatten(0, 1)).reshape(b, m, -1)
        q = curriculum_quantile(progress, self.config.curriculum_start, self.config.curriculum_end)
        return self.attention(f_tissue, f_cell, keep), n_kept(m, q) / m

    def curriculum(self, image: Tensor, progress: float) -> tuple[Tensor, Tensor, Tensor]:
        """Cell-level patches, their entropies and the curriculum's keep mask at training ``progress``.

        Returns
        -------
        ``(patches, entropy, keep)``: ``(B, M, C, P, P)``, ``(B, M)`` in bits and ``(B, M)`` boolean.

        """
        cfg = self.config
        patches = extract_patches(image, cfg.cell_patch_px, cfg.cell_grid)
        entropy = patch_entropy(patches)
        keep = select_patches(entropy, curriculum_quantile(progress, cfg.curriculum_start, cfg.curriculum_end))
        return patches, entropy, keep
