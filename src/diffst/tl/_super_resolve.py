"""``dst.tl.super_resolve``: whole-slide super-resolution, tiled with dask, written back to the SpatialData."""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import dask.array as da
import numpy as np

from .. import _logging as log
from .._contract import Prepared, is_prepared, read_record
from .._device import resolve_device, resolve_precision
from .._genes import GeneError, resolve_genes
from .._store import scratch_beside
from ._inference import DEFAULT_BLOCK_LR, SAMPLERS, InferencePipeline, compute
from ._model import DiffST, Guard, fingerprint
from ._output import Units, check_sr_free, sr_image, write_sr
from ._run import on_interrupt

if TYPE_CHECKING:
    import xarray as xr
    from spatialdata import SpatialData

SamplerName = Literal["fast", "ddpm", "ddim", "dpmsolver"]
Precision = Literal["auto", "float32", "bfloat16"]


def super_resolve(
    sdata: SpatialData,
    *,
    model: DiffST | str | Path | None = None,
    genes: str | list[str] | None = None,
    prepared_key: str = "diffst",
    image_key: str | None = None,
    device: str = "auto",
    precision: Precision = "auto",
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
    """Super-resolve gene maps over the whole tissue and write them into the SpatialData; prepare and train first if needed.

    On a raw SpatialData (not prepared, no model) the call does the whole workflow: it prepares the data with the
    ``genes`` asked for (:func:`diffst.pp.prepare`), trains a model on them (:func:`diffst.tl.train`, about 10
    minutes on a laptop CPU) and writes their maps. On prepared data or with a model, the genes asked for must be
    among the prepared or the model's genes; if they are not, the call says which call adds them, before any work.

    The tissue is covered by overlapping model windows; each window is sampled with its own seed (so the result does
    not depend on how the work is split up), windows are blended with weights that fall to zero at their borders (no
    visible seams), and several samples give a mean and a per-pixel standard deviation. With ``consistency``, each
    sample is rescaled so that degrading it with the data's operator (sum-pooling or Visium spots) gives back the
    observed LR counts exactly. The work runs lazily over chunks of the slide with dask, so memory does not grow with
    slide size and a ``dask.distributed`` cluster can run it (create a ``Client`` first).

    Parameters
    ----------
    sdata
        The SpatialData: prepared with :func:`diffst.pp.prepare`, or raw (then it is prepared under ``prepared_key``:
        with the model's genes and units when a model is given, else with ``genes``; a Visium slide with only spots
        works).
    model
        A :class:`diffst.DiffST`, a path to a saved one, or ``None``: the model :func:`diffst.tl.train` recorded in
        ``sdata.attrs[prepared_key]['model']``; if there is none, one is trained with the defaults first (you are told).
    genes
        Genes to write (default: all the model's genes). The model always predicts its genes jointly. On raw data
        without a model, the genes the data are prepared and the model trained with (default: 25 spatially variable
        genes).
    prepared_key
        Key of the prepared data.
    image_key
        The tissue image, when the call prepares the data itself and the SpatialData has several (e.g. a Xenium
        slide's ``"morphology_focus"`` and its registered ``"he_image"``); see :func:`diffst.pp.prepare`.
    device
        Where the network runs: ``"auto"`` (CUDA when there is a GPU, then Apple's MPS, else the CPU), ``"cpu"``,
        ``"cuda"``, ``"cuda:N"`` or ``"mps"``; the model is moved there. With a ``dask.distributed`` cluster, the
        workers must have that device.
    precision
        Number format of the network's forward passes: ``"auto"`` (bfloat16 where the device computes it natively —
        a recent NVIDIA GPU, or a CPU with AVX512-BF16/AMX — else float32), ``"float32"`` or ``"bfloat16"``. The
        benchmarks page of the documentation says what bfloat16 changes in the maps and what it saves. The result
        records the precision used (``sdata.attrs[key_added]['precision']``).
    sampler
        ``"fast"`` (the model's fast sampler, DPM-Solver++), ``"ddim"``, ``"dpmsolver"`` or ``"ddpm"`` (1000 ancestral
        steps, as in the paper; slow).
    steps
        Sampler steps (default: the model's, 10 for the fast samplers of the ``default`` preset).
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
    target = resolve_device(device)
    autocast = resolve_precision(precision, target)
    asked = None if genes is None else ([genes] if isinstance(genes, str) else list(genes))
    if asked is not None:
        resolve_genes(asked, asked, unknown=lambda missing: "", empty="or None for all of the model's genes")
    if inplace:
        check_sr_free(sdata, key_added, overwrite=overwrite)
    else:
        # a preparation or a training this call needs goes into a detached copy: `sdata` is left exactly as it was
        sdata = _detached(sdata)
    model = _model_for(sdata, model, asked, prepared_key, image_key)
    if not is_prepared(sdata, prepared_key):
        _prepare_for(sdata, model, prepared_key, image_key)
    prep = Prepared.from_sdata(sdata, prepared_key)
    want = _resolve_genes(asked, model, prepared_key)
    model.check_compatible(prep, genes=want)
    model.to(target)
    if prep.image.key not in sdata.images:
        msg = "The SpatialData has no tissue image for this model; diffst needs the image the data were prepared with."
        raise ValueError(msg)
    transferred = model.info.get("prepared_fingerprint") != fingerprint(prep)
    if transferred:
        log.info("the model was trained on another slide: per-gene scales are adapted from this slide's LR counts")

    guard = _guard_to_apply(model)
    pipe = InferencePipeline.from_model(sdata, prep, model, want, sampler=sampler, steps=steps, n_samples=n_samples,
                                        average_flips=average_flips, consistency=consistency,
                                        tile_overlap=tile_overlap, batch_size=batch_size, seed=seed,
                                        block_lr=block_lr, guard=guard if guard is not None else False,
                                        autocast=autocast)  # fmt: skip
    log.info(
        f"super-resolving {len(want)} genes over {len(pipe.windows)} windows of {model.config.tile_um:g} µm "
        + (
            f"({pipe.sampler}, {pipe.steps} steps, {n_samples} sample{'s' if n_samples > 1 else ''}) in "
            if model.config.supervision == "hr"
            else f"(leave-spots-out: each pixel predicted with its own spot hidden, {n_samples} random "
            f"split{'s' if n_samples > 1 else ''}) in "
        )
        + f"{len(pipe.blocks)} chunks"
    )
    stack = pipe.slide()
    if units == "log1p":
        # log1p of the expected counts; the std follows by the delta method, std / (1 + mean)
        stack = da.stack([da.log1p(stack[0]), stack[1] / (1.0 + stack[0])])
    params = {
        "model_path": str(model.path) if model.path else None,
        "sampler": pipe.sampler,
        "steps": pipe.steps,
        "n_samples": int(n_samples),
        "average_flips": pipe.average_flips,
        "precision": "float32" if autocast is None else "bfloat16",
        "consistency": bool(consistency),
        "tile_overlap": float(tile_overlap),
        "seed": int(seed),
        "transferred": bool(transferred),
        "gene_scale": [float(v) for v in pipe.gene_scale[pipe.out_index]],
        "guard": _guard_params(guard, model, want),
    }
    kept = "nothing was written: the SpatialData (and its store) are as they were"
    with (
        on_interrupt("super-resolving", kept, "run the call again"),
        scratch_beside(sdata if inplace else None) as scratch,
    ):
        stack = compute(stack, scratch, pipe.window_runs())
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


def _guard_params(guard: Guard | None, model: DiffST, want: list[str]) -> dict | None:
    if guard is None:
        return None
    idx = [model.genes.index(g) for g in want]
    return {
        "alpha": {g: guard.alpha[i] for g, i in zip(want, idx, strict=True)},
        "std_scale": {g: guard.std_scale[i] for g, i in zip(want, idx, strict=True)},
        "definition": "mean = alpha * model + (1 - alpha) * image floor; "
        + (
            "std = std_scale * sqrt((alpha * model std)^2 + mean), the sample spread plus Poisson counting noise"
            if guard.std_noise == "poisson"
            else "std = alpha * std_scale * model std"
        ),
    }


def _check_arguments(sampler, steps, n_samples, tile_overlap, batch_size, units, block_lr) -> None:
    if sampler not in SAMPLERS:
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
    """The model to apply: the one given, the one recorded for the prepared data, or one trained now."""
    return _model_for(sdata, model, None, key)


def _model_for(sdata: SpatialData, model: DiffST | str | Path | None, genes: list[str] | None, key: str,
               image_key: str | None = None) -> DiffST:  # fmt: skip
    """The model that predicts ``genes``: given, recorded, or trained now on data prepared with them.

    Genes the model (or the prepared data, when a model must be trained on them) does not have are an error that
    names the call which adds them, raised before any work.
    """
    if model is not None:
        model = model if isinstance(model, DiffST) else DiffST.load(model)
        _check_model_genes(model, genes, key)
        return model
    prepared = is_prepared(sdata, key)
    recorded = read_record(sdata, key).model if prepared else None
    if recorded and Path(recorded["path"]).exists():
        model = DiffST.load(recorded["path"])
        _check_model_genes(model, genes, key)
        log.info(f"using the model trained for this SpatialData: {recorded['path']}")
        return model
    if recorded:
        log.warn(f"the recorded model {recorded['path']} is gone; training a new one")
    from ..pp import prepare
    from ._train import train

    if prepared:
        have = Prepared.from_sdata(sdata, key).genes
        missing = [g for g in genes or [] if g not in have]
        if missing:
            msg = (
                f"The data under {key!r} are prepared with {len(have)} genes and lack {missing[:10]}. Prepare them with "
                f"the genes you ask for under another key and super-resolve from there: "
                f"`dst.tl.super_resolve(sdata, genes={genes!r}, prepared_key='{key}_genes')` (that prepares and "
                f"trains on them), or replace these: `dst.pp.prepare(sdata, genes={genes!r}, key_added={key!r}, "
                "overwrite=True)`."
            )
            raise GeneError(msg)
    else:
        what = f"the {len(genes)} genes asked for" if genes else "the defaults"
        log.info(f"no prepared data under {key!r}: preparing with {what} (dst.pp.prepare)")
        prepare(sdata, key_added=key, image_key=image_key, **({"genes": genes} if genes else {}))
    log.info("no trained model for this SpatialData: training one with the defaults (dst.tl.train)")
    return train(sdata, prepared_key=key)


def _check_model_genes(model: DiffST, genes: list[str] | None, key: str) -> None:
    missing = [g for g in genes or [] if g not in model.genes]
    if not missing:
        return
    names = list(model.genes)
    from .._spatial import suggest

    hints = "".join(f"\n  {g!r}:{suggest(g, names) or ' no close match'}" for g in missing[:10])
    msg = (
        f"The model does not know {len(missing)} of the requested genes (it predicts {len(names)}, the genes it was "
        f"trained on). Train one on yours: `dst.tl.super_resolve(sdata, genes={genes!r}, "
        f"prepared_key='{key}_genes')` without `model` (it prepares and trains on them under a new key), or "
        f"`dst.pp.prepare(sdata, genes={genes!r}, key_added='{key}_genes')` then "
        f"`dst.tl.train(sdata, prepared_key='{key}_genes')`." + hints
    )
    raise GeneError(msg)


def _guard_to_apply(model: DiffST) -> Guard | None:
    """The guard ``super_resolve`` applies: the model's; for a model never validated, the image floor (warned)."""
    if model.guard is not None or "steps" not in model.info:
        return model.guard  # guarded, or a model built by hand, not by `train` (advanced use: applied as it is)
    if model.info.get("validated"):
        log.warn(
            "the model was not compared with the training-free image floor on validation (trained with guard=False): "
            "its maps are written as trained, unchecked. `dst.tl.train(..., resume=True)` with the guard on fits it."
        )
        return None
    log.warn(
        "the model was never validated (no validation data and no guard): super_resolve writes the training-free "
        "image floor instead of its maps (as `dst.tl.upsample(sdata, method='image')`), with a Poisson std. Train it "
        "with validation (the default `dst.tl.train` always holds some out) to use the model."
    )
    return Guard.floor_only(len(model.genes), "image floor: the model was not validated")


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


def _prepare_for(sdata: SpatialData, model: DiffST, key: str, image_key: str | None = None) -> None:
    from ..pp import prepare

    u = model.units
    degradation = u.degradation if u.degradation in ("bin", "visium") else "bin"
    log.info(f"preparing the data under {key!r} with the model's {len(model.genes)} genes and units")
    prepare(
        sdata,
        genes=model.genes,
        lr_um=u.lr_um,
        scale=u.scale,
        degradation=degradation,
        tile_um=model.config.tile_um,
        context_genes=model.context_genes,
        image_key=image_key,
        key_added=key,
    )


def _resolve_genes(genes: list[str] | None, model: DiffST, key: str) -> list[str]:
    _check_model_genes(model, genes, key)
    return resolve_genes(genes, model.genes, unknown=lambda missing: "", empty="or None for all the model's genes")


def _level0(element: Any) -> Any:
    from .._spatial import image_levels

    return image_levels(element)[0]
