"""The weight-free encoder: stain, nuclear and texture features at several scales, with no download."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ..model.floor import _HED_FROM_RGB
from ._encoder import ImageEncoder

#: Gaussian scales (σ, in HR pixels) at which the stain maps are also described.
SIGMAS = (1.0, 2.0, 4.0)


def _pool(x: np.ndarray, k: int) -> np.ndarray:
    """Mean over ``k × k`` blocks of the last two axes."""
    *lead, h, w = x.shape
    return x.reshape(*lead, h // k, k, w // k, k).mean(axis=(-3, -1))


class StainEncoder(ImageEncoder):
    """Features a pathologist's eye starts from, computed per HR pixel with no learned weights.

    For H&E (``kind="rgb"``): the haematoxylin and eosin optical densities of colour deconvolution (Ruifrok &
    Johnston's stain vectors, as :func:`skimage.color.rgb2hed`; haematoxylin marks nuclei, so its mean is the nuclear
    density the image floor uses), darkness (1 − brightness), the within-pixel standard deviation of haematoxylin and of
    brightness (nuclear texture, chromatin) and the mean gradient magnitude (edges, cell boundaries); then the four
    stain maps (haematoxylin, eosin, darkness, gradient) smoothed at σ = 1, 2 and 4 HR pixels (tissue context).
    18 features. For fluorescence (``kind="fluorescence"``): per channel, its mean, within-pixel standard deviation
    and gradient, and the mean smoothed at the three scales: 6 per channel.

    Parameters
    ----------
    kind
        ``"rgb"`` (brightfield, H&E) or ``"fluorescence"``.
    n_channels
        Image channels (fluorescence); RGB reads the first three.
    um_per_px
        µm per image pixel read (1 µm resolves nuclei, 6–10 µm across, and keeps extraction fast).
    hr_um
        HR pixel side, which sets the smoothing scales in µm.

    """

    def __init__(self, kind: str = "rgb", n_channels: int = 3, um_per_px: float = 1.0, hr_um: float = 10.0):
        if kind not in ("rgb", "fluorescence"):
            msg = f"`kind` must be 'rgb' or 'fluorescence'; got {kind!r}."
            raise ValueError(msg)
        self.kind, self.n_channels = kind, int(n_channels)
        self.name, self.um_per_px, self.hr_um = "stain", float(um_per_px), float(hr_um)
        self.dim = 18 if kind == "rgb" else 6 * self.n_channels
        # 3 σ of the largest smoothing, in µm: crops carry that much context on each side
        self.context_um = 3.0 * max(SIGMAS) * self.hr_um

    def describe(self) -> dict:
        return {**super().describe(), "kind": self.kind, "n_channels": self.n_channels, "hr_um": self.hr_um,
                "sigmas_hr": list(SIGMAS)}  # fmt: skip

    def encode(self, crops: np.ndarray, per_hr: int) -> np.ndarray:
        return np.stack([self._one(np.asarray(c, dtype=np.float32), per_hr) for c in crops])

    def _one(self, crop: np.ndarray, k: int) -> np.ndarray:
        if self.kind == "rgb":
            rgb = np.clip(crop[:3] if crop.shape[0] >= 3 else np.repeat(crop[:1], 3, axis=0), 1e-6, 1.0)
            od = np.log(rgb) / np.log(1e-6)  # optical density as rgb2hed scales it
            hed = np.einsum("chw,cd->dhw", od, _HED_FROM_RGB.astype(np.float32))
            grey = rgb.mean(axis=0)
            maps = {"h": np.clip(hed[0], 0.0, None), "e": np.clip(hed[1], 0.0, None), "dark": 1.0 - grey}
            texture = {"h": maps["h"], "grey": grey}
            grad_of = grey
        else:
            channels = crop[: self.n_channels]
            maps = {f"c{i}": channels[i] for i in range(len(channels))}
            texture = maps
            grad_of = None
        means = {name: _pool(m, k) for name, m in maps.items()}
        feats = list(means.values())
        feats += [np.sqrt(np.clip(_pool(t * t, k) - (means[n] if n in means else _pool(t, k)) ** 2, 0.0, None))
                  for n, t in texture.items()]  # fmt: skip
        grads = [_pool(np.hypot(ndimage.sobel(g, 0), ndimage.sobel(g, 1)), k) for g in
                 ([grad_of] if grad_of is not None else list(maps.values()))]  # fmt: skip
        feats += grads
        smooth = list(means.values()) + (grads if self.kind == "rgb" else [])
        feats += [ndimage.gaussian_filter(m, s, mode="nearest") for s in SIGMAS for m in smooth]
        out = np.stack(feats).astype(np.float32)
        if self.kind == "fluorescence":  # group per channel: mean, std, grad, 3 smoothed means
            n = len(maps)
            order = [j for i in range(n) for j in (i, n + i, 2 * n + i, 3 * n + i, 4 * n + i, 5 * n + i)]
            out = out[order]
        return out
