from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
import spatialdata as sd

import diffst as dst
from diffst import cli

from .toy import toy_visium, toy_xenium

PREPARE = ["--genes", "3", "--lr-um", "40", "--scale", "4", "--tile-um", "160"]


@pytest.fixture(scope="module")
def toy_store(tmp_path_factory) -> Path:
    """A raw toy Xenium store (transcripts + DAPI), written once; tests work on copies."""
    path = tmp_path_factory.mktemp("toy") / "toy.zarr"
    toy_xenium(size_um=800, n=60_000, seed=0).write(path)
    return path


@pytest.fixture
def store(toy_store, tmp_path) -> Path:
    path = tmp_path / "slide.zarr"
    shutil.copytree(toy_store, path)
    return path


@pytest.fixture(scope="module")
def prepared_store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prepared") / "slide.zarr"
    toy_xenium(size_um=800, n=60_000, seed=0).write(path)
    assert cli.main(["--quiet", "prepare", str(path), *PREPARE]) == 0
    return path


# --------------------------------------------------------------------------------------------------------------------
# help, version, argument parsing
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ("demo", ["--quick", "--out", "default: diffst_demo", "demo.zarr", "metrics.csv"]),
        (
            "prepare",
            ["--lr-um", "default: 100.0", "--tile-um", "default: 400 µm, or four spot pitches", "images['diffst_lr']"],
        ),
        ("train", ["--preset", "default: default", "--max-epochs", "model.pt", "400 µm"]),
        ("super-resolve", ["--n-samples", "default: 1", "--no-consistency", "images['diffst_sr']"]),
        ("evaluate", ["--key", "default: diffst_sr", "--split", "default: test", "--output"]),
    ],
)
def test_help_of_each_command_mentions_units_defaults_and_outputs(command, expected, capsys):
    assert cli.main([command, "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "µm" in text
    for word in expected:
        assert word in text, word
    assert "(default: None)" not in text


def test_top_level_help_and_version(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("demo", "prepare", "train", "super-resolve", "evaluate"):
        assert command in out
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"diffst {dst.__version__}"


def test_usage_errors_exit_2(capsys):
    assert cli.main([]) == 2
    assert cli.main(["prepare"]) == 2  # PATH missing
    assert cli.main(["prepare", "x.zarr", "--scale", "0"]) == 2
    assert "positive integer" in capsys.readouterr().err


def test_genes_take_a_count_or_a_list():
    assert cli._genes_or_count("12") == 12
    assert cli._genes_or_count("ERBB2, LUM,") == ["ERBB2", "LUM"]
    args = cli.build_parser().parse_args(["prepare", "x.zarr", "--genes", "G1,G2", "--split", "0.6,0.2,0.2"])
    assert args.genes == ["G1", "G2"]
    assert args.split == (0.6, 0.2, 0.2)
    assert args.lr_um == 100.0 and args.scale == 10 and args.key_added == "diffst"


# --------------------------------------------------------------------------------------------------------------------
# commands on a zarr store
# --------------------------------------------------------------------------------------------------------------------
def test_prepare_then_evaluate_round_trip(store, tmp_path, capsys):
    assert cli.main(["prepare", str(store), *PREPARE]) == 0
    assert "diffst_lr" in capsys.readouterr().out
    sdata = sd.read_zarr(store)
    for name in ("diffst_lr", "diffst_lr_mask", "diffst_hr"):
        assert name in sdata.images
    assert "diffst_tiles" in sdata.shapes
    assert sdata.attrs["diffst"]["lr_um"] == 40.0 and sdata.attrs["diffst"]["scale"] == 4
    genes = sdata.attrs["diffst"]["genes"]
    assert len(genes) == 3

    dst.tl.upsample(sdata, method="bicubic")  # a backed SpatialData: written into the store
    csv = tmp_path / "metrics.csv"
    assert cli.main(["evaluate", str(store), "--key", "bicubic_sr", "--output", str(csv)]) == 0
    assert "pcc" in capsys.readouterr().out
    df = pd.read_csv(csv, index_col="gene")
    assert list(df.index) == [*genes, "mean"]
    assert {"pcc", "rmse", "ssim", "lr_consistency", "method"} <= set(df.columns)
    assert (df["method"] == "bicubic").all()
    assert pd.notna(df.loc["mean", "pcc"]) and df.loc["mean", "rmse"] > 0


def test_data_errors_exit_1_with_a_message_and_no_traceback(store, tmp_path, capsys):
    # --quiet: the progress lines before the error (which reach capsys now that diffst loads lazily) stay out
    assert cli.main(["--quiet", "prepare", str(store), *PREPARE[2:], "--genes", "NOPE,G1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("diffst: error: ") and "NOPE" in err
    assert "Traceback" not in err

    missing = tmp_path / "missing.zarr"
    assert cli.main(["evaluate", str(missing)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("diffst: error: ") and str(missing) in err and "does not exist" in err
    assert "Traceback" not in err

    # a store without the requested SR result: the library's KeyError, shown as its message (not its repr)
    assert cli.main(["evaluate", str(store), "--key", "nothing_here"]) == 1
    err = capsys.readouterr().err
    assert "No super-resolved result under 'nothing_here'" in err and "\\n" not in err

    not_a_store = tmp_path / "plain"
    not_a_store.mkdir()
    assert cli.main(["train", str(not_a_store)]) == 1
    assert "not a SpatialData zarr store" in capsys.readouterr().err

    assert cli.main(["--verbose", "evaluate", str(missing)]) == 1
    assert "Traceback" in capsys.readouterr().err
    assert cli.main(["evaluate", str(missing), "--verbose"]) == 1  # global options after the command too
    assert "Traceback" in capsys.readouterr().err


@pytest.mark.slow
def test_train_then_super_resolve_writes_the_result(prepared_store, tmp_path, capsys):
    path = str(prepared_store)
    ckpt = tmp_path / "run"
    args = ["--preset", "tiny", "--max-epochs", "1", "--val-steps", "2", "--checkpoint-dir", str(ckpt)]
    assert cli.main(["--quiet", "train", path, *args]) == 0
    assert (ckpt / "model.pt").exists()
    assert str(ckpt / "model.pt") in capsys.readouterr().out
    assert cli.main(["--quiet", "super-resolve", path, "--n-samples", "2", "--steps", "2"]) == 0
    assert dst.settings.verbosity == 1  # main restores what it changed
    sdata = sd.read_zarr(prepared_store)
    assert {"diffst_sr", "diffst_sr_std"} <= set(sdata.images)
    assert sdata.attrs["diffst_sr"]["n_samples"] == 2
    assert sdata.attrs["diffst"]["model"]["path"] == str(ckpt / "model.pt")
    assert sdata.attrs["diffst_sr"]["genes"] == sdata.attrs["diffst"]["genes"]
    # the same result again is refused unless --overwrite
    assert cli.main(["--quiet", "super-resolve", path, "--steps", "2"]) == 1
    assert "overwrite" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_quick_writes_store_figure_metrics_and_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--quick", "--out", str(out)]) == 0
    summary = capsys.readouterr().out
    assert "PCC" in summary and "RMSE" in summary and "bicubic" in summary and "floor" in summary
    assert (out / "demo.zarr").is_dir()
    assert (out / "gene_maps.png").stat().st_size > 10_000
    assert (out / "model" / "model.pt").exists()
    sdata = sd.read_zarr(out / "demo.zarr")
    assert {"diffst_lr", "diffst_hr", "diffst_sr", "bicubic_sr", "image_floor_sr", "he_image"} <= set(sdata.images)
    df = pd.read_csv(out / "metrics.csv")
    assert set(df["method"]) == {"diffst", "bicubic", "image_floor"}
    assert (df["gene"] == "mean").sum() == 3
    assert df["pcc"].notna().all()

    assert cli.main(["demo", "--quick", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "already holds a diffst demo" in err and "--overwrite" in err


def test_top_level_help_lists_every_command_and_imports_no_heavy_library():
    import subprocess
    import sys

    code = (
        "import sys; from diffst import cli; status = cli.main(['--help']); "
        "print(status, sorted(m for m in ('torch', 'lightning', 'spatialdata', 'dask') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    *help_lines, last = result.stdout.strip().splitlines()
    assert last == "0 []"
    text = "\n".join(help_lines)
    for command in ("demo", "prepare", "train", "super-resolve", "upsample", "evaluate", "evaluate-spots",
                    "image-features", "plot"):  # fmt: skip
        assert f"    {command}" in text, command


# --------------------------------------------------------------------------------------------------------------------
# the parser is generated from the library functions
# --------------------------------------------------------------------------------------------------------------------
#: Every option of every command before the CLI was generated from the signatures (diffst 0.1.0.dev0).
OPTIONS_BEFORE = {
    "demo": ["--dataset", "--out", "--overwrite", "--quick", "--seed"],
    "prepare": [
        "--bin-size", "--coordinate-system", "--degradation", "--gene-selection", "--genes", "--image-key",
        "--image-kind", "--key-added", "--layer", "--lr-um", "--min-tissue", "--overwrite", "--points-key", "--region",
        "--scale", "--seed", "--split", "--split-block-um", "--spot-diameter-um", "--spot-pitch-um", "--table-key",
        "--tile-um", "--um-per-px",
    ],
    "train": [
        "--batch-size", "--device", "--checkpoint-dir", "--config", "--devices", "--image-encoder", "--key",
        "--max-epochs", "--no-guard", "--num-workers", "--overwrite", "--patience", "--preset", "--resume", "--seed",
        "--supervision", "--time-budget", "--val-steps",
    ],
    "super-resolve": [
        "--batch-size", "--block-lr", "--genes", "--key", "--key-added", "--model", "--n-samples", "--no-consistency",
        "--overwrite", "--sampler", "--seed", "--steps", "--tile-overlap", "--units",
    ],
    "upsample": ["--consistency", "--key", "--key-added", "--method", "--no-consistency", "--overwrite", "--units"],
    "evaluate": ["--genes", "--key", "--output", "--split", "--truth-key", "-o"],
    "plot": [
        "--dpi", "--genes", "--key", "--no-show-image", "--output", "--panel-size", "--region", "--show-image",
        "--split", "--tile", "--units", "-o",
    ],
}  # fmt: skip


def _subparsers() -> dict:
    import argparse

    parser = cli.build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def test_every_command_and_option_of_before_is_kept():
    subs = _subparsers()
    assert set(subs) >= set(OPTIONS_BEFORE)  # every command of before, and the ones added since
    assert set(subs) - set(OPTIONS_BEFORE) == {"evaluate-spots", "image-features"}
    for command, flags in OPTIONS_BEFORE.items():
        missing = [f for f in flags if f not in subs[command]._option_string_actions]
        assert not missing, (command, missing)


def test_options_take_the_functions_defaults_and_docstrings():
    import inspect

    for name, command in cli.COMMANDS.items():
        func = inspect.unwrap(command.load())
        params = inspect.signature(func).parameters
        sub = _subparsers()[name]
        by_dest = {a.dest: a for a in sub._actions}
        for param in command.params:
            action = by_dest[param]
            assert action.default == params[param].default, (name, param)
            assert action.help, (name, param)  # every exposed parameter is documented
    # the help is the numpydoc entry, in the command line's words
    help_of = {a.dest: a.help for a in _subparsers()["train"]._actions}
    assert help_of["time_budget"].startswith("Limit of training in seconds")
    assert "`--checkpoint-dir`" in help_of["resume"] and "checkpoint_dir" not in help_of["resume"]
    # the old `--key` of train, super-resolve and upsample is the prepared key, under its new name too
    args = cli.build_parser(["train"]).parse_args(["train", "s.zarr", "--key", "k"])
    assert args.prepared_key == "k"
    args = cli.build_parser(["upsample"]).parse_args(["upsample", "s.zarr", "--prepared-key", "k", "--no-consistency"])
    assert args.prepared_key == "k" and args.consistency is False


def test_image_features_writes_the_features_of_the_prepared_tiles(prepared_store, tmp_path, capsys):
    path = tmp_path / "slide.zarr"
    shutil.copytree(prepared_store, path)
    assert cli.main(["--quiet", "image-features", str(path), "--encoder", "stain", "--n-components", "4"]) == 0
    assert "wrote images['diffst_features']" in capsys.readouterr().out
    import spatialdata as sd

    sdata = sd.read_zarr(path)
    assert sdata.attrs["diffst"]["image_features"]["n_components"] == 4
    assert sdata["diffst_features"].shape[0] == 4


@pytest.mark.slow
def test_evaluate_spots_prints_and_writes_the_held_out_spots(tmp_path, capsys):
    path = tmp_path / "visium.zarr"
    toy_visium(n_side=18, seed=2).write(path)
    assert cli.main(["--quiet", "prepare", str(path), "--genes", "3", "--lr-um", "100", "--scale", "4"]) == 0
    assert cli.main(["--quiet", "train", str(path), "--preset", "tiny", "--max-epochs", "2", "--val-steps", "2"]) == 0
    out = tmp_path / "spots.csv"
    assert cli.main(["--quiet", "evaluate-spots", str(path), "--output", str(out)]) == 0
    text = capsys.readouterr().out
    assert "held-out spots of the test tiles" in text and out.exists()
    import pandas as pd

    df = pd.read_csv(out, header=[0, 1], index_col=0)
    assert "mean" in df.index and ("diffst", "pcc") in df.columns


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_help_speaks_command_line_not_python(command, capsys):
    assert cli.main([command, "--help"]) == 0
    text = capsys.readouterr().out
    import re

    assert "``" not in text and ":func:" not in text and ":doc:" not in text and ":class:" not in text
    assert not re.search(r"`(True|False|None)`|\(default: None\)", text), re.findall(r".*(?:True|False|None).*", text)
    # no Python-quoted values in backticks (`"auto"`), and JSON examples are JSON
    assert not re.search(r"`[\"'][^`]*[\"']`", text)
    assert "False}" not in text and "True}" not in text


@pytest.mark.slow
def test_the_examples_of_the_help_run(tmp_path, monkeypatch, capsys):
    """Every `diffst …` line of the top-level help runs, in order, on a synthetic slide (training shortened); the
    Python lines (from a platform's folder to a store) are valid Python naming real spatialdata-io readers."""
    import shlex

    import diffst as dst

    lines = [line.strip() for line in cli.DESCRIPTION.splitlines()]
    commands = [shlex.split(line)[1:] for line in lines if line.startswith("diffst ")]
    assert [c[0] for c in commands] == ["prepare", "train", "super-resolve", "evaluate"]
    python = [line.split(":", 1)[1].strip() for line in lines if "spatialdata_io." in line]
    assert len(python) == 5
    for code in python:
        compile(code, "<help>", "eval")
        reader = code.split("spatialdata_io.")[1].split("(")[0]
        assert callable(getattr(spatialdata_io_module(), reader))
    monkeypatch.chdir(tmp_path)
    slide = dst.datasets.synthetic_xenium(size_um=1200.0, seed=0, boundaries=False)
    del slide.images["morphology_focus"]  # one image (with several, `--image-key` says which)
    slide.write("slide.zarr")
    from diffst.tl import _train

    monkeypatch.setitem(_train.DEFAULT_STEPS, "default", 1)  # a few steps (an epoch is at least one)
    for args in commands:
        assert cli.main(["--quiet", *args]) == 0, args
    assert (tmp_path / "metrics.csv").exists()


def spatialdata_io_module():
    return pytest.importorskip("spatialdata_io")
