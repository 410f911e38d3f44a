"""What every image encoder offers: crops of the slide at its µm per pixel → one feature vector per HR pixel."""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod

import numpy as np


class ImageEncoder(ABC):
    """An image encoder for :func:`diffst.pp.image_features` (no SpatialData: crops in, HR feature maps out).

    Attributes
    ----------
    name
        The spec it was made from (``"stain"``, ``"timm:<model>"``); saved with models and prepared data.
    um_per_px
        µm per image pixel of the crops it reads (its training resolution for a pretrained network).
    dim
        Features per HR pixel before any reduction.
    context_um
        Context, in µm, each crop needs beyond the HR pixels it encodes (filters, receptive fields).

    """

    name: str
    um_per_px: float
    dim: int
    context_um: float = 0.0

    @abstractmethod
    def encode(self, crops: np.ndarray, per_hr: int) -> np.ndarray:
        """Crops ``(B, C, H, W)`` in [0, 1], ``H`` and ``W`` multiples of ``per_hr`` → ``(B, dim, H/per_hr, W/per_hr)``.

        ``per_hr`` is image pixels per HR pixel side: feature pixel ``(i, j)`` describes image pixels
        ``[i·per_hr, (i+1)·per_hr) × [j·per_hr, (j+1)·per_hr)``.
        """

    def fingerprint(self) -> str:
        """A short hash of what makes this encoder's features what they are (weights, parameters), µm/px apart."""
        what = {k: v for k, v in self.describe().items() if k != "um_per_px"}
        return hashlib.sha256(repr(sorted(what.items())).encode()).hexdigest()[:16]

    def describe(self) -> dict:
        """The encoder's identity as saved in ``sdata.attrs`` and in models."""
        return {"name": self.name, "um_per_px": float(self.um_per_px), "dim": int(self.dim)}


def weights_hash(state_dict: dict) -> str:
    """SHA-256 (first 16 hex digits) of a model's parameters and buffers, in key order."""
    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key]
        h.update(key.encode())
        if hasattr(t, "detach"):  # a torch tensor; numpy has no bfloat16
            t = t.detach().cpu().contiguous()
            t = t.float() if str(t.dtype) == "torch.bfloat16" else t
        h.update(np.ascontiguousarray(np.asarray(t)).tobytes())
    return h.hexdigest()[:16]
