"""Learning from more than the HR of the training tiles: the panel context (the LR of genes measured but not predicted)
and the self-supervised term learnt from the LR alone over every tile (``lr_weight``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import diffst as dst
from diffst.model import DiffSTConfig, DiffSTNet, Diffusion, weak
from diffst.tl._data import Prepared, TileSource

from . import toy
from .toy import toy_visium, toy_xenium

pytestmark = pytest.mark.usefixtures("quiet")

FAST = {**toy.FAST, "max_epochs": 2}


def _prepared(**kw):
    sdata = toy_xenium(size_um=320, n=9000, seed=1)
    dst.pp.prepare(sdata, **{"genes": 3, "lr_um": 40.0, "scale": 4, "tile_um": 160.0, **kw})
    return sdata


def test_prepare_records_the_panel_context_beside_the_genes():
    sdata = _prepared(context_genes=3)
    prep = Prepared.from_sdata(sdata, "diffst")
    assert len(prep.context_genes) == 3 and not set(prep.context_genes) & set(prep.genes)
    ranked = list(_prepared(genes=6).attrs["diffst"]["genes"])
    assert prep.genes + prep.context_genes == ranked  # the next ones by the same criterion
    lr = np.asarray(sdata["diffst_context"].values)
    assert (
        lr.shape == (3, *prep.grid.lr_shape) and list(sdata["diffst_context"].coords["c"].values) == prep.context_genes
    )
    assert prep.context_scale.shape == (3,) and np.all(prep.context_scale > 0)
    named = Prepared.from_sdata(_prepared(context_genes=["G1"]), "diffst")
    assert named.context_genes == ["G1"] or "G1" in named.genes
    assert Prepared.from_sdata(_prepared(), "diffst").context_genes == []
    with pytest.raises(ValueError, match="share"):
        _prepared(genes=["G1", "G2"], context_genes=["G2"])
    item = TileSource.from_sdata(sdata, prep).read(0, 0, 4, 5.0, prep.hr_scale)
    assert item["context"].shape == (3, 4, 4)


def test_the_network_reads_the_context_and_hidden_spots_hide_it():
    cfg = DiffSTConfig.preset("tiny", context_genes=2)
    torch.manual_seed(0)
    net = DiffSTNet(cfg).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape))
    diffusion = Diffusion(cfg, gene_scale=torch.full((cfg.n_genes,), 3.0))
    g = torch.Generator().manual_seed(1)
    h = cfg.lr_px
    lr = torch.rand(2, cfg.n_genes, h, h, generator=g) * 2 - 1
    mask = torch.ones(2, 1, h, h)
    image = torch.rand(2, cfg.image_channels, cfg.image_px, cfg.image_px, generator=g)
    context = torch.rand(2, 2, h, h, generator=g) * 2 - 1
    a = diffusion.predict_mean(net, lr, mask, image, context=context)
    b = diffusion.predict_mean(net, lr, mask, image, context=-context)
    assert (a - b).abs().max() > 1e-3  # the map depends on the context
    with pytest.raises(ValueError, match="context"):
        diffusion.predict_mean(net, lr, mask, image)  # a network that reads a context needs one
    flips = diffusion.predict_mean(net, lr, mask, image, context=context, average_flips=True)
    assert flips.shape == a.shape
    hidden = torch.zeros_like(mask, dtype=torch.bool)
    hidden[:, :, 0, 0] = True
    _, mask_in = weak.hidden_input(lr, mask, hidden)
    hid = weak.hide_context(context, mask_in)
    assert torch.all(hid[:, :, 0, 0] == -1) and torch.equal(hid[:, :, 1:], context[:, :, 1:])


@pytest.mark.slow
def test_a_model_with_a_panel_context_trains_applies_and_needs_the_context(tmp_path):
    sdata = _prepared(context_genes=3)
    model = dst.tl.train(sdata, checkpoint_dir=tmp_path, **FAST)
    assert model.config.context_genes == 3 and model.context_genes == Prepared.from_sdata(sdata, "diffst").context_genes
    assert model.net.st_encoder[0].in_channels == 3 + 1 + 3
    out = dst.tl.super_resolve(sdata, model=model, inplace=False, n_samples=2)
    assert np.isfinite(out["mean"].values).all() and float(out["std"].values.max()) > 0
    # a raw slide is prepared with the model's context; prepared data without it are refused with the fix
    raw = toy_xenium(size_um=320, n=9000, seed=2)
    assert dst.tl.super_resolve(raw, model=model, inplace=False)["mean"].shape[0] == 3
    assert raw.attrs == {}
    plain = _prepared()
    with pytest.raises(ValueError, match="context_genes=model.context_genes"):
        dst.tl.super_resolve(plain, model=model)


@pytest.mark.slow
def test_a_spots_only_model_reads_its_context_with_hidden_spots_hidden(tmp_path):
    sdata = toy_visium(n_side=18, seed=2)
    dst.pp.prepare(sdata, genes=3, lr_um=100.0, scale=4, context_genes=2)
    model = dst.tl.train(sdata, checkpoint_dir=tmp_path, **FAST)
    assert model.config.supervision == "lr" and model.config.context_genes == 2
    assert dst.tl.super_resolve(sdata, model=model, inplace=False, n_samples=2)["std"] is not None


@pytest.mark.slow
def test_lr_weight_adds_the_hide_and_predict_term_over_every_tile(tmp_path, monkeypatch):
    sdata = _prepared()
    from diffst.tl import _lightning

    drawn = []
    real = _lightning.DiffSTModule._lr_windows_loss

    def spy(self, n):
        drawn.append(len(self.lr_windows))
        return real(self, n)

    monkeypatch.setattr(_lightning.DiffSTModule, "_lr_windows_loss", spy)
    model = dst.tl.train(sdata, checkpoint_dir=tmp_path, config={"lr_weight": 0.5}, **FAST)
    assert model.config.lr_weight == 0.5 and drawn and model.info["steps"] == len(drawn)
    prep = Prepared.from_sdata(sdata, "diffst")
    window = model.info["window_lr"]
    tiles = len(prep.tiles(sdata))
    assert drawn[0] > len(prep.tiles(sdata, "train"))  # windows over every tile, not the training ones only
    assert drawn[0] >= tiles * (prep.tile_lr - window + 1) ** 2 // 4
    assert all(r.get("train_lr_loss", 1.0) >= 0 for r in model.history)
    assert any("train_lr_loss" in r for r in model.history)
    with pytest.raises(ValueError, match="lr_weight"):
        DiffSTConfig.preset("tiny", lr_weight=0.5, supervision="lr", objective="regression")
