from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import spatialdata as sd
import torch

import diffst as dst
from diffst.tl._data import Prepared, TileDataset

from .models import untrained
from .toy import FAST, toy_prepared, toy_visium, toy_xenium

_prepared = toy_prepared


def _weights(model: dst.DiffST) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.net.parameters()])


def test_tile_dataset_gives_model_inputs_in_model_units(prepared):
    prep = Prepared.from_sdata(prepared, "diffst")
    ds = TileDataset(prepared, prep, "train", image_um=5.0, gene_scale=prep.hr_scale)
    item = ds[0]
    assert item["x0"].shape == (5, 16, 16)
    assert item["lr"].shape == (5, 4, 4)
    assert item["mask"].shape == (1, 4, 4)
    assert item["image"].shape == (1, 32, 32)
    # zero counts are -1; LR of a sum-pooled pixel is the mean HR count per pixel, in the same units
    r0, c0 = ds.origins[0]
    hr = prepared["diffst_hr"].values[:, r0 * 4 : r0 * 4 + 16, c0 * 4 : c0 * 4 + 16]
    assert torch.equal(item["x0"] == -1, torch.from_numpy(hr == 0))
    mean_hr = hr.reshape(5, 4, 4, 4, 4).mean(axis=(2, 4))
    expected = 2 * np.log1p(mean_hr) / prep.hr_scale[:, None, None] - 1
    assert np.allclose(item["lr"].numpy(), expected, atol=1e-5)
    assert float(item["image"].max()) <= 1.0 and float(item["image"].min()) >= 0.0


@pytest.mark.slow
def test_same_seed_same_weights_different_seed_different(prepared, tmp_path):
    a = dst.tl.train(prepared, max_epochs=1, seed=1, checkpoint_dir=tmp_path / "a", **FAST)
    b = dst.tl.train(prepared, max_epochs=1, seed=1, checkpoint_dir=tmp_path / "b", **FAST)
    c = dst.tl.train(prepared, max_epochs=1, seed=2, checkpoint_dir=tmp_path / "c", **FAST)
    assert a.info["steps"] > 0
    assert torch.equal(_weights(a), _weights(b))
    assert not torch.allclose(_weights(a), _weights(c))


@pytest.mark.slow
def test_training_loss_falls(tmp_path):
    sdata = _prepared(seed=5)
    # around the bicubic base the untrained loss is large, so the optimiser's progress is plain to see
    model = dst.tl.train(
        sdata, max_epochs=6, checkpoint_dir=tmp_path, patience=100, config={"learning_rate": 3e-3, "base": "bicubic"},
        **FAST,
    )  # fmt: skip
    losses = [row["train_loss"] for row in model.history]
    assert len(losses) == 6
    assert min(losses[-2:]) < 0.8 * losses[0]
    assert {"val_loss", "val_pcc", "val_pcc_bicubic"} <= set(model.history[-1])


@pytest.mark.slow
def test_save_load_round_trip_gives_identical_samples(prepared, tmp_path):
    model = dst.tl.train(prepared, max_epochs=1, checkpoint_dir=tmp_path, **FAST)
    # train recorded and saved the model
    assert Path(prepared.attrs["diffst"]["model"]["path"]) == model.path
    loaded = dst.DiffST.load(model.path)
    assert loaded.genes == model.genes
    assert loaded.units == model.units
    assert loaded.config == model.config
    assert np.array_equal(loaded.gene_scale, model.gene_scale)
    prep = Prepared.from_sdata(prepared, "diffst")
    batch = TileDataset(prepared, prep, "test", image_um=5.0, gene_scale=prep.hr_scale)[0]
    args = (batch["lr"][None], batch["mask"][None], batch["image"][None])
    s1 = model.diffusion.sample(model.net, *args, steps=3, generator=torch.Generator().manual_seed(0))
    s2 = loaded.diffusion.sample(loaded.net, *args, steps=3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(s1, s2)


@pytest.mark.slow
def test_resume_continues_an_interrupted_run(prepared, tmp_path):
    first = dst.tl.train(prepared, max_epochs=1, checkpoint_dir=tmp_path, **FAST)
    steps_one_epoch = first.info["steps"]
    second = dst.tl.train(prepared, max_epochs=2, checkpoint_dir=tmp_path, resume=True, **FAST)
    assert second.info["steps"] == 2 * steps_one_epoch
    assert [row["epoch"] for row in second.history] == [0, 1]
    with pytest.raises(ValueError, match="earlier training run.*resume=True"):
        dst.tl.train(prepared, max_epochs=1, checkpoint_dir=tmp_path, resume=False, **FAST)
    with pytest.raises(ValueError, match="different configuration"):
        dst.tl.train(prepared, max_epochs=3, checkpoint_dir=tmp_path, config={"cam": False}, resume=True, **FAST)


def test_model_refuses_data_with_other_genes_or_units(prepared):
    model = untrained(Prepared.from_sdata(prepared, "diffst"))  # the data contract, not the weights, is under test
    other = toy_xenium(size_um=800, n=60_000)
    dst.pp.prepare(other, genes=["G1", "G2", "G3", "G4", "G6"], lr_um=40, scale=4, tile_um=160, key_added="g")
    dst.pp.prepare(other, genes=model.genes, lr_um=50, scale=5, tile_um=200, key_added="u")
    with pytest.raises(ValueError, match="lack the model's genes"):
        model.check_compatible(Prepared.from_sdata(other, "g"))
    with pytest.raises(ValueError, match=r"50 → 10 µm.*40 → 10 µm"):
        model.check_compatible(Prepared.from_sdata(other, "u"))
    with pytest.raises(ValueError, match="does not know genes"):
        model.check_compatible(Prepared.from_sdata(prepared, "diffst"), genes=["NOPE"])


def test_train_on_a_small_spot_slide_says_what_it_needs():
    # Spots-only data train from the spots themselves (issue 12); the toy slide has too few of them, and HR
    # supervision has nothing to learn from.
    sdata = toy_visium()
    dst.pp.prepare(sdata, genes=3, tile_um=200)
    with pytest.raises(ValueError, match=r"Only 84 measured LR pixels.*at least 100"):
        dst.tl.train(sdata, **FAST)
    with pytest.raises(ValueError, match="no HR truth"):
        dst.tl.train(sdata, supervision="hr", **FAST)


def test_train_without_prepare_says_what_to_do():
    with pytest.raises(KeyError, match=r"Run `dst.pp.prepare"):
        dst.tl.train(toy_xenium(), **FAST)


@pytest.mark.slow
def test_zarr_backed_model_lives_beside_the_store(tmp_path):
    sdata = _prepared()
    sdata.write(tmp_path / "s.zarr")
    backed = sd.read_zarr(tmp_path / "s.zarr")
    model = dst.tl.train(backed, max_epochs=1, **FAST)
    # <store>.diffst/<key>-<data fingerprint>-<config hash>/run-<time>/model.pt
    assert model.path.parent.parent.parent == tmp_path / "s.zarr.diffst"
    assert model.path.parent.name.startswith("run-")
    assert sd.read_zarr(tmp_path / "s.zarr").attrs["diffst"]["model"]["path"] == str(model.path)


@pytest.mark.slow
def test_ddp_on_two_cpu_processes(tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import sys
            sys.path.insert(0, {str(Path(__file__).parents[1])!r})
            import diffst as dst
            from tests.toy import toy_prepared as _prepared

            if __name__ == "__main__":
                sdata = _prepared()
                dst.tl.train(sdata, preset="tiny", max_epochs=1, device="cpu", devices=2, strategy="ddp",
                             checkpoint_dir={str(tmp_path / "run")!r}, enable_progress_bar=False, val_steps=2)
            """
        )
    )
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    model = dst.DiffST.load(tmp_path / "run" / "model.pt")
    assert model.info["steps"] > 0
    # an epoch is about one pass over the training area; each of the 2 processes saw half of its windows
    n_train = int(_prepared().attrs["diffst"]["split"]["train"])  # tiles of 4 × 4 LR pixels = one window each
    assert model.info["window_lr"] == 4
    assert model.info["steps"] == math.ceil(math.ceil(n_train / 2) / model.config.batch_size)
