"""Running a training that a user can leave alone: progress lines, a time budget, checkpoints, Ctrl-C, resuming.

- :class:`RunControl` (Lightning's ``Timer``: the clock across resumes and the time budget) seeds each step from
  ``(seed, step)``, keeps the position in the epoch for an exact resume and writes ``last.ckpt`` when the budget
  stops the run and, after Ctrl-C, at the end of the current step before raising :class:`StopRequested`;
  :func:`periodic_checkpoint` writes it at least every :data:`CHECKPOINT_EVERY` seconds.
- :class:`ProgressLog` prints plain lines (a log file is as good as a terminal): the plan with the measured speed
  after the first steps, then step, loss, the latest validation and an ETA every ``dst.settings.progress_every``
  seconds.
- :func:`run_directory` decides where a run lives and whether it continues an earlier one: only when asked.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, Timer

from .. import _logging as log
from .._settings import settings

#: Seconds of training between two periodic checkpoints (``last.ckpt``).
CHECKPOINT_EVERY = 60.0
#: Steps after which the speed is measured and the plan printed (the first step, which warms up, is not counted).
SPEED_STEPS = 3

Resume = bool | Literal["auto"]


class StopRequested(Exception):
    """Raised inside ``trainer.fit`` after Ctrl-C, once the checkpoint of the last finished step is written."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C in a diffst call, as one message: what it was doing, what was kept and how to go on.

    Still a :class:`KeyboardInterrupt` (a script ends as Ctrl-C ends it). ``doing``, ``kept`` and ``how`` hold the
    three parts; an interrupted training loop also sets ``steps``, ``saved_step`` and ``checkpoint``.
    """

    __module__ = "diffst"  # tracebacks name it diffst.Interrupted

    def __init__(self, doing: str, kept: str, how: str) -> None:
        super().__init__(f"interrupted while {doing}: {kept}; {how}")
        self.doing, self.kept, self.how = doing, kept, how


@contextlib.contextmanager
def on_interrupt(doing: str, kept: str, how: str) -> Iterator[None]:
    """Turn a Ctrl-C inside the block into an :class:`Interrupted` with these words (one already made passes)."""
    try:
        yield
    except Interrupted:
        raise
    except KeyboardInterrupt:
        raise Interrupted(doing, kept, how) from None


def interrupted(steps: int, saved_step: int | None, checkpoint: Path) -> Interrupted:
    """The :class:`Interrupted` that :func:`diffst.tl.train` raises after Ctrl-C in its loop: where the checkpoint is.

    Its attributes ``steps`` (done), ``saved_step`` (of the checkpoint, ``None`` when none was written) and
    ``checkpoint`` (its path) let another interface (the CLI) word the way back (:func:`resume_hint`).
    """
    text = resume_hint(steps, saved_step, checkpoint, "`dst.tl.train(..., resume=True)`")
    kept, _, how = text.partition("; resume with ")
    e = Interrupted("training", kept.removeprefix("interrupted "), f"resume with {how}" if how else "start again")
    e.args = (text,)
    e.steps, e.saved_step, e.checkpoint = int(steps), saved_step, Path(checkpoint)  # type: ignore[attr-defined]
    return e


def resume_hint(steps: int, saved_step: int | None, checkpoint: Path, how: str) -> str:
    """``interrupted after N steps; checkpoint at …; resume with <how>``."""
    if not Path(checkpoint).exists():
        return f"interrupted after {steps} steps, before the first checkpoint: nothing was saved"
    at = "" if saved_step in (None, steps) else f" (of step {saved_step})"
    return f"interrupted after {steps} steps; checkpoint at {checkpoint}{at}; resume with {how}"


class RunControl(Timer):
    """Lightning's ``Timer`` (the training clock, kept across resumes, and the time budget), and exact resuming.

    The :class:`~lightning.pytorch.callbacks.Timer` does the clock; this adds what it cannot do:

    - Step ``k`` runs with the global torch seed derived from ``(seed, k)``: noise, timesteps and augmentation of a
      step do not depend on whether the run was resumed before it.
    - The position in the epoch is kept in the checkpoint and handed to the sampler on resume, so a run resumed
      mid-epoch draws the batches it had not drawn (Lightning restarts a plain DataLoader's epoch).
    - ``last.ckpt`` is written at the end of the step that used up the budget, and after Ctrl-C at the end of the
      current step (then :class:`StopRequested` ends ``fit``); the periodic checkpoints are a
      :class:`~lightning.pytorch.callbacks.ModelCheckpoint` with ``train_time_interval`` (:func:`periodic_checkpoint`).

    Parameters
    ----------
    last
        Where checkpoints are written (``…/checkpoints/last.ckpt``).
    sampler
        The training :class:`~diffst.tl._data.WindowSampler`; a resumed run tells it which batches of the epoch are
        done.
    batch_size
        Windows per step (to skip the done part of an epoch).
    seed
        Seed of the run.
    time_budget
        Seconds of training (across resumes) after which training stops; ``None`` for none.

    """

    def __init__(self, last: Path, sampler: Any, batch_size: int, seed: int, time_budget: float | None = None) -> None:
        super().__init__(duration=None if time_budget is None else timedelta(seconds=time_budget), verbose=False)
        self.last, self.sampler, self.batch_size, self.seed = Path(last), sampler, int(batch_size), int(seed)
        self.time_budget = time_budget
        self.epoch = 0
        self.batches = 0  # batches of ``epoch`` done
        self.interrupted = False

    @property
    def seconds(self) -> float:
        """Seconds trained so far, earlier sessions of a resumed run included."""
        return self.time_elapsed("train")

    @property
    def out_of_time(self) -> bool:
        """Whether the time budget is used up."""
        remaining = self.time_remaining()
        return remaining is not None and remaining <= 0

    @property
    def offset(self) -> float:
        """Seconds trained before this session."""
        return float(self._offset)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int):
        torch.manual_seed(int(np.random.SeedSequence([self.seed, int(trainer.global_step)]).generate_state(1)[0]))

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.epoch, self.batches = int(trainer.current_epoch), int(batch_idx) + 1
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)  # the Timer: stop at the budget
        if self.out_of_time:
            trainer.save_checkpoint(self.last)
        elif self.interrupted:
            trainer.save_checkpoint(self.last)
            raise StopRequested

    def state_dict(self) -> dict[str, Any]:
        return super().state_dict() | {"epoch": self.epoch, "batches": self.batches}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.epoch, self.batches = int(state_dict["epoch"]), int(state_dict["batches"])
        self.sampler.skip(self.epoch, self.batches * self.batch_size)


def periodic_checkpoint(directory: Path) -> ModelCheckpoint:
    """``last.ckpt`` in ``directory`` at least every :data:`CHECKPOINT_EVERY` seconds of training."""
    return ModelCheckpoint(dirpath=directory, save_last=True, save_top_k=0,
                           train_time_interval=timedelta(seconds=CHECKPOINT_EVERY))  # fmt: skip


def checkpoint_step(checkpoint: Path) -> int | None:
    """The step of the checkpoint at ``checkpoint``; ``None`` when there is none."""
    if not Path(checkpoint).exists():
        return None
    return int(torch.load(checkpoint, map_location="cpu", weights_only=False, mmap=True)["global_step"])


class ProgressLog(L.Callback):
    """Plain progress lines, whether the output is a terminal, a notebook or a log file.

    After the first :data:`SPEED_STEPS` timed steps: the planned steps, the measured seconds per step and the
    projected time. Then, every ``dst.settings.progress_every`` seconds: step, mean training loss since the last
    line, the latest validation PCC (model, bicubic, image floor) and the estimated time left.
    """

    def __init__(self, control: RunControl, planned: int, every: float | None = None) -> None:
        self.control, self.planned = control, int(planned)
        self.every = settings.progress_every if every is None else float(every)
        self._losses: list[float] = []
        self._start_step = 0
        self._t_first: float | None = None  # end of the first step of this session
        self._last_line = 0.0
        self._announced = False
        self.val: dict[str, float] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start_step = int(trainer.global_step)
        self._last_line = time.perf_counter()
        if self._start_step:
            log.info(f"resuming at step {self._start_step} of {self.planned} ({self.control.offset:.0f} s trained)")

    def seconds_per_step(self, trainer: L.Trainer) -> float | None:
        done = int(trainer.global_step) - self._start_step - 1
        if self._t_first is None or done < 1:
            return None
        return (time.perf_counter() - self._t_first) / done

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None:
            self._losses.append(float(loss))
        step = int(trainer.global_step)
        if self._t_first is None:
            self._t_first = time.perf_counter()
        rate = self.seconds_per_step(trainer)
        if not self._announced and rate is not None and step - self._start_step > SPEED_STEPS:
            self._announced = True
            log.info(self._plan(step, rate))
        now = time.perf_counter()
        if now - self._last_line >= self.every:
            self._last_line = now
            log.info(self._line(step, rate))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        m = trainer.callback_metrics
        self.val = {k: float(m[k]) for k in ("val_pcc", "val_pcc_bicubic", "val_pcc_floor") if k in m}
        self.val["step"] = float(trainer.global_step)

    def _plan(self, step: int, rate: float) -> str:
        left = self.planned - step
        text = (
            f"{self.planned} steps planned; {rate:.2f} s per step over the first {step - self._start_step - 1} "
            f"timed steps, so about {format_duration(left * rate)} more (plus validation)"
        )
        budget = self.control.time_budget
        if budget is not None:
            remaining = budget - self.control.seconds
            if left * rate > remaining:
                text += (
                    f"; the time budget ({budget:g} s) will stop it near step {step + int(remaining / rate)}: pass a "
                    "larger `time_budget` (or None) to train all of them"
                )
        return text

    def _line(self, step: int, rate: float | None) -> str:
        parts = [f"step {step}/{self.planned}", f"epoch {self.control.epoch + 1}"]
        if self._losses:
            parts.append(f"loss {np.mean(self._losses):.4f}")
            self._losses = []
        if "val_pcc" in self.val:
            v = self.val
            ref = ", ".join(
                f"{name} {v[k]:.3f}"
                for name, k in (("bicubic", "val_pcc_bicubic"), ("floor", "val_pcc_floor"))
                if k in v
            )
            parts.append(f"val PCC {v['val_pcc']:.3f} at step {int(v['step'])}" + (f" ({ref})" if ref else ""))
        else:
            parts.append("not validated yet")
        parts.append(f"{format_duration(self.control.seconds)} trained")
        if rate is not None:
            eta = (self.planned - step) * rate
            budget = self.control.time_budget
            if budget is not None:
                eta = min(eta, max(0.0, budget - self.control.seconds))
            parts.append(f"about {format_duration(eta)} left")
        return " · ".join(parts)


def format_duration(seconds: float) -> str:
    """``42 s``, ``3.5 min`` or ``2.1 h``."""
    seconds = max(0.0, float(seconds))
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


@contextlib.contextmanager
def interrupt_flag(control: RunControl) -> Iterator[None]:
    """While training, the first Ctrl-C (SIGINT) asks ``control`` to stop after the current step.

    A second Ctrl-C stops at once (the last periodic checkpoint remains). Only in the main thread, where Python
    delivers signals.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        if control.interrupted:
            raise KeyboardInterrupt
        control.interrupted = True
        log.warn("interrupt: stopping after the current step to save a checkpoint (press Ctrl-C again to stop now)")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


# --------------------------------------------------------------------------------------------------------------------
# Where a run lives, and whether it continues an earlier one
# --------------------------------------------------------------------------------------------------------------------
def run_directory(
    family: Path | None, checkpoint_dir: Path | None, *, resume: Resume, overwrite: bool
) -> tuple[Path, Path | None]:
    """The run directory and the checkpoint to resume from (``None``: a fresh start).

    With ``checkpoint_dir`` the run lives there. Otherwise each run gets its own ``run-<UTC time>`` folder under
    ``family`` (one per data fingerprint, configuration and seed), so unrelated runs never share checkpoints, and
    ``resume`` picks the latest run of the family that left a checkpoint.
    """
    if resume not in (True, False, "auto"):
        msg = f"`resume` must be True, False or 'auto'; got {resume!r}."
        raise ValueError(msg)
    if checkpoint_dir is not None:
        run = Path(checkpoint_dir)
        last = run / "checkpoints" / "last.ckpt"
        earlier = last.exists() or (run / "model.pt").exists()
        if earlier and overwrite:
            for p in [last, last.parent / "best.ckpt", run / "model.pt"]:
                p.unlink(missing_ok=True)
            return run, None
        if earlier and resume is False:
            msg = (
                f"{run} holds an earlier training run. Pass `resume=True` to continue it, `overwrite=True` to start "
                "afresh there, or another `checkpoint_dir`."
            )
            raise ValueError(msg)
        if resume is True and not last.exists():
            msg = f"Nothing to resume: {run} holds no checkpoint (`checkpoints/last.ckpt`). Pass `resume=False`."
            raise ValueError(msg)
        return run, (last if last.exists() and resume else None)
    assert family is not None
    runs = sorted(p.parent.parent for p in family.glob("run-*/checkpoints/last.ckpt"))
    if resume is True and not runs:
        msg = (
            "Nothing to resume: no earlier run of this configuration and seed on these data left a checkpoint (looked "
            f"in {family}). Pass `resume=False` to start afresh, or the run's `checkpoint_dir`."
        )
        raise ValueError(msg)
    if resume and runs:
        return runs[-1], runs[-1] / "checkpoints" / "last.ckpt"
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    run = family / f"run-{stamp}"
    n = 1
    while run.exists():
        n += 1
        run = family / f"run-{stamp}-{n}"
    return run, None


#: Config fields that training fits from the data rather than takes from the user.
FITTED_CONFIG = ("stain_exponents",)


def check_resumable(
    ckpt_path: Path,
    *,
    config: dict[str, Any],
    fingerprint: str,
    planned_steps: int,
    max_epochs: int,
    time_budget: float | None,
) -> dict[str, Any]:
    """Refuse, with the choices, a checkpoint of another configuration or data, or one at or past this budget."""
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    hp = ckpt.get("hyper_parameters", {})
    # what training fits from the data (the fitted floor's exponents) is not chosen by the user; the data
    # fingerprint, compared below, already says whether the data are the same
    config = {k: v for k, v in config.items() if k not in FITTED_CONFIG}
    stored = hp.get("config")
    if stored is not None:
        stored = {k: v for k, v in stored.items() if k not in FITTED_CONFIG}
    run = ckpt_path.parent.parent
    if stored is not None and stored != config:
        diff = sorted(k for k in config if stored.get(k) != config[k])
        msg = (
            f"The checkpoint in {ckpt_path.parent} was trained with a different configuration ({diff}); use another "
            "`checkpoint_dir`, `overwrite=True`, or `resume=False`."
        )
        raise ValueError(msg)
    stored_fp = hp.get("fingerprint")
    if stored_fp is not None and stored_fp != fingerprint:
        msg = (
            f"The checkpoint in {ckpt_path.parent} was trained on other prepared data (fingerprint {stored_fp}, these "
            f"are {fingerprint}); use another `checkpoint_dir`, `overwrite=True`, or `resume=False`."
        )
        raise ValueError(msg)
    steps = int(ckpt.get("global_step", 0))
    state = next((v for k, v in ckpt.get("callbacks", {}).items() if k.startswith("RunControl")), {})
    seconds = float(state.get("time_elapsed", {}).get("train", 0.0))
    early = next((v for k, v in ckpt.get("callbacks", {}).items() if k.startswith("EarlyStopping")), {})
    why = None
    if early.get("stopped_epoch", 0) > 0:
        why = "it was stopped early, when its validation PCC stopped improving, so it would stop again"
    elif steps >= planned_steps:
        why = f"it has done {steps} steps, and this call plans {planned_steps} ({max_epochs} epochs)"
    elif time_budget is not None and seconds >= time_budget:
        why = f"it has trained {seconds:.0f} s, and this call's time budget is {time_budget:g} s"
    if why is not None:
        model = run / "model.pt"
        use = f"use its model ({model}, `dst.DiffST.load`), " if model.exists() else ""
        msg = (
            f"The run in {run} cannot continue within this call's budget: {why}. Choose: continue it with a larger "
            f"budget (`max_epochs` of at least {steps // max(1, planned_steps // max_epochs) + 1} or `time_budget` "
            f"above {seconds:.0f} s, with `resume=True`), "
            f"{use}or start afresh (`resume=False`)."
        )
        raise ValueError(msg)
    return {"steps": steps, "seconds": seconds}
