"""Which image-feature element a model reads, and the check that it is the one the model was trained on."""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

from .. import _logging as log
from .._contract import Prepared, read_record

if TYPE_CHECKING:
    from spatialdata import SpatialData

    from ._model import DiffST


def projection_hash(projection: dict[str, Any]) -> str:
    """A short hash of a fitted standardisation and PCA (what makes features mean the same on two slides)."""
    return hashlib.sha256(json.dumps(projection, sort_keys=True).encode()).hexdigest()[:16]


def features_for_training(
    sdata: SpatialData, prep: Prepared, encoder: str, like: dict[str, Any] | None = None
) -> tuple[Prepared, dict[str, Any] | None]:
    """The prepared data (re-read) and their feature record for ``encoder``; computed when missing or another's.

    ``like``: the feature record of another section trained together with this one; its features must mean the
    same (same encoder and weights, µm per pixel and projection): weight-free ones are computed with its projection,
    others are checked.
    """
    if encoder == "learned":
        return prep, None
    info = prep.record.image_features
    same = like is None or (
        info is not None
        and info["fingerprint"] == like["fingerprint"]
        and projection_hash(info["projection"]) == projection_hash(like["projection"])
    )
    if info is None or info["encoder"]["name"] != encoder or info["key"] not in sdata.images or not same:
        from ..pp import image_features

        if like is not None and not encoder == "stain" and info is not None and info["key"] in sdata.images:
            msg = (
                f"The {encoder} image features under {prep.key!r} of this section were made with other weights or "
                "another projection than the first section's; compute them as the first section's: "
                f"`dst.pp.image_features(sdata, encoder={encoder!r}, projection=<the first section's "
                "attrs[...]['image_features']['projection']>, overwrite=True)` with the same `weights`."
            )
            raise ValueError(msg)
        if info is not None:
            log.info(f"the image features under {prep.key!r} are not the ones to train with: computing {encoder}'s")
        extra = {} if like is None else {"projection": like["projection"], "um_per_px": like["um_per_px"]}
        image_features(sdata, encoder=encoder, prepared_key=prep.key, key_added=(info or {}).get("key"),
                       overwrite=info is not None, **extra)  # fmt: skip
        prep = Prepared.from_sdata(sdata, prep.key)
        info = prep.record.image_features
    return prep, info


def model_record(info: dict[str, Any]) -> dict[str, Any]:
    """What a model keeps of the features it was trained on (saved with it, checked on every slide it is applied to)."""
    return {
        "encoder": info["encoder"],
        "fingerprint": info["fingerprint"],
        "um_per_px": info["um_per_px"],
        "n_components": info["n_components"],
        "projection": info["projection"],
        "projection_hash": projection_hash(info["projection"]),
    }


def feature_key(sdata: SpatialData, prep: Prepared, model: DiffST) -> str | None:
    """The feature element ``model`` reads on these data (``None`` for the learned encoder), after checking it.

    Weight-free (``"stain"``) features missing from the data are computed with the model's projection; features of
    another encoder, other weights, another µm per pixel or another projection are refused before any work.
    """
    cfg = model.config
    if cfg.image_encoder == "learned":
        return None
    want = model.info.get("image_features")
    if want is None:
        msg = f"The model conditions on {cfg.image_encoder} image features but does not record them; retrain it."
        raise ValueError(msg)
    have = prep.record.image_features
    fix = (
        f"compute them as in training: `dst.pp.image_features(sdata, encoder={cfg.image_encoder!r}, prepared_key={prep.key!r}, "
        f"um_per_px={want['um_per_px']:g}, projection=model.info['image_features']['projection'], overwrite=True)`"
        + (" with the same `weights`" if cfg.image_encoder.startswith("timm:") else "")
    )
    if have is None or have["key"] not in sdata.images:
        if cfg.image_encoder == "stain":
            from ..pp import image_features

            log.info("computing the weight-free image features the model was trained with (its projection)")
            image_features(sdata, encoder="stain", prepared_key=prep.key, um_per_px=want["um_per_px"], projection=want["projection"],
                           overwrite=have is not None)  # fmt: skip
            return read_record(sdata, prep.key).image_features["key"]
        msg = f"The model conditions on {cfg.image_encoder} image features, which these data under {prep.key!r} lack; {fix}."
        raise ValueError(msg)
    problems = []
    if have["encoder"]["name"] != want["encoder"]["name"]:
        problems.append(f"they were made by {have['encoder']['name']}, the model's by {want['encoder']['name']}")
    elif have["fingerprint"] != want["fingerprint"]:
        problems.append(
            f"the encoder's weights or parameters differ (hash {have['fingerprint']}, the model's {want['fingerprint']})"
        )
    if abs(float(have["um_per_px"]) - float(want["um_per_px"])) > 1e-6:
        problems.append(f"they were read at {have['um_per_px']:g} µm/px, the model's at {want['um_per_px']:g} µm/px")
    if projection_hash(have["projection"]) != want["projection_hash"]:
        problems.append("their standardisation/PCA was fitted on other data than the model's")
    if problems:
        msg = (
            f"The image features under {prep.key!r} are not the ones this model was trained on: "
            + "; ".join(problems)
            + f". {fix[0].upper()}{fix[1:]}."
        )
        raise ValueError(msg)
    return have["key"]
