"""``dst.tl.train``: train Diff-ST on prepared tiles with Lightning."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import lightning as L
import torch
from torch.utils.data import DataLoader

from .. import _logging as log
from .._compat import deprecated_arguments
from .._contract import update_record
from .._settings import settings
from ..features import is_encoder_spec
from ..model import DiffSTConfig, DiffSTNet
from ..model.floor import default_exponents, fit_stain_exponents
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
from ._features import features_for_training, model_record
from ._guard import fit_guard, guard_summary
from ._lightning import DiffSTModule, History
from ._model import DiffST, data_units, fingerprint
from ._run import (
    Interrupted,
    ProgressLog,
    Resume,
    RunControl,
    check_resumable,
    interrupt_flag,
    interrupted,
    run_directory,
)

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
#: Fewest measured spots (LR pixels) in the training tiles that training from the spots alone accepts.
MIN_TRAIN_SPOTS = 100

Supervision = Literal["auto", "hr", "lr"]


@deprecated_arguments(renamed={"key": "prepared_key"})
def train(
    sdata: SpatialData,
    *,
    prepared_key: str = "diffst",
    preset: Preset = "default",
    max_epochs: int | None = None,
    batch_size: int | None = None,
    accelerator: str = "auto",
    devices: int | str | list[int] = "auto",
    seed: int = 0,
    checkpoint_dir: str | Path | None = None,
    resume: Resume = False,
    overwrite: bool = False,
    config: dict[str, Any] | None = None,
    patience: int = 10,
    val_steps: int = 10,
    num_workers: int = 0,
    time_budget: float | None = DEFAULT_TIME_BUDGET,
    guard: bool = True,
    supervision: Supervision = "auto",
    image_encoder: str = "learned",
    **trainer_kwargs: Any,
) -> DiffST:
    """Train a Diff-ST model on the data that :func:`diffst.pp.prepare` made.

    Each step draws windows at random positions inside the training tiles (any LR-pixel offset, with a random one
    of the 8 rotations/flips), so that a small region still gives many distinct windows; the window side is the
    prepared tile (``tile_um``) at most, smaller when the training region is small. Validation windows are fixed
    (the validation tiles). Training optimises the objective with AdamW, keeps an exponential moving average (EMA) of the weights
    for sampling, and validates about every 50 steps: PCC and RMSE of the mean map beside bicubic up-sampling and
    the image floor (recorded in ``model.history``). The checkpoint with the best validation PCC is kept, and
    training stops early when it stops improving. Finally the guard (``diffst.tl._guard``) compares the model with
    the baselines on validation as ``super_resolve`` runs it, fits per-gene blend weights with the image floor and a
    calibration of the std map, prints the table and warns when the model does not beat the floor.

    Data with no HR truth (a Visium or ST slide alone) train from the spots themselves (``supervision="lr"``): each
    step hides a random half of the spots from the model, which must predict them from the image and the other
    spots, scored through the slide's own spot geometry (:mod:`diffst.model.weak`); validation, early stopping and
    the guard use the validation spots, each predicted while hidden. The diffusion is not trained in this mode (there
    is no HR detail to learn it from): ``super_resolve`` takes its std map from several random leave-spots-out
    predictions instead.

    A training can be left running:

    - **visible**: plain progress lines (a log file reads like a terminal): after the first few steps, the planned
      steps, the measured seconds per step and the projected time; then every ``dst.settings.progress_every``
      seconds (30) the step, the loss, the latest validation PCC beside bicubic and the image floor, and the time
      left;
    - **bounded**: ``time_budget`` (600 s by default) stops it; when it (or anything else) stops training before the
      first validation or while validation is still improving, a warning says so, and ``model.info['stopped_by']``
      records why it stopped (``"completed"``, ``"early stopping"``, ``"time budget"``);
    - **interruptible**: ``checkpoints/last.ckpt`` is written at least every minute, and on Ctrl-C at the end of the
      current step, after which a :class:`KeyboardInterrupt` says where it is and how to resume (a second
      Ctrl-C stops at once);
    - **resumable, only when asked**: each call starts a fresh run in its own folder unless ``resume`` says
      otherwise. A resumed run repeats exactly what an uninterrupted one would do (same windows, noise and
      weights; on one device).

    Parameters
    ----------
    sdata
        SpatialData prepared with :func:`diffst.pp.prepare`.
    prepared_key
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
        Where checkpoints (``checkpoints/``), logs and the final ``model.pt`` go. Default: a new
        ``run-<UTC time>`` folder per call under ``<store>.diffst/<prepared_key>-<data fingerprint>-<config hash>/`` beside
        a zarr-backed SpatialData, else under ``dst.settings.cachedir/models/``; the folder name ties a run to the
        exact prepared data, configuration and seed.
    resume
        ``False`` (default): start afresh (with ``checkpoint_dir`` holding an earlier run, refuse unless
        ``overwrite``). ``True``: continue the latest run of these exact data, configuration and seed (or the run in
        ``checkpoint_dir``) from its last checkpoint; an error when there is none. ``"auto"``: continue such a run if
        there is one, else start afresh. Resuming counts the budget from the start of the run: a run that already
        used ``max_epochs`` or ``time_budget`` is refused with the choices (a larger budget, its model, a fresh
        start).
    overwrite
        Start afresh in ``checkpoint_dir`` even if it holds an earlier run (replacing it).
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
        Limit of training in seconds (default 600, about 750 steps of the default preset on a 2-core CPU), counted
        over all sessions of a resumed run; ``None`` for none. A training stopped by it says so.
    guard
        Fit the guard on validation after training (see above); ``False`` skips it (the model is used as trained).
    supervision
        ``"hr"``: learn from HR truth (transcripts, Visium HD bins). ``"lr"``: learn from the LR measurement alone, as
        above (Visium, ST; on data that have HR truth, e.g. prepared with ``degradation="visium"``, the HR is then
        never read, which is how this mode is benchmarked). ``"auto"`` (default): ``"hr"`` when the data have HR
        truth, else ``"lr"``.
    image_encoder
        Where the tissue-level image features come from: ``"learned"`` (default: the model's own encoder, trained on
        this slide), ``"stain"`` (weight-free stain and texture features) or ``"timm:<model>"`` (a pretrained
        encoder, e.g. a pathology foundation model). Features are computed once per slide by
        :func:`diffst.pp.image_features` (here, when the data lack them; run it yourself first for a timm model's
        local ``weights`` or other options) and replace the learned tissue encoder. See :doc:`/encoders`.
    trainer_kwargs
        Passed to :class:`lightning.Trainer` (e.g. ``strategy="ddp"``, ``precision="bf16-mixed"``).

    Returns
    -------
    The trained :class:`diffst.DiffST` (EMA weights). Its path is recorded in ``sdata.attrs[prepared_key]['model']`` (and written
    to the zarr store when backed), so :func:`diffst.tl.super_resolve` finds it.

    """
    prep = Prepared.from_sdata(sdata, prepared_key)
    supervision = _supervision(prep, prepared_key, supervision)
    if image_encoder != "learned" and not is_encoder_spec(image_encoder):
        msg = f"`image_encoder` must be 'learned', 'stain' or 'timm:<model name>'; got {image_encoder!r}."
        raise ValueError(msg)
    n_train = len(prep.tiles(sdata, "train"))
    if n_train == 0:
        msg = f"No training tiles under {prepared_key!r}; prepare with smaller `tile_um` or a larger train share in `split`."
        raise ValueError(msg)
    if max_epochs is not None and max_epochs < 1:
        msg = f"`max_epochs` must be at least 1; got {max_epochs}."
        raise ValueError(msg)
    if time_budget is not None and time_budget <= 0:
        msg = f"`time_budget` must be a positive number of seconds or None; got {time_budget!r}."
        raise ValueError(msg)

    region = split_region(prep, sdata, "train")
    if supervision == "lr":
        _check_spots(prep, region)
        config = {"objective": "regression", "supervision": "lr", **(config or {})}
    # the prepared tile (400 µm by default, the default preset's) bounds the window; small regions get smaller ones
    window_lr = choose_window(region, prep.tile_lr)
    prep, features = features_for_training(sdata, prep, image_encoder)
    cfg = _config(prep, preset, batch_size, config, window_um=window_lr * prep.grid.lr_um, features=features)
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
    # learning from the spots alone reads nothing of the HR truth, not even its scale
    gene_scale = prep.hr_scale if supervision == "hr" else prep.lr_scale
    planned = max_epochs * steps_per_epoch
    fp = fingerprint(prep)
    family = None if checkpoint_dir is not None else _default_dir(sdata, prep, prepared_key, cfg, seed)
    run_dir, ckpt_path = run_directory(
        family, None if checkpoint_dir is None else Path(checkpoint_dir), resume=resume, overwrite=overwrite
    )
    ckpt_dir = run_dir / "checkpoints"
    resumed = None
    if ckpt_path is not None:
        resumed = check_resumable(
            ckpt_path, config=cfg.to_dict(), fingerprint=fp, planned_steps=planned, max_epochs=max_epochs,
            time_budget=time_budget,
        )  # fmt: skip

    L.seed_everything(seed, workers=True, verbose=False)
    source = TileSource.from_sdata(
        sdata, prep, footprint=supervision == "lr", features=features["key"] if features else None
    ).cache_image(cfg.image_um)
    if supervision == "lr":
        source.hr = None
    train_ds = WindowDataset(source, train_origins, window_lr, image_um=cfg.image_um, gene_scale=gene_scale)
    val_ds = WindowDataset(source, val_origins, window_lr, image_um=cfg.image_um, gene_scale=gene_scale)
    if cfg.base == "fitted" and supervision == "hr":
        cfg = _fit_base(cfg, train_ds, gene_scale)
    sampler = WindowSampler(len(train_ds), epoch_len, seed)
    train_dl = DataLoader(train_ds, batch_size=cfg.batch_size, sampler=sampler, num_workers=num_workers)
    val_dl = DataLoader(val_ds, batch_size=cfg.batch_size, num_workers=num_workers) if n_val else None
    module = DiffSTModule(
        cfg.to_dict(),
        prep.coexpression.tolist(),
        val_steps=val_steps,
        gene_scale=[float(v) for v in gene_scale],
        fingerprint=fp,
    )

    history = History()
    control = RunControl(ckpt_dir / "last.ckpt", sampler, cfg.batch_size, seed, time_budget=time_budget)
    progress = ProgressLog(control, planned)
    # progress before control: the line of the last step is printed before an interrupt stops the run
    callbacks: list[L.Callback] = [history, progress, control]
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
    early = L.pytorch.callbacks.EarlyStopping(monitor=MONITOR, patience=patience, mode="max") if n_val else None
    if early is not None:
        callbacks.append(early)
    on_gpu = _uses_gpu(accelerator)
    trainer_args: dict[str, Any] = {
        "max_epochs": max_epochs,
        "accelerator": accelerator,
        "devices": devices,
        "callbacks": callbacks,
        "logger": L.pytorch.loggers.CSVLogger(run_dir, name="logs"),
        # plain progress lines (ProgressLog) instead of a bar: they read the same in a log file
        "enable_progress_bar": False,
        "enable_model_summary": settings.verbosity >= 2,
        "deterministic": not on_gpu,
        "precision": ("bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed") if on_gpu else "32-true",
        "log_every_n_steps": max(1, min(50, steps_per_epoch)),
        "num_sanity_val_steps": 0,
        "check_val_every_n_epoch": max(1, round(VAL_EVERY_STEPS / steps_per_epoch)),
    }
    trainer_args.update(trainer_kwargs)
    with _quiet_lightning():
        trainer = L.Trainer(**trainer_args)
    area = prep.grid.lr_um**2 / 1e6  # mm² per LR pixel
    val_area = int(split_region(prep, sdata, "val").sum()) * area
    log.info(
        f"training preset {preset!r} ("
        + (cfg.objective if supervision == "hr" else "from the spots alone: hidden spots predicted from the rest")
        + f") on random {window_lr * prep.grid.lr_um:g} µm windows at "
        f"{len(train_origins)} positions × 8 rotations/flips in the training region ({int(region.sum()) * area:.3f} "
        f"mm²); validation: {n_val} fixed windows ({val_area:.3f} mm²); {max_epochs} epochs × {steps_per_epoch} "
        f"steps = {planned} steps, batch {cfg.batch_size}, "
        + (f"time budget {time_budget:g} s" if time_budget is not None else "no time budget")
        + f"; checkpoints in {ckpt_dir}"
        + (f" (resuming the run there from step {resumed['steps']})" if resumed else "")
    )
    if not n_val:
        log.warn("no validation windows: the last weights are kept and nothing checks them against the baselines")
    t0 = time.perf_counter()
    try:
        with interrupt_flag(control), warnings.catch_warnings(), _quiet_lightning():
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*LeafSpec.*")
            warnings.filterwarnings("ignore", message=".*exists and is not empty.*")
            warnings.filterwarnings("ignore", message=".*dataloader is not resumable.*")
            trainer.fit(module, train_dl, val_dl, ckpt_path=ckpt_path)
    except (Interrupted, SystemExit, KeyboardInterrupt) as e:
        # Interrupted: Ctrl-C, saved after the step; SystemExit: Lightning's exit after a KeyboardInterrupt it caught
        # itself (a second Ctrl-C); both become a KeyboardInterrupt that says where the checkpoint is
        if isinstance(e, SystemExit) and not control.interrupted:
            raise
        exc = interrupted(int(trainer.global_step), control.saved_step, ckpt_dir / "last.ckpt")
        log.warn(str(exc))
        raise exc from None
    seconds = time.perf_counter() - t0
    stopped = _stopped_by(trainer, control, early, planned, max_epochs)
    validated = bool(n_val) and checkpoint.best_model_score is not None
    last_val = progress.val.get("val_pcc")
    # still improving: the last validation was the best, and early stopping did not end the run
    improving = (
        validated
        and stopped != "early stopping"
        and last_val is not None
        and last_val >= float(checkpoint.best_model_score) - 1e-12
    )
    _warn_unfinished(stopped, trainer.global_step, planned, time_budget, n_val=n_val, validated=validated,
                     improving=improving, best=checkpoint.best_model_score)  # fmt: skip

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
            "planned_steps": int(planned),
            "trained_seconds": float(control.seconds),
            "validated": validated,
            "still_improving": bool(improving),
            "run_dir": str(run_dir),
            "window_lr": int(window_lr),
            "prepared_fingerprint": fp,
            "key": prepared_key,
            **({"image_features": model_record(features)} if features else {}),
        },
    )
    if trainer.is_global_zero:
        if guard:
            model.info["guard"] = fit_guard(sdata, prep, model, seed=seed)
        model.save(run_dir / "model.pt")
        _record(sdata, prepared_key, model)
        log.info(
            f"trained {model.info['steps']} steps in {seconds:.0f} s ({stopped}; {_summary(model.info)})"
            f"; model saved to {model.path}"
        )
    return model


def _supervision(prep: Prepared, key: str, supervision: str) -> str:
    if supervision not in ("auto", "hr", "lr"):
        msg = f"`supervision` must be 'auto', 'hr' or 'lr'; got {supervision!r}."
        raise ValueError(msg)
    if supervision == "hr" and not prep.has_hr:
        msg = (
            f"The data under {key!r} have no HR truth ({prep.record.measurement} measure only LR), so "
            "`supervision='hr'` has nothing to learn from. Use supervision='lr' (or 'auto') to learn from the "
            "spots themselves, or train on a slide with transcripts or Visium HD bins and transfer the model."
        )
        raise ValueError(msg)
    if supervision == "auto":
        supervision = "hr" if prep.has_hr else "lr"
        if supervision == "lr":
            log.info(
                f"the data under {key!r} have no HR truth ({prep.record.measurement}): learning from the spots "
                "alone (supervision='lr'; see dst.tl.train)"
            )
    return supervision


def _check_spots(prep: Prepared, region) -> None:
    """Enough measured spots in the training region to learn from them alone."""
    n = int(((prep.coverage > 0) & region).sum())
    if n < MIN_TRAIN_SPOTS:
        msg = (
            f"Only {n} measured LR pixels (spots) lie in the training tiles; learning from the spots alone needs at "
            f"least {MIN_TRAIN_SPOTS} (a Visium slide has about 4,000; an ST section a few hundred). Give training more of the slide (a larger "
            "train share in `split` or smaller `tile_um` in `dst.pp.prepare`), or transfer a model trained on a "
            "slide with HR truth."
        )
        raise ValueError(msg)


def _best(rows: list[dict[str, float]], name: str) -> float | None:
    values = [r[name] for r in rows if name in r]
    return float(min(values)) if values else None


#: Training windows the fitted floor's exponents are chosen on (evenly spread over the training region).
BASE_FIT_WINDOWS = 64


def _fit_base(cfg: DiffSTConfig, train_ds: WindowDataset, gene_scale) -> DiffSTConfig:
    """Choose the fitted floor's per-gene stain exponents on training windows (:func:`fit_stain_exponents`)."""
    import dataclasses

    import numpy as np

    idx = np.unique(np.linspace(0, len(train_ds) - 1, min(BASE_FIT_WINDOWS, len(train_ds))).round().astype(int))
    batch = {k: torch.stack([train_ds[int(i)][k] for i in idx]) for k in ("x0", "lr", "mask", "image")}
    n_stains = 2 if cfg.image_kind == "rgb" else cfg.image_channels
    exponents, pcc = fit_stain_exponents(
        batch["x0"], batch["lr"], batch["mask"], batch["image"], scale=cfg.scale, per_hr=cfg.image_per_hr,
        gene_scale=torch.as_tensor(np.asarray(gene_scale, dtype=np.float32)), kind=cfg.image_kind,
        n_stains=n_stains, channel=cfg.nuclear_channel,
    )  # fmt: skip
    floor = default_exponents(cfg.n_genes, n_stains, cfg.image_kind, cfg.nuclear_channel)
    changed = int((exponents != floor).any(1).sum())
    log.info(
        f"fitted floor: {changed} of {cfg.n_genes} genes weigh the image's stains differently from the floor, on "
        f"{len(idx)} training windows (PCC {float(np.nanmean(pcc['floor'].numpy())):.3f} → "
        f"{float(np.nanmean(pcc['fitted'].numpy())):.3f})"
    )
    return dataclasses.replace(cfg, stain_exponents=[[float(v) for v in row] for row in exponents.tolist()])


def _config(
    prep: Prepared,
    preset: str,
    batch_size: int | None,
    overrides: dict[str, Any] | None,
    window_um: float | None = None,
    features: dict[str, Any] | None = None,
) -> DiffSTConfig:
    data = {
        "image_encoder": features["encoder"]["name"] if features else "learned",
        "feature_channels": int(features["n_components"]) if features else 0,
        "n_genes": len(prep.genes),
        "image_channels": len(prep.image.channels),
        "hr_um": prep.grid.hr_um,
        "scale": prep.grid.scale,
        "tile_um": float(window_um if window_um is not None else prep.record.tile_um),
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
        where = (
            "pass `image_encoder=` to `dst.tl.train`"
            if set(clash) <= {"image_encoder", "feature_channels"}
            else "set them in `dst.pp.prepare`, and the image encoder with `image_encoder=`"
        )
        msg = f"`config` may not override {clash}: they come from the prepared data ({where})."
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


def _summary(info: dict[str, Any]) -> str:
    if info.get("guard"):
        return guard_summary(info["guard"])
    if info.get("best_val_pcc") is not None:
        return f"best val PCC {info['best_val_pcc']:.3f}, no guard"
    return "not validated"


def _stopped_by(trainer: L.Trainer, control: RunControl, early: Any, planned: int, max_epochs: int) -> str:
    if control.out_of_time:
        return "time budget"
    if early is not None and early.stopped_epoch > 0:
        return "early stopping"
    if trainer.global_step >= planned or trainer.current_epoch >= max_epochs:
        return "completed"
    return "stopped by the trainer"  # e.g. max_steps / max_time passed as trainer arguments


def _warn_unfinished(
    stopped: str,
    steps: int,
    planned: int,
    time_budget: float | None,
    *,
    n_val: int,
    validated: bool,
    improving: bool,
    best: Any,
) -> None:
    """Say in plain words when training ended before the model was validated or before validation levelled off.

    A budget (time, or a Trainer limit) that ends training before its planned steps always says so; the planned steps
    running out says so when validation never ran or was still improving at its last check.
    """
    what = {
        "time budget": f"by its time budget ({time_budget:g} s)" if time_budget is not None else "by its time budget",
        "completed": "when its planned steps ran out",
        "stopped by the trainer": "by a Trainer limit (`max_steps` / `max_time`)",
    }.get(stopped)
    if what is None or not n_val:
        return
    longer = (
        "pass a larger `time_budget` (or None)" if stopped == "time budget" else "pass a larger `max_epochs`"
    ) + ", or continue this run with `resume=True` and the larger budget"
    if not validated:
        log.warn(
            f"training stopped {what} after {steps} of {planned} planned steps, before its first validation: nothing "
            f"checked the model against bicubic or the image floor, and it is likely undertrained; {longer}"
        )
    elif improving:
        log.warn(
            f"training stopped {what} after {steps} of {planned} planned steps while its validation PCC was still "
            f"improving (best {float(best):.3f}, at the last check): the model may be undertrained; {longer}"
        )
    elif stopped != "completed":
        log.warn(
            f"training stopped {what} after {steps} of {planned} planned steps, before early stopping found that "
            f"validation had levelled off (best PCC {float(best):.3f}); the model may be undertrained; {longer}"
        )


def _record(sdata: SpatialData, key: str, model: DiffST) -> None:
    entry = {
        "path": str(model.path),
        "preset": model.info["preset"],
        "seed": model.info["seed"],
        "steps": model.info["steps"],
        "best_val_loss": model.info["best_val_loss"],
    }
    update_record(sdata, key, model=entry)
