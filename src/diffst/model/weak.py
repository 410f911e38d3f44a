"""Learning from the LR measurement alone: hidden spots, the degradation on a window, leave-spots-out prediction.

A Visium slide without matched HR data only says how many counts each spot captured. A model that sees a spot's
counts can reproduce them with any arrangement inside the disc, so its own counts teach it nothing about sub-spot
detail. Here the model never sees the counts it is scored on:

- **training** (:func:`hide`, :func:`spot_means`, :func:`weak_loss`): each window hides a random share of its
  observed LR pixels (with all their spots) from the input, and the mean head's HR map, degraded through the data's
  operator (disc footprints for spots, sum-pooling for bins), must reproduce the hidden spots' counts. The map is a
  function of the image and of the *other* spots, applied the same way in every HR pixel, so what it learns to
  predict a hidden spot's total from (nuclear density, morphology, neighbours) is what places counts inside a spot;
- **prediction** (:func:`leave_out`): the window's LR pixels are split at random into two groups; each HR pixel takes
  the map computed while its own spot's group was hidden, exactly as in training. Several random splits give several
  maps; their mean is the estimate and their spread the uncertainty (how much the map depends on which spots it is
  shown). LR consistency (``SpotDegradation.project``) then restores each spot's counts.

All tensors follow the network's layout: HR ``(B, ·, H, W)``, LR ``(B, ·, h, w)``, ``H = scale · h``. A window's
footprint is ``foot`` ``(B, 1, H, W)`` (the weight each HR pixel enters its spot with) and ``offset``
``(B, 2, H, W)`` (LR row and column of that spot's pixel minus the HR pixel's own), from
``SpotDegradation.footprint``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from .floor import floor_model_units, per_gene
from .upsample import upsample_lr

if TYPE_CHECKING:
    from .diffusion import Diffusion

__all__ = [
    "heldout",
    "hide_context",
    "hidden_input",
    "hide",
    "predictors",
    "key_pixel",
    "leave_out",
    "spot_means",
    "to_counts",
    "to_units",
    "weak_loss",
    "whole",
]


def to_counts(x: Tensor, gene_scale: Tensor) -> Tensor:
    """Model units → counts per HR pixel (differentiable; ``diffst._normalise.to_counts`` in torch)."""
    return torch.expm1((x + 1.0) * 0.5 * per_gene(gene_scale, x)).clamp_min(0.0)


def to_units(counts: Tensor, gene_scale: Tensor) -> Tensor:
    """Counts per HR pixel → model units (``diffst._normalise.to_model_units`` in torch)."""
    return 2.0 * torch.log1p(counts.clamp_min(0.0)) / per_gene(gene_scale, counts) - 1.0


def key_pixel(foot: Tensor, offset: Tensor, scale: int) -> Tensor:
    """Window-local LR index ``(B, H, W)`` (``row · w + col``) each HR pixel is scored in.

    An HR pixel inside a spot belongs to the LR pixel its spot is laid on (when that lies in the window); every other
    HR pixel to the LR pixel containing it (:func:`leave_out` uses this to pick its map; :func:`spot_means` counts
    only pixels inside spots).
    """
    b, _, hh, ww = foot.shape
    h, w = hh // scale, ww // scale
    rows = (torch.arange(hh, device=foot.device) // scale).reshape(1, -1, 1) + offset[:, 0].round().long()
    cols = (torch.arange(ww, device=foot.device) // scale).reshape(1, 1, -1) + offset[:, 1].round().long()
    inside = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
    own = (torch.arange(hh, device=foot.device) // scale).reshape(1, -1, 1) * w + (
        torch.arange(ww, device=foot.device) // scale
    ).reshape(1, 1, -1)
    return torch.where(inside, rows * w + cols, own.expand(b, hh, ww))


def spot_means(counts: Tensor, foot: Tensor, offset: Tensor, scale: int) -> tuple[Tensor, Tensor]:
    """Counts per HR pixel of each LR pixel's spots, as the degradation sees them, and the footprint inside the window.

    Returns ``means`` ``(B, G, h, w)`` (``Σ foot · counts / Σ foot`` over the HR pixels owned by each LR pixel, 0
    where it owns none) and ``weight`` ``(B, 1, h, w)`` (that ``Σ foot``: the LR pixel's footprint is whole in the
    window when this equals its area ``coverage · scale²``).
    """
    b, g, hh, ww = counts.shape
    h, w = hh // scale, ww // scale
    index = key_pixel(foot, offset, scale).reshape(b, 1, -1)
    f = foot.reshape(b, 1, -1)
    total = torch.zeros((b, g, h * w), device=counts.device, dtype=counts.dtype)
    total = total.scatter_add(2, index.expand(b, g, -1), (counts.reshape(b, g, -1) * f).to(counts.dtype))
    weight = torch.zeros((b, 1, h * w), device=counts.device, dtype=foot.dtype).scatter_add(2, index, f)
    means = total / weight.clamp_min(1e-12).to(total)
    return means.reshape(b, g, h, w), weight.reshape(b, 1, h, w)


def whole(weight: Tensor, area: Tensor) -> Tensor:
    """LR pixels ``(B, 1, h, w)`` measured (``area > 0``) whose whole footprint lies in the window."""
    return (area > 0) & (weight >= area * (1.0 - 1e-3))


def hide(mask: Tensor, fraction: float, generator: torch.Generator | None = None) -> Tensor:
    """A random share ``fraction`` of the observed LR pixels ``(B, 1, h, w)`` (bool), drawn independently per pixel."""
    device = generator.device if generator is not None else mask.device
    u = torch.rand(mask.shape, generator=generator, device=device).to(mask.device)
    return (u < fraction) & (mask > 0)


def hidden_input(lr: Tensor, mask: Tensor, hidden: Tensor) -> tuple[Tensor, Tensor]:
    """The LR input and mask with the ``hidden`` pixels made unobserved (−1 and 0, as unmeasured pixels are)."""
    return torch.where(hidden, torch.full_like(lr, -1.0), lr), torch.where(hidden, torch.zeros_like(mask), mask)


def weak_loss(
    pred: Tensor, lr: Tensor, hidden: Tensor, foot: Tensor, offset: Tensor, area: Tensor, gene_scale: Tensor,
    scale: int,
) -> Tensor:  # fmt: skip
    """MSE, in model units, between the hidden spots' counts and the map's degradation, over whole hidden spots.

    ``pred`` is the HR map ``(B, G, H, W)`` in model units, ``lr`` the LR maps *before* hiding (model units of counts
    per HR pixel: what the spots measured). Both sides are compared as ``2·log1p(mean counts per HR pixel)/s_g − 1``,
    the scale the HR loss uses, so genes weigh alike and a few very high spots do not dominate. Zero when no hidden
    spot is whole in the window.
    """
    means, weight = spot_means(to_counts(pred.float(), gene_scale), foot, offset, scale)
    keep = (hidden & whole(weight, area)).to(pred.dtype)
    err = (to_units(means, gene_scale) - lr).square() * keep
    return err.sum() / (keep.sum() * pred.shape[1]).clamp_min(1.0)


def leave_out(
    predict: Callable[[Tensor, Tensor], Tensor],
    lr: Tensor,
    mask: Tensor,
    foot: Tensor,
    offset: Tensor,
    scale: int,
    group: Tensor,
) -> Tensor:
    """The map in which every HR pixel was predicted with its own spot hidden.

    ``predict(lr, mask)`` returns HR maps ``(B, G, H, W)``; ``group`` ``(B, 1, h, w)`` (bool) splits the LR pixels in
    two. ``predict`` runs twice, hiding each group in turn; an HR pixel takes the run that hid the LR pixel it is
    scored in (:func:`key_pixel`).
    """
    observed = mask > 0
    runs = [predict(*hidden_input(lr, mask, side & observed)) for side in (group, ~group)]
    b, _, hh, ww = foot.shape
    key = key_pixel(foot, offset, scale).reshape(b, 1, -1)
    flat = group.reshape(b, 1, -1)
    in_first = torch.gather(flat, 2, key).reshape(b, 1, hh, ww)
    return torch.where(in_first, runs[0], runs[1])


def heldout(
    predict: Callable[[Tensor, Tensor], Tensor],
    lr: Tensor,
    mask: Tensor,
    foot: Tensor,
    offset: Tensor,
    area: Tensor,
    gene_scale: Tensor,
    scale: int,
    group: Tensor,
) -> tuple[Tensor, Tensor]:
    """Each whole spot of the windows predicted while hidden: ``(predicted, measured)``, model units, ``(G, spots)``.

    ``predict(lr, mask)`` returns HR maps in model units; its :func:`leave_out` map is degraded with the footprints
    and compared with ``lr`` (the measured spots, model units) at the LR pixels whose footprint is whole.
    """
    hr = leave_out(predict, lr, mask, foot, offset, scale, group)
    means, weight = spot_means(to_counts(hr.float(), gene_scale), foot, offset, scale)
    keep = whole(weight, area)[:, 0]
    pred = to_units(means, gene_scale).transpose(0, 1)[:, keep]
    return pred, lr.transpose(0, 1)[:, keep]


def hide_context(context: Tensor | None, mask: Tensor) -> Tensor | None:
    """Panel-context maps with the LR pixels the mask leaves unobserved (hidden spots among them) set to −1."""
    return None if context is None else torch.where(mask > 0, context, torch.full_like(context, -1.0))


def predictors(
    diffusion: Diffusion, net: nn.Module, image: Tensor, gene_scale: Tensor | None = None,
    context: Tensor | None = None,
) -> dict[str, Callable[[Tensor, Tensor], Tensor]]:  # fmt: skip
    """``predict(lr, mask)`` of the model's mean head, bicubic, nearest and the image floor on windows of ``image``.

    Keys ``""``, ``"_bicubic"``, ``"_nearest"``, ``"_floor"``: the names the validation metrics carry
    (``val_pcc_floor`` …). ``"_nearest"`` gives each hidden spot the level of its nearest measured neighbours.
    """
    c = diffusion.config
    scale = diffusion.scale_of(gene_scale)

    def floor(lr: Tensor, mask: Tensor) -> Tensor:
        return floor_model_units(lr, mask, image, scale=c.scale, per_hr=c.image_per_hr,
                                 gene_scale=scale.to(lr), kind=c.image_kind, channel=c.nuclear_channel)  # fmt: skip

    return {
        "": lambda lr, mask: diffusion.predict_mean(
            net, lr, mask, image, gene_scale=gene_scale, context=hide_context(context, mask)
        ),  # fmt: skip
        "_bicubic": lambda lr, mask: upsample_lr(lr, mask, c.scale),
        "_nearest": lambda lr, mask: upsample_lr(lr, mask, c.scale, mode="nearest"),
        "_floor": floor,
    }
