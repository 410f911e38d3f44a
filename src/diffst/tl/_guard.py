"""The guard: after training, compare the model with the training-free baselines on validation and never do worse.

On the validation tiles (never trained on), the trained model is run exactly as :func:`diffst.tl.super_resolve` runs
it (windows, blending, LR consistency, ``n_samples`` samples), beside the LR-consistent bicubic map and the image
floor (:func:`diffst.tl.upsample` with ``method="image"``). Per gene, a blend weight ``α_g`` in ``[0, 1]`` is chosen
to maximise the validation PCC of ``α_g · model + (1 − α_g) · floor`` (both LR-consistent, so the blend is), and a
scale ``c_g`` of the std map so that ``mean ± 2 c_g std`` covers 95 % of the validation counts. Both are stored in the
model and applied by ``super_resolve``; a model that does not beat the floor is reported in a warning.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from .. import _logging as log
from .._normalise import to_model_units
from ..metrics import pearson, rmse
from ._baselines import _interpolate, _project, slide_floor
from ._data import Prepared

if TYPE_CHECKING:
    from spatialdata import SpatialData

    from ._model import DiffST

#: Blend weights tried per gene (0 = the image floor only, 1 = the model only).
ALPHAS = np.round(np.linspace(0.0, 1.0, 11), 2)
#: Nominal coverage of mean ± 2 std after calibration.
COVERAGE = 0.95


def coverage_scale(truth: np.ndarray, mean: np.ndarray, std: np.ndarray, level: float = COVERAGE) -> float:
    """The factor ``c`` such that ``|truth − mean| ≤ 2 c std`` holds for a share ``level`` of the pixels."""
    err = np.abs(truth - mean)
    if not np.any(std > 0):
        return 1.0
    ratio = np.where(err <= 1e-9, 0.0, np.where(std > 0, err / (2.0 * np.where(std > 0, std, 1.0)), np.inf))
    c = float(np.quantile(ratio, level, method="higher"))  # no interpolation between inf values
    return float(min(max(c, 1e-3), 1e3)) if np.isfinite(c) else 1e3


def validation_maps(sdata: SpatialData, prep: Prepared, model: DiffST, *, split: str = "val", n_samples: int = 4,
                    seed: int = 0) -> dict[str, np.ndarray] | None:  # fmt: skip
    """Model mean and std, image floor, LR-consistent bicubic and truth on the tiles of ``split``: ``(G, pixels)``.

    Genes in the model's order; counts per HR pixel. ``None`` when the split has no tiles or the data no HR truth.
    """
    from ._super_resolve import DEFAULT_BLOCK_LR, _Job

    tiles = prep.tiles(sdata, split)
    if len(tiles) == 0 or not prep.has_hr:
        return None
    genes = list(model.genes)
    job = _Job.build(sdata, prep, model, genes, sampler="fast", steps=None, n_samples=n_samples, consistency=True,
                     tile_overlap=0.25, batch_size=16, seed=seed, block_lr=DEFAULT_BLOCK_LR)  # fmt: skip
    order = [prep.genes.index(g) for g in genes]
    lr = np.asarray(sdata[prep.elements["lr"]].values, dtype=np.float32)
    gene_scale = prep.hr_scale
    floor = slide_floor(sdata, prep, lr)[order]
    bicubic = _project(sdata, prep, _interpolate(lr, prep.coverage, prep.grid.scale, gene_scale, "bicubic"), lr)[order]
    hr = sdata[prep.elements["hr"]].data
    s, t = prep.grid.scale, prep.tile_lr
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("mean", "std", "floor", "bicubic", "truth")}
    for r0, c0 in zip(tiles["lr_row0"].astype(int), tiles["lr_col0"].astype(int), strict=True):
        rows, cols = (r0 * s, (r0 + t) * s), (c0 * s, (c0 + t) * s)
        out = job.run_block(rows, cols)
        cut = (slice(None), slice(*rows), slice(*cols))
        parts["mean"].append(out[0])
        parts["std"].append(out[1])
        parts["floor"].append(floor[cut])
        parts["bicubic"].append(bicubic[cut])
        parts["truth"].append(np.asarray(hr[(order, *cut[1:])], dtype=np.float32))
    return {k: np.concatenate([p.reshape(len(genes), -1) for p in v], axis=1) for k, v in parts.items()}


def fit_guard(sdata: SpatialData, prep: Prepared, model: DiffST, *, n_samples: int = 4, seed: int = 0) -> dict | None:
    """Fit the per-gene floor blend and std scale on validation; print the comparison table. ``None`` without val."""
    maps = validation_maps(sdata, prep, model, n_samples=n_samples, seed=seed)
    if maps is None:
        log.warn("no validation tiles: the model could not be compared with the image floor, and is used as it is")
        return None
    genes = list(model.genes)
    scale = np.asarray(model.gene_scale, dtype=np.float32)
    norm = {k: to_model_units(maps[k], scale) for k in ("mean", "floor", "bicubic", "truth")}
    alpha, std_scale = [], []
    scores: dict[str, dict[str, list[float]]] = {k: {"pcc": [], "rmse": []} for k in ("model", "guarded", "bicubic",
                                                                                     "image_floor")}  # fmt: skip
    covered = []
    for g in range(len(genes)):
        truth = norm["truth"][g]
        pccs = [pearson(to_model_units(a * maps["mean"][g] + (1 - a) * maps["floor"][g], scale[g : g + 1]), truth)
                for a in ALPHAS]  # fmt: skip
        pccs = np.nan_to_num(np.asarray(pccs), nan=-np.inf)
        best = float(ALPHAS[int(np.flatnonzero(pccs >= pccs.max() - 1e-4).max())])  # ties go to the model
        blend = best * maps["mean"][g] + (1 - best) * maps["floor"][g]
        std = best * maps["std"][g]
        c = coverage_scale(maps["truth"][g], blend, std)
        alpha.append(best)
        std_scale.append(c)
        if np.any(std > 0):
            covered.append(float(np.mean(np.abs(maps["truth"][g] - blend) <= 2 * c * std + 1e-9)))
        blend_n = to_model_units(blend, scale[g : g + 1])
        for name, pred in (("model", norm["mean"][g]), ("guarded", blend_n), ("bicubic", norm["bicubic"][g]),
                           ("image_floor", norm["floor"][g])):  # fmt: skip
            scores[name]["pcc"].append(pearson(pred, truth))
            scores[name]["rmse"].append(rmse(pred, truth))
    table = {name: {m: float(np.nanmean(v)) for m, v in ms.items()} for name, ms in scores.items()}
    n_px = maps["truth"].shape[1]
    log.info(
        f"validation ({n_px} HR pixels, {len(genes)} genes; PCC / RMSE on the normalised scale):\n"
        + "\n".join(
            f"  {label:<34} {table[k]['pcc']:.3f} / {table[k]['rmse']:.3f}"
            for k, label in (
                ("model", "Diff-ST"),
                ("guarded", "Diff-ST, guarded by the floor"),
                ("bicubic", "bicubic (LR-consistent)"),
                ("image_floor", "image floor"),
            )
        )  # fmt: skip
    )
    if table["model"]["pcc"] < table["image_floor"]["pcc"]:
        log.warn(
            f"the model does not beat the training-free image floor on validation (PCC {table['model']['pcc']:.3f} vs "
            f"{table['image_floor']['pcc']:.3f}); super_resolve blends each gene with the floor by the weights "
            f"validation chose ({sum(a < 1 for a in alpha)} of {len(genes)} genes). To do better: train longer "
            "(`time_budget`), on more tissue, at a smaller `scale`, or with another image (`image_key`)."
        )
    return {
        "alpha": alpha,
        "std_scale": std_scale,
        "validation": table,
        "coverage_val": float(np.mean(covered)) if covered else None,
        "n_samples": int(n_samples),
        "pixels": int(n_px),
    }


def guard_summary(guard: dict[str, Any] | None) -> str:
    """One line: validation PCC of the model, the floor and bicubic."""
    if not guard:
        return "no validation"
    t = guard["validation"]
    return (
        f"val PCC {t['guarded']['pcc']:.3f} (model {t['model']['pcc']:.3f}, image floor "
        f"{t['image_floor']['pcc']:.3f}, bicubic {t['bicubic']['pcc']:.3f})"
    )
