"""Training a user can leave running: visible, bounded, interruptible, resumable (and the CLI's words for it)."""

from __future__ import annotations

import functools
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

import diffst as dst
from diffst import cli
from diffst.tl import _run
from diffst.tl._data import Prepared, WindowSampler

from .models import untrained
from .toy import toy_prepared as _prepared
from .toy import toy_xenium

ROOT = Path(__file__).parents[1]
# validation every epoch, so that the runs below validate (and select their best checkpoint) several times
RUN = {"preset": "tiny", "val_steps": 2, "guard": False, "check_val_every_n_epoch": 1}


def _state(model: dst.DiffST) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.net.state_dict().items()}


# --------------------------------------------------------------------------------------------------------------------
# the sampler: a function of (seed, epoch), and a resumed epoch skips what was done
# --------------------------------------------------------------------------------------------------------------------
def test_window_sampler_depends_on_seed_and_epoch_and_skips_a_done_part():
    a, b = WindowSampler(100, 12, seed=3), WindowSampler(100, 12, seed=3)
    a.set_epoch(2)
    b.set_epoch(2)
    first = list(a)
    assert first == list(b) and len(first) == 12
    a.set_epoch(3)
    assert list(a) != first
    c = WindowSampler(100, 12, seed=3)
    c.skip(2, 8)
    c.set_epoch(2)
    assert list(c) == first[8:]
    c.set_epoch(2)  # the skip applies once
    assert list(c) == first
    assert list(WindowSampler(100, 12, seed=4)) != list(WindowSampler(100, 12, seed=3))


# --------------------------------------------------------------------------------------------------------------------
# interruptible and resumable: SIGINT in a subprocess, then resume to the same weights
# --------------------------------------------------------------------------------------------------------------------
SCRIPT = """
import sys, time
import torch
sys.path.insert(0, {root!r})
import diffst as dst
from diffst.tl._lightning import DiffSTModule
from tests.toy import toy_prepared as _prepared

dst.settings.progress_every = 0  # a progress line every step
torch.set_num_threads({threads})  # as the test process: float sums, and so the weights, depend on the thread count
step = DiffSTModule.training_step

def slow(self, batch, i):  # slow enough for the test to interrupt it mid-run
    print("STEP", self.global_step, flush=True)
    time.sleep(0.25)
    return step(self, batch, i)

DiffSTModule.training_step = slow
dst.tl.train(_prepared(), max_epochs=3, checkpoint_dir={run!r}, **{kwargs!r})
print("FINISHED", flush=True)
"""


@pytest.mark.slow
def test_sigint_saves_a_checkpoint_says_how_to_resume_and_resuming_matches_an_uninterrupted_run(prepared, tmp_path):
    reference = dst.tl.train(prepared, max_epochs=3, checkpoint_dir=tmp_path / "reference", **RUN)

    run = tmp_path / "interrupted"
    script = tmp_path / "train.py"
    script.write_text(SCRIPT.format(root=str(ROOT), run=str(run), kwargs=RUN, threads=torch.get_num_threads()))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:  # interrupt in the middle of the second epoch (10 steps per epoch)
        if line.startswith("STEP 13"):
            proc.send_signal(signal.SIGINT)
            break
    out, err = proc.communicate(timeout=300)
    assert "FINISHED" not in out
    # a plain KeyboardInterrupt ends the script; its exit status is the interpreter's (130 / -SIGINT, or 1 when a
    # library's exit hook runs Python code after it, as torch._dynamo's can), so only "not 0" is checked
    assert proc.returncode != 0, err[-2000:]
    checkpoint = run / "checkpoints" / "last.ckpt"
    assert checkpoint.exists()
    steps = int(torch.load(checkpoint, map_location="cpu", weights_only=False)["global_step"])
    assert 13 <= steps < 30
    message = (
        f"interrupted after {steps} steps; checkpoint at {checkpoint}; resume with `dst.tl.train(..., resume=True)`"
    )
    assert message in err
    assert f"diffst.Interrupted: {message}" in err  # raised (a KeyboardInterrupt, not a SystemExit), with the message
    # progress lines reached a pipe (not a terminal): the plan with the measured speed, then step lines
    assert "30 steps planned;" in err and "s per step" in err
    assert f"step {steps}/30 · epoch 2 · loss " in err

    # resuming is only on request: without it, the folder holding the run is refused
    with pytest.raises(ValueError, match="earlier training run.*resume=True"):
        dst.tl.train(prepared, max_epochs=3, checkpoint_dir=run, **RUN)
    resumed = dst.tl.train(prepared, max_epochs=3, checkpoint_dir=run, resume=True, **RUN)
    assert resumed.info["steps"] == reference.info["steps"] == 30
    a, b = _state(reference), _state(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run's"
    assert resumed.info["best_val_pcc"] == pytest.approx(reference.info["best_val_pcc"], abs=1e-7)
    assert resumed.info["trained_seconds"] > 0


@pytest.mark.slow
def test_a_checkpoint_is_written_at_least_every_interval(prepared, tmp_path, monkeypatch):
    saved: list[int] = []
    original = L.Trainer.save_checkpoint

    def spy(self, filepath, *args, **kwargs):
        if Path(filepath).name == "last.ckpt":
            saved.append(int(self.global_step))
        original(self, filepath, *args, **kwargs)

    monkeypatch.setattr(L.Trainer, "save_checkpoint", spy)
    monkeypatch.setattr(_run, "CHECKPOINT_EVERY", 0.0)
    dst.tl.train(prepared, max_epochs=1, checkpoint_dir=tmp_path / "a", **RUN)
    assert sorted(set(saved)) == list(range(1, 11))  # every step
    saved.clear()
    monkeypatch.setattr(_run, "CHECKPOINT_EVERY", 1e9)
    dst.tl.train(prepared, max_epochs=1, checkpoint_dir=tmp_path / "b", **RUN)
    assert saved == [10]  # only with the validation at the epoch's end


# --------------------------------------------------------------------------------------------------------------------
# resumable, never by surprise
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_default_runs_never_share_checkpoints_and_resume_only_when_asked(tmp_path, log_lines):
    sdata = _prepared()
    sdata.write(tmp_path / "s.zarr")
    import spatialdata as sd

    backed = sd.read_zarr(tmp_path / "s.zarr")
    with pytest.raises(ValueError, match="Nothing to resume.*resume=False"):
        dst.tl.train(backed, max_epochs=1, resume=True, **RUN)
    first = dst.tl.train(backed, max_epochs=1, **RUN)
    second = dst.tl.train(backed, max_epochs=1, **RUN)
    assert first.path.parent != second.path.parent  # each run in its own folder
    assert first.path.parent.parent == second.path.parent.parent  # of the same data, configuration and seed
    assert torch.equal(next(iter(_state(first).values())), next(iter(_state(second).values())))
    log_lines.clear()
    # resume=True continues the latest run of the family, and says where from
    longer = dst.tl.train(backed, max_epochs=2, resume=True, **RUN)
    assert longer.path.parent == second.path.parent
    assert longer.info["steps"] == 2 * first.info["steps"]
    assert any(f"resuming the run there from step {first.info['steps']}" in line for line in log_lines)
    assert any(line.startswith(f"resuming at step {first.info['steps']} of 20") for line in log_lines)
    # "auto": the same when there is such a run; another configuration is another family: a fresh start
    auto = dst.tl.train(backed, max_epochs=1, resume="auto", config={"learning_rate": 7e-4}, **RUN)
    assert auto.path.parent.parent != first.path.parent.parent
    with pytest.raises(ValueError, match="`resume` must be True, False or 'auto'"):
        dst.tl.train(backed, max_epochs=1, resume="yes", **RUN)


@pytest.mark.slow
def test_a_budget_below_what_the_checkpoint_did_is_a_clear_message(prepared, tmp_path):
    run = tmp_path / "run"
    dst.tl.train(prepared, max_epochs=3, checkpoint_dir=run, **RUN)
    with pytest.raises(ValueError) as info:
        dst.tl.train(prepared, max_epochs=1, checkpoint_dir=run, resume=True, **RUN)
    msg = str(info.value)
    assert "it has done 30 steps, and this call plans 10 (1 epochs)" in msg
    assert "larger budget (`max_epochs` of at least 4" in msg and "start afresh (`resume=False`)" in msg
    assert str(run / "model.pt") in msg  # its model is a choice too
    assert "Misconfiguration" not in msg
    with pytest.raises(ValueError, match=r"this call's time budget is 0.001 s"):
        dst.tl.train(prepared, max_epochs=5, checkpoint_dir=run, resume=True, time_budget=0.001, **RUN)
    # a larger budget continues it
    more = dst.tl.train(prepared, max_epochs=4, checkpoint_dir=run, resume=True, **RUN)
    assert more.info["steps"] == 40


@pytest.mark.slow
def test_a_checkpoint_of_other_data_is_refused(prepared, tmp_path):
    run = tmp_path / "run"
    dst.tl.train(prepared, max_epochs=1, checkpoint_dir=run, **RUN)
    other = _prepared(seed=1)
    with pytest.raises(ValueError, match="trained on other prepared data"):
        dst.tl.train(other, max_epochs=2, checkpoint_dir=run, resume=True, **RUN)


# --------------------------------------------------------------------------------------------------------------------
# bounded: why training stopped, in plain words
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_stopping_before_the_first_validation_is_said_plainly(prepared, tmp_path, log_lines):
    model = dst.tl.train(
        prepared, max_epochs=2, checkpoint_dir=tmp_path, preset="tiny", val_steps=2, guard=False,
        check_val_every_n_epoch=5,
    )  # fmt: skip
    assert model.info["stopped_by"] == "completed" and model.info["validated"] is False
    assert any("before its first validation" in line and "likely undertrained" in line for line in log_lines)


@pytest.mark.slow
def test_the_time_budget_stops_training_records_it_and_counts_across_resumes(prepared, tmp_path, log_lines):
    model = dst.tl.train(prepared, max_epochs=500, checkpoint_dir=tmp_path, time_budget=1.5, **RUN)
    assert model.info["stopped_by"] == "time budget"
    assert model.info["trained_seconds"] >= 1.5  # the budget was reached (how much longer depends on the machine)
    assert model.info["steps"] < model.info["planned_steps"] == 5000
    assert any("stopped by its time budget (1.5 s)" in line for line in log_lines)
    # the budget is of the whole run: resuming it with the same budget has nothing left to do
    with pytest.raises(ValueError, match="time budget is 1.5 s"):
        dst.tl.train(prepared, max_epochs=500, checkpoint_dir=tmp_path, time_budget=1.5, resume=True, **RUN)


@pytest.mark.slow
def test_progress_lines_carry_step_loss_validation_and_time_left(prepared, tmp_path, log_lines, monkeypatch):
    monkeypatch.setattr(dst.settings, "progress_every", 0.0)
    dst.tl.train(prepared, max_epochs=2, checkpoint_dir=tmp_path, **RUN)
    plan = [line for line in log_lines if "steps planned" in line]
    assert len(plan) == 1 and plan[0].startswith("20 steps planned; ")
    step_lines = [line for line in log_lines if line.startswith("step ")]
    assert [line.split()[1] for line in step_lines] == [f"{i}/20" for i in range(1, 21)]
    late = step_lines[-1]
    assert "loss " in late and "val PCC " in late and "at step 10 (bicubic " in late and "floor " in late
    assert "left" in late and "trained" in late


# --------------------------------------------------------------------------------------------------------------------
# model and data agree on the degradation
# --------------------------------------------------------------------------------------------------------------------
def test_a_model_trained_on_bins_warns_on_spot_data(prepared):
    model = untrained(Prepared.from_sdata(prepared, "diffst"))  # the contract, not the weights, is under test
    assert model.units.degradation == "bin" and model.units.spot_diameter_um is None
    spots = toy_xenium(size_um=800, n=60_000, seed=0)
    dst.pp.prepare(spots, genes=model.genes, lr_um=40, scale=4, tile_um=160, degradation="visium")
    with pytest.warns(UserWarning, match=r"square bins \(degradation='bin'\).*22 µm spot discs 40 µm apart"):
        model.check_compatible(Prepared.from_sdata(spots, "diffst"))
    assert model.degradation_mismatch(Prepared.from_sdata(prepared, "diffst")) is None
    # a spot model on spots of another size
    spot_model = untrained(Prepared.from_sdata(spots, "diffst"))
    assert spot_model.units.spot_diameter_um == pytest.approx(22.0)
    wide = toy_xenium(size_um=800, n=60_000, seed=0)
    dst.pp.prepare(wide, genes=model.genes, lr_um=40, scale=4, tile_um=160, degradation="visium", spot_diameter_um=30)
    assert "sizes differ" in spot_model.degradation_mismatch(Prepared.from_sdata(wide, "diffst"))
    assert "square bins" in spot_model.degradation_mismatch(Prepared.from_sdata(prepared, "diffst"))


# --------------------------------------------------------------------------------------------------------------------
# the CLI: its own flags in messages, Ctrl-C, upsample and plot
# --------------------------------------------------------------------------------------------------------------------
def test_cli_words_name_the_flags():
    words = cli.CliWords(cli.build_parser())
    text = words(
        "pass `image_key=` or `overwrite=True`, `key_added`; run `dst.pp.prepare` first; a larger `time_budget` "
        "(or None), `resume=True`, `resume='auto'`, start afresh (`resume=False`); `degradation='visium'`; "
        "`guard=False`; `consistency=False`; `not_a_parameter`"
    )
    assert text == (
        "pass `--image-key` or `--overwrite`, `--key-added`; run `diffst prepare` first; a larger `--time-budget` "
        "(or None), `--resume`, `--resume auto`, start afresh (without `--resume`); `--degradation visium`; "
        "`--no-guard`; `--no-consistency`; `not_a_parameter`"
    )
    # within one command, only its own flags: `diffst demo` has no --time-budget
    demo = cli.CliWords(cli.build_parser(), "demo")
    assert demo("pass a larger `time_budget`, or `overwrite=True`") == "pass a larger `time_budget`, or `--overwrite`"


@pytest.mark.slow
def test_cli_errors_and_warnings_use_flags(tmp_path, capsys, log_lines):
    path = tmp_path / "s.zarr"
    toy_xenium(size_um=800, n=60_000, seed=0).write(path)
    prepare = ["prepare", str(path), "--genes", "3", "--lr-um", "40", "--scale", "4", "--tile-um", "160"]
    assert cli.main(["--quiet", *prepare]) == 0
    capsys.readouterr()
    assert cli.main(["--quiet", *prepare]) == 1
    err = capsys.readouterr().err
    assert "--overwrite" in err and "overwrite=True" not in err

    def train(epochs: int, *more: str) -> list[str]:
        return ["--quiet", "train", str(path), "--preset", "tiny", "--max-epochs", str(epochs), "--checkpoint-dir",
                str(tmp_path / "run"), "--no-guard", *more]  # fmt: skip

    assert cli.main(train(3)) == 0
    assert cli.main(train(1, "--resume")) == 1
    err = capsys.readouterr().err
    assert "`--max-epochs` of at least 4" in err and "without `--resume`" in err and "max_epochs" not in err
    # a warning during a command, through the logger (--quiet silences progress, not warnings):
    # "… before its first validation … pass a larger `max_epochs`"
    log_lines.clear()
    assert cli.main(train(4, "--resume", "--time-budget", "none")) == 0
    assert any("pass a larger `--max-epochs`" in line for line in log_lines)
    assert not any("`max_epochs`" in line for line in log_lines)


def test_cli_interrupt_says_how_to_resume_with_its_flags(tmp_path):
    checkpoint = tmp_path / "last.ckpt"
    checkpoint.write_bytes(b"")
    e = _run.interrupted(12, 12, checkpoint)
    assert isinstance(e, KeyboardInterrupt) and type(e) is dst.Interrupted
    text = cli._interrupted(e, ["train", "s.zarr", "--preset", "tiny", "--overwrite"])
    assert (
        text
        == f"interrupted after 12 steps; checkpoint at {checkpoint}; resume with `diffst train s.zarr --preset tiny --resume`"
    )
    assert cli._interrupted(KeyboardInterrupt(), ["prepare", "s.zarr"]) == "interrupted"
    assert "before the first checkpoint" in str(_run.interrupted(2, None, tmp_path / "none.ckpt"))


def test_cli_ctrl_c_in_train_exits_130_with_the_resume_command(tmp_path, capsys, monkeypatch):
    path = tmp_path / "s.zarr"
    toy_xenium(size_um=400, n=5_000, seed=0).write(path)
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"")

    @functools.wraps(dst.tl.train)  # the CLI takes its defaults from the signature
    def interrupted_train(sdata, **kwargs):
        raise _run.interrupted(7, 7, checkpoint)

    monkeypatch.setattr(dst.tl, "train", interrupted_train)
    argv = ["train", str(path), "--max-epochs", "5", "--checkpoint-dir", str(tmp_path / "run")]
    assert cli.main(argv) == 130
    err = capsys.readouterr().err
    assert err.strip() == (
        f"diffst: interrupted after 7 steps; checkpoint at {checkpoint}; resume with `diffst train {path} "
        f"--max-epochs 5 --checkpoint-dir {tmp_path / 'run'} --resume`"
    )


def test_cli_upsample_and_plot(tmp_path, capsys):
    path = tmp_path / "s.zarr"
    toy_xenium(size_um=800, n=60_000, seed=0).write(path)
    assert (
        cli.main(["--quiet", "prepare", str(path), "--genes", "3", "--lr-um", "40", "--scale", "4", "--tile-um", "160"])
        == 0
    )
    assert cli.main(["--quiet", "upsample", str(path), "--method", "image"]) == 0
    assert "images['image_floor_sr']" in capsys.readouterr().out
    import spatialdata as sd

    sdata = sd.read_zarr(path)
    assert sdata.attrs["image_floor_sr"]["method"] == "image_floor"
    from PIL import Image

    genes = sdata.attrs["diffst"]["genes"]
    heights = []
    for n in (1, 2):
        figure = tmp_path / f"maps{n}.png"
        args = ["--key", "image_floor_sr", "--genes", ",".join(genes[:n]), "-o", str(figure)]
        assert cli.main(["--quiet", "plot", str(path), *args]) == 0
        assert f"wrote {figure}" in capsys.readouterr().out
        with Image.open(figure) as im:
            heights.append(im.size[1])
    assert heights[1] > 1.6 * heights[0]  # one row of panels per gene
    assert cli.main(["plot", str(path), "--key", "image_floor_sr", "-o", str(tmp_path / "nope" / "x.png")]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["plot", str(path), "--region", "10,10,5,20"]) == 2
