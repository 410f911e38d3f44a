"""Image features once per slide: an encoder run over the prepared tiles, written as an HR-grid image element."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import _logging as log
from .._image import in_memory_level, read_tile
from .._store import ElementWriter
from ..features import ImageEncoder, make_encoder, pixels_per_hr

if TYPE_CHECKING:
    from spatialdata import SpatialData

#: Tiles whose features fit the standardisation and PCA, and pixels sampled from them.
FIT_TILES, FIT_PIXELS = 24, 200_000


def image_features(
    sdata: SpatialData,
    *,
    encoder: str | ImageEncoder = "stain",
    prepared_key: str = "diffst",
    key_added: str | None = None,
    n_components: int | None = 32,
    um_per_px: float | None = None,
    weights: str | Path | None = None,
    pretrained: bool = True,
    device: str | None = None,
    batch_size: int = 16,
    model_kwargs: dict[str, Any] | None = None,
    projection: dict[str, Any] | None = None,
    seed: int = 0,
    progress: bool | None = None,
    overwrite: bool = False,
) -> None:
    """Encode the slide's image once, on the prepared HR grid, for training and super-resolution to reuse.

    The encoder reads the image of the prepared data tile by tile at its own µm per pixel (with the context its
    filters need), gives one feature vector per HR pixel, and the features are standardised per channel and, when
    there are more than ``n_components``, reduced by a PCA fitted on a sample of the slide's tiles. The result is an
    image element on the HR grid (channels ``feature_0 …``, the prepared transformation, a multiscale pyramid when
    large), zero outside the prepared tiles, written to the zarr store of a backed SpatialData, so later sessions
    reuse it. :func:`diffst.tl.train` with ``image_encoder=`` conditions the model on it.

    Parameters
    ----------
    sdata
        SpatialData prepared with :func:`diffst.pp.prepare`.
    encoder
        ``"stain"``: the weight-free encoder (:class:`diffst.features.StainEncoder`: haematoxylin, eosin, nuclear
        texture and gradients at several scales for H&E; intensity and texture per channel for fluorescence; no
        download). ``"timm:<model>"``: any timm model (:class:`diffst.features.TimmEncoder`), e.g.
        ``"timm:hf-hub:MahmoodLab/UNI"``, with pretrained weights from the Hugging Face hub, or from ``weights``
        offline. Or an :class:`diffst.features.ImageEncoder`. See :doc:`/encoders`.
    prepared_key
        The key of the prepared data (``key_added`` of :func:`diffst.pp.prepare`).
    key_added
        Name of the feature element (default ``"{prepared_key}_features"``).
    n_components
        Features kept (PCA); ``None`` keeps all.
    um_per_px
        µm per image pixel the encoder reads (default: 1 µm for ``"stain"``, 0.5 µm, i.e. 20×, for timm models),
        adjusted so a whole number of pixels spans an HR pixel.
    weights
        A local weights file for a timm model (offline machines).
    pretrained
        Load a timm model's pretrained weights (``False``: random weights, for tests).
    device
        Where a timm model runs (default: CUDA when available).
    batch_size
        Model inputs per forward pass of a timm model.
    model_kwargs
        Passed to ``timm.create_model`` (the architecture arguments a model card gives, ``pretrained_cfg_overlay``).
    projection
        A fitted standardisation and PCA to apply instead of fitting one on this slide (a trained model's
        ``model.info["image_features"]["projection"]``, so features mean the same on a new slide).
    seed
        Seed of the tiles sampled for the fit.
    progress
        Show a progress bar (default: in a terminal or notebook).
    overwrite
        Replace an existing feature element.

    Returns
    -------
    Nothing; writes ``sdata.images[key_added]`` and ``sdata.attrs[prepared_key]["image_features"]`` (the encoder, its
    fingerprint, µm per pixel and the projection).

    """
    from .._contract import Prepared

    prep = Prepared.from_sdata(sdata, prepared_key)
    key_added = key_added or f"{prepared_key}_features"
    if n_components is not None and (not isinstance(n_components, int | np.integer) or n_components < 1):
        msg = f"`n_components` must be a positive integer or None; got {n_components!r}."
        raise ValueError(msg)
    writer = ElementWriter(sdata, overwrite=overwrite)
    writer.check_free([key_added])
    enc = encoder if isinstance(encoder, ImageEncoder) else make_encoder(
        encoder, kind=prep.image.kind, n_channels=len(prep.image.channels), hr_um=prep.grid.hr_um,
        um_per_px=um_per_px, weights=weights, pretrained=pretrained, device=device, batch_size=batch_size,
        model_kwargs=model_kwargs)  # fmt: skip
    per_hr = pixels_per_hr(prep.grid.hr_um, enc.um_per_px)
    t0 = time.perf_counter()
    tiles = prep.tiles(sdata)
    origins = list(zip(tiles["lr_row0"].astype(int), tiles["lr_col0"].astype(int), strict=True))
    raw: dict[int, np.ndarray] = {}
    # every tile reads a crop: hold the pyramid level it reads in memory when it fits (a dask image recomputes)
    image = in_memory_level(sdata.images[prep.image.key], prep.image, prep.grid.hr_um / per_hr, 2 * 2**30)

    def encode(i: int) -> np.ndarray:
        if i not in raw:
            raw[i] = _encode_tile(image, prep, enc, origins[i], per_hr)
        return raw[i]

    if projection is None:
        rng = np.random.default_rng(seed)
        fit = rng.choice(len(origins), size=min(FIT_TILES, len(origins)), replace=False)
        projection = fit_projection(np.concatenate([encode(int(i)).reshape(enc.dim, -1) for i in fit], axis=1),
                                    n_components, rng)  # fmt: skip
    elif len(projection["mean"]) != enc.dim:
        msg = f"The projection expects {len(projection['mean'])} features; encoder {enc.name!r} gives {enc.dim}."
        raise ValueError(msg)
    k = len(projection["components"]) if projection.get("components") is not None else enc.dim
    s, t = prep.grid.scale, prep.tile_lr
    out = np.zeros((k, *prep.grid.hr_shape), dtype=np.float32)
    from tqdm.auto import tqdm

    show = progress if progress is not None else log.interactive()
    for i in tqdm(range(len(origins)), disable=not show, desc=f"image features ({enc.name})", unit="tile"):
        r0, c0 = origins[i]
        out[:, r0 * s : (r0 + t) * s, c0 * s : (c0 + t) * s] = project(encode(i), projection)
        raw.pop(i, None)
    seconds = time.perf_counter() - t0
    area_mm2 = len(origins) * (prep.record.tile_um / 1000.0) ** 2
    from ..tl._output import sr_image

    features = {
        "key": key_added,
        "encoder": enc.describe(),
        "fingerprint": enc.fingerprint(),
        "um_per_px": float(enc.um_per_px),
        "n_components": int(k),
        "projection": projection,
        "seconds": float(seconds),
    }
    channels = [f"feature_{j}" for j in range(k)]
    record = dataclasses.replace(prep.record, image_features=features)
    writer.commit({key_added: ("images", sr_image(out, channels, prep))}, attrs={prepared_key: record.to_dict()})
    log.info(
        f"image features: {enc.name} at {enc.um_per_px:g} µm/px, {enc.dim} → {k} per HR pixel on {len(origins)} tiles "
        f"({area_mm2:.2f} mm²) in {seconds:.1f} s ({area_mm2 / max(seconds, 1e-9) * 60:.1f} mm²/min) "
        f"→ sdata.images[{key_added!r}]"
    )


def _encode_tile(image: Any, prep, enc: ImageEncoder, origin: tuple[int, int], per_hr: int) -> np.ndarray:
    """Raw features ``(dim, t·s, t·s)`` of one tile, encoded with ``enc.context_um`` of context on each side."""
    g = prep.grid
    n = prep.tile_lr * g.scale
    margin = int(np.ceil(enc.context_um / g.hr_um))
    r0, c0 = origin
    x0 = g.origin_um[0] + c0 * g.lr_um - margin * g.hr_um
    y0 = g.origin_um[1] + r0 * g.lr_um - margin * g.hr_um
    side = (n + 2 * margin) * g.hr_um
    crop = read_tile(image, prep.image, (x0, y0, x0 + side, y0 + side), g.hr_um / per_hr)
    feats = enc.encode(crop[None], per_hr)[0]
    return feats[:, margin : margin + n, margin : margin + n]


def fit_projection(x: np.ndarray, n_components: int | None, rng: np.random.Generator) -> dict[str, Any]:
    """Standardisation and PCA of features ``(dim, pixels)``: ``{"mean", "std", "components"}`` (lists, for attrs).

    ``components`` is ``None`` when ``n_components`` is ``None`` or not below ``dim`` (standardisation only).
    """
    x = np.asarray(x, dtype=np.float64)
    if x.shape[1] > FIT_PIXELS:
        x = x[:, rng.choice(x.shape[1], size=FIT_PIXELS, replace=False)]
    mean = x.mean(axis=1)
    std = x.std(axis=1)
    std = np.where(std > 1e-8, std, 1.0)
    z = (x - mean[:, None]) / std[:, None]
    components = None
    if n_components is not None and n_components < x.shape[0]:
        _, _, vt = np.linalg.svd(z.T - z.T.mean(axis=0), full_matrices=False)
        components = vt[:n_components]
        # a deterministic sign: the largest loading of each component is positive
        signs = np.sign(components[np.arange(len(components)), np.abs(components).argmax(axis=1)])
        components = (components * signs[:, None]).tolist()
    return {"mean": mean.tolist(), "std": std.tolist(), "components": components}


def project(feats: np.ndarray, projection: dict[str, Any]) -> np.ndarray:
    """Features ``(dim, H, W)`` → standardised (and PCA-reduced) ``(k, H, W)`` float32."""
    d = feats.shape[0]
    mean = np.asarray(projection["mean"], dtype=np.float32).reshape(d, 1)
    std = np.asarray(projection["std"], dtype=np.float32).reshape(d, 1)
    z = (feats.reshape(d, -1) - mean) / std
    if projection.get("components") is not None:
        z = np.asarray(projection["components"], dtype=np.float32) @ z
    return z.reshape(-1, *feats.shape[1:]).astype(np.float32)
