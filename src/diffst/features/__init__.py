"""Image encoders that turn the tissue image into one feature vector per HR pixel (no SpatialData here).

:func:`diffst.pp.image_features` runs one over a prepared slide and stores the result; :func:`diffst.tl.train` with
``image_encoder=`` conditions the model on it. See :doc:`/encoders` for choosing one.
"""

from __future__ import annotations

from pathlib import Path

from ._encoder import ImageEncoder, weights_hash
from ._stain import StainEncoder
from ._timm import TimmEncoder

__all__ = ["ImageEncoder", "StainEncoder", "TimmEncoder", "make_encoder", "weights_hash"]

#: µm per image pixel each kind of encoder reads by default.
DEFAULT_UM_PER_PX = {"stain": 1.0, "timm": 0.5}


def is_encoder_spec(spec: object) -> bool:
    """Whether ``spec`` names an encoder :func:`make_encoder` makes: ``"stain"`` or ``"timm:<model name>"``."""
    return isinstance(spec, str) and (spec == "stain" or (spec.startswith("timm:") and len(spec) > 5))


def pixels_per_hr(hr_um: float, um_per_px: float) -> int:
    """Whole image pixels per HR pixel side at (about) ``um_per_px``; at least 1."""
    return max(1, int(round(hr_um / um_per_px)))


def make_encoder(
    spec: str,
    *,
    kind: str = "rgb",
    n_channels: int = 3,
    hr_um: float = 10.0,
    um_per_px: float | None = None,
    weights: str | Path | None = None,
    pretrained: bool = True,
    device: str | None = None,
    batch_size: int = 16,
    model_kwargs: dict | None = None,
) -> ImageEncoder:
    """The encoder a spec names: ``"stain"`` or ``"timm:<model name>"``.

    ``um_per_px`` is adjusted so that a whole number of image pixels spans an HR pixel of ``hr_um``.
    """
    if not is_encoder_spec(spec):
        msg = (
            f"Unknown image encoder {spec!r}: use 'learned' (the model's own, in `dst.tl.train`), 'stain' (weight-free) "
            "or 'timm:<model name>' (e.g. 'timm:vit_small_patch16_224', 'timm:hf-hub:MahmoodLab/UNI')."
        )
        raise ValueError(msg)
    family = "stain" if spec == "stain" else "timm"
    um = float(um_per_px) if um_per_px is not None else DEFAULT_UM_PER_PX[family]
    if not um > 0:
        msg = f"`um_per_px` must be positive; got {um_per_px!r}."
        raise ValueError(msg)
    um = hr_um / pixels_per_hr(hr_um, um)
    if family == "stain":
        if model_kwargs:
            msg = "`model_kwargs` apply to timm encoders only; the 'stain' encoder has no model."
            raise ValueError(msg)
        return StainEncoder(kind, n_channels=n_channels, um_per_px=um, hr_um=hr_um)
    return TimmEncoder(spec.removeprefix("timm:"), pretrained=pretrained, weights=weights, um_per_px=um, device=device,
                       batch_size=batch_size, model_kwargs=model_kwargs)  # fmt: skip
