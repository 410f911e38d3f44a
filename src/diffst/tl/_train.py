"""``dst.tl.train``: train Diff-ST on one or several prepared sections with Lightning.

The stages, each its own function: the sections and where each is validated (:func:`_sections`), the plan of
windows, configuration and steps (:class:`_Plan`), the run folder (:func:`run_directory`), the training itself
(:func:`_fit`: datasets, the fitted floor, Lightning), the guard (:func:`~diffst.tl._guard.fit_guard`) and the
record. The weights are saved as soon as training ends, before the guard, so that an interrupted guard does not
cost the training.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import lightning as L
import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader

from .. import _logging as log
from .._contract import update_record
from .._device import lightning_device, resolve_device
from .._settings import settings
from .._spatial import image_levels
from ..features import is_encoder_spec
from ..model import DiffSTConfig, DiffSTNet
from ..model.floor import default_exponents, fit_stain_exponents
from ._data import (
    Prepared,
    TileSource,
    WindowDataset,
    WindowSampler,
    choose_window,
    holdout,
    split_region,
    window_origins,
)
from ._features import features_for_training, model_record
from ._guard import Validation, fit_guard, guard_summary
from ._lightning import DiffSTModule, History
from ._model import DiffST, ModelUnits, fingerprint
from ._run import (
    Interrupted,
    ProgressLog,
    Resume,
    RunControl,
    StopRequested,
    check_resumable,
    checkpoint_step,
    interrupt_flag,
    interrupted,
    on_interrupt,
    periodic_checkpoint,
    run_directory,
)

if TYPE_CHECKING:
    from spatialdata import SpatialData

Preset = Literal["default", "paper", "tiny"]

#: Optimiser steps a preset aims for when ``max_epochs`` is not given (the benchmark page says how long they take).
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
#: Training windows the fitted floor's exponents are chosen on (evenly spread over the training regions).
BASE_FIT_WINDOWS = 64

Supervision = Literal["auto", "hr", "lr"]


def train(
    sdata: SpatialData | Sequence[SpatialData],
    *,
    prepared_key: str = "diffst",
    preset: Preset = "default",
    max_epochs: int | None = None,
    batch_size: int | None = None,
    device: str = "auto",
    devices: int | list[int] = 1,
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
    """Train a Diff-ST model on the data that :func:`diffst.pp.prepare` made, from one section or several.

    Each step draws windows at random positions inside the training tiles (any LR-pixel offset, with a random one
    of the 8 rotations/flips), so that a small region still gives many distinct windows; the window side is the
    prepared tile (``tile_um``) at most, smaller when the training region is small. Training optimises the objective
    with AdamW, keeps an exponential moving average (EMA) of the weights for sampling, and validates about every 50
    steps: PCC and RMSE of the mean map beside bicubic up-sampling and the image floor (recorded in
    ``model.history``). The checkpoint with the best validation PCC is kept, and training stops early when it stops
    improving. Finally the guard (``diffst.tl._guard``) compares the model with the baselines on validation as
    ``super_resolve`` runs it, fits per-gene blend weights with the image floor and a calibration of the std map,
    prints the table and warns when the model does not beat the floor.

    **Always validated.** Validation uses the prepared validation tiles. Data prepared without any (a region too
    small for a three-way split of its tiles) hold out a spatially blocked band of their training tiles instead
    (the far rows or columns with about 20 % of the pixels), so model selection,
    the guard and the std calibration always run; ``model.info["validation"]`` says which.

    **Several sections.** ``sdata`` may be a list of SpatialData objects, the sections of one study, each prepared
    with the same genes and units under ``prepared_key``. One model learns from all of them: every window keeps its
    own section's normalisation (its per-gene scales), training draws windows from all sections in proportion to
    their training area, and validation and the guard pool every section's validation pixels.
    :func:`diffst.tl.super_resolve` applies the model to any of them, or to a new section (its scales estimated from
    its LR counts).

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
      current step; Ctrl-C at any other moment (the fitted floor, validation, the guard, saving) ends with one
      message saying what was kept and how to go on. The weights are saved as soon as training ends, so an
      interrupted guard keeps them: ``resume=True`` then goes straight to the guard;
    - **resumable, only when asked**: each call starts a fresh run in its own folder unless ``resume`` says
      otherwise. A resumed run repeats exactly what an uninterrupted one would do (same windows, noise and
      weights; on one device).

    Parameters
    ----------
    sdata
        SpatialData prepared with :func:`diffst.pp.prepare`, or a list of them (sections of one study, prepared with
        the same genes and units).
    prepared_key
        The ``key_added`` used in ``prepare``.
    preset
        Model size: ``"default"`` (small, trains on a laptop CPU in minutes), ``"paper"`` (the paper's Table 3;
        GPU) or ``"tiny"`` (tests).
    max_epochs
        Number of epochs; by default about 750 optimiser steps for ``"default"``, 200 epochs for ``"paper"``.
    batch_size
        Windows per step (default: the preset's).
    device
        Where to train and where the returned model lives: ``"auto"`` (CUDA when there is a GPU, then Apple's MPS,
        else the CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"``. On a GPU, training runs in mixed precision.
    devices
        GPUs to train on at once (Lightning's DDP, with ``strategy="ddp"`` in a script or ``"ddp_notebook"`` in
        Jupyter): a number or a list of indices. 1 by default.
    seed
        Seed of weights, batches, noise and augmentation: same seed on the same device, same model.
    checkpoint_dir
        Where checkpoints (``checkpoints/``), logs and the final ``model.pt`` go. Default: a new
        ``run-<UTC time>`` folder per call under ``<store>.diffst/<prepared_key>-<data fingerprint>-<config hash>/``
        beside a zarr-backed SpatialData (the first section's), else under ``dst.settings.cachedir/models/``; the
        folder name ties a run to the exact prepared data, configuration and seed.
    resume
        ``False`` (default): start afresh (with ``checkpoint_dir`` holding an earlier run, refuse unless
        ``overwrite``). ``True``: continue the latest run of these exact data, configuration and seed (or the run in
        ``checkpoint_dir``) from its last checkpoint, or fit the guard of a run whose training finished; an error
        when there is none. ``"auto"``: continue such a run if there is one, else start afresh. Resuming counts the
        budget from the start of the run: a run that already used ``max_epochs`` or ``time_budget`` is refused with
        the choices (a larger budget, its model, a fresh start).
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
        Limit of training in seconds (default 600), counted over all sessions of a resumed run; ``None`` for none.
        A training stopped by it says so.
    guard
        Fit the guard on validation after training (see above). ``False`` skips it: ``super_resolve`` then applies
        the model as trained, with a warning that it was not compared with the floor.
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
    The trained :class:`diffst.DiffST` (EMA weights) on ``device``. Its path is recorded in
    ``sdata.attrs[prepared_key]['model']`` of every section (and written to the zarr store when backed), so
    :func:`diffst.tl.super_resolve` finds it.

    """
    target = resolve_device(device)
    _check_arguments(max_epochs, time_budget, image_encoder)
    sections = _sections(sdata, prepared_key, supervision, image_encoder)
    plan = _Plan.make(sections, preset, batch_size, config, max_epochs)
    family = None if checkpoint_dir is not None else _default_dir(sections, prepared_key, plan.cfg, seed)
    run_dir, ckpt_path = run_directory(
        family, None if checkpoint_dir is None else Path(checkpoint_dir), resume=resume, overwrite=overwrite
    )
    model = _trained_earlier(run_dir) if resume else None
    if model is None:
        resumed = None
        if ckpt_path is not None:
            resumed = check_resumable(ckpt_path, config=plan.cfg.to_dict(), fingerprint=plan.fingerprint,
                                      planned_steps=plan.planned, max_epochs=plan.max_epochs,
                                      time_budget=time_budget)["steps"]  # fmt: skip
        fit = _Fit(plan, run_dir, ckpt_path, resumed, target, devices, seed, patience, val_steps, num_workers,
                   time_budget, trainer_kwargs)  # fmt: skip
        model = fit.run(sections)
        if not fit.first_process:  # the other processes of a multi-device run leave the rest to the first
            return model
    else:
        log.info(f"the training in {run_dir} has finished: fitting its guard (no training)")
    model.to(target)
    model.guard = None
    if guard:
        kept = f"the trained weights are saved in {model.path}"
        how = "`dst.tl.train(..., resume=True)` fits the guard on them without training again"
        with on_interrupt("fitting the guard on the validation data", kept, how):
            model.guard = fit_guard([s.validation for s in sections], model, seed=seed)
    model.info["stage"] = "complete"
    with on_interrupt("saving the model", "the trained weights are in " + str(model.path), "run the call again"):
        model.save(run_dir / "model.pt")
        for s in sections:
            _record(s.sdata, prepared_key, model)
    log.info(
        f"trained {model.info['steps']} steps in {model.info['seconds']:.0f} s ({model.info['stopped_by']}; "
        f"{_summary(model)}); model saved to {model.path}"
    )
    return model


# --------------------------------------------------------------------------------------------------------------------
# The sections and where each is validated
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class Section:
    """One prepared section as training sees it: its training and validation LR pixels and its normalisation."""

    sdata: SpatialData
    prep: Prepared
    train: np.ndarray  # (h, w) LR pixels training draws windows from
    val: np.ndarray  # (h, w) LR pixels of validation
    held_out: bool  # validation is a band held out of the training tiles (no validation tiles)
    supervision: str  # "hr" or "lr"
    gene_scale: np.ndarray
    features: dict[str, Any] | None

    @property
    def validation(self) -> Validation:
        return Validation(self.sdata, self.prep, self.val if self.held_out else None)

    def record(self) -> dict[str, Any]:
        """What the model keeps of this section: its data, normalisation and where it was validated."""
        area = self.prep.grid.lr_um**2 / 1e6
        return {
            "fingerprint": fingerprint(self.prep),
            "gene_scale": [float(v) for v in self.gene_scale],
            "lr_scale": [float(v) for v in self.prep.lr_scale],
            "validation": "held-out band of the training tiles" if self.held_out else "validation tiles",
            "train_mm2": float(self.train.sum() * area),
            "val_mm2": float(self.val.sum() * area),
        }


def _sections(sdata, key: str, supervision: str, encoder: str) -> list[Section]:
    """The sections to learn from, checked to agree; each with its training and validation pixels."""
    many = list(sdata) if isinstance(sdata, list | tuple) else [sdata]
    if not many:
        msg = "`sdata` is an empty list: pass a prepared SpatialData, or a list of them."
        raise ValueError(msg)
    preps = [Prepared.from_sdata(s, key) for s in many]
    _check_agree(preps, key)
    supervision = _supervision(preps[0], key, supervision)
    sections = []
    features = None
    for i, (s, prep) in enumerate(zip(many, preps, strict=True)):
        prep, feats = features_for_training(s, prep, encoder, like=features)
        features = features or feats
        train_region = split_region(prep, s, "train")
        if not train_region.any():
            msg = (
                f"No training tiles under {key!r}{f' in section {i}' if len(many) > 1 else ''}; prepare with smaller "
                "`tile_um` or a larger train share in `split`."
            )
            raise ValueError(msg)
        val_region = split_region(prep, s, "val")
        held_out = not val_region.any()
        if held_out:
            train_region, val_region = holdout(train_region, tissue=prep.tissue(s))
        _check_validation_counts(s, prep, val_region, held_out, f" of section {i}" if len(many) > 1 else "")
        if supervision == "lr":
            _check_spots(prep, train_region)
        gene_scale = prep.hr_scale if supervision == "hr" else prep.lr_scale
        sections.append(Section(s, prep, train_region, val_region, held_out, supervision, np.asarray(gene_scale),
                                feats))  # fmt: skip
    if any(s.held_out for s in sections):
        n = sum(s.held_out for s in sections)
        log.info(
            f"{'the data have' if len(sections) == 1 else f'{n} of {len(sections)} sections have'} no validation "
            "tiles: a spatially blocked band of the training tiles (about 20 % of them) is held out for validation"
        )
    return sections


def _check_agree(preps: list[Prepared], key: str) -> None:
    """Sections learnt together must have the same genes, units and kind of image."""
    first = preps[0]
    for i, prep in enumerate(preps[1:], start=1):
        problems = []
        if prep.genes != first.genes:
            problems.append(
                f"its genes differ from section 0's (prepare every section with `genes={first.genes[:5]}…`, "
                "the same list in the same order)"
            )
        if not np.isclose(prep.grid.hr_um, first.grid.hr_um) or prep.grid.scale != first.grid.scale:
            problems.append(
                f"it is prepared at {prep.grid.lr_um:g} → {prep.grid.hr_um:g} µm, section 0 at "
                f"{first.grid.lr_um:g} → {first.grid.hr_um:g} µm (use the same `lr_um` and `scale`)"
            )
        if prep.image.kind != first.image.kind or len(prep.image.channels) != len(first.image.channels):
            problems.append(
                f"its image is {prep.image.kind} with {len(prep.image.channels)} channels, section 0's "
                f"{first.image.kind} with {len(first.image.channels)}"
            )
        if prep.context_genes != first.context_genes:
            problems.append(
                f"its panel context differs from section 0's (prepare with `context_genes={first.context_genes}`)"
            )
        if prep.has_hr != first.has_hr:
            problems.append("one section has HR truth and the other not (train them apart, or transfer a model)")
        if problems:
            msg = f"Section {i} cannot be trained with section 0 under {key!r}: " + "; ".join(problems) + "."
            raise ValueError(msg)


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


def _check_validation_counts(sdata, prep: Prepared, region: np.ndarray, held_out: bool, where: str) -> None:
    """Refuse validation pixels without a single count (scores, early stopping and the guard would run on nothing)."""
    total = np.asarray(image_levels(sdata[prep.elements["lr"]])[0].data.sum(axis=0))  # (h, w), the LR grid is small
    if float(total[region].sum()) > 0:
        return
    what = "the band of the training tiles held out for validation" if held_out else "the validation tiles"
    msg = (
        f"No transcript or count lies in {what}{where}: validation would score nothing. Prepare again with other "
        "tiles (a smaller `tile_um`, or `split=` with a validation share) so that validation covers tissue."
    )
    raise ValueError(msg)


def _check_spots(prep: Prepared, region) -> None:
    """Enough measured spots in the training region to learn from them alone."""
    n = int(((prep.coverage > 0) & region).sum())
    if n < MIN_TRAIN_SPOTS:
        msg = (
            f"Only {n} measured LR pixels (spots) lie in the training tiles; learning from the spots alone needs at "
            f"least {MIN_TRAIN_SPOTS} (a Visium slide has about 4,000; an ST section a few hundred). Give training "
            "more of the slide (a larger train share in `split` or smaller `tile_um` in `dst.pp.prepare`), or train "
            "on several sections at once, or transfer a model trained on a slide with HR truth."
        )
        raise ValueError(msg)


def _check_arguments(max_epochs: int | None, time_budget: float | None, image_encoder: str) -> None:
    if image_encoder != "learned" and not is_encoder_spec(image_encoder):
        msg = f"`image_encoder` must be 'learned', 'stain' or 'timm:<model name>'; got {image_encoder!r}."
        raise ValueError(msg)
    if max_epochs is not None and max_epochs < 1:
        msg = f"`max_epochs` must be at least 1; got {max_epochs}."
        raise ValueError(msg)
    if time_budget is not None and time_budget <= 0:
        msg = f"`time_budget` must be a positive number of seconds or None; got {time_budget!r}."
        raise ValueError(msg)


# --------------------------------------------------------------------------------------------------------------------
# The plan: windows, configuration, steps
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class _Plan:
    """Window side, configuration, window positions and step counts of one training."""

    cfg: DiffSTConfig
    preset: str
    supervision: str
    window_lr: int
    train_origins: list[np.ndarray]  # per section
    val_origins: list[np.ndarray]
    epoch_len: int
    steps_per_epoch: int
    max_epochs: int
    fingerprint: str

    @property
    def planned(self) -> int:
        return self.max_epochs * self.steps_per_epoch

    @property
    def n_val(self) -> int:
        return sum(len(o) for o in self.val_origins)

    @classmethod
    def make(cls, sections: list[Section], preset: str, batch_size: int | None, overrides: dict | None,
             max_epochs: int | None) -> _Plan:  # fmt: skip
        first = sections[0]
        supervision = first.supervision
        overrides = dict(overrides or {})
        if supervision == "lr":
            overrides = {"objective": "regression", "supervision": "lr", **overrides}
        # the prepared tile (400 µm by default) bounds the window; small regions get smaller ones, and a held-out
        # validation band must hold at least one window
        window_lr = choose_window([s.train for s in sections], first.prep.tile_lr)
        while window_lr > 1 and any(s.held_out and not len(window_origins(s.val, window_lr)) for s in sections):
            window_lr -= 1
        cfg = _config(first.prep, preset, batch_size, overrides, window_um=window_lr * first.prep.grid.lr_um,
                      features=first.features)  # fmt: skip
        train_origins = [window_origins(s.train, window_lr) for s in sections]
        val_origins = [s.validation.window_origins(window_lr) for s in sections]
        area = sum(int(s.train.sum()) for s in sections)
        # an epoch: about one pass over the training area
        epoch_len = max(cfg.batch_size, math.ceil(area / window_lr**2))
        steps_per_epoch = math.ceil(epoch_len / cfg.batch_size)
        if max_epochs is None:
            max_epochs = (
                PAPER_EPOCHS
                if preset == "paper"
                else max(5, min(1000, math.ceil(DEFAULT_STEPS[preset] / steps_per_epoch)))
            )
        prints = [fingerprint(s.prep) for s in sections]
        combined = prints[0] if len(prints) == 1 else hashlib.sha256("".join(prints).encode()).hexdigest()[:12]
        return cls(cfg, preset, supervision, window_lr, train_origins, val_origins, epoch_len, steps_per_epoch,
                   int(max_epochs), combined)  # fmt: skip

    def describe(self, sections: list[Section], time_budget: float | None, ckpt_dir: Path, resumed: int | None) -> str:
        area = sections[0].prep.grid.lr_um ** 2 / 1e6  # mm² per LR pixel
        where = f" of {len(sections)} sections" if len(sections) > 1 else ""
        held = any(s.held_out for s in sections)
        return (
            f"training preset {self.preset!r} ("
            + (self.cfg.objective if self.supervision == "hr" else "from the spots alone: hidden spots predicted "
               "from the rest")
            + f") on random {self.window_lr * sections[0].prep.grid.lr_um:g} µm windows at "
            f"{sum(len(o) for o in self.train_origins)} positions × 8 rotations/flips in the training region{where} "
            f"({sum(int(s.train.sum()) for s in sections) * area:.3f} mm²); validation: {self.n_val} fixed windows "
            f"({sum(int(s.val.sum()) for s in sections) * area:.3f} mm²"
            + (", held out of the training tiles" if held else "")
            + f"); {self.max_epochs} epochs × {self.steps_per_epoch} steps = {self.planned} steps, batch "
            f"{self.cfg.batch_size}, "
            + (f"time budget {time_budget:g} s" if time_budget is not None else "no time budget")
            + f"; checkpoints in {ckpt_dir}"
            + (f" (resuming the run there from step {resumed})" if resumed else "")
        )  # fmt: skip


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
        "context_genes": len(prep.context_genes),
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


# --------------------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class _Fit:
    """One run of Lightning over the plan: datasets, the fitted floor, the trainer, the model it ends with."""

    plan: _Plan
    run_dir: Path
    ckpt_path: Path | None
    resumed: int | None  # the step a resumed run continues from
    device: torch.device
    devices: int | list[int]
    seed: int
    patience: int
    val_steps: int
    num_workers: int
    time_budget: float | None
    trainer_kwargs: dict[str, Any]
    first_process: bool = True

    def run(self, sections: list[Section]) -> DiffST:
        """Train; the model of the run (saved at once by the first process, before its guard)."""
        plan = self.plan
        L.seed_everything(self.seed, workers=True, verbose=False)
        doing = "preparing the training data (reading windows, fitting the floor's stain exponents)"
        with on_interrupt(doing, "nothing was saved", "run the call again"):
            train_ds, val_ds = self._datasets(sections)
            if plan.cfg.base == "fitted" and plan.supervision == "hr":
                plan.cfg = _fit_base(plan.cfg, train_ds)
        ckpt_dir = self.run_dir / "checkpoints"
        sampler = WindowSampler(len(train_ds), plan.epoch_len, self.seed)
        train_dl = DataLoader(train_ds, batch_size=plan.cfg.batch_size, sampler=sampler, num_workers=self.num_workers)
        val_dl = (
            DataLoader(val_ds, batch_size=plan.cfg.batch_size, num_workers=self.num_workers) if plan.n_val else None
        )
        coexpr = np.mean([s.prep.coexpression for s in sections], axis=0)
        module = DiffSTModule(plan.cfg.to_dict(), coexpr.tolist(), val_steps=self.val_steps,
                              gene_scale=[float(v) for v in sections[0].gene_scale],
                              fingerprint=plan.fingerprint)  # fmt: skip
        if plan.cfg.lr_weight > 0:
            module.lr_windows = self._lr_windows(sections)
        history = History()
        control = RunControl(ckpt_dir / "last.ckpt", sampler, plan.cfg.batch_size, self.seed,
                             time_budget=self.time_budget)  # fmt: skip
        progress = ProgressLog(control, plan.planned)
        checkpoint = L.pytorch.callbacks.ModelCheckpoint(
            dirpath=ckpt_dir, filename="best", monitor=MONITOR if plan.n_val else None, mode="max", save_last=True,
            save_top_k=1, enable_version_counter=False,
        )  # fmt: skip
        early = L.pytorch.callbacks.EarlyStopping(monitor=MONITOR, patience=self.patience, mode="max")
        # progress before control: the line of the last step is printed before an interrupt stops the run
        callbacks = [history, progress, control, checkpoint, periodic_checkpoint(ckpt_dir),
                     *([early] if plan.n_val else [])]  # fmt: skip
        with _quiet_lightning():
            trainer = L.Trainer(**self._trainer_args(callbacks))
        log.info(plan.describe(sections, self.time_budget, ckpt_dir, self.resumed))
        t0 = time.perf_counter()
        self._fit(trainer, module, train_dl, val_dl, control, ckpt_dir)
        seconds = time.perf_counter() - t0
        stopped = _stopped_by(trainer, control, early if plan.n_val else None, plan.planned, plan.max_epochs)
        validated = bool(plan.n_val) and checkpoint.best_model_score is not None
        last_val = progress.val.get("val_pcc")
        # still improving: the last validation was the best, and early stopping did not end the run
        improving = (validated and stopped != "early stopping" and last_val is not None
                     and last_val >= float(checkpoint.best_model_score) - 1e-12)  # fmt: skip
        _warn_unfinished(stopped, trainer.global_step, plan.planned, self.time_budget, n_val=plan.n_val,
                         validated=validated, improving=improving, best=checkpoint.best_model_score)  # fmt: skip
        self.first_process = bool(trainer.is_global_zero)
        best = checkpoint.best_model_path if plan.n_val and checkpoint.best_model_path else None
        info = {
            "preset": plan.preset,
            "seed": self.seed,
            "epochs": int(trainer.current_epoch),
            "steps": int(trainer.global_step),
            "seconds": seconds,
            "best_checkpoint": str(best) if best else None,
            "best_val_loss": _best(history.rows, "val_loss"),
            "best_val_pcc": float(checkpoint.best_model_score) if best else None,
            "stopped_by": stopped,
            "planned_steps": int(plan.planned),
            "trained_seconds": float(control.seconds),
            "validated": validated,
            "still_improving": bool(improving),
            "run_dir": str(self.run_dir),
            "window_lr": int(plan.window_lr),
            "prepared_fingerprint": fingerprint(sections[0].prep),
            "sections": [s.record() for s in sections],
            "validation": sections[0].record()["validation"] if len(sections) == 1 else "per section",
            "key": sections[0].prep.key,
            "stage": "trained",  # the guard is still to come
            **({"image_features": model_record(sections[0].features)} if sections[0].features else {}),
        }
        with on_interrupt("saving the trained weights", f"the checkpoints are in {ckpt_dir}",
                          "`dst.tl.train(..., resume=True)` continues from them"):  # fmt: skip
            model = _model_from(module, best, sections, coexpr, history.rows, info)
            if self.first_process:
                model.save(self.run_dir / "model.pt")
        if control.interrupted:  # Ctrl-C after the last step (in the last validation): stop before the guard
            raise Interrupted("finishing the training", f"the trained weights are saved in {model.path}",
                              "`dst.tl.train(..., resume=True)` fits the guard on them without training again")  # fmt: skip
        return model

    def _datasets(self, sections: list[Section]) -> tuple[ConcatDataset, ConcatDataset]:
        plan, cfg = self.plan, self.plan.cfg
        train_parts, val_parts = [], []
        for s, t_origins, v_origins in zip(sections, plan.train_origins, plan.val_origins, strict=True):
            source = TileSource.from_sdata(s.sdata, s.prep, footprint=plan.supervision == "lr",
                                           features=s.features["key"] if s.features else None).cache_image(cfg.image_um)  # fmt: skip
            if plan.supervision == "lr":
                source.hr = None
            common = {"image_um": cfg.image_um, "gene_scale": s.gene_scale}
            train_parts.append(WindowDataset(source, t_origins, plan.window_lr, **common))
            val_parts.append(WindowDataset(source, v_origins, plan.window_lr, **common))
        return ConcatDataset(train_parts), ConcatDataset(val_parts)

    def _lr_windows(self, sections: list[Section]) -> ConcatDataset:
        """Windows of LR alone over every tile of every section, with the degradation's footprint (``lr_weight``).

        Validation and test tiles too: their LR is the model's input at inference anyway; their HR is never read.
        """
        plan, cfg = self.plan, self.plan.cfg
        parts = []
        for s in sections:
            region = split_region(s.prep, s.sdata, "train") | split_region(s.prep, s.sdata, "val")
            region |= split_region(s.prep, s.sdata, "test")
            source = TileSource.from_sdata(s.sdata, s.prep, footprint=True,
                                           features=s.features["key"] if s.features else None).cache_image(cfg.image_um)  # fmt: skip
            source.hr = None
            parts.append(WindowDataset(source, window_origins(region, plan.window_lr), plan.window_lr,
                                       image_um=cfg.image_um, gene_scale=s.gene_scale))  # fmt: skip
        return ConcatDataset(parts)

    def _trainer_args(self, callbacks: list[L.Callback]) -> dict[str, Any]:
        plan = self.plan
        on_gpu = self.device.type == "cuda"
        args: dict[str, Any] = {
            "max_epochs": plan.max_epochs,
            **lightning_device(self.device, self.devices),
            "callbacks": callbacks,
            "logger": L.pytorch.loggers.CSVLogger(self.run_dir, name="logs"),
            # plain progress lines (ProgressLog) instead of a bar: they read the same in a log file
            "enable_progress_bar": False,
            "enable_model_summary": settings.verbosity >= 2,
            "deterministic": not on_gpu,
            "precision": ("bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed") if on_gpu else "32-true",
            "log_every_n_steps": max(1, min(50, plan.steps_per_epoch)),
            "num_sanity_val_steps": 0,
            # at least once: a short training is still selected on validation
            "check_val_every_n_epoch": max(1, min(round(VAL_EVERY_STEPS / plan.steps_per_epoch), plan.max_epochs)),
        }
        args.update(self.trainer_kwargs)
        return args

    def _fit(self, trainer, module, train_dl, val_dl, control: RunControl, ckpt_dir: Path) -> None:
        try:
            with interrupt_flag(control), warnings.catch_warnings(), _quiet_lightning():
                for pattern in ("does not have many workers", "LeafSpec", "exists and is not empty",
                                "dataloader is not resumable"):  # fmt: skip
                    warnings.filterwarnings("ignore", message=f".*{pattern}.*")
                trainer.fit(module, train_dl, val_dl, ckpt_path=self.ckpt_path)
        except (StopRequested, SystemExit, KeyboardInterrupt) as e:
            # StopRequested: Ctrl-C, saved after the step; SystemExit: Lightning's exit after a KeyboardInterrupt it
            # caught itself (a second Ctrl-C); both become one message that says where the checkpoint is
            if isinstance(e, SystemExit) and not control.interrupted:
                raise
            last = ckpt_dir / "last.ckpt"
            exc = interrupted(int(trainer.global_step), checkpoint_step(last), last)
            log.warn(str(exc))
            raise exc from None


def _model_from(module: DiffSTModule, best: str | None, sections: list[Section], coexpr: np.ndarray,
                history: list[dict], info: dict[str, Any]) -> DiffST:  # fmt: skip
    """The model of the run: the EMA weights of the best validation checkpoint (or the last ones without one)."""
    if best:
        state = torch.load(best, map_location="cpu", weights_only=False)["state_dict"]
        ema_state = {k.removeprefix("ema."): v for k, v in state.items() if k.startswith("ema.")}
    else:
        ema_state = {k: v.detach().cpu() for k, v in module.ema.state_dict().items()}
    net = DiffSTNet(module.config, coexpr=torch.tensor(coexpr, dtype=torch.float32))
    net.load_state_dict(ema_state)
    prep = sections[0].prep
    return DiffST(config=module.config, net=net, genes=list(prep.genes), gene_scale=sections[0].gene_scale,
                  lr_scale=prep.lr_scale, units=ModelUnits.of(prep, module.config.image_um), history=list(history),
                  info=info)  # fmt: skip


def _trained_earlier(run_dir: Path) -> DiffST | None:
    """The model of a run whose training finished but whose guard did not (then the next call fits only that)."""
    path = run_dir / "model.pt"
    if not path.exists():
        return None
    model = DiffST.load(path)
    return model if model.info.get("stage") == "trained" else None


def _fit_base(cfg: DiffSTConfig, train_ds: ConcatDataset) -> DiffSTConfig:
    """Choose the fitted floor's per-gene stain exponents on training windows (:func:`fit_stain_exponents`)."""
    n = len(train_ds)
    idx = np.unique(np.linspace(0, n - 1, min(BASE_FIT_WINDOWS, n)).round().astype(int))
    batch = {k: torch.stack([train_ds[int(i)][k] for i in idx]) for k in ("x0", "lr", "mask", "image", "gene_scale")}
    n_stains = 2 if cfg.image_kind == "rgb" else cfg.image_channels
    exponents, pcc = fit_stain_exponents(
        batch["x0"], batch["lr"], batch["mask"], batch["image"], scale=cfg.scale, per_hr=cfg.image_per_hr,
        gene_scale=batch["gene_scale"], kind=cfg.image_kind, n_stains=n_stains, channel=cfg.nuclear_channel,
    )  # fmt: skip
    floor = default_exponents(cfg.n_genes, n_stains, cfg.image_kind, cfg.nuclear_channel)
    changed = int((exponents != floor).any(1).sum())
    log.info(
        f"fitted floor: {changed} of {cfg.n_genes} genes weigh the image's stains differently from the floor, on "
        f"{len(idx)} training windows (PCC {float(np.nanmean(pcc['floor'].numpy())):.3f} → "
        f"{float(np.nanmean(pcc['fitted'].numpy())):.3f})"
    )
    return dataclasses.replace(cfg, stain_exponents=[[float(v) for v in row] for row in exponents.tolist()])


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


def _default_dir(sections: list[Section], key: str, cfg: DiffSTConfig, seed: int) -> Path:
    h = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode() + f"{seed}".encode()).hexdigest()[:8]
    prints = [fingerprint(s.prep) for s in sections]
    data = prints[0] if len(prints) == 1 else hashlib.sha256("".join(prints).encode()).hexdigest()[:12]
    name = f"{key}-{data}-{h}"
    path = sections[0].sdata.path
    if path is not None:
        store = Path(path)
        return store.parent / f"{store.name}.diffst" / name
    return Path(settings.cachedir) / "models" / name


def _best(rows: list[dict[str, float]], name: str) -> float | None:
    values = [r[name] for r in rows if name in r]
    return float(min(values)) if values else None


def _summary(model: DiffST) -> str:
    info = model.info
    if model.guard is not None:
        return guard_summary(model.guard)
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
            f"training stopped {what} after {steps} of {planned} planned steps, before its first validation: model "
            f"selection did not run and the model is likely undertrained (the guard still compares it with the "
            f"floor); {longer}"
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
