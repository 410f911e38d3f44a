"""Always validated (a held-out band when there are no validation tiles), several sections in one model, the genes a
user asks for, the device, and Ctrl-C at any moment of ``train`` and ``super_resolve``."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest
import torch

import diffst as dst
from diffst import _device
from diffst._device import lightning_device, resolve_device, resolve_precision
from diffst._spatial import image_levels
from diffst.tl import _inference, _train
from diffst.tl._data import Prepared, holdout

from . import toy
from .toy import toy_xenium

pytestmark = pytest.mark.usefixtures("quiet")

FAST = {**toy.FAST, "max_epochs": 2}


def _prepared(size_um=320, seed=1, genes=3, tile_um=160.0, **kw):
    sdata = toy_xenium(size_um=size_um, n=int(size_um**2 / 12), seed=seed)
    dst.pp.prepare(sdata, genes=genes, lr_um=40.0, scale=4, tile_um=tile_um, **kw)
    return sdata


def _values(sdata, key):
    return np.asarray(image_levels(sdata[key])[0].values)


def _sigint(*args, **kwargs):
    """Ctrl-C arriving now (Python raises KeyboardInterrupt at the next instruction of the main thread)."""
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(5)  # never reached: the interrupt comes first
    raise AssertionError("SIGINT was not delivered")


# --------------------------------------------------------------------------------------------- always validated
def test_holdout_is_a_band_along_the_longer_side_with_a_fifth_of_the_pixels():
    region = np.zeros((12, 20), dtype=bool)
    region[1:11, 2:18] = True
    train, val = holdout(region)
    assert not (train & val).any() and np.array_equal(train | val, region)
    assert 0.15 <= val.sum() / region.sum() <= 0.25
    cols = np.nonzero(val.any(0))[0]
    assert val.any(0).sum() == len(cols) and cols.max() == 17 and not val[:, :14].any()  # the far columns
    tiny = np.zeros((3, 3), dtype=bool)
    tiny[1, 1:3] = True  # two pixels: one trains, one validates
    train, val = holdout(tiny)
    assert train.sum() == 1 and val.sum() == 1


def test_the_held_out_band_lies_on_tissue_when_the_tiles_reach_past_it():
    # two tiles side by side (4 × 8 LR px); tissue covers only the first five columns, as a small crop on a large grid
    region = np.zeros((8, 8), dtype=bool)
    region[:4] = True
    tissue = np.zeros((8, 8), dtype=bool)
    tissue[:5, :5] = True
    train, val = holdout(region)
    assert not (val & tissue).any()  # without the mask the band is the empty far columns: nothing to score
    train, val = holdout(region, tissue=tissue)
    assert not (train & val).any() and np.array_equal(train | val, region)
    on_tissue = (val & tissue).sum() / (region & tissue).sum()
    assert 0.15 <= on_tissue <= 0.3 and (train & tissue).sum() == 16
    assert val[:4, 4:].all()  # whole lines of the region, margin included: windows fit in the band
    assert not val[:, :4].any()


def test_train_refuses_validation_without_counts_before_any_work(monkeypatch):
    sdata = _prepared()
    prep = Prepared.from_sdata(sdata, "diffst")
    lr = sdata[prep.elements["lr"]]
    val = np.zeros(prep.grid.lr_shape, dtype=bool)
    t = prep.tile_lr
    for r0, c0 in zip(prep.tiles(sdata, "val")["lr_row0"], prep.tiles(sdata, "val")["lr_col0"], strict=True):
        val[int(r0) : int(r0) + t, int(c0) : int(c0) + t] = True
    assert val.any()
    counts = lr.values.copy()
    counts[:, val] = 0  # the validation tiles hold nothing
    lr.data = counts
    with pytest.raises(ValueError, match="No transcript or count lies in the validation tiles"):
        dst.tl.train(sdata, **FAST)


def test_prepare_does_not_report_a_missing_validation_tile_as_a_problem(log_lines, monkeypatch):
    monkeypatch.setattr(dst.settings, "verbosity", 1)
    _prepared(size_um=240, tile_um=240.0)  # 0.06 mm²: one tile, so no validation and no test tile
    assert not any("no val tile" in line for line in log_lines)
    assert any("holds out a spatially blocked band" in line for line in log_lines)


@pytest.mark.slow
def test_a_small_region_without_validation_tiles_is_validated_on_a_held_out_band(tmp_path):
    sdata = _prepared(size_um=240, tile_um=240.0)  # 0.06 mm², one tile
    prep = Prepared.from_sdata(sdata, "diffst")
    assert set(prep.tiles(sdata)["split"]) == {"train"}
    model = dst.tl.train(sdata, checkpoint_dir=tmp_path, **FAST)
    info = model.info
    assert info["validation"] == "held-out band of the training tiles"
    assert info["validated"] and info["best_val_pcc"] is not None  # model selection ran
    assert model.guard is not None and model.guard.pixels > 0  # so did the guard and the std calibration
    assert len(model.guard.std_scale) == 3
    section = info["sections"][0]
    assert 0 < section["val_mm2"] < 0.35 * section["train_mm2"]
    dst.tl.super_resolve(sdata, model=model, n_samples=2)
    assert sdata.attrs["diffst_sr"]["guard"]["alpha"]


@pytest.mark.slow
def test_a_model_never_validated_falls_back_to_the_image_floor_with_a_warning(tmp_path, log_lines):
    sdata = _prepared()
    model = dst.tl.train(sdata, checkpoint_dir=tmp_path, guard=False, **FAST)
    assert model.guard is None
    model.info["validated"] = False  # as a run that stopped before any validation and skipped the guard
    dst.tl.super_resolve(sdata, model=model, key_added="fallback", n_samples=2)
    assert any("never validated" in line for line in log_lines)
    dst.tl.upsample(sdata, method="image", key_added="floor")
    mean = _values(sdata, "fallback")
    floor = _values(sdata, "floor")
    np.testing.assert_allclose(mean, floor, rtol=1e-5, atol=1e-6)
    std = _values(sdata, "fallback_std")
    np.testing.assert_allclose(std, np.sqrt(floor), rtol=1e-5, atol=1e-6)  # Poisson counting noise alone
    # validated but trained without the guard: applied as trained, with a warning
    model.info["validated"] = True
    log_lines.clear()
    dst.tl.super_resolve(sdata, model=model, key_added="unguarded")
    assert any("guard=False" in line for line in log_lines)
    assert not np.allclose(_values(sdata, "unguarded"), floor)


# --------------------------------------------------------------------------------------------- several sections
@pytest.mark.slow
def test_one_model_learns_from_several_sections_each_with_its_own_normalisation(tmp_path):
    a = _prepared(seed=1)
    genes = list(Prepared.from_sdata(a, "diffst").genes)
    b = toy_xenium(size_um=400, n=30_000, seed=7)  # another depth: other scales
    dst.pp.prepare(b, genes=genes, lr_um=40.0, scale=4, tile_um=160.0)
    pa, pb = Prepared.from_sdata(a, "diffst"), Prepared.from_sdata(b, "diffst")
    assert not np.allclose(pa.hr_scale, pb.hr_scale)
    model = dst.tl.train([a, b], checkpoint_dir=tmp_path, **FAST)
    sections = model.info["sections"]
    assert len(sections) == 2
    np.testing.assert_allclose(model.gene_scale_for(pa), pa.hr_scale)
    np.testing.assert_allclose(model.gene_scale_for(pb), pb.hr_scale)
    assert model.guard.pixels > 0
    for sdata in (a, b):  # recorded in both, applied to both
        assert sdata.attrs["diffst"]["model"]["path"] == str(model.path)
        dst.tl.super_resolve(sdata)
        assert _values(sdata, "diffst_sr").shape[0] == 3
    # a new section: its scales estimated from its LR counts, by the training sections' HR/LR ratio
    c = toy_xenium(size_um=320, n=12_000, seed=9)
    dst.pp.prepare(c, genes=genes, lr_um=40.0, scale=4, tile_um=160.0)
    pc = Prepared.from_sdata(c, "diffst")
    ratio = np.exp(np.mean([np.log(np.asarray(s["gene_scale"]) / np.asarray(s["lr_scale"])) for s in sections], 0))
    np.testing.assert_allclose(model.gene_scale_for(pc), pc.lr_scale * ratio, rtol=1e-5)
    out = dst.tl.super_resolve(c, model=model, inplace=False)
    assert np.isfinite(out["mean"].values).all()


def test_sections_must_agree_before_any_work(monkeypatch):
    a = _prepared(seed=1)
    b = _prepared(seed=2, genes=4)
    monkeypatch.setattr(_train._Fit, "run", lambda *a, **k: pytest.fail("trained"))
    with pytest.raises(ValueError, match="Section 1 cannot be trained with section 0.*genes differ"):
        dst.tl.train([a, b], **FAST)
    with pytest.raises(ValueError, match="empty list"):
        dst.tl.train([], **FAST)


# --------------------------------------------------------------------------------------------- the genes asked for
def _quick_train(monkeypatch, calls):
    real = _train.train

    def quick(sdata, **kwargs):
        calls.append(kwargs)
        return real(sdata, **{**kwargs, **FAST})

    monkeypatch.setattr(_train, "train", quick)


@pytest.mark.slow
def test_super_resolve_on_raw_data_prepares_and_trains_on_the_genes_asked_for(monkeypatch):
    raw = toy_xenium(size_um=320, n=9000, seed=3)
    calls = []
    _quick_train(monkeypatch, calls)
    asked = ["G5", "G2"]  # not necessarily among the default selection's top genes
    out = dst.tl.super_resolve(raw, genes=asked, inplace=False)
    assert list(out["mean"].coords["c"].values) == asked
    assert len(calls) == 1
    raw2 = toy_xenium(size_um=320, n=9000, seed=3)
    dst.tl.super_resolve(raw2, genes=asked)
    assert raw2.attrs["diffst"]["genes"] == asked  # prepared with them (and nothing else)
    assert list(image_levels(raw2["diffst_sr"])[0].coords["c"].values) == asked


def test_genes_the_prepared_data_or_the_model_lack_are_refused_with_the_call_that_adds_them(monkeypatch):
    sdata = _prepared(genes=3)
    have = Prepared.from_sdata(sdata, "diffst").genes
    other = next(g for g in [f"G{i}" for i in range(8)] if g not in have)
    monkeypatch.setattr(_train, "train", lambda *a, **k: pytest.fail("trained before refusing"))
    with pytest.raises(ValueError, match=r"lack \['" + other + r"'\].*dst.tl.super_resolve\(sdata, genes="):
        dst.tl.super_resolve(sdata, genes=[have[0], other])
    from .models import untrained

    model = untrained(Prepared.from_sdata(sdata, "diffst"))
    with pytest.raises(ValueError, match="does not know 1 of the requested genes.*prepared_key='diffst_genes'"):
        dst.tl.super_resolve(sdata, model=model, genes=[other])
    assert "diffst_sr" not in sdata.images


# --------------------------------------------------------------------------------------------- the device
def test_the_device_is_resolved_and_checked_before_any_work():
    assert resolve_device("auto").type in ("cuda", "mps", "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto") != torch.device("cuda")
        with pytest.raises(ValueError, match="CUDA GPU, but PyTorch sees none"):
            resolve_device("cuda")
    with pytest.raises(ValueError, match="must be 'auto', 'cpu'"):
        resolve_device("tpu")
    assert lightning_device(torch.device("cuda", 1), 1) == {"accelerator": "gpu", "devices": [1]}
    assert lightning_device(torch.device("cuda", 0), 4) == {"accelerator": "gpu", "devices": 4}
    assert lightning_device(torch.device("cpu"), 2) == {"accelerator": "cpu", "devices": 2}
    sdata = _prepared()
    from .models import untrained

    model = untrained(Prepared.from_sdata(sdata, "diffst"))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            dst.tl.super_resolve(sdata, model=model, device="cuda")
        with pytest.raises(ValueError, match="CUDA"):
            dst.tl.train(sdata, device="cuda", **FAST)
    out = dst.tl.super_resolve(sdata, model=model, device="cpu", inplace=False)
    assert model.device == torch.device("cpu") and out["mean"].shape[0] == 3


def test_the_precision_is_resolved_per_device_and_checked_before_any_work(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_precision("float32", cpu) is None
    assert resolve_precision("bfloat16", cpu) is torch.bfloat16
    monkeypatch.setattr(_device, "native_bf16", lambda device: False)
    assert resolve_precision("auto", cpu) is None  # a laptop CPU without bfloat16 units: float32
    monkeypatch.setattr(_device, "native_bf16", lambda device: True)
    assert resolve_precision("auto", cpu) is torch.bfloat16
    with pytest.raises(ValueError, match="not supported on MPS"):
        resolve_precision("bfloat16", torch.device("mps"))
    monkeypatch.undo()

    def missing():  # a torch build without oneDNN's private check
        raise AttributeError("_is_mkldnn_bf16_supported")

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", missing, raising=False)
    assert _device.native_bf16(cpu) is False and resolve_precision("auto", cpu) is None
    with pytest.raises(ValueError, match="`precision` must be one of"):
        resolve_precision("fp8", cpu)
    sdata = _prepared()
    from .models import untrained

    model = untrained(Prepared.from_sdata(sdata, "diffst"))
    with pytest.raises(ValueError, match="`precision` must be one of"):
        dst.tl.super_resolve(sdata, model=model, precision="half")
    assert "diffst_sr" not in sdata.images


@pytest.mark.slow
def test_bfloat16_maps_stay_close_to_float32_and_are_recorded(tmp_path):
    sdata = _prepared()
    model = dst.tl.train(sdata, checkpoint_dir=tmp_path, **FAST)
    dst.tl.super_resolve(sdata, model=model, precision="float32", key_added="f32")
    dst.tl.super_resolve(sdata, model=model, precision="bfloat16", key_added="bf16")
    assert sdata.attrs["f32"]["precision"] == "float32" and sdata.attrs["bf16"]["precision"] == "bfloat16"
    a, b = _values(sdata, "f32"), _values(sdata, "bf16")
    assert not np.array_equal(a, b)  # the network did run in bfloat16
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.999
    assert np.abs(a - b).max() <= 0.05 * a.max()


def test_a_model_saved_from_another_device_loads_on_the_cpu(tmp_path, monkeypatch):
    """Weights are saved as CPU tensors, and loading maps whatever they hold to the CPU (``map_location``)."""
    sdata = _prepared()
    from .models import untrained

    model = untrained(Prepared.from_sdata(sdata, "diffst"))
    path = model.save(tmp_path / "model.pt")
    seen = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: seen.append(k.get("map_location")) or real(*a, **k))
    loaded = dst.DiffST.load(path)
    assert seen == ["cpu"] and loaded.device == torch.device("cpu")
    payload = real(path, weights_only=True)
    assert all(v.device.type == "cpu" for v in payload["state_dict"].values())


# --------------------------------------------------------------------------------------------- Ctrl-C anywhere
@pytest.mark.slow
def test_ctrl_c_in_the_guard_keeps_the_weights_and_the_next_call_goes_straight_to_the_guard(tmp_path, monkeypatch):
    sdata = _prepared()
    monkeypatch.setattr(_train, "fit_guard", _sigint)
    with pytest.raises(dst.Interrupted, match="while fitting the guard.*trained weights are saved in.*resume=True"):
        dst.tl.train(sdata, checkpoint_dir=tmp_path, **FAST)
    saved = dst.DiffST.load(tmp_path / "model.pt")
    assert saved.info["stage"] == "trained" and saved.guard is None
    monkeypatch.undo()
    monkeypatch.setattr(_train._Fit, "run", lambda *a, **k: pytest.fail("trained again"))
    model = dst.tl.train(sdata, checkpoint_dir=tmp_path, resume=True, **FAST)
    assert model.guard is not None and model.info["stage"] == "complete"
    assert dst.DiffST.load(tmp_path / "model.pt").guard == model.guard
    assert sdata.attrs["diffst"]["model"]["path"] == str(tmp_path / "model.pt")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("where", "doing"),
    [
        ("_fit_base", "preparing the training data"),
        ("validation", "finishing the training"),
        ("_record", "saving the model"),
    ],
)
def test_ctrl_c_in_each_phase_of_train_ends_with_one_message(where, doing, tmp_path, monkeypatch):
    sdata = _prepared()
    if where == "validation":
        from diffst.tl._lightning import DiffSTModule

        real = DiffSTModule.validation_step

        sent = []

        def validation_step(self, *args, **kwargs):  # one Ctrl-C while validating; training's handler takes it
            if not sent:
                sent.append(os.kill(os.getpid(), signal.SIGINT))
            return real(self, *args, **kwargs)

        monkeypatch.setattr(DiffSTModule, "validation_step", validation_step)
    else:
        monkeypatch.setattr(_train, where, _sigint)
    before = dict(sdata.attrs["diffst"])
    with pytest.raises(dst.Interrupted) as e:
        dst.tl.train(sdata, checkpoint_dir=tmp_path, **FAST)
    assert str(e.value).startswith(f"interrupted while {doing}")
    assert "resume" in str(e.value) or "again" in str(e.value)
    if where == "_fit_base":
        assert "nothing was saved" in str(e.value) and not (tmp_path / "model.pt").exists()
        assert dict(sdata.attrs["diffst"]) == before
    if where == "validation":
        assert (tmp_path / "checkpoints" / "last.ckpt").exists()


def test_ctrl_c_while_super_resolving_writes_nothing(monkeypatch, tmp_path):
    sdata = _prepared()
    path = tmp_path / "s.zarr"
    sdata.write(path)
    import spatialdata as sd

    sdata = sd.read_zarr(path)
    from .models import untrained

    model = untrained(Prepared.from_sdata(sdata, "diffst"))
    monkeypatch.setattr(_inference.InferencePipeline, "block", _sigint)
    with pytest.raises(dst.Interrupted, match="while super-resolving: nothing was written"):
        dst.tl.super_resolve(sdata, model=model)
    assert "diffst_sr" not in sdata.images and "diffst_sr" not in sdata.attrs
    assert "diffst_sr" not in sd.read_zarr(path).images
    assert not list(tmp_path.glob(".diffst-tmp-*"))  # the scratch store is gone too


def test_the_guard_runs_on_at_most_its_area_of_validation_tiles(monkeypatch):
    from diffst.tl import _guard

    sdata = _prepared(size_um=480, tile_um=80.0)
    prep = Prepared.from_sdata(sdata, "diffst")
    where = _guard.Validation(sdata, prep)
    n_val = len(prep.tiles(sdata, "val"))
    tile = prep.tile_lr

    def area(blocks):
        return sum((r1 - r0) * (c1 - c0) for r0, c0, r1, c1 in blocks)

    assert area(where.blocks(2)) == n_val * tile**2  # within the cap: every validation tile
    monkeypatch.setattr(_guard, "MAX_GUARD_MM2", 3.5 * (prep.record.tile_um / 1000) ** 2)
    assert n_val > 3 and area(where.blocks(2)) == 3 * tile**2  # beyond it: an evenly spread subset
