"""The image floor: a training-free, image-aware disaggregation of LR counts (pure torch, no SpatialData).

Within each LR pixel, counts are spread over its HR pixels in proportion to the bicubic up-sampling of the LR maps
times an image-derived *density* (the square root of the mean nuclear signal of each HR pixel: DAPI for
fluorescence, haematoxylin from colour deconvolution for H&E). Each LR pixel then keeps exactly its counts. Cells
carry transcripts and nuclei mark cells, so the density says *where inside the LR pixel* the counts most likely are;
the bicubic factor keeps the smooth trend between neighbouring LR pixels. No parameter is fitted.

The SpatialData side (:func:`diffst.tl.upsample` with ``method="image"``) computes the nuclear signal of the slide
and finishes with the data's exact degradation operator; here the block rescaling is the sum-pooling (``bin``)
one, which is what validation inside training uses.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["density_weights", "floor_model_units", "hr_signal", "image_floor", "nuclear_channel", "nuclear_signal"]

#: Names (lower case, substrings) of fluorescence channels that stain nuclei.
NUCLEAR_NAMES = ("dapi", "hoechst", "nucle", "dna", "draq", "sytox", "h3342")

# Ruifrok & Johnston's H&E-DAB stain vectors, as in ``skimage.color.rgb2hed`` (rows: haematoxylin, eosin, DAB).
_RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_HED_FROM_RGB = np.linalg.inv(_RGB_FROM_HED)


def nuclear_channel(channels: list[str] | tuple[str, ...]) -> int:
    """Index of the nuclear channel of a fluorescence image: the first whose name looks like DAPI/Hoechst, else 0."""
    for i, name in enumerate(channels):
        if any(tag in str(name).lower() for tag in NUCLEAR_NAMES):
            return i
    return 0


def nuclear_signal(image: Tensor, kind: str, channel: int = 0) -> Tensor:
    """Per-pixel nuclear stain of image crops ``(B, C, H, W)`` in [0, 1] → ``(B, 1, H, W)``, non-negative.

    ``kind="rgb"`` (H&E): the haematoxylin optical density of colour deconvolution (``skimage.color.rgb2hed``'s
    stain matrix; white background gives 0). ``kind="fluorescence"``: the intensity of channel ``channel``.
    """
    if kind == "rgb" and image.shape[1] >= 3:
        rgb = image[:, :3].clamp_min(1e-6)
        od = torch.log(rgb) / np.log(1e-6)  # optical density as rgb2hed scales it
        hed = torch.einsum("bchw,cd->bdhw", od.double(), torch.from_numpy(_HED_FROM_RGB).to(od.device))
        return hed[:, :1].clamp_min(0.0).to(image.dtype)
    return image[:, channel : channel + 1].clamp_min(0.0)


def hr_signal(image: Tensor, kind: str, per_hr: int, channel: int = 0) -> Tensor:
    """Mean nuclear signal of each HR pixel: :func:`nuclear_signal` average-pooled ``per_hr × per_hr``."""
    return F.avg_pool2d(nuclear_signal(image, kind, channel), per_hr)


def density_weights(signal: Tensor, scale: int) -> Tensor:
    """``sqrt(signal)`` normalised to mean 1 inside every LR pixel (``scale × scale`` HR pixels); flat where empty."""
    d = signal.clamp_min(0.0).sqrt()
    block = F.avg_pool2d(d, scale)
    up = F.interpolate(block, scale_factor=scale, mode="nearest")
    return torch.where(up > 0, d / up.clamp_min(1e-12), torch.ones_like(d))


def image_floor(base: Tensor, lr_total: Tensor, observed: Tensor, signal: Tensor, scale: int) -> Tensor:
    """The image floor in counts per HR pixel.

    Parameters
    ----------
    base
        ``(B, G, H, W)`` bicubic up-sampling in expected counts per HR pixel (non-negative).
    lr_total
        ``(B, G, h, w)`` counts each LR pixel must keep (its measured counts over the full LR-pixel area).
    observed
        ``(B, 1, h, w)`` whether each LR pixel was measured; unobserved ones keep ``base × density``.
    signal
        ``(B, 1, H, W)`` nuclear signal per HR pixel (:func:`hr_signal`).
    scale
        SR factor.

    Returns
    -------
    ``(B, G, H, W)`` non-negative counts whose ``scale × scale`` sums equal ``lr_total`` where observed.

    """
    shaped = base.clamp_min(0.0) * density_weights(signal, scale)
    sums = F.avg_pool2d(shaped, scale) * scale * scale
    ratio = torch.where(sums > 0, lr_total / sums.clamp_min(1e-12), torch.zeros_like(sums))
    # a block the shaped map left empty but that has counts: spread them by the density alone
    flat = lr_total / (scale * scale)
    d = density_weights(signal, scale)
    fill = torch.where(_up(sums, scale) > 0, shaped * _up(ratio, scale), _up(flat, scale) * d)
    return torch.where(_up(observed.to(base.dtype).expand_as(lr_total), scale) > 0, fill, shaped)


def floor_model_units(
    lr: Tensor, mask: Tensor, image: Tensor, *, scale: int, per_hr: int, gene_scale: Tensor, kind: str, channel: int = 0
) -> Tensor:
    """The image floor of model-input windows, in model units (``2·log1p(c)/s_g − 1``, see ``diffst._normalise``).

    ``lr`` ``(B, G, h, w)`` and ``mask`` ``(B, 1, h, w)`` as the network takes them, ``image`` ``(B, C, H·per_hr, …)``
    in [0, 1]; LR pixels are rescaled by sum-pooling (exact for ``bin`` data, the extrapolated spot total for spots).
    """
    from .upsample import upsample_lr

    s_g = gene_scale.reshape(1, -1, 1, 1).to(lr)

    def counts(x: Tensor) -> Tensor:
        return torch.expm1((x + 1.0) * 0.5 * s_g).clamp_min(0.0)

    observed = (mask > 0).to(lr.dtype)
    base = counts(upsample_lr(lr, mask, scale))
    total = counts(lr) * (scale * scale) * observed
    floor = image_floor(base, total, observed, hr_signal(image, kind, per_hr, channel), scale)
    return 2.0 * torch.log1p(floor) / s_g - 1.0


def _up(t: Tensor, scale: int) -> Tensor:
    return F.interpolate(t, scale_factor=scale, mode="nearest")
