"""``dst.tl.super_resolve``: whole-slide super-resolution, tiled with dask, written back to the SpatialData."""

from __future__ import annotations

import contextlib
import copy
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import dask
import dask.array as da
import numpy as np
import torch
from scipy import ndimage

from .. import _logging as log
from .._compat import deprecated_arguments
from .._contract import Prepared, is_prepared, read_record, read_window
from .._degradation import BinDegradation, SpotDegradation, degradation_for
from .._genes import resolve_genes
from .._grid import Grid
from .._normalise import to_counts
from .._settings import settings
from ..model import Diffusion
from ._data import TileSource
from ._features import feature_key
from ._model import DiffST, fingerprint
from ._output import Units, check_sr_free, sr_image, write_sr
from ._run import format_duration

if TYPE_CHECKING:
    import xarray as xr
    from spatialdata import SpatialData

SamplerName = Literal["fast", "ddpm", "ddim", "dpmsolver"]

#: Output chunk side in LR pixels (each chunk is computed from the windows that reach it).
DEFAULT_BLOCK_LR = 48


@deprecated_arguments(renamed={"key": "prepared_key"}, positional=("model",))
def super_resolve(
    sdata: SpatialData,
    *,
    model: DiffST | str | Path | None = None,
    genes: str | list[str] | None = None,
    prepared_key: str = "diffst",
    sampler: SamplerName = "fast",
    steps: int | None = None,
    n_samples: int = 1,
    average_flips: bool = True,
    consistency: bool = True,
    tile_overlap: float = 0.25,
    batch_size: int = 16,
    seed: int = 0,
    units: Units = "counts",
    key_added: str = "diffst_sr",
    overwrite: bool = False,
    inplace: bool = True,
    block_lr: int = DEFAULT_BLOCK_LR,
) -> dict[str, xr.DataArray] | None:
    """Super-resolve gene maps over the whole tissue and write them into the SpatialData.

    The tissue is covered by overlapping model windows; each window is sampled with its own seed (so the result does
    not depend on how the work is split up), windows are blended with weights that fall to zero at their borders (no
    visible seams), and several samples give a mean and a per-pixel standard deviation. With ``consistency``, each
    sample is rescaled so that degrading it with the data's operator (sum-pooling or Visium spots) gives back the
    observed LR counts exactly. The work runs lazily over chunks of the slide with dask, so memory does not grow with
    slide size and a ``dask.distributed`` cluster can run it (create a ``Client`` first).

    Parameters
    ----------
    sdata
        The SpatialData: prepared with :func:`diffst.pp.prepare`, or raw (then it is prepared under ``prepared_key`` with the
        model's genes and units; a Visium slide with only spots works).
    model
        A :class:`diffst.DiffST`, a path to a saved one, or ``None``: the model :func:`diffst.tl.train` recorded in
        ``sdata.attrs[prepared_key]['model']``; if there is none, one is trained with the defaults first (you are told).
    genes
        Genes to write (default: all the model's genes). The model always predicts its genes jointly.
    prepared_key
        Key of the prepared data.
    sampler
        ``"fast"`` (the model's fast sampler, DPM-Solver++), ``"ddim"``, ``"dpmsolver"`` or ``"ddpm"`` (1000 ancestral
        steps, as in the paper; slow).
    steps
        Sampler steps (default: the model's, 20 for the fast samplers).
    n_samples
        Samples per pixel; more than one adds ``images[key_added + '_std']``. For a model with a guard (trained with
        HR truth and validation tiles), that is the predictive std of a measured count: the spread of the samples plus
        Poisson counting noise, scaled per gene so that mean ± 2 std covered 95 % of the validation counts;
        otherwise the spread of the samples.
    average_flips
        The mean map of each window is the network's mean head averaged over the 8 rotations/flips of the window
        (test-time augmentation: 8 calls of the head instead of 1; ``False`` is faster, most of all with
        ``n_samples=1``, where the head is the whole cost). The benchmarks page of the documentation says what it
        changes on real tissue and what it costs. Applies to models with a mean head trained on HR truth (the default
        refiner, ``objective="regression"``); the paper's ``"diffusion"`` objective and models trained from spots
        alone are not averaged (recorded as ``False`` in ``sdata.attrs``).
    consistency
        Enforce that the map, re-degraded, reproduces the observed LR counts exactly (non-negative).
    tile_overlap
        Overlap of neighbouring windows as a fraction of the window (``0 ≤ tile_overlap < 1``).
    batch_size
        Windows per network call.
    seed
        Same seed, same map (on the same device).
    units
        ``"counts"``: expected counts per HR pixel (re-binning compares with LR counts); ``"log1p"``: log1p of them.
    key_added
        Name of the result.
    overwrite
        Replace an existing result of that name.
    inplace
        Write into ``sdata`` (``True``) or return the maps without touching it: with ``False``, a preparation or a
        training the call needs (no prepared data, no model) is done on a detached copy, and ``sdata`` (elements,
        attrs, store) stays exactly as it was.
    block_lr
        Output chunk side in LR pixels (memory per chunk grows with its square).

    Returns
    -------
    ``None`` when ``inplace`` (writes ``images[key_added]``, ``images[key_added + '_std']`` when ``n_samples > 1``,
    ``sdata.attrs[key_added]``; on disk too for a zarr-backed SpatialData); else ``{"mean": DataArray, "std": DataArray
    or None}``.

    """
    t_start = time.perf_counter()
    _check_arguments(sampler, steps, n_samples, tile_overlap, batch_size, units, block_lr)
    if inplace:
        check_sr_free(sdata, key_added, overwrite=overwrite)
    else:
        # a preparation or a training this call needs goes into a detached copy: `sdata` is left exactly as it was
        sdata = _detached(sdata)
    model = _resolve_model(sdata, model, prepared_key)
    if not is_prepared(sdata, prepared_key):
        _prepare_for(sdata, model, prepared_key)
    prep = Prepared.from_sdata(sdata, prepared_key)
    want = _resolve_genes(genes, model)
    model.check_compatible(prep, genes=want)
    if prep.image.key not in sdata.images:
        msg = "The SpatialData has no tissue image for this model; diffst needs the image the data were prepared with."
        raise ValueError(msg)
    transferred = model.info.get("prepared_fingerprint") != fingerprint(prep)
    if transferred:
        log.info("the model was trained on another slide: per-gene scales are adapted from this slide's LR counts")

    job = _Job.build(sdata, prep, model, want, sampler=sampler, steps=steps, n_samples=n_samples,
                     average_flips=average_flips, consistency=consistency, tile_overlap=tile_overlap,
                     batch_size=batch_size, seed=seed, block_lr=block_lr)  # fmt: skip
    log.info(
        f"super-resolving {len(want)} genes over {len(job.windows)} windows of {model.config.tile_um:g} µm "
        + (
            f"({job.sampler}, {job.steps} steps, {n_samples} sample{'s' if n_samples > 1 else ''}) in "
            if model.config.supervision == "hr"
            else f"(leave-spots-out: each pixel predicted with its own spot hidden, {n_samples} random "
            f"split{'s' if n_samples > 1 else ''}) in "
        )
        + f"{len(job.blocks)} chunks"
    )
    stack = job.dask_array()
    guard = model.info.get("guard")
    if guard:
        stack = _apply_guard(stack, sdata, prep, model, want, guard)
    if units == "log1p":
        # log1p of the expected counts; the std follows by the delta method, std / (1 + mean)
        stack = da.stack([da.log1p(stack[0]), stack[1] / (1.0 + stack[0])])
    params = {
        "model_path": str(model.path) if model.path else None,
        "sampler": job.sampler,
        "steps": job.steps,
        "n_samples": int(n_samples),
        "average_flips": job.average_flips,
        "consistency": bool(consistency),
        "tile_overlap": float(tile_overlap),
        "seed": int(seed),
        "transferred": bool(transferred),
        "gene_scale": [float(v) for v in job.gene_scale[job.out_index]],
        "guard": _guard_params(guard, model, want),
    }
    with _scratch(sdata if inplace else None) as scratch:
        stack = _compute(stack, scratch, job.window_runs())
        mean = stack[0]
        std = stack[1] if n_samples > 1 else None
        if not inplace:
            out = {"mean": _level0(sr_image(np.asarray(mean), want, prep))}
            out["std"] = _level0(sr_image(np.asarray(std), want, prep)) if std is not None else None
            log.info(f"done in {time.perf_counter() - t_start:.1f} s")
            return out
        write_sr(sdata, prep, key_added=key_added, mean=mean, std=std, genes=want, units=units,
                 method="regression" if model.config.objective == "regression" and model.config.supervision == "hr"
                 else "diffst",
                 params=params, overwrite=overwrite)  # fmt: skip
    log.info(f"wrote images[{key_added!r}] in {time.perf_counter() - t_start:.1f} s")
    return None


# ---------------------------------------------------------------------------------------------------------------


def _apply_guard(stack: da.Array, sdata, prep: Prepared, model: DiffST, want: list[str], guard: dict) -> da.Array:
    """Blend each gene's map with the image floor by the weight validation chose; scale the std by its calibration.

    ``mean = α_g · model + (1 − α_g) · floor`` (both LR-consistent, so the blend is too) and the predictive std
    ``c_g · sqrt((α_g · std)² + mean)`` (:func:`~diffst.tl._guard.predictive_std`), with ``α_g`` and ``c_g`` fitted on
    the validation windows by :func:`dst.tl.train`. A guard fitted before the Poisson term (no ``"std_noise"``) scales
    the sample spread alone: ``α_g · c_g · std``.
    """
    from ._baselines import slide_floor

    idx = [model.genes.index(g) for g in want]
    alpha = np.asarray(guard["alpha"], dtype=np.float32)[idx][:, None, None]
    scale = np.asarray(guard.get("std_scale", [1.0] * len(model.genes)), dtype=np.float32)[idx][:, None, None]
    mean, std = stack[0], stack[1]
    if np.any(alpha < 1):
        floor = slide_floor(sdata, prep)[[prep.genes.index(g) for g in want]]
        mean = mean * alpha + da.from_array(floor, chunks=mean.chunks) * (1.0 - alpha)
        log.info(
            f"guard: {int(np.sum(alpha[:, 0, 0] < 1))} of {len(want)} genes blended with the image floor "
            "(weights fitted on validation, see sdata.attrs[key_added]['guard'])"
        )
    if guard.get("std_noise") == "poisson":
        from ._guard import predictive_std

        return da.stack([mean, scale * predictive_std(mean, std * alpha)])
    return da.stack([mean, std * alpha * scale])


def _guard_params(guard: dict | None, model: DiffST, want: list[str]) -> dict | None:
    if not guard:
        return None
    idx = [model.genes.index(g) for g in want]
    return {
        "alpha": {g: float(guard["alpha"][i]) for g, i in zip(want, idx, strict=True)},
        "std_scale": {g: float(guard["std_scale"][i]) for g, i in zip(want, idx, strict=True)},
        "definition": "mean = alpha * model + (1 - alpha) * image floor; "
        + (
            "std = std_scale * sqrt((alpha * model std)^2 + mean), the sample spread plus Poisson counting noise"
            if guard.get("std_noise") == "poisson"
            else "std = alpha * std_scale * model std"
        ),
    }


def _check_arguments(sampler, steps, n_samples, tile_overlap, batch_size, units, block_lr) -> None:
    if sampler not in ("fast", "ddpm", "ddim", "dpmsolver"):
        msg = f"`sampler` must be 'fast', 'ddim', 'dpmsolver' or 'ddpm'; got {sampler!r}."
        raise ValueError(msg)
    if steps is not None and (not isinstance(steps, int | np.integer) or steps < 1):
        msg = f"`steps` must be a positive integer; got {steps!r}."
        raise ValueError(msg)
    if not isinstance(n_samples, int | np.integer) or n_samples < 1:
        msg = f"`n_samples` must be an integer ≥ 1 (samples per pixel); got {n_samples!r}."
        raise ValueError(msg)
    if not 0 <= tile_overlap < 1:
        msg = f"`tile_overlap` must be a fraction of the window in [0, 1); got {tile_overlap!r}."
        raise ValueError(msg)
    if batch_size < 1:
        msg = f"`batch_size` must be ≥ 1; got {batch_size!r}."
        raise ValueError(msg)
    if units not in ("counts", "log1p"):
        msg = f"`units` must be 'counts' or 'log1p'; got {units!r}."
        raise ValueError(msg)
    if block_lr < 1:
        msg = f"`block_lr` must be ≥ 1; got {block_lr!r}."
        raise ValueError(msg)


def _resolve_model(sdata: SpatialData, model: DiffST | str | Path | None, key: str) -> DiffST:
    if isinstance(model, DiffST):
        return model
    if model is not None:
        return DiffST.load(model)
    recorded = read_record(sdata, key).model if is_prepared(sdata, key) else None
    if recorded and Path(recorded["path"]).exists():
        log.info(f"using the model trained for this SpatialData: {recorded['path']}")
        return DiffST.load(recorded["path"])
    if recorded:
        log.warn(f"the recorded model {recorded['path']} is gone; training a new one")
    from ..pp import prepare
    from ._train import train

    if not is_prepared(sdata, key):
        log.info(f"no prepared data under {key!r}: preparing with the defaults (dst.pp.prepare)")
        prepare(sdata, key_added=key)
    log.info("no trained model for this SpatialData: training one with the defaults (dst.tl.train)")
    return train(sdata, prepared_key=key)


def _detached(sdata: SpatialData) -> SpatialData:
    """A shallow, unbacked copy: the same elements (not copied), its own element dicts and a deep copy of the attrs."""
    from spatialdata import SpatialData

    return SpatialData(
        images=dict(sdata.images),
        labels=dict(sdata.labels),
        points=dict(sdata.points),
        shapes=dict(sdata.shapes),
        tables=dict(sdata.tables),
        attrs=copy.deepcopy(dict(sdata.attrs)),
    )


def _prepare_for(sdata: SpatialData, model: DiffST, key: str) -> None:
    from ..pp import prepare

    u = model.units
    degradation = u["degradation"] if u["degradation"] in ("bin", "visium") else "bin"
    log.info(f"preparing the data under {key!r} with the model's {len(model.genes)} genes and units")
    prepare(
        sdata,
        genes=model.genes,
        lr_um=u["lr_um"],
        scale=u["scale"],
        degradation=degradation,
        tile_um=model.config.tile_um,
        key_added=key,
    )


def _resolve_genes(genes: str | list[str] | None, model: DiffST) -> list[str]:
    return resolve_genes(
        genes,
        model.genes,
        empty="or None for all the model's genes",
        unknown=lambda missing: (
            f"The model does not know {len(missing)} of the requested genes (it predicts {len(model.genes)}):"
        ),
    )


def blend_weights(size: int, overlap: int) -> np.ndarray:
    """1-D window weights: a linear ramp over ``overlap`` pixels at each end (tiny but > 0 at the border)."""
    w = np.ones(size, dtype=np.float32)
    if overlap > 0:
        ramp = (np.arange(overlap, dtype=np.float32) + 0.5) / overlap
        w[:overlap] = ramp
        w[-overlap:] = ramp[::-1]
    return w


def _level0(element: Any) -> Any:
    from .._spatial import image_levels

    return image_levels(element)[0]


@dataclass
class _Job:
    """A picklable description of the whole super-resolution; ``run_block`` computes one output chunk."""

    source: TileSource
    net: Any
    diffusion: Any
    grid: Grid
    windows: np.ndarray  # (n, 2) LR origins
    blocks: list[tuple[int, int]]
    block_lr: int
    window_lr: int
    overlap_hr: int
    halo_lr: int
    operator: BinDegradation | SpotDegradation | None
    lr_counts: np.ndarray  # (G_model, h, w) observed LR counts in the model's gene order
    observed: np.ndarray
    gene_scale: np.ndarray
    out_index: np.ndarray
    image_um: float
    sampler: str
    steps: int
    n_samples: int
    average_flips: bool  # whether the mean head is averaged over the 8 rotations/flips (only where there is one)
    consistency: bool
    batch_size: int
    seed: int

    @classmethod
    def build(cls, sdata, prep: Prepared, model: DiffST, want: list[str], *, sampler, steps, n_samples, consistency,
              tile_overlap, batch_size, seed, block_lr, average_flips: bool) -> _Job:  # fmt: skip
        cfg = model.config
        grid = prep.grid
        window_lr = cfg.lr_px
        stride = max(1, int(round(window_lr * (1 - tile_overlap))))
        overlap_hr = (window_lr - stride) * grid.scale
        h, w = grid.lr_shape
        tissue = np.asarray(sdata[prep.elements["tissue"]].values, dtype=bool)
        reach = ndimage.binary_dilation(tissue, iterations=1) if tissue.any() else tissue
        rows = _starts(h, window_lr, stride)
        cols = _starts(w, window_lr, stride)
        windows = [
            (r, c) for r in rows for c in cols if reach[max(r, 0) : r + window_lr, max(c, 0) : c + window_lr].any()
        ]
        blocks = [(r, c) for r in range(0, h, block_lr) for c in range(0, w, block_lr)]
        op = degradation_for(sdata, prep) if consistency else None
        halo = 0
        if isinstance(op, SpotDegradation):
            halo = int(np.ceil(op.diameter_um / grid.lr_um)) + 2
        lr_all = np.asarray(sdata[prep.elements["lr"]].values, dtype=np.float32)
        model_index = np.array([prep.genes.index(g) for g in model.genes])
        resolved = cfg.sampler if sampler == "fast" else sampler
        if resolved == "ddpm" and sampler == "fast":
            resolved = "dpmsolver"
        n_steps = steps or (cfg.num_train_timesteps if resolved == "ddpm" else cfg.sample_steps)
        source = TileSource.from_sdata(sdata, prep, genes=model.genes, footprint=cfg.supervision == "lr",
                                       features=feature_key(sdata, prep, model))  # fmt: skip
        source = source.cache_image(cfg.image_um)
        source.lr = lr_all  # small: keep it in the task instead of re-reading the store
        source.hr = None
        net = model.net.eval()
        gene_scale = model.gene_scale_for(prep)
        return cls(
            source=source,
            net=net,
            diffusion=Diffusion(cfg, gene_scale=torch.from_numpy(np.asarray(gene_scale, dtype=np.float32))),
            grid=grid,
            windows=np.array(windows, dtype=np.int64).reshape(-1, 2),
            blocks=blocks,
            block_lr=block_lr,
            window_lr=window_lr,
            overlap_hr=overlap_hr,
            halo_lr=halo,
            operator=op,
            lr_counts=lr_all[model_index],
            observed=prep.coverage > 0,
            gene_scale=gene_scale,
            out_index=np.array([model.genes.index(g) for g in want]),
            image_um=cfg.image_um,
            sampler=resolved,
            steps=int(n_steps),
            n_samples=int(n_samples),
            average_flips=bool(average_flips and cfg.supervision == "hr" and cfg.objective != "diffusion"),
            consistency=bool(consistency),
            batch_size=int(batch_size),
            seed=int(seed),
        )

    # -------------------------------------------------------------- one chunk
    def dask_array(self) -> da.Array:
        """``(2, genes, H, W)`` lazy array: mean and standard deviation over samples."""
        s = self.grid.scale
        hh, ww = self.grid.hr_shape
        b = self.block_lr * s
        chunks = ((2,), (len(self.out_index),), _chunks(hh, b), _chunks(ww, b))
        ctx = dask.delayed(self, pure=True, traverse=False)
        return da.map_blocks(
            _run_block, dtype=np.float32, chunks=chunks, ctx=ctx, meta=np.zeros((0, 0, 0, 0), np.float32)
        )

    def window_runs(self) -> int:
        """Window samplings over all chunks (a window reaching several chunks is sampled for each)."""
        s, b = self.grid.scale, self.block_lr
        h, w = self.grid.lr_shape
        return sum(
            len(self._touching(*self._region((r * s, min(r + b, h) * s), (c * s, min(c + b, w) * s))))
            for r, c in self.blocks
        )

    def _region(self, hr_rows: tuple[int, int], hr_cols: tuple[int, int]) -> tuple[int, int, int, int]:
        """LR pixels ``r0, c0, r1, c1`` whose windows a chunk of HR pixels needs (with the spot halo)."""
        s = self.grid.scale
        r0, c0 = hr_rows[0] // s - self.halo_lr, hr_cols[0] // s - self.halo_lr
        r1, c1 = -(-hr_rows[1] // s) + self.halo_lr, -(-hr_cols[1] // s) + self.halo_lr
        return r0, c0, r1, c1

    def _touching(self, r0: int, c0: int, r1: int, c1: int) -> np.ndarray:
        """Origins of the windows that overlap LR pixels ``[r0, r1) × [c0, c1)``."""
        wr, wc = self.windows[:, 0], self.windows[:, 1]
        hit = (wr < r1) & (wr + self.window_lr > r0) & (wc < c1) & (wc + self.window_lr > c0)
        return self.windows[hit]

    def run_block(self, hr_rows: tuple[int, int], hr_cols: tuple[int, int]) -> np.ndarray:
        """Mean and std (expected counts) of the HR pixels ``[rows) × [cols)``: ``(2, genes, rows, cols)``.

        Windows are blended with weights that fall off towards their borders: the mean maps and the *variances* over
        samples within each window, so the std does not dip where windows overlap (averaging independent samples of
        neighbouring windows would shrink it there). LR consistency rescales the blended mean; the std follows the
        same per-pixel factor.
        """
        s = self.grid.scale
        r0, c0, r1, c1 = self._region(hr_rows, hr_cols)
        acc, var, wsum = self._blend(r0, c0, r1, c1)
        w = np.maximum(wsum, 1e-12)[None]
        mean = acc / w
        std = np.sqrt(np.maximum(var / w, 0.0))
        if self.consistency and self.operator is not None:
            proj = self._project(mean, r0, c0, r1, c1)
            ratio = np.where(mean > 0, proj / np.where(mean > 0, mean, 1.0), 1.0)
            mean, std = proj, std * ratio
        cut = (self.out_index, slice(hr_rows[0] - r0 * s, hr_rows[1] - r0 * s),
               slice(hr_cols[0] - c0 * s, hr_cols[1] - c0 * s))  # fmt: skip
        return np.stack([mean[cut], std[cut]]).astype(np.float32)

    def _blend(self, r0: int, c0: int, r1: int, c1: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        s = self.grid.scale
        n_genes = len(self.gene_scale)
        size = self.window_lr * s
        acc = np.zeros((n_genes, (r1 - r0) * s, (c1 - c0) * s), dtype=np.float64)
        var = np.zeros_like(acc)
        wsum = np.zeros(acc.shape[1:], dtype=np.float64)
        if len(self.windows) == 0:
            return acc, var, wsum
        todo = self._touching(r0, c0, r1, c1)
        w1 = blend_weights(size, self.overlap_hr)
        weight = np.outer(w1, w1)
        per_batch = 1 if self.sampler == "ddpm" else max(1, self.batch_size // self.n_samples)
        for i in range(0, len(todo), per_batch):
            group = todo[i : i + per_batch]
            means, variances = self._sample_windows(group)  # (len(group), G, size, size) counts each
            for (wr0, wc0), m, v in zip(group, means, variances, strict=True):
                # window rows/cols relative to the block, clipped to it
                ar0, ac0 = (wr0 - r0) * s, (wc0 - c0) * s
                sr0, sc0 = max(0, -ar0), max(0, -ac0)
                er, ec = min(size, acc.shape[1] - ar0), min(size, acc.shape[2] - ac0)
                tgt = (slice(ar0 + sr0, ar0 + er), slice(ac0 + sc0, ac0 + ec))
                wpart = weight[sr0:er, sc0:ec]
                acc[(slice(None), *tgt)] += m[:, sr0:er, sc0:ec] * wpart
                var[(slice(None), *tgt)] += v[:, sr0:er, sc0:ec] * wpart
                wsum[tgt] += wpart
            if _progress is not None:  # a local run's bar (workers of a cluster have none)
                _progress.update(len(group))
        return acc, var, wsum

    def _sample_windows(self, group: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mean map and variance over samples, in expected counts, of each window: two ``(n, G, size, size)``."""
        items = [
            self.source.read(int(r), int(c), self.window_lr, self.image_um, self.gene_scale, with_hr=False)
            for r, c in group
        ]
        k = self.n_samples
        device = next(self.net.parameters()).device
        lr = torch.from_numpy(np.stack([it["lr"] for it in items])).to(device)
        mask = torch.from_numpy(np.stack([it["mask"] for it in items])).to(device)
        image = torch.from_numpy(np.stack([it["image"] for it in items])).to(device)
        size = self.window_lr * self.grid.scale
        n, g = len(group), len(self.gene_scale)
        if self.diffusion.config.supervision == "lr":
            return self._leave_out_windows(group, items, lr, mask, image)
        with torch.inference_mode():
            head = self.diffusion.predict_mean(self.net, lr, mask, image, average_flips=self.average_flips,
                                               max_batch=self.batch_size)  # fmt: skip
        mean = None if head is None else to_counts(head.float().cpu().numpy(), self.gene_scale)
        if mean is not None and (k == 1 or self.diffusion.config.objective == "regression"):
            return mean, np.zeros_like(mean)
        noise = []
        for r, c in group:
            gen = torch.Generator().manual_seed(_window_seed(self.seed, int(r), int(c)))
            noise.append(torch.randn((k, g, size, size), generator=gen))
        noise = torch.cat(noise).to(device)
        gen = torch.Generator().manual_seed(_window_seed(self.seed, int(group[0][0]), int(group[0][1])) + 1)
        rep = {"lr": lr, "mask": mask, "image": image}
        rep = {name: v.repeat_interleave(k, 0) for name, v in rep.items()}
        with torch.inference_mode():
            x = self.diffusion.sample(
                self.net, rep["lr"], rep["mask"], rep["image"], sampler=self.sampler, steps=self.steps, noise=noise,
                generator=gen, mean=None if head is None else head.repeat_interleave(k, 0),
            )  # fmt: skip
        samples = to_counts(x.float().cpu().numpy(), self.gene_scale).reshape(n, k, g, size, size)
        # the refiner's map is its mean head (samples scatter around it); the paper's is the average of samples
        return (samples.mean(axis=1) if mean is None else mean), samples.var(axis=1)

    def _leave_out_windows(
        self, group: np.ndarray, items: list[dict], lr, mask, image
    ) -> tuple[np.ndarray, np.ndarray]:
        """A model trained from the spots alone: ``n_samples`` leave-spots-out maps per window, their mean and variance.

        Each map splits the window's LR pixels into two random groups (seeded by the window's position, so that it
        does not depend on the batch) and predicts every HR pixel with its own spot hidden, as training did
        (:func:`diffst.model.weak.leave_out`).
        """
        from ..model import weak

        device = lr.device
        foot = torch.from_numpy(np.stack([it["foot"] for it in items])).to(device)
        offset = torch.from_numpy(np.stack([it["offset"] for it in items])).to(device)
        gens = [torch.Generator().manual_seed(_window_seed(self.seed, int(r), int(c))) for r, c in group]
        maps = []
        for _ in range(self.n_samples):
            split = torch.stack([torch.rand(mask.shape[1:], generator=gen) < 0.5 for gen in gens]).to(device)
            with torch.inference_mode():
                hr = weak.leave_out(lambda lr_, m_: self.diffusion.predict_mean(self.net, lr_, m_, image), lr, mask,
                                    foot, offset, self.grid.scale, split)  # fmt: skip
            maps.append(to_counts(hr.float().cpu().numpy(), self.gene_scale))
        samples = np.stack(maps, axis=1)
        return samples.mean(axis=1), samples.var(axis=1)

    def _project(self, x: np.ndarray, r0: int, c0: int, r1: int, c1: int) -> np.ndarray:
        """LR-consistency on the region ``[r0, r1) × [c0, c1)`` of LR pixels (zero-padded outside the grid)."""
        h, w = self.grid.lr_shape
        rr0, cc0, rr1, cc1 = max(r0, 0), max(c0, 0), min(r1, h), min(c1, w)
        lr = read_window(self.lr_counts, (r0, r1), (c0, c1), dtype=np.float64)
        obs = read_window(self.observed, (r0, r1), (c0, c1), dtype=bool)
        if isinstance(self.operator, BinDegradation):
            return self.operator.project(x, lr, obs)
        # spots: work on the part of the region inside the grid (HR pixels beyond it do not exist)
        g = self.grid
        s = g.scale
        x = x.copy()
        inner = (slice(None), slice((rr0 - r0) * s, (rr1 - r0) * s), slice((cc0 - c0) * s, (cc1 - c0) * s))
        op, inside = self.operator.window(rr0, cc0, rr1, cc1)
        # an LR pixel can be made exact here only if none of its spots' discs is cut by the region's border; the
        # halo is wide enough that every spot reaching the chunk itself is whole, so neighbouring chunks agree
        whole = np.isclose(op.weights.sum(axis=(1, 2)), self.operator.weights[inside].sum(axis=(1, 2)))
        sub_obs = obs[rr0 - r0 : rr1 - r0, cc0 - c0 : cc1 - c0]
        cut = np.bincount(op.lr_index, weights=~whole, minlength=sub_obs.size).reshape(sub_obs.shape) > 0
        x[inner] = op.project(x[inner], lr[:, rr0 - r0 : rr1 - r0, cc0 - c0 : cc1 - c0], sub_obs & ~cut)
        return x


#: The progress bar of the super-resolution running in this process, if any (see :func:`_compute`).
_progress: Any = None


def _run_block(block_info: dict | None = None, ctx: _Job | None = None) -> np.ndarray:
    loc = block_info[None]["array-location"]
    # tasks may read lazily-loaded image chunks: do it in this thread, never through a nested scheduler
    with dask.config.set(scheduler="synchronous"):
        return ctx.run_block(loc[2], loc[3])


def _window_seed(seed: int, row: int, col: int) -> int:
    return int(np.random.SeedSequence([seed, row + 2**20, col + 2**20]).generate_state(1)[0])


def _starts(n: int, size: int, stride: int) -> list[int]:
    """Window origins covering ``[0, n)``: every ``stride``, the last one ending at or after ``n``."""
    starts = list(range(0, max(n - size, 0) + 1, stride))
    if starts[-1] + size < n:
        starts.append(starts[-1] + stride)
    return starts


def _chunks(n: int, b: int) -> tuple[int, ...]:
    return tuple([b] * (n // b) + ([n % b] if n % b else []))


class _LogProgress:
    """The bar's ``update`` as plain log lines every ``dst.settings.progress_every`` seconds (output to a file)."""

    def __init__(self, total: int) -> None:
        self.total, self.n = int(total), 0
        self.t0 = self.last = time.perf_counter()

    def update(self, n: int) -> None:
        self.n += int(n)
        now = time.perf_counter()
        if now - self.last >= settings.progress_every or self.n >= self.total:
            self.last = now
            spent = now - self.t0
            left = spent / self.n * (self.total - self.n) if self.n else 0.0
            log.info(
                f"super-resolving: {self.n}/{self.total} windows · {format_duration(spent)} · "
                f"about {format_duration(left)} left"
            )


@contextlib.contextmanager
def _progress_bar(total: int, show: bool):
    """Install a progress display over ``total`` window samplings as this process's :data:`_progress`.

    A tqdm bar in a terminal or a notebook, plain log lines otherwise.
    """
    global _progress
    if not show:
        yield
        return
    if log.interactive():
        from tqdm.auto import tqdm

        bar: Any = tqdm(total=total, desc="super-resolving", unit="window")
    else:
        bar = contextlib.nullcontext(_LogProgress(total))
    with bar as progress:
        _progress = progress
        try:
            yield
        finally:
            _progress = None


@contextlib.contextmanager
def _scratch(sdata: SpatialData | None):
    """A temporary folder beside a zarr-backed SpatialData (same disk), else None."""
    if sdata is None or sdata.path is None or not Path(sdata.path).exists():
        yield None
        return
    path = Path(tempfile.mkdtemp(prefix=".diffst-tmp-", dir=Path(sdata.path).parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _compute(stack: da.Array, scratch: Path | None, windows: int) -> Any:
    """Run the graph: into a scratch zarr store (bounded memory, for zarr-backed data) or into memory.

    Without a ``dask.distributed`` client the chunks run one after the other (torch already uses every core), with a
    progress bar over the ``windows`` window samplings; on a cluster, its dashboard shows the progress.
    """
    try:
        from distributed import get_client

        get_client()
        distributed = True
    except (ImportError, ValueError):
        distributed = False
    show = not distributed and settings.verbosity >= 1
    local = contextlib.nullcontext() if distributed else dask.config.set(scheduler="threads", num_workers=1)
    with _progress_bar(windows, show), local:
        if scratch is not None:
            target = str(scratch / "sr.zarr")
            stack.to_zarr(target)
            return da.from_zarr(target)
        return np.asarray(stack.compute())
