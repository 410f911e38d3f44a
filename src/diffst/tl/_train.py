"""``dst.tl.train``: train Diff-ST on prepared tiles with Lightning."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time
import warnings
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import lightning as L
import torch
from torch.utils.data import DataLoader

from .. import _logging as log
from .._settings import settings
from ..model import DiffSTConfig, DiffSTNet
from ._data import (
    Prepared,
    TileSource,
    WindowDataset,
    WindowSampler,
    choose_window,
    split_region,
    tiled_origins,
    window_origins,
)
from ._guard import fit_guard, guard_summary
from ._lightning import DiffSTModule, History
from ._model import DiffST, data_units, fingerprint

if TYPE_CHECKING:
    from spatialdata import SpatialData

Preset = Literal["default", "paper", "tiny"]

#: Optimiser steps a preset aims for when ``max_epochs`` is not given. 750 steps of ``default`` take about 5 minutes
#: on 2 CPU cores, where its validation loss has levelled off (benchmarks/bench_train.py).
DEFAULT_STEPS = {"default": 750, "tiny": 60}
PAPER_EPOCHS = 200
#: Validate about this often (in optimiser steps) unless ``check_val_every_n_epoch`` is given.
VAL_EVERY_STEPS = 50
#: Default wall-clock budget of one training, in seconds (``time_budget=None`` for none).
DEFAULT_TIME_BUDGET = 600.0
#: What selects the kept checkpoint and stops training early: the validation PCC of the mean map.
MONITOR = "val_pcc"


def train(
    sdata: SpatialData,
    *,
    key: str = "diffst",
    preset: Preset = "default",
    max_epochs: int | None = None,
    batch_size: int | None = None,
    accelerator: str = "auto",
    devices: int | str | list[int] = "auto",
    seed: int = 0,
    checkpoint_dir: str | Path | None = None,
    resume: bool = True,
    overwrite: bool = False,
    config: dict[str, Any] | None = None,
    patience: int = 10,
    val_steps: int = 10,
    num_workers: int = 0,
    time_budget: float | None = DEFAULT_TIME_BUDGET,
    guard: bool = True,
    **trainer_kwargs: Any,
) -> DiffST:
    """Train a Diff-ST model on the data that :func:`diffst.pp.prepare` made.

    Each step draws windows at random positions inside the training tiles (any LR-pixel offset, with a random one
    of the 8 rotations/flips), so that a small region still gives many distinct windows; the window side is the
    prepared tile (``tile_um``) at most, smaller when the training region is small. Validation windows are fixed
    (the validation tiles). Training optimises the objective with AdamW, keeps an exponential moving average (EMA) of the weights
    for sampling, and validates about every 50 steps: PCC and RMSE of the mean map beside bicubic up-sampling and
    the image floor (recorded in ``model.history``). The checkpoint with the best validation PCC is kept, training
    stops early when it stops improving or when ``time_budget`` runs out, and checkpoints let an interrupted run
    continue. Finally the guard (``diffst.tl._guard``) compares the model with the baselines on validation as
    ``super_resolve`` runs it, fits per-gene blend weights with the image floor and a calibration of the std map,
    prints the table and warns when the model does not beat the floor.

    Parameters
    ----------
    sdata
        SpatialData prepared with :func:`diffst.pp.prepare` (it needs HR truth: transcripts or Visium HD bins).
    key
        The ``key_added`` used in ``prepare``.
    preset
        Model size: ``"default"`` (small, trains on a laptop CPU in minutes), ``"paper"`` (the paper's Table 3;
        GPU) or ``"tiny"`` (tests).
    max_epochs
        Number of epochs; by default about 750 optimiser steps for ``"default"`` (about 5 minutes on 2 CPU cores), 200 epochs for ``"paper"``.
    batch_size
        Tiles per step (default: the preset's).
    accelerator, devices
        Lightning's: ``"auto"`` uses a GPU (CUDA, then MPS) when there is one. Several devices train with DDP
        (``strategy="ddp"`` in a script, ``"ddp_notebook"`` in Jupyter).
    seed
        Seed of weights, batches, noise and augmentation: same seed on the same device, same model.
    checkpoint_dir
        Where checkpoints and the final model go. Default: beside a zarr-backed SpatialData
        (``<store>.diffst/<key>-<config hash>/``), else ``dst.settings.cachedir/models/…``.
    resume
        Continue from the last checkpoint in ``checkpoint_dir`` if there is one.
    overwrite
        Start afresh even if ``checkpoint_dir`` holds an earlier run (replacing it).
    config
        Overrides of the preset's :class:`diffst.model.DiffSTConfig` fields (e.g. ``{"cam": False}`` for an
        ablation, ``{"learning_rate": 5e-4}``).
    patience
        Validation checks without improvement of the validation PCC before stopping (validation runs about every
        50 optimiser steps, or every ``check_val_every_n_epoch`` epochs if given).
    val_steps
        Fast-sampler steps for the per-epoch validation PCC.
    num_workers
        DataLoader worker processes (the training and validation regions are read into memory once).
    time_budget
        Wall-clock limit of training in seconds (default 600); ``None`` for none. A training stopped by it says so.
    guard
        Fit the guard on validation after training (see above); ``False`` skips it (the model is used as trained).
    trainer_kwargs
        Passed to :class:`lightning.Trainer` (e.g. ``strategy="ddp"``, ``max_time="00:00:05:00"``,
        ``precision="bf16-mixed"``).

    Returns
    -------
    The trained :class:`diffst.DiffST` (EMA weights). Its path is recorded in ``sdata.attrs[key]['model']`` (and written
    to the zarr store when backed), so :func:`diffst.tl.super_resolve` finds it.

    """
    prep = Prepared.from_sdata(sdata, key)
    if not prep.has_hr:
        msg = (
            f"The data under {key!r} have no HR truth ({prep.attrs['measurement']} measure only LR), so there is "
            "nothing to learn super-resolution from. Train on a slide with transcripts or Visium HD bins (prepared "
            "with `degradation='visium'` to mimic Visium) and apply the model to this one with `dst.tl.super_resolve`."
        )
        raise ValueError(msg)
    n_train = len(prep.tiles(sdata, "train"))
    if n_train == 0:
        msg = f"No training tiles under {key!r}; prepare with smaller `tile_um` or a larger train share in `split`."
        raise ValueError(msg)
    if max_epochs is not None and max_epochs < 1:
        msg = f"`max_epochs` must be at least 1; got {max_epochs}."
        raise ValueError(msg)
    if time_budget is not None and time_budget <= 0:
        msg = f"`time_budget` must be a positive number of seconds or None; got {time_budget!r}."
        raise ValueError(msg)

    region = split_region(prep, sdata, "train")
    # the prepared tile (400 µm by default, the default preset's) bounds the window; small regions get smaller ones
    window_lr = choose_window(region, prep.tile_lr)
    cfg = _config(prep, preset, batch_size, config, window_um=window_lr * prep.grid.lr_um)
    train_origins = window_origins(region, window_lr)
    val_origins = tiled_origins(prep.tiles(sdata, "val"), prep.tile_lr, window_lr)
    n_val = len(val_origins)
    # an epoch: about one pass over the training area
    epoch_len = max(cfg.batch_size, math.ceil(int(region.sum()) / window_lr**2))
    steps_per_epoch = math.ceil(epoch_len / cfg.batch_size)
    if max_epochs is None:
        max_epochs = (
            PAPER_EPOCHS if preset == "paper" else max(5, min(1000, math.ceil(DEFAULT_STEPS[preset] / steps_per_epoch)))
        )
    gene_scale = prep.hr_scale
    run_dir = Path(checkpoint_dir) if checkpoint_dir is not None else _default_dir(sdata, prep, key, cfg, seed)
    ckpt_dir = run_dir / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    ckpt_path = _resume_from(last, run_dir, cfg, resume=resume, overwrite=overwrite)

    L.seed_everything(seed, workers=True, verbose=False)
    source = TileSource.from_sdata(sdata, prep).cache_image(cfg.image_um)
    train_ds = WindowDataset(source, train_origins, window_lr, image_um=cfg.image_um, gene_scale=gene_scale)
    val_ds = WindowDataset(source, val_origins, window_lr, image_um=cfg.image_um, gene_scale=gene_scale)
    loader_gen = torch.Generator().manual_seed(seed)
    sampler = WindowSampler(len(train_ds), epoch_len, loader_gen)
    train_dl = DataLoader(train_ds, batch_size=cfg.batch_size, sampler=sampler, num_workers=num_workers)
    val_dl = DataLoader(val_ds, batch_size=cfg.batch_size, num_workers=num_workers) if n_val else None
    module = DiffSTModule(
        cfg.to_dict(), prep.coexpression.tolist(), val_steps=val_steps, gene_scale=[float(v) for v in gene_scale]
    )

    history = History()
    callbacks: list[L.Callback] = [history]
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=ckpt_dir,
        filename="best",
        monitor=MONITOR if n_val else None,
        mode="max",
        save_last=True,
        save_top_k=1,
        enable_version_counter=False,
    )
    callbacks.append(checkpoint)
    if n_val:
        callbacks.append(L.pytorch.callbacks.EarlyStopping(monitor=MONITOR, patience=patience, mode="max"))
    on_gpu = _uses_gpu(accelerator)
    trainer_args: dict[str, Any] = {
        "max_epochs": max_epochs,
        "accelerator": accelerator,
        "devices": devices,
        "callbacks": callbacks,
        "logger": L.pytorch.loggers.CSVLogger(run_dir, name="logs"),
        "enable_progress_bar": settings.verbosity >= 1,
        "enable_model_summary": settings.verbosity >= 2,
        "deterministic": not on_gpu,
        "precision": ("bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed") if on_gpu else "32-true",
        "log_every_n_steps": max(1, min(50, steps_per_epoch)),
        "num_sanity_val_steps": 0,
        "check_val_every_n_epoch": max(1, round(VAL_EVERY_STEPS / steps_per_epoch)),
    }
    if time_budget is not None:
        trainer_args["max_time"] = timedelta(seconds=float(time_budget))
    trainer_args.update(trainer_kwargs)
    with _quiet_lightning():
        trainer = L.Trainer(**trainer_args)
    area = prep.grid.lr_um**2 / 1e6  # mm² per LR pixel
    val_area = int(split_region(prep, sdata, "val").sum()) * area
    log.info(
        f"training preset {preset!r} ({cfg.objective}) on random {window_lr * prep.grid.lr_um:g} µm windows at "
        f"{len(train_origins)} positions × 8 rotations/flips in the training region ({int(region.sum()) * area:.3f} "
        f"mm²); validation: {n_val} fixed windows ({val_area:.3f} mm²); {max_epochs} epochs × {steps_per_epoch} "
        f"steps, batch {cfg.batch_size}, "
        + (f"time budget {time_budget:g} s" if time_budget is not None else "no time budget")
        + f"; checkpoints in {ckpt_dir}"
        + (f" (resuming from {ckpt_path.name})" if ckpt_path else "")
    )
    if not n_val:
        log.warn("no validation windows: the last weights are kept and nothing checks them against the baselines")
    t0 = time.perf_counter()
    with warnings.catch_warnings(), _quiet_lightning():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*LeafSpec.*")
        warnings.filterwarnings("ignore", message=".*exists and is not empty.*")
        trainer.fit(module, train_dl, val_dl, ckpt_path=ckpt_path)
    seconds = time.perf_counter() - t0
    planned = max_epochs * steps_per_epoch
    stopped = "completed"
    if trainer.global_step < planned:
        stopped = "time budget" if time_budget is not None and seconds >= 0.98 * time_budget else "early stopping"
    if stopped == "time budget":
        log.warn(
            f"training stopped by its time budget ({time_budget:g} s) after {trainer.global_step} of {planned} planned "
            "steps; the model may be undertrained: pass a larger `time_budget` (or None) to train longer"
        )

    best = checkpoint.best_model_path if n_val and checkpoint.best_model_path else None
    if best:
        state = torch.load(best, map_location="cpu", weights_only=False)["state_dict"]
        ema_state = {k.removeprefix("ema."): v for k, v in state.items() if k.startswith("ema.")}
    else:
        ema_state = {k: v.detach().cpu() for k, v in module.ema.state_dict().items()}
    net = DiffSTNet(cfg, coexpr=torch.tensor(prep.coexpression))
    net.load_state_dict(ema_state)
    model = DiffST(
        config=cfg,
        net=net,
        genes=list(prep.genes),
        gene_scale=gene_scale,
        lr_scale=prep.lr_scale,
        units=data_units(prep, cfg.image_um),
        history=list(history.rows),
        info={
            "preset": preset,
            "seed": seed,
            "epochs": int(trainer.current_epoch),
            "steps": int(trainer.global_step),
            "seconds": seconds,
            "best_checkpoint": str(best) if best else None,
            "best_val_loss": _best(history.rows, "val_loss"),
            "best_val_pcc": float(checkpoint.best_model_score) if best else None,
            "stopped_by": stopped,
            "window_lr": int(window_lr),
            "prepared_fingerprint": fingerprint(prep),
            "key": key,
        },
    )
    if trainer.is_global_zero:
        if guard:
            model.info["guard"] = fit_guard(sdata, prep, model, seed=seed)
        model.save(run_dir / "model.pt")
        _record(sdata, key, model)
        log.info(
            f"trained {model.info['steps']} steps in {seconds:.0f} s ({stopped}; {guard_summary(model.info.get('guard'))})"
            f"; model saved to {model.path}"
        )
    return model


def _best(rows: list[dict[str, float]], name: str) -> float | None:
    values = [r[name] for r in rows if name in r]
    return float(min(values)) if values else None


def _config(
    prep: Prepared,
    preset: str,
    batch_size: int | None,
    overrides: dict[str, Any] | None,
    window_um: float | None = None,
) -> DiffSTConfig:
    data = {
        "n_genes": len(prep.genes),
        "image_channels": len(prep.image.channels),
        "hr_um": prep.grid.hr_um,
        "scale": prep.grid.scale,
        "tile_um": float(window_um if window_um is not None else prep.attrs["tile_um"]),
        "image_kind": prep.image.kind,
        "nuclear_channel": prep.image.nuclear_channel,
    }
    base = DiffSTConfig.preset(preset)
    if base.tile_um > data["tile_um"]:
        log.info(
            f"preset {preset!r} is designed for windows up to {base.tile_um:g} µm; these data give "
            f"{data['tile_um']:g} µm windows (the training region or the prepared tiles are smaller)"
        )
    extra = dict(overrides or {})
    clash = sorted(set(extra) & set(data))
    if clash:
        msg = f"`config` may not override {clash}: they come from the prepared data (set them in `dst.pp.prepare`)."
        raise ValueError(msg)
    if batch_size is not None:
        extra["batch_size"] = int(batch_size)
    image_um = float(extra.get("image_um", base.image_um))
    per_hr = data["hr_um"] / image_um
    if abs(per_hr - round(per_hr)) > 1e-6:
        # image pixels must tile HR pixels exactly: take the nearest image resolution that does
        fitted = data["hr_um"] / max(1, round(per_hr))
        log.info(f"image_um {image_um:g} does not divide the HR pixel ({data['hr_um']:g} µm); using {fitted:g} µm/px")
        extra["image_um"] = fitted
    return DiffSTConfig.preset(preset, **data, **extra)


@contextlib.contextmanager
def _quiet_lightning():
    """Hide Lightning's start-up banners (GPU/TPU availability, tips) unless ``dst.settings.verbosity >= 2``."""
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric", "lightning")]
    levels = [lg.level for lg in loggers]
    if settings.verbosity < 2:
        for lg in loggers:
            lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _uses_gpu(accelerator: str) -> bool:
    if accelerator in ("gpu", "cuda"):
        return True
    return accelerator == "auto" and torch.cuda.is_available()


def _default_dir(sdata: SpatialData, prep: Prepared, key: str, cfg: DiffSTConfig, seed: int) -> Path:
    h = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode() + f"{seed}".encode()).hexdigest()[:8]
    name = f"{key}-{fingerprint(prep)}-{h}"
    if sdata.path is not None:
        store = Path(sdata.path)
        return store.parent / f"{store.name}.diffst" / name
    return Path(settings.cachedir) / "models" / name


def _resume_from(last: Path, run_dir: Path, cfg: DiffSTConfig, *, resume: bool, overwrite: bool) -> Path | None:
    earlier = last.exists() or (run_dir / "model.pt").exists()
    if not earlier:
        return None
    if overwrite:
        for p in [last, last.parent / "best.ckpt", run_dir / "model.pt"]:
            p.unlink(missing_ok=True)
        return None
    if not resume:
        msg = (
            f"{run_dir} holds an earlier training run. Pass `resume=True` to continue it, `overwrite=True` to start "
            "afresh there, or another `checkpoint_dir`."
        )
        raise ValueError(msg)
    if not last.exists():
        return None
    stored = torch.load(last, map_location="cpu", weights_only=False).get("hyper_parameters", {}).get("config")
    if stored is not None and stored != cfg.to_dict():
        diff = sorted(k for k in cfg.to_dict() if stored.get(k) != cfg.to_dict()[k])
        msg = f"The checkpoint in {last.parent} was trained with a different configuration ({diff}); use another `checkpoint_dir` or `overwrite=True`."
        raise ValueError(msg)
    return last


def _record(sdata: SpatialData, key: str, model: DiffST) -> None:
    entry = {
        "path": str(model.path),
        "preset": model.info["preset"],
        "seed": model.info["seed"],
        "steps": model.info["steps"],
        "best_val_loss": model.info["best_val_loss"],
    }
    sdata.attrs[key]["model"] = entry
    if sdata.path is not None and Path(sdata.path).exists():
        sdata.write_attrs()
