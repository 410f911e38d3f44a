"""The guard: after training, compare the model with the training-free baselines on validation and never do worse.

On the validation tiles (never trained on), the trained model is run exactly as :func:`diffst.tl.super_resolve` runs
it (windows, blending, LR consistency, ``n_samples`` samples), beside the LR-consistent bicubic map and the image
floor (:func:`diffst.tl.upsample` with ``method="image"``). Per gene, a blend weight ``α_g`` in ``[0, 1]`` is chosen
to maximise the validation PCC of ``α_g · model + (1 − α_g) · floor`` (both LR-consistent, so the blend is), and a
scale ``c_g`` of the predictive std so that ``mean ± 2 std`` covers 95 % of the validation counts. Both are stored in
the model and applied by ``super_resolve``; a model that does not beat the floor is reported in a warning.

The predictive std of a measured count at an HR pixel (:func:`predictive_std`) adds the counting noise of that
measurement to the spread of the model's samples: ``std = c_g · sqrt((α_g · sample std)² + mean)``, Poisson noise
having a variance equal to the expected count. Without the Poisson term, a single factor had to stand for the counting
noise of the validation tiles, and did not carry to tissue with other expression levels (60 % coverage outside a small
training region, against 97 % with the term; ``docs/benchmarks.md``). ``c_g`` is never below 1: counts scatter at least
as much as Poisson counts do, and a validation region with few counts cannot narrow the interval below that.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from .. import _logging as log
from .._contract import Prepared
from .._device import resolve_precision
from .._normalise import to_model_units
from ..metrics import pearson, rmse
from ._baselines import Upsampler
from ._features import feature_key
from ._inference import DEFAULT_BLOCK_LR, InferencePipeline, predictive_std
from ._model import Guard

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping, Sequence

    from spatialdata import SpatialData

    from ._model import DiffST

#: Blend weights tried per gene (0 = the image floor only, 1 = the model only).
ALPHAS = np.round(np.linspace(0.0, 1.0, 11), 2)
#: Most validation area (mm²) the guard runs the model on: beyond it, an evenly spread subset of the tiles.
MAX_GUARD_MM2 = 1.0
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


def tile_blocks(origins: Iterable[tuple[int, int]], tile: int, max_side: int) -> list[tuple[int, int, int, int]]:
    """Tiles ``(row0, col0)`` (LR pixels, side ``tile``) merged into rectangles ``(r0, c0, r1, c1)`` they fill exactly.

    Runs of side-by-side tiles in a row are merged first, then runs with the same columns in consecutive rows; no
    side grows past ``max(tile, max_side)``. Run as one block, neighbouring tiles share the windows that reach both
    (each window is sampled once instead of once per tile), and every pixel gets the same windows and seeds as
    tile by tile, so the maps are those of :func:`~diffst.tl.super_resolve` either way.
    """
    limit = max(tile, max_side)
    runs: list[list[int]] = []  # [r0, c0, r1, c1]
    for r, c in sorted({(int(r), int(c)) for r, c in origins}):
        last = runs[-1] if runs else None
        if last is not None and last[0] == r and last[3] == c and c + tile - last[1] <= limit:
            last[3] = c + tile
        else:
            runs.append([r, c, r + tile, c + tile])
    blocks: list[list[int]] = []
    open_: dict[tuple[int, int], list[int]] = {}  # column span → the block whose last row ends where a run starts
    for r0, c0, r1, c1 in runs:  # sorted by row, then column
        block = open_.get((c0, c1))
        if block is not None and block[2] == r0 and r1 - block[0] <= limit:
            block[2] = r1
        else:
            block = [r0, c0, r1, c1]
            blocks.append(block)
            open_[(c0, c1)] = block
    return [(a, b, c, d) for a, b, c, d in blocks]


@dataclass
class Validation:
    """Where a model is validated on one prepared section: its validation tiles, or a held-out ``region``.

    ``region`` is a mask of LR pixels ``(h, w)`` (:func:`diffst.tl._data.holdout`'s band, for data prepared without
    validation tiles); ``None`` means the tiles of ``split``.
    """

    sdata: SpatialData
    prep: Prepared
    region: np.ndarray | None = None
    split: str = "val"

    def blocks(self, window_lr: int) -> list[tuple[int, int, int, int]]:
        """Rectangles of LR pixels ``(r0, c0, r1, c1)`` that cover the validation pixels exactly.

        Of a held-out band, its tissue pixels. Of a large slide's validation tiles, an evenly spread subset of
        :data:`MAX_GUARD_MM2` at most: enough pixels to fit a weight and a std scale per gene, at a bounded cost.
        """
        if self.region is None:
            tiles = self.prep.tiles(self.sdata, self.split)
            origins = list(zip(tiles["lr_row0"].astype(int), tiles["lr_col0"].astype(int), strict=True))
            tile_mm2 = (self.prep.record.tile_um / 1000.0) ** 2
            keep = max(1, int(MAX_GUARD_MM2 // tile_mm2))
            if len(origins) > keep:
                origins = [origins[i] for i in np.unique(np.linspace(0, len(origins) - 1, keep).round().astype(int))]
            return tile_blocks(origins, self.prep.tile_lr, DEFAULT_BLOCK_LR)
        # the held-out band's tissue pixels: its windows may reach into the empty margin of a tile, its scores do not
        on_tissue = self.region & self.prep.tissue(self.sdata)
        return tile_blocks(map(tuple, np.argwhere(on_tissue if on_tissue.any() else self.region)), 1, DEFAULT_BLOCK_LR)

    def window_origins(self, window_lr: int) -> np.ndarray:
        """Fixed model windows over the validation pixels (the tiles', or inside the held-out region)."""
        from ._data import covering_origins, tiled_origins

        if self.region is None:
            return tiled_origins(self.prep.tiles(self.sdata, self.split), self.prep.tile_lr, window_lr)
        return covering_origins(self.region, window_lr)

    def empty(self) -> bool:
        return not self.region.any() if self.region is not None else len(self.prep.tiles(self.sdata, self.split)) == 0


def validation_maps(sdata: SpatialData, prep: Prepared, model: DiffST, *, split: str = "val",
                    region: np.ndarray | None = None, n_samples: int = 4, seed: int = 0,
                    average_flips: bool = True, autocast: Any = None) -> dict[str, np.ndarray] | None:  # fmt: skip
    """Model mean and std, image floor, LR-consistent bicubic and truth on the validation pixels: ``(G, pixels)``.

    The validation pixels are the tiles of ``split``, or the LR pixels of ``region`` (a mask, see
    :class:`Validation`). Genes in the model's order; counts per HR pixel. ``None`` when there are no such pixels or
    the data no HR truth. The model's maps are made as :func:`~diffst.tl.super_resolve` makes them (``average_flips``
    and ``autocast``, the dtype of its ``precision``, as there).
    """
    where = Validation(sdata, prep, region, split)
    if where.empty() or not prep.has_hr:
        return None
    genes = list(model.genes)
    pipe = InferencePipeline.from_model(sdata, prep, model, genes, n_samples=n_samples, seed=seed,
                                        average_flips=average_flips, guard=False, autocast=autocast)  # fmt: skip
    order = [prep.genes.index(g) for g in genes]
    lr = np.asarray(sdata[prep.elements["lr"]].values, dtype=np.float32)
    floor = Upsampler.from_sdata(sdata, prep, "image", genes=genes, lr=lr)
    bicubic = Upsampler.from_sdata(sdata, prep, "bicubic", genes=genes, lr=lr)
    hr = sdata[prep.elements["hr"]].data
    s = prep.grid.scale
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("mean", "std", "floor", "bicubic", "truth")}
    for r0, c0, r1, c1 in where.blocks(model.config.lr_px):
        rows, cols = (r0 * s, r1 * s), (c0 * s, c1 * s)
        out = pipe.block(rows, cols)
        cut = (slice(None), slice(*rows), slice(*cols))
        parts["mean"].append(out[0])
        parts["std"].append(out[1])
        parts["floor"].append(floor.block(rows, cols))
        parts["bicubic"].append(bicubic.block(rows, cols))
        parts["truth"].append(np.asarray(hr[(order, *cut[1:])], dtype=np.float32))
    return {k: np.concatenate([p.reshape(len(genes), -1) for p in v], axis=1) for k, v in parts.items()}


def heldout_spots(sdata: SpatialData, prep: Prepared, model: DiffST, *, split: str = "val",
                  region: np.ndarray | None = None, seed: int = 0, batch_size: int = 16,
                  extra: Mapping[str, Callable] | None = None) -> dict[str, np.ndarray] | None:  # fmt: skip
    """Every whole spot of the validation windows predicted while hidden, by the model, the image floor and bicubic.

    The windows cover the tiles of ``split``, or lie inside ``region`` (see :class:`Validation`). Returns model units
    ``(G, spots)`` under ``"mean"``, ``"floor"``, ``"bicubic"``, ``"nearest"`` and ``"truth"`` (the measured spots),
    genes in the model's order; ``None`` when there are no validation windows. The HR truth is never read. ``extra``
    adds predictors scored on the same hidden spots: ``name → factory(image)`` returning ``predict(lr, mask)`` (the
    interface of :func:`diffst.model.weak.predictors`), e.g. TESLA in ``benchmarks/bench_visium.py``.
    """
    import torch

    from ..model import weak
    from ._data import TileSource, WindowDataset

    where = Validation(sdata, prep, region, split)
    cfg = model.config
    origins = where.window_origins(cfg.lr_px) if not where.empty() else np.zeros((0, 2), dtype=np.int64)
    if len(origins) == 0:
        return None
    gene_scale = model.gene_scale_for(prep)
    source = TileSource.from_sdata(sdata, prep, genes=model.genes, footprint=True, features=feature_key(sdata, prep, model),
                                   context=model.context_genes).cache_image(cfg.image_um)  # fmt: skip
    source.hr = None
    ds = WindowDataset(source, origins, cfg.lr_px, image_um=cfg.image_um, gene_scale=gene_scale)
    diffusion = model.diffusion_for(gene_scale)
    net = model.net.eval()
    device = next(net.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    parts: dict[str, list[torch.Tensor]] = {}
    for i in range(0, len(ds), batch_size):
        batch = {k: torch.stack([ds[j][k] for j in range(i, min(i + batch_size, len(ds)))]).to(device) for k in ds[i]}
        group = weak.hide(torch.ones_like(batch["mask"]).cpu(), 0.5, generator=gen).to(device)
        with torch.inference_mode():
            fns = weak.predictors(
                diffusion, net, batch["image"], context=batch.get("context") if cfg.context_genes else None
            )
            fns.update({name: factory(batch["image"]) for name, factory in (extra or {}).items()})
            for name, fn in fns.items():
                pred, truth = weak.heldout(fn, batch["lr"], batch["mask"], batch["foot"], batch["offset"],
                                           batch["area"], diffusion.gene_scale.to(device), cfg.scale, group)  # fmt: skip
                parts.setdefault(name.removeprefix("_") or "mean", []).append(pred.cpu())
        parts.setdefault("truth", []).append(truth.cpu())
    return {k: torch.cat(v, dim=1).numpy() for k, v in parts.items()}


def fit_guard(validation: Validation | Sequence[Validation], model: DiffST, *, n_samples: int = 4, seed: int = 0,
              std_noise: Literal["poisson"] | None = "poisson", average_flips: bool = True,
              precision: str = "auto") -> Guard | None:  # fmt: skip
    """Fit the per-gene floor blend and std scale on validation; print the comparison table. ``None`` without any.

    ``validation``: where the model is validated, on one section or on each of several (their pixels pooled, each
    section's scored on its own normalisation). ``std_noise=None`` calibrates the sample spread alone, as before the
    Poisson term (for comparisons). ``average_flips``: the model's maps as :func:`~diffst.tl.super_resolve` makes
    them by default (recorded); ``precision`` likewise (``"auto"``: bfloat16 where the model's device computes it
    natively, see :func:`~diffst.tl.super_resolve`).

    A model trained from the spots alone (``supervision="lr"``) is compared on the validation spots, each predicted
    while hidden (:func:`heldout_spots`); the blend weights are chosen there and the std is not calibrated (there is
    no HR truth to calibrate it on).
    """
    sections = [validation] if isinstance(validation, Validation) else list(validation)
    if model.config.supervision == "lr":
        return _fit_on_spots(sections, model, seed=seed)
    found = []
    autocast = resolve_precision(precision, model.device)
    for v in sections:
        maps = validation_maps(v.sdata, v.prep, model, split=v.split, region=v.region, n_samples=n_samples,
                               seed=seed, average_flips=average_flips, autocast=autocast)  # fmt: skip
        if maps is not None:
            found.append((maps, np.asarray(model.gene_scale_for(v.prep), dtype=np.float32)))
    if not found:
        log.warn("no validation pixels: the model could not be compared with the image floor, and is used as it is")
        return None
    genes = list(model.genes)
    maps = {k: np.concatenate([m[k] for m, _ in found], axis=1) for k in found[0][0]}
    # each section's pixels in its own model units (its own normalisation), pooled
    norm = {k: np.concatenate([to_model_units(m[k], sc) for m, sc in found], axis=1)
            for k in ("mean", "floor", "bicubic", "truth")}  # fmt: skip
    scales = [sc for _, sc in found]
    widths = [m["truth"].shape[1] for m, _ in found]

    def units(counts: np.ndarray, g: int) -> np.ndarray:
        """One gene's pooled counts in the pooled sections' own units."""
        bounds = np.cumsum([0, *widths])
        return np.concatenate([to_model_units(counts[bounds[i] : bounds[i + 1]], sc[g : g + 1])
                               for i, sc in enumerate(scales)])  # fmt: skip

    alpha, std_scale = [], []
    scores: dict[str, dict[str, list[float]]] = {k: {"pcc": [], "rmse": []} for k in ("model", "guarded", "bicubic",
                                                                                     "image_floor")}  # fmt: skip
    covered = []
    for g in range(len(genes)):
        truth = norm["truth"][g]
        pccs = [pearson(units(a * maps["mean"][g] + (1 - a) * maps["floor"][g], g), truth) for a in ALPHAS]
        pccs = np.nan_to_num(np.asarray(pccs), nan=-np.inf)
        best = float(ALPHAS[int(np.flatnonzero(pccs >= pccs.max() - 1e-4).max())])  # ties go to the model
        blend = best * maps["mean"][g] + (1 - best) * maps["floor"][g]
        if std_noise == "poisson":
            std = predictive_std(blend, best * maps["std"][g])
            c = max(1.0, coverage_scale(maps["truth"][g], blend, std))
        else:
            std = best * maps["std"][g]
            c = coverage_scale(maps["truth"][g], blend, std)
        alpha.append(best)
        std_scale.append(c)
        if np.any(std > 0):
            covered.append(float(np.mean(np.abs(maps["truth"][g] - blend) <= 2 * c * std + 1e-9)))
        blend_n = units(blend, g)
        for name, pred in (("model", norm["mean"][g]), ("guarded", blend_n), ("bicubic", norm["bicubic"][g]),
                           ("image_floor", norm["floor"][g])):  # fmt: skip
            scores[name]["pcc"].append(pearson(pred, truth))
            scores[name]["rmse"].append(rmse(pred, truth))
    n_px = maps["truth"].shape[1]
    where = f"{n_px} HR pixels" + (f" of {len(found)} sections" if len(found) > 1 else "")
    table = _report(scores, f"validation ({where}, {len(genes)} genes; PCC / RMSE on the normalised scale)")
    _warn_below_floor(table, alpha, len(genes))
    return Guard(alpha, std_scale, std_noise=std_noise, validation=table,
                 coverage_val=float(np.mean(covered)) if covered else None, n_samples=n_samples,
                 average_flips=average_flips, pixels=n_px)  # fmt: skip


def spot_blend(maps: dict[str, np.ndarray], alpha: float | np.ndarray, gene_scale: np.ndarray) -> np.ndarray:
    """``α · model + (1 − α) · floor`` of :func:`heldout_spots` maps, blended in counts, back in model units ``(G, spots)``.

    ``alpha`` is one weight or one per gene: what ``super_resolve`` writes with the guard's weights.
    """
    import torch

    from ..model.weak import to_counts, to_units

    scale = torch.from_numpy(np.asarray(gene_scale, dtype=np.float32))
    a = torch.as_tensor(np.asarray(alpha, dtype=np.float32)).reshape(1, -1, 1, 1)
    # (1, G, spots, 1): the layout the torch conversions take
    mean, floor = (to_counts(torch.from_numpy(maps[k])[None, :, :, None], scale) for k in ("mean", "floor"))
    return to_units(a * mean + (1 - a) * floor, scale)[0, :, :, 0].numpy()


def _fit_on_spots(sections: list[Validation], model: DiffST, *, seed: int) -> Guard | None:
    found = []
    for v in sections:
        maps = heldout_spots(v.sdata, v.prep, model, split=v.split, region=v.region, seed=seed)
        if maps is not None and maps["truth"].shape[1] > 0:
            found.append((maps, model.gene_scale_for(v.prep)))
    if not found:
        log.warn("no validation spots: the model could not be compared with the image floor, and is used as it is")
        return None
    genes = list(model.genes)
    # each section's spots blended on its own scale, then pooled (all in model units already)
    blends_by_alpha = [np.concatenate([spot_blend(m, a, sc) for m, sc in found], axis=1) for a in ALPHAS]
    maps = {k: np.concatenate([m[k] for m, _ in found], axis=1) for k in found[0][0]}
    alpha: list[float] = []
    scores: dict[str, dict[str, list[float]]] = {k: {"pcc": [], "rmse": []} for k in ("model", "guarded", "bicubic",
                                                                                     "image_floor")}  # fmt: skip
    for g in range(len(genes)):
        truth = maps["truth"][g]
        blends = [b[g] for b in blends_by_alpha]
        pccs = np.nan_to_num(np.asarray([pearson(b, truth) for b in blends]), nan=-np.inf)
        best = int(np.flatnonzero(pccs >= pccs.max() - 1e-4).max())  # ties go to the model
        alpha.append(float(ALPHAS[best]))
        for name, pred in (("model", maps["mean"][g]), ("guarded", blends[best]), ("bicubic", maps["bicubic"][g]),
                           ("image_floor", maps["floor"][g])):  # fmt: skip
            scores[name]["pcc"].append(pearson(pred, truth))
            scores[name]["rmse"].append(rmse(pred, truth))
    n = maps["truth"].shape[1]
    table = _report(scores, f"validation ({n} held-out spots, each predicted while hidden from the image and the "
                            f"other spots; {len(genes)} genes; PCC / RMSE on the normalised scale)")  # fmt: skip
    _warn_below_floor(table, alpha, len(genes))
    # no HR truth to calibrate a std on: the spread of the leave-spots-out maps is written as it is
    return Guard(alpha, [1.0] * len(genes), std_noise=None, validation=table, n_samples=1, average_flips=False,
                 spots=n)  # fmt: skip


def _report(scores: dict[str, dict[str, list[float]]], title: str) -> dict[str, dict[str, float]]:
    """Mean of each method's per-gene scores, printed as the comparison table."""
    table = {name: {m: float(np.nanmean(v)) for m, v in ms.items()} for name, ms in scores.items()}
    log.info(
        f"{title}:\n"
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
    return table


def _warn_below_floor(table: dict[str, dict[str, float]], alpha: list[float], n_genes: int) -> None:
    if table["model"]["pcc"] < table["image_floor"]["pcc"]:
        log.warn(
            f"the model does not beat the training-free image floor on validation (PCC {table['model']['pcc']:.3f} vs "
            f"{table['image_floor']['pcc']:.3f}); super_resolve blends each gene with the floor by the weights "
            f"validation chose ({sum(a < 1 for a in alpha)} of {n_genes} genes). To do better: train longer "
            "(`time_budget`), on more tissue, at a smaller `scale`, or with another image (`image_key`)."
        )


def guard_summary(guard: Guard | None) -> str:
    """One line: validation PCC of the model, the floor and bicubic."""
    if guard is None or guard.validation is None:
        return "no validation"
    t = guard.validation
    return (
        f"val PCC {t['guarded']['pcc']:.3f} (model {t['model']['pcc']:.3f}, image floor "
        f"{t['image_floor']['pcc']:.3f}, bicubic {t['bicubic']['pcc']:.3f})"
    )
