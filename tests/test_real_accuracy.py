"""Issue 10: the image floor, random training windows, the refiner objective, the guard and the std map."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage.color import rgb2hed

import diffst as dst
from diffst._spatial import image_levels
from diffst.model import DiffSTConfig, DiffSTNet, Diffusion
from diffst.model.diffusion import dihedral, undihedral
from diffst.model.floor import (
    default_exponents,
    density_weights,
    fit_stain_exponents,
    floor_model_units,
    image_floor,
    nuclear_channel,
    nuclear_signal,
    stain_candidates,
    stain_signals,
)
from diffst.model.upsample import upsample_lr
from diffst.tl._data import Prepared, TileSource, WindowDataset, choose_window, tiled_origins, window_origins
from diffst.tl._guard import coverage_scale, predictive_std, tile_blocks, validation_maps
from diffst.tl._inference import DEFAULT_BLOCK_LR, InferencePipeline
from diffst.tl._model import Guard

from .models import untrained
from .toy import FAST, toy_xenium


# ---------------------------------------------------------------------------------------------------- the floor
def test_haematoxylin_matches_skimage_rgb2hed():
    rng = np.random.default_rng(0)
    img = rng.uniform(0, 1, (3, 9, 7)).astype(np.float32)
    ours = nuclear_signal(torch.from_numpy(img)[None], "rgb")[0, 0].numpy()
    assert np.allclose(ours, rgb2hed(img.transpose(1, 2, 0))[..., 0], atol=1e-6)


def test_nuclear_channel_is_found_by_name():
    assert nuclear_channel(["PolyT", "DAPI"]) == 1
    assert nuclear_channel(["Hoechst 33342", "CD45"]) == 0
    assert nuclear_channel(["a", "b"]) == 0


def test_floor_keeps_every_lr_pixel_and_follows_the_nuclei():
    s = 4
    base = torch.ones(1, 2, 8, 8)
    lr_total = torch.tensor([[[[16.0, 8.0], [0.0, 4.0]], [[1.0, 2.0], [3.0, 4.0]]]])
    signal = torch.zeros(1, 1, 8, 8)
    signal[..., 1, 1] = 1.0  # one bright nucleus in the top-left LR pixel
    signal[..., 4:, 4:] = 0.25  # a flat bottom-right LR pixel
    out = image_floor(base, lr_total, torch.ones(1, 1, 2, 2), signal, s)
    sums = out.reshape(1, 2, 2, s, 2, s).sum(dim=(3, 5))
    assert torch.allclose(sums, lr_total, atol=1e-5)
    # the top-left LR pixel's counts all go to the nucleus; empty signal spreads evenly
    assert float(out[0, 0, 1, 1]) == pytest.approx(16.0)
    assert torch.allclose(out[0, 0, :4, 4:], torch.full((4, 4), 0.5))
    assert torch.allclose(out[0, 0, 4:, 4:], torch.full((4, 4), 0.25))
    assert torch.allclose(density_weights(torch.zeros(1, 1, 4, 4), 2), torch.ones(1, 1, 4, 4))


def test_image_floor_baseline_is_lr_consistent_and_beats_bicubic(prepared):
    dst.tl.upsample(prepared, method="image", overwrite=True)
    dst.tl.upsample(prepared, method="bicubic", consistency=True, key_added="bic_c", overwrite=True)
    floor = dst.tl.evaluate(prepared, key="image_floor_sr").loc["mean"]
    bic = dst.tl.evaluate(prepared, key="bic_c").loc["mean"]
    assert float(floor["lr_consistency"]) < 1e-5
    assert float(bic["lr_consistency"]) < 1e-5
    assert prepared.attrs["image_floor_sr"]["method"] == "image_floor"
    # the toy's transcripts sit on its bright nuclei: the floor must find them
    assert float(floor["pcc"]) > float(bic["pcc"]) + 0.1
    with pytest.raises(ValueError, match="LR-consistent by construction"):
        dst.tl.upsample(prepared, method="image", consistency=False, key_added="x")


def test_the_floors_exponents_give_the_floor_and_an_rgb_image_has_two_stains():
    rng = np.random.default_rng(1)
    signal = torch.from_numpy(rng.uniform(0, 1, (2, 1, 8, 8)).astype(np.float32))
    signal[0, 0, :4, :4] = 0.0  # an unstained LR pixel: flat in both
    stains = torch.cat([signal, torch.from_numpy(rng.uniform(0, 1, (2, 1, 8, 8)).astype(np.float32))], 1)
    ex = default_exponents(3, 2, "fluorescence", channel=0)
    fitted = density_weights(stains, 4, ex)
    assert fitted.shape == (2, 3, 8, 8)
    assert torch.allclose(fitted, density_weights(signal, 4).expand(-1, 3, -1, -1), atol=1e-5)
    assert default_exponents(1, 2, "fluorescence", channel=1).tolist() == [[0.0, 0.5]]
    rgb = torch.rand(1, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    assert stain_signals(rgb, "rgb").shape == (1, 2, 5, 5)
    assert torch.allclose(stain_signals(rgb, "rgb")[:, :1], nuclear_signal(rgb, "rgb"), atol=1e-6)
    cands = stain_candidates(3)
    assert ((cands > 0).sum(1) <= 2).all() and len(cands) == len({tuple(c) for c in cands.tolist()})
    assert len(cands) == 1 + 3 * 3 + 3 * 9  # nothing, one stain, two stains
    many = stain_candidates(20, nuclear=5)
    pairs = many[(many > 0).sum(1) == 2]
    assert len(many) == 1 + 20 * 3 + 19 * 9 and bool((pairs[:, 5] > 0).all())


def _stain_windows(follows: int, seed: int = 0):
    """Windows whose gene 0 follows stain ``follows`` of two (gene 1 is flat noise): truth, LR, mask, image."""
    s, per_hr, b, h = 4, 2, 8, 4
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(b, 2, h * s * per_hr, h * s * per_hr, generator=g) ** 3
    stain = F.avg_pool2d(image[:, follows : follows + 1], per_hr)
    counts = torch.cat([8 * stain, torch.rand(b, 1, h * s, h * s, generator=g)], 1)
    gene_scale = torch.full((2,), 3.0)
    x0 = 2 * torch.log1p(counts) / gene_scale.view(1, -1, 1, 1) - 1
    lr_counts = F.avg_pool2d(counts, s)  # counts per HR pixel of each LR pixel, as the model units hold them
    lr = 2 * torch.log1p(lr_counts) / gene_scale.view(1, -1, 1, 1) - 1
    return x0, lr, torch.ones(b, 1, h, h), image, {"scale": s, "per_hr": per_hr, "gene_scale": gene_scale}


def test_fitted_floor_finds_the_stain_a_gene_follows_and_keeps_the_floor_otherwise():
    x0, lr, mask, image, kw = _stain_windows(follows=1)
    ex, pcc = fit_stain_exponents(x0, lr, mask, image, kind="fluorescence", n_stains=2, channel=0, **kw)
    assert ex.shape == (2, 2)
    assert float(ex[0, 1]) > 0 and float(ex[0, 0]) == 0.0  # gene 0 follows the second stain only
    assert float(pcc["fitted"][0]) > float(pcc["floor"][0]) + 0.1
    assert ex[1].tolist() == [0.5, 0.0] or float(pcc["fitted"][1]) > float(pcc["floor"][1]) + 0.005
    # a gene that follows the nuclear stain keeps the floor: nothing beats it by the margin
    x0, lr, mask, image, kw = _stain_windows(follows=0)
    ex, pcc = fit_stain_exponents(x0, lr, mask, image, kind="fluorescence", n_stains=2, channel=0, **kw)
    assert float(ex[0, 1]) == 0.0
    # the fitted exponents are what the model's base then uses
    cfg = DiffSTConfig.preset("tiny", n_genes=2, image_channels=2, image_kind="fluorescence", scale=4,
                              stain_exponents=ex.tolist())  # fmt: skip
    diffusion = Diffusion(cfg, gene_scale=kw["gene_scale"])
    assert torch.equal(diffusion.stain_exponents, ex)
    floor_cfg = DiffSTConfig.preset("tiny", base="floor", n_genes=2, stain_exponents=ex.tolist())
    assert Diffusion(floor_cfg, gene_scale=kw["gene_scale"]).stain_exponents is None
    with pytest.raises(ValueError, match="one row per gene"):
        DiffSTConfig.preset("tiny", n_genes=3, stain_exponents=ex.tolist())


# ---------------------------------------------------------------------------------------------------- windows
def test_windows_inside_a_region_at_every_offset():
    region = np.zeros((10, 10), dtype=bool)
    region[2:7, 3:6] = True  # 5 × 3 LR pixels
    assert len(window_origins(region, 2)) == 4 * 2
    assert {tuple(o) for o in window_origins(region, 3)} == {(2, 3), (3, 3), (4, 3)}
    assert len(window_origins(region, 4)) == 0
    # the largest window with enough positions; a one-tile region still gives several windows
    assert choose_window(region, 3, min_positions=3) == 3
    assert choose_window(region, 3, min_positions=8) == 2
    tile = np.zeros((8, 8), dtype=bool)
    tile[:4, :4] = True
    assert choose_window(tile, 4) == 1  # 16 positions of 1 × 1; 9 of 2 × 2 is fewer than MIN_POSITIONS


def test_tiled_origins_cover_each_tile():
    import pandas as pd

    tiles = pd.DataFrame({"lr_row0": [0, 8], "lr_col0": [4, 0]})
    o = tiled_origins(tiles, 5, 2)
    # starts 0, 2 and the flush one at 3 per axis: 9 windows per tile
    assert len(o) == 18
    assert {tuple(x) for x in o[:9]} == {(r, 4 + c) for r in (0, 2, 3) for c in (0, 2, 3)}


def test_window_dataset_cuts_the_same_inputs_as_a_direct_read(prepared):
    prep = Prepared.from_sdata(prepared, "diffst")
    source = TileSource.from_sdata(prepared, prep)
    origins = np.array([[3, 5], [6, 2], [4, 4]])
    ds = WindowDataset(source, origins, 2, image_um=5.0, gene_scale=prep.hr_scale)
    for i, (r, c) in enumerate(origins):
        direct = source.read(int(r), int(c), 2, 5.0, prep.hr_scale)
        item = ds[i]
        for k in ("lr", "mask", "x0"):
            assert np.allclose(item[k].numpy(), direct[k], atol=1e-6), k
        # the image crop is resampled from one larger read: equal up to interpolation at crop borders
        assert np.abs(item["image"].numpy() - direct["image"]).mean() < 0.02


# ---------------------------------------------------------------------------------------------------- refiner
def _inputs(cfg, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = cfg.lr_px
    lr = torch.rand(b, cfg.n_genes, h, h, generator=g) * 2 - 1
    mask = torch.ones(b, 1, h, h)
    image = torch.rand(b, cfg.image_channels, cfg.hr_px * cfg.image_per_hr, cfg.hr_px * cfg.image_per_hr, generator=g)
    x0 = torch.rand(b, cfg.n_genes, cfg.hr_px, cfg.hr_px, generator=g) * 2 - 1
    return x0, lr, mask, image


def test_refiner_trains_a_mean_head_and_samples_around_it():
    cfg = DiffSTConfig.preset("tiny")
    assert cfg.objective == "refiner" and cfg.base == "fitted"
    torch.manual_seed(0)
    net = DiffSTNet(cfg)
    diffusion = Diffusion(cfg, gene_scale=torch.full((cfg.n_genes,), 3.0))
    x0, lr, mask, image = _inputs(cfg)
    losses = diffusion.training_losses(net, x0, lr, mask, image, generator=torch.Generator().manual_seed(1))
    assert set(losses) >= {"loss", "mse", "mean_mse", "dis"}
    assert float(losses["loss"]) >= float(losses["mean_mse"]) + float(losses["mse"]) - 1e-6
    # the untrained (zero-initialised output) mean head is the image floor; samples equal it too
    mean = diffusion.predict_mean(net, lr, mask, image)
    floor = floor_model_units(lr, mask, image, scale=cfg.scale, per_hr=cfg.image_per_hr,
                              gene_scale=torch.full((cfg.n_genes,), 3.0), kind="rgb")  # fmt: skip
    assert torch.allclose(mean, floor.clamp(*cfg.x0_range), atol=1e-5)
    assert not torch.allclose(floor, upsample_lr(lr, mask, cfg.scale), atol=1e-2)
    sample = diffusion.sample(net, lr, mask, image, steps=3, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(sample, mean, atol=1e-5)
    # the paper's objective has no mean head
    assert Diffusion(DiffSTConfig.preset("tiny", objective="diffusion")).predict_mean(net, lr, mask, image) is None
    with pytest.raises(ValueError, match="gene_scale"):
        Diffusion(cfg).predict_mean(net, lr, mask, image)


def _perturbed(net: DiffSTNet, seed: int = 0) -> DiffSTNet:
    """The network with every weight moved at random, so that its output depends on how the window is turned."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return net


def test_mean_head_averaged_over_flips_is_equivariant_and_is_the_mean_of_the_8_turned_maps():
    cfg = DiffSTConfig.preset("tiny")
    torch.manual_seed(0)
    net = _perturbed(DiffSTNet(cfg).eval())
    diffusion = Diffusion(cfg, gene_scale=torch.full((cfg.n_genes,), 3.0))
    _, lr, mask, image = _inputs(cfg)
    turn = {k: [dihedral(x, k) for x in (lr, mask, image)] for k in range(8)}
    plain = diffusion.predict_mean(net, lr, mask, image)
    avg = diffusion.predict_mean(net, lr, mask, image, average_flips=True)
    by_hand = torch.stack([undihedral(diffusion.predict_mean(net, *turn[k]), k) for k in range(8)]).mean(0)
    assert torch.allclose(avg, by_hand, atol=1e-5)
    # the turned copies go through the network together or in smaller calls: the same average
    for max_batch in (1, 4, 5):
        assert torch.allclose(diffusion.predict_mean(net, lr, mask, image, average_flips=True, max_batch=max_batch),
                              avg, atol=1e-5)  # fmt: skip
    assert (avg - plain).abs().max() > 1e-3  # the plain head depends on the orientation ...
    for k in range(1, 8):
        assert (diffusion.predict_mean(net, *turn[k]) - dihedral(plain, k)).abs().max() > 1e-3
        # ... the average does not: turning the window turns its map
        assert torch.allclose(diffusion.predict_mean(net, *turn[k], average_flips=True), dihedral(avg, k), atol=1e-5)
    assert torch.allclose(undihedral(dihedral(image, 5), 5), image)
    # the paper's objective has no mean head to average
    paper = Diffusion(DiffSTConfig.preset("tiny", objective="diffusion"))
    assert paper.predict_mean(net, lr, mask, image, average_flips=True) is None
    # the refiner's samples scatter around the head they are given (the averaged one in super_resolve), by default
    # around the plain head; the same noise gives the same residual around either
    noise = torch.randn(plain.shape, generator=torch.Generator().manual_seed(3))
    around_plain = diffusion.sample(net, lr, mask, image, steps=3, noise=noise)
    assert torch.allclose(diffusion.sample(net, lr, mask, image, steps=3, noise=noise, mean=plain), around_plain)
    around_avg = diffusion.sample(net, lr, mask, image, steps=3, noise=noise, mean=avg)
    assert (around_avg - around_plain).abs().max() > 1e-3
    # the residual is drawn from the same noise, so nearly the same (clipping to x0_range differs with the base)
    residuals = torch.stack([(around_avg - avg).ravel(), (around_plain - plain).ravel()])
    assert torch.corrcoef(residuals)[0, 1] > 0.9
    assert (around_avg - avg).abs().mean() < 0.8 * (around_plain - avg).abs().mean()
    with pytest.raises(ValueError, match="mean has shape"):
        diffusion.sample(net, lr, mask, image, steps=3, noise=noise, mean=avg[:1])


@pytest.mark.parametrize("kind", ["rgb", "fluorescence"])
def test_the_base_turns_with_the_window(kind):
    """``predict_mean(average_flips=True)`` computes the base once and turns it: the base must be flip-equivariant,
    with unobserved LR pixels (filled from their neighbours) and per-gene stain exponents too."""
    channels = 3 if kind == "rgb" else 2
    cfg = DiffSTConfig.preset("tiny", image_kind=kind, image_channels=channels,
                              stain_exponents=[[0.5, 0.25]] * 2 + [[0.0, 1.0]] * 3)  # fmt: skip
    diffusion = Diffusion(cfg, gene_scale=torch.linspace(2.0, 4.0, cfg.n_genes))
    _, lr, mask, image = _inputs(cfg, seed=4)
    mask[0, 0, 1, 2] = mask[1, 0, 0, 0] = mask[1, 0, 3, 1] = 0.0
    base = diffusion.condition(lr, mask, image)
    for k in range(1, 8):
        turned = diffusion.condition(*(dihedral(x, k) for x in (lr, mask, image)))
        assert torch.allclose(turned, dihedral(base, k), atol=1e-5), k


def test_an_empty_x_t_has_one_graph_context_for_the_batch():
    """The mean head's ``x_t`` is all zeros: its CIGC-Graph context is computed once and shared by the batch."""
    cfg = DiffSTConfig.preset("tiny")
    torch.manual_seed(1)
    net = _perturbed(DiffSTNet(cfg).eval())
    zeros = torch.zeros(3, cfg.n_genes, cfg.hr_px, cfg.hr_px)
    calls = []
    net.graph.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    with torch.no_grad():
        shared = net._graph_context(zeros)
        full = net.graph(zeros)
    assert calls == [1, 3]
    assert torch.allclose(shared, full, atol=1e-6)
    noisy = zeros + 0.1
    with torch.no_grad():
        net._graph_context(noisy)
    assert calls[-1] == 3  # a noisy x_t has a context per map


@pytest.mark.slow
def test_windows_reaching_several_chunks_are_sampled_once_with_the_same_maps(prepared, monkeypatch):
    prep = Prepared.from_sdata(prepared, "diffst")
    torch.manual_seed(0)
    model = untrained(prep)
    _perturbed(model.net)
    sampled = []
    original = InferencePipeline.window_maps
    monkeypatch.setattr(
        InferencePipeline, "window_maps", lambda self, group, *a: sampled.extend(map(tuple, group)) or original(self, group, *a)
    )
    run = functools.partial(dst.tl.super_resolve, prepared, model=model, n_samples=2, inplace=False, block_lr=3)
    cached = run()
    assert len(sampled) == len(set(sampled))  # each window once, though small chunks share many
    pipe = InferencePipeline.from_model(prepared, prep, model, list(model.genes), block_lr=3)
    assert max(pipe.chunks_per_window().values()) > 1 and len(sampled) == pipe.window_runs()
    monkeypatch.setattr("diffst.tl._inference._Shared.keep", lambda self, key, maps: None)  # no sharing
    sampled.clear()
    alone = run()
    assert len(sampled) > len(set(sampled))
    np.testing.assert_allclose(cached["mean"].values, alone["mean"].values, rtol=1e-6, atol=1e-6)
    # the samples' spread goes through the sampler steps in batches of other sizes: float rounding, no more
    std, std_alone = cached["std"].values, alone["std"].values
    assert np.abs(std - std_alone).max() < 1e-4 * std_alone.max()


def test_super_resolve_averages_the_mean_head_over_flips_by_default_and_records_it(prepared):
    prep = Prepared.from_sdata(prepared, "diffst")
    model = untrained(prep)
    torch.manual_seed(0)
    _perturbed(model.net)
    kw = {"model": model, "consistency": False, "inplace": False}
    flips = dst.tl.super_resolve(prepared, **kw)["mean"].values
    plain = dst.tl.super_resolve(prepared, average_flips=False, **kw)["mean"].values
    assert np.abs(flips - plain).max() > 1e-3 * np.abs(plain).max()
    dst.tl.super_resolve(prepared, model=model, key_added="flips_sr", overwrite=True)
    assert prepared.attrs["flips_sr"]["average_flips"] is True
    # nothing to average for the paper's objective: recorded as not averaged
    paper = untrained(prep, objective="diffusion")
    dst.tl.super_resolve(prepared, model=paper, key_added="paper_sr", overwrite=True, steps=2)
    assert prepared.attrs["paper_sr"]["average_flips"] is False
    for key in ("flips_sr", "paper_sr"):
        del prepared.images[key]
        del prepared.attrs[key]


@pytest.mark.slow
def test_refiner_mean_head_learns_what_regression_learns():
    """A mean head trained jointly with the diffusion fits a fixed batch like a regression network does."""
    results = {}
    for objective in ("refiner", "regression"):
        cfg = DiffSTConfig.preset("tiny", objective=objective, learning_rate=3e-3, base="bicubic")
        torch.manual_seed(0)
        net = DiffSTNet(cfg)
        diffusion = Diffusion(cfg)
        x0, lr, mask, image = _inputs(cfg, b=4, seed=3)
        opt = torch.optim.Adam(net.parameters(), lr=cfg.learning_rate)
        gen = torch.Generator().manual_seed(0)
        for _ in range(60):
            loss = diffusion.training_losses(net, x0, lr, mask, image, generator=gen)["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            results[objective] = float(((diffusion.predict_mean(net, lr, mask, image) - x0) ** 2).mean())
    start = float(((upsample_lr(lr, mask, 4) - x0) ** 2).mean())
    assert results["refiner"] < 0.5 * start
    assert results["refiner"] < 1.5 * results["regression"]


# ---------------------------------------------------------------------------------------------------- std map
def test_std_map_has_no_window_border_structure(prepared, monkeypatch):
    """Windows whose samples have the same spread everywhere must give a flat std map, overlaps included."""
    prep = Prepared.from_sdata(prepared, "diffst")
    model = untrained(prep)

    def flat(self, group, region=None):
        shape = (len(group), len(self.gene_scale), self.window_lr * self.grid.scale, self.window_lr * self.grid.scale)
        return np.full(shape, 5.0), np.full(shape, 4.0)

    monkeypatch.setattr(InferencePipeline, "window_maps", flat)
    out = dst.tl.super_resolve(prepared, model=model, n_samples=4, consistency=False, inplace=False, tile_overlap=0.5)
    std = out["std"].values
    tissue = np.asarray(prepared[prep.elements["tissue"]].values, dtype=bool).repeat(4, 0).repeat(4, 1)
    assert np.allclose(std[:, tissue], 2.0, atol=1e-6)
    assert np.allclose(out["mean"].values[:, tissue], 5.0, atol=1e-6)

    # a guard writes the predictive std c · sqrt(spread² + mean): still flat, 1.5 · sqrt(2² + 5) = 4.5
    g = len(model.genes)
    model.guard = Guard([1.0] * g, [1.5] * g, std_noise="poisson", validation=None)
    out = dst.tl.super_resolve(prepared, model=model, n_samples=4, consistency=False, inplace=False, tile_overlap=0.5)
    assert np.allclose(out["std"].values[:, tissue], 4.5, atol=1e-5)
    # a guard whose std is the spread alone (std_noise=None: spots alone, or fit_guard(std_noise=None)) scales it
    model.guard = Guard([1.0] * g, [1.5] * g, std_noise=None, validation=None)
    out = dst.tl.super_resolve(prepared, model=model, n_samples=4, consistency=False, inplace=False, tile_overlap=0.5)
    assert np.allclose(out["std"].values[:, tissue], 3.0, atol=1e-5)


def test_coverage_scale_calibrates_two_std_to_95_percent():
    rng = np.random.default_rng(0)
    mean = rng.uniform(0, 5, 200_000)
    sigma = rng.uniform(0.5, 2, mean.size)
    truth = mean + rng.normal(0, 1, mean.size) * sigma
    c = coverage_scale(truth, mean, sigma / 2)  # a std map that is half the true spread
    assert c == pytest.approx(2 * 1.96 / 2, rel=0.02)
    assert coverage_scale(truth, mean, np.zeros_like(mean)) == 1.0


def test_the_predictive_std_carries_from_sparse_validation_tissue_to_richer_tissue():
    """Calibrated on nearly empty validation tiles, the interval still covers ~95 % of counts where expression is high.

    Counts are Poisson around the model's mean; the samples spread a little. Scaling the spread alone to cover the
    validation counts (the calibration before the Poisson term) covers far fewer counts where there are more of them.
    """
    rng = np.random.default_rng(0)
    spread = 0.1
    val_mean = np.full(50_000, 0.02)
    val_truth = rng.poisson(val_mean).astype(float)
    test_mean = rng.uniform(0.5, 4.0, 50_000)
    test_truth = rng.poisson(test_mean).astype(float)

    def covered(c, mean, std, truth):
        return float(np.mean(np.abs(truth - mean) <= 2 * c * std + 1e-9))

    c = max(1.0, coverage_scale(val_truth, val_mean, predictive_std(val_mean, np.full_like(val_mean, spread))))
    assert c == 1.0  # sparse validation counts cannot narrow it below Poisson
    test_std = predictive_std(test_mean, np.full_like(test_mean, spread))
    assert 0.92 <= covered(c, test_mean, test_std, test_truth) <= 0.98
    c_old = coverage_scale(val_truth, val_mean, np.full_like(val_mean, spread))
    assert covered(c_old, test_mean, np.full_like(test_mean, spread), test_truth) < 0.6


# ---------------------------------------------------------------------------------------------------- train + guard
@pytest.fixture(scope="module")
def trained(prepared, tmp_path_factory):
    return dst.tl.train(
        prepared, max_epochs=3, check_val_every_n_epoch=1, checkpoint_dir=tmp_path_factory.mktemp("run"), **FAST
    )


def test_training_selects_on_validation_pcc_and_records_the_baselines(trained):
    rows = [r for r in trained.history if "val_pcc" in r]
    assert rows, trained.history
    for k in ("val_pcc", "val_rmse", "val_pcc_bicubic", "val_rmse_bicubic", "val_pcc_floor", "val_rmse_floor"):
        assert np.isfinite(rows[-1][k]), k
    assert trained.info["best_val_pcc"] == pytest.approx(max(r["val_pcc"] for r in rows), abs=1e-6)
    assert trained.info["stopped_by"] in ("completed", "early stopping")
    # the fitted floor's exponents were chosen before training: one row per gene, one column per stain (the toy's
    # image is one DAPI channel)
    assert trained.config.base == "fitted" and trained.config.image_kind == "fluorescence"
    assert np.asarray(trained.config.stain_exponents).shape == (len(trained.genes), trained.config.image_channels)
    guard = trained.guard
    assert len(guard.alpha) == len(trained.genes)
    assert all(0.0 <= a <= 1.0 for a in guard.alpha)
    assert all(c >= 1.0 for c in guard.std_scale) and guard.std_noise == "poisson"
    assert 0.9 <= guard.coverage_val <= 1.0
    table = guard.validation
    # the guarded map is at least as good as the model alone and as the floor on validation (α = 1 and 0 are tried)
    assert table["guarded"]["pcc"] >= table["model"]["pcc"] - 1e-6
    assert table["guarded"]["pcc"] >= table["image_floor"]["pcc"] - 0.02


def test_tile_blocks_merge_neighbouring_tiles_into_the_rectangles_they_fill():
    # an L of tiles of side 4: row 0 has columns 0, 4, 8; row 4 has columns 0, 4; row 8 has column 0; one tile apart
    tiles = [(0, 0), (0, 4), (0, 8), (4, 0), (4, 4), (8, 0), (20, 20)]
    blocks = tile_blocks(tiles, 4, 48)
    assert blocks == [(0, 0, 4, 12), (4, 0, 8, 8), (8, 0, 12, 4), (20, 20, 24, 24)]
    covered = {(r, c) for r0, c0, r1, c1 in blocks for r in range(r0, r1, 4) for c in range(c0, c1, 4)}
    assert covered == set(tiles)
    # equal column spans in consecutive rows stack; no side grows past the limit
    square = [(r, c) for r in range(0, 12, 4) for c in range(0, 12, 4)]
    assert tile_blocks(square, 4, 48) == [(0, 0, 12, 12)]
    assert tile_blocks(square, 4, 8) == [(0, 0, 8, 8), (0, 8, 8, 12), (8, 0, 12, 8), (8, 8, 12, 12)]


def test_validation_maps_are_the_tile_by_tile_maps_with_fewer_windows(prepared, trained, monkeypatch):
    prep = Prepared.from_sdata(prepared, "diffst")
    model = dst.DiffST.load(trained.path)
    sampled = []
    original = InferencePipeline.window_maps
    monkeypatch.setattr(
        InferencePipeline, "window_maps", lambda self, group, *a: sampled.append(len(group)) or original(self, group, *a)
    )
    maps = validation_maps(prepared, prep, model, n_samples=2, seed=5)
    merged = sum(sampled)  # window samplings
    # the same pipeline run tile by tile, as the guard did before
    pipe = InferencePipeline.from_model(prepared, prep, model, list(model.genes), n_samples=2, seed=5, guard=False)
    s, t = prep.grid.scale, prep.tile_lr
    tiles = prep.tiles(prepared, "val")
    origins = list(zip(tiles["lr_row0"].astype(int), tiles["lr_col0"].astype(int), strict=True))
    assert len(origins) > 1
    sampled.clear()
    g, (hh, ww) = len(model.genes), prep.grid.hr_shape
    per_tile = {(r, c): pipe.block((r * s, (r + t) * s), (c * s, (c + t) * s)) for r, c in origins}
    assert merged < sum(sampled)
    for i, name in enumerate(("mean", "std")):
        # place both on the HR grid: the guard's pixels come block by block (row-major), in tile_blocks' order
        guard_map, tile_map = np.full((2, g, hh, ww), np.nan)
        start = 0
        for r0, c0, r1, c1 in tile_blocks(origins, t, DEFAULT_BLOCK_LR):
            n = (r1 - r0) * (c1 - c0) * s * s
            guard_map[:, r0 * s : r1 * s, c0 * s : c1 * s] = maps[name][:, start : start + n].reshape(
                g, (r1 - r0) * s, -1
            )
            start += n
        assert start == maps[name].shape[1]
        for (r, c), block in per_tile.items():
            tile_map[:, r * s : (r + t) * s, c * s : (c + t) * s] = block[i]
        assert np.array_equal(np.isnan(guard_map), np.isnan(tile_map))
        assert np.allclose(guard_map, tile_map, rtol=1e-4, atol=1e-5, equal_nan=True), name


def test_super_resolve_blends_with_the_floor_by_the_guard(prepared, trained):
    model = dst.DiffST.load(trained.path)
    g = len(model.genes)
    model.guard = dataclasses.replace(model.guard, alpha=[0.0] * g)
    dst.tl.super_resolve(prepared, model=model, key_added="guarded_sr", overwrite=True)
    dst.tl.upsample(prepared, method="image", key_added="floor_sr", overwrite=True)
    a = np.asarray(image_levels(prepared.images["guarded_sr"])[0].values)
    b = np.asarray(image_levels(prepared.images["floor_sr"])[0].values)
    assert np.allclose(a, b, rtol=1e-4, atol=1e-4)
    assert prepared.attrs["guarded_sr"]["guard"]["alpha"] == dict.fromkeys(model.genes, 0.0)


@pytest.mark.slow
def test_time_budget_stops_training_and_says_so(prepared, tmp_path, caplog):
    model = dst.tl.train(prepared, max_epochs=500, time_budget=2.0, checkpoint_dir=tmp_path, guard=False, **FAST)
    assert model.info["stopped_by"] == "time budget"
    assert model.info["steps"] < 500
    with pytest.raises(ValueError, match="time_budget"):
        dst.tl.train(prepared, time_budget=0, checkpoint_dir=tmp_path / "x", **FAST)


def test_a_small_crop_still_gets_a_validation_region(monkeypatch):
    # 3 × 3 tiles of 160 µm form one 2 × 2-tile block and a few partial ones: blocks of one tile take over
    sdata = toy_xenium(size_um=480.0, n=20_000, seed=1)
    said: list[str] = []
    monkeypatch.setattr("diffst.pp._prepare.log.info", said.append)
    dst.pp.prepare(sdata, genes=5, lr_um=40, scale=4, tile_um=160, split_block_um=480)
    split = sdata.attrs["diffst"]["split"]
    assert split["train"] > 0 and split["val"] > 0 and split["test"] > 0
    assert any("val 0.0" in m and "mm²" in m for m in said), said
