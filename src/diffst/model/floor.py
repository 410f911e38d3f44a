"""The image floor: a training-free, image-aware disaggregation of LR counts (pure torch, no SpatialData).

Within each LR pixel, counts are spread over its HR pixels in proportion to the bicubic up-sampling of the LR maps
times an image-derived *density* (the square root of the mean nuclear signal of each HR pixel: DAPI for
fluorescence, haematoxylin from colour deconvolution for H&E). Each LR pixel then keeps exactly its counts. Cells
carry transcripts and nuclei mark cells, so the density says *where inside the LR pixel* the counts most likely are;
the bicubic factor keeps the smooth trend between neighbouring LR pixels. No parameter is fitted.

The *fitted* floor (the model's ``base="fitted"``) lets each gene weigh every stain of the image: its density is
``Π_k signal_k^γ_gk`` over the stains (the fluorescence channels; haematoxylin and eosin of H&E), with per-gene
exponents chosen on the training tiles by :func:`fit_stain_exponents` (the training-free floor is
``γ = ½`` on the nuclear stain and 0 elsewhere). A total-RNA stain such as MERFISH's polyT says more about where
transcripts are than DAPI does; a gene of the extracellular matrix may follow eosin.

The SpatialData side (:func:`diffst.tl.upsample` with ``method="image"``) computes the nuclear signal of the slide
and finishes with the data's exact degradation operator; here the block rescaling is the sum-pooling (``bin``)
one, which is what validation inside training uses.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "default_exponents",
    "density_weights",
    "fit_stain_exponents",
    "floor_model_units",
    "hr_signal",
    "hr_stains",
    "image_floor",
    "nuclear_channel",
    "nuclear_signal",
    "stain_candidates",
    "stain_signals",
]

#: Exponent values tried per stain by :func:`fit_stain_exponents` (at most two stains non-zero at a time).
EXPONENTS = (0.0, 0.25, 0.5, 1.0)
#: Stain signal below which a pixel counts as unstained in the fitted density (signals are in [0, 1]).
_TINY = 1e-6

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
        return _hed(image, 1)
    return image[:, channel : channel + 1].clamp_min(0.0)


def _hed(image: Tensor, n: int) -> Tensor:
    """The first ``n`` stains (haematoxylin, eosin, DAB) of RGB crops by colour deconvolution, non-negative."""
    rgb = image[:, :3].clamp_min(1e-6)
    od = torch.log(rgb) / np.log(1e-6)  # optical density as rgb2hed scales it
    hed = torch.einsum("bchw,cd->bdhw", od.double(), torch.from_numpy(_HED_FROM_RGB).to(od.device))
    return hed[:, :n].clamp_min(0.0).to(image.dtype)


def hr_signal(image: Tensor, kind: str, per_hr: int, channel: int = 0) -> Tensor:
    """Mean nuclear signal of each HR pixel: :func:`nuclear_signal` average-pooled ``per_hr × per_hr``."""
    return F.avg_pool2d(nuclear_signal(image, kind, channel), per_hr)


def stain_signals(image: Tensor, kind: str, n_channels: int | None = None) -> Tensor:
    """Every stain of image crops ``(B, C, H, W)`` in [0, 1] → ``(B, K, H, W)``, non-negative.

    ``kind="rgb"``: haematoxylin and eosin by colour deconvolution (K = 2); ``"fluorescence"``: the first
    ``n_channels`` channels (all by default; extra channels, such as image features, are left out).
    """
    if kind == "rgb" and image.shape[1] >= 3:
        return _hed(image, 2)
    return image[:, :n_channels].clamp_min(0.0)


def hr_stains(image: Tensor, kind: str, per_hr: int, n_channels: int | None = None) -> Tensor:
    """Mean of every stain over each HR pixel: :func:`stain_signals` average-pooled ``per_hr × per_hr``."""
    return F.avg_pool2d(stain_signals(image, kind, n_channels), per_hr)


def density_weights(signal: Tensor, scale: int, exponents: Tensor | None = None) -> Tensor:
    """A density normalised to mean 1 inside every LR pixel (``scale × scale`` HR pixels); flat where empty.

    Without ``exponents``: ``sqrt(signal)`` of the nuclear signal ``(B, 1, H, W)``. With ``exponents`` ``(G, K)``: per
    gene ``Π_k signal_k^γ_gk`` of the stains ``(B, K, H, W)`` (``hr_stains``), ``(B, G, H, W)``.
    """
    if exponents is None:
        d = signal.clamp_min(0.0).sqrt()
    else:
        log_s = signal.clamp_min(_TINY).log()
        d = torch.einsum("bkhw,gk->bghw", log_s, exponents.to(log_s)).exp()
        # an unstained pixel (every stain the gene weighs below _TINY) gets no share, as with the sqrt density
        weighed = (exponents > 0).to(log_s)
        stained = torch.einsum("bkhw,gk->bghw", (signal > _TINY).to(log_s), weighed) >= weighed.sum(1).view(1, -1, 1, 1)
        d = torch.where(stained, d, torch.zeros_like(d))
    block = F.avg_pool2d(d, scale)
    up = F.interpolate(block, scale_factor=scale, mode="nearest")
    return torch.where(up > 0, d / up.clamp_min(1e-12), torch.ones_like(d))


def image_floor(
    base: Tensor, lr_total: Tensor, observed: Tensor, signal: Tensor, scale: int, exponents: Tensor | None = None
) -> Tensor:
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
        ``(B, 1, H, W)`` nuclear signal per HR pixel (:func:`hr_signal`), or with ``exponents`` the stains
        ``(B, K, H, W)`` (``hr_stains``).
    scale
        SR factor.
    exponents
        ``(G, K)`` per-gene stain exponents of the fitted floor (``density_weights``); ``None``: the floor.

    Returns
    -------
    ``(B, G, H, W)`` non-negative counts whose ``scale × scale`` sums equal ``lr_total`` where observed.

    """
    d = density_weights(signal, scale, exponents)
    shaped = base.clamp_min(0.0) * d
    sums = F.avg_pool2d(shaped, scale) * scale * scale
    ratio = torch.where(sums > 0, lr_total / sums.clamp_min(1e-12), torch.zeros_like(sums))
    # a block the shaped map left empty but that has counts: spread them by the density alone
    flat = lr_total / (scale * scale)
    fill = torch.where(_up(sums, scale) > 0, shaped * _up(ratio, scale), _up(flat, scale) * d)
    return torch.where(_up(observed.to(base.dtype).expand_as(lr_total), scale) > 0, fill, shaped)


def floor_model_units(
    lr: Tensor,
    mask: Tensor,
    image: Tensor,
    *,
    scale: int,
    per_hr: int,
    gene_scale: Tensor,
    kind: str,
    channel: int = 0,
    exponents: Tensor | None = None,
) -> Tensor:
    """The image floor of model-input windows, in model units (``2·log1p(c)/s_g − 1``, see ``diffst._normalise``).

    ``lr`` ``(B, G, h, w)`` and ``mask`` ``(B, 1, h, w)`` as the network takes them, ``image`` ``(B, C, H·per_hr, …)``
    in [0, 1], ``gene_scale`` ``(G,)`` or one row per window ``(B, G)``; LR pixels are rescaled by sum-pooling (exact for ``bin`` data, the extrapolated spot total for spots).
    ``exponents`` ``(G, K)``: the fitted floor over the ``K`` stains of the image (:func:`fit_stain_exponents`).
    """
    if exponents is None:
        signal = hr_signal(image, kind, per_hr, channel)
    else:
        signal = hr_stains(image, kind, per_hr, exponents.shape[1] if kind != "rgb" else None)
    return _floor_units(_counts_in(lr, mask, scale, gene_scale), signal, scale, exponents)


def per_gene(gene_scale: Tensor, like: Tensor) -> Tensor:
    """A per-gene scale ``(G,)`` (every window) or ``(B, G)`` (one row per window) as ``(1 or B, G, 1, 1)``."""
    s_g = torch.as_tensor(gene_scale).to(like)
    return s_g.reshape(1, -1, 1, 1) if s_g.ndim == 1 else s_g.reshape(s_g.shape[0], -1, 1, 1)


def _counts_in(lr: Tensor, mask: Tensor, scale: int, gene_scale: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The floor's inputs from model-input windows, besides the image.

    The bicubic base and the LR totals in counts, the observed LR pixels and the per-gene scale ``(1, G, 1, 1)``.
    """
    from .upsample import upsample_lr

    s_g = per_gene(gene_scale, lr)

    def counts(x: Tensor) -> Tensor:
        return torch.expm1((x + 1.0) * 0.5 * s_g).clamp_min(0.0)

    observed = (mask > 0).to(lr.dtype)
    return counts(upsample_lr(lr, mask, scale)), counts(lr) * (scale * scale) * observed, observed, s_g


def _floor_units(inputs: tuple[Tensor, Tensor, Tensor, Tensor], signal: Tensor, scale: int,
                 exponents: Tensor | None) -> Tensor:  # fmt: skip
    base, total, observed, s_g = inputs
    floor = image_floor(base, total, observed, signal, scale, exponents)
    return 2.0 * torch.log1p(floor) / s_g - 1.0


def default_exponents(n_genes: int, n_stains: int, kind: str, channel: int = 0) -> Tensor:
    """The training-free floor as stain exponents ``(G, K)``: ``½`` on the nuclear stain, 0 on the others."""
    ex = torch.zeros(n_genes, n_stains)
    ex[:, 0 if kind == "rgb" else channel] = 0.5
    return ex


#: Above this many stains, only pairs that include the nuclear stain are tried (a 20-channel IF image gives 232
#: candidates instead of 1771).
MAX_ALL_PAIRS = 4


def stain_candidates(n_stains: int, nuclear: int = 0) -> Tensor:
    """Exponent vectors ``(N, K)`` tried per gene: each stain at :data:`EXPONENTS`, at most two stains non-zero.

    With more than :data:`MAX_ALL_PAIRS` stains, a pair always includes the ``nuclear`` one.
    """
    import itertools

    rows = {tuple([0.0] * n_stains)}
    pairs = list(itertools.combinations(range(n_stains), min(2, n_stains)))
    if n_stains > MAX_ALL_PAIRS:
        pairs = [p for p in pairs if nuclear in p]
    for pair in pairs:
        for values in itertools.product(EXPONENTS, repeat=len(pair)):
            row = [0.0] * n_stains
            for k, v in zip(pair, values, strict=True):
                row[k] = v
            rows.add(tuple(row))
    return torch.tensor(sorted(rows))


def fit_stain_exponents(
    x0: Tensor,
    lr: Tensor,
    mask: Tensor,
    image: Tensor,
    *,
    scale: int,
    per_hr: int,
    gene_scale: Tensor,
    kind: str,
    n_stains: int,
    channel: int = 0,
    margin: float = 0.005,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-gene stain exponents of the fitted floor, chosen on training windows.

    Every candidate of ``stain_candidates`` is scored per gene by the Pearson correlation of its floor with the
    truth ``x0`` (model units, ``(B, G, H, W)``) over the observed HR pixels of the windows. A gene takes the best
    candidate only where it beats the training-free floor (``default_exponents``) by more than ``margin``;
    otherwise it keeps the floor's exponents, so little or noisy training data changes nothing.

    ``n_stains``: 2 for H&E (haematoxylin, eosin), the image's channels for fluorescence (not its feature
    channels). Returns the exponents ``(G, K)`` and the per-gene PCC of the floor (``"floor"``) and of the chosen
    exponents (``"fitted"``) on these windows.
    """
    g = x0.shape[1]
    observed = F.interpolate((mask > 0).to(x0.dtype), scale_factor=scale, mode="nearest")[:, 0] > 0
    truth = x0.permute(1, 0, 2, 3)[:, observed]  # (G, pixels)

    # the LR inputs and the stains do not depend on the exponents: computed once for every candidate
    inputs = _counts_in(lr, mask, scale, gene_scale)
    stains = hr_stains(image, kind, per_hr, n_stains if kind != "rgb" else None)

    def pcc(ex: Tensor) -> Tensor:
        pred = _floor_units(inputs, stains, scale, ex).permute(1, 0, 2, 3)[:, observed]
        p = pred - pred.mean(1, keepdim=True)
        t = truth - truth.mean(1, keepdim=True)
        den = (p.square().sum(1) * t.square().sum(1)).sqrt()
        return torch.where(den > 0, (p * t).sum(1) / den.clamp_min(1e-12), torch.full_like(den, float("nan")))

    floor_ex = default_exponents(g, n_stains, kind, channel)
    with torch.no_grad():
        base = pcc(floor_ex)
        cands = stain_candidates(n_stains, 0 if kind == "rgb" else channel)
        scores = torch.stack([pcc(c.expand(g, -1)) for c in cands])  # (N, G)
    best = torch.nan_to_num(scores, nan=-2.0).argmax(0)
    best_score = scores[best, torch.arange(g)]
    better = torch.nan_to_num(best_score - base, nan=0.0) > margin
    exponents = torch.where(better[:, None], cands[best], floor_ex)
    return exponents, {"floor": base, "fitted": torch.where(better, best_score, base)}


def _up(t: Tensor, scale: int) -> Tensor:
    return F.interpolate(t, scale_factor=scale, mode="nearest")
