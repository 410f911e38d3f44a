"""Accuracy of Diff-ST against baselines (paper Table 1), its ablations (Table 2) and its sampling options.

Experiments (each appends rows to ``benchmarks/results/<experiment>.csv`` and skips what is already there, so an
interrupted run continues; ``--fresh`` starts over):

``quality``
    methods × {5×, 10×} × datasets {synthetic Xenium, MERFISH mouse brain} × seeds. Methods: Diff-ST (default
    preset, mean of 4 samples, LR-consistent), the regression network (same backbone and conditioning, MSE, no
    diffusion), bicubic and nearest up-sampling, TESLA when installed. Strict metrics (signed PCC, RMSE and SSIM on
    the normalised scale, LR consistency) and the paper-compatible ones, on held-out test tiles.
``accuracy``
    The real-tissue accuracy benchmark (issue 10): datasets {synthetic, MERFISH, MERFISH small region (train and
    validate on a 300 × 300 µm region only)} × {5×, 10×} × seeds; Diff-ST (default preset: refiner, guarded by the
    image floor, mean of 4 samples), regression, bicubic, LR-consistent bicubic, the image floor, TESLA; the guard's
    validation PCC and the coverage of mean ± 2 std on test tiles.
``base``
    The default model's base before training (the floor with per-gene stain exponents fitted on the training
    windows) against the training-free image floor, pooled PCC on the test windows; no training.
``coverage``
    Coverage of mean ± 2 std on the test tiles of the ``accuracy`` cells, with the std calibrated on validation as
    before (the sample spread scaled) and as now (with Poisson counting noise), same models and validation tiles.
``flips``
    The mean head averaged over the 8 rotations/flips of each window (``super_resolve(average_flips=True)``, the
    default since the ``accuracy`` table was measured) against the plain head, for Diff-ST and regression on the
    ``accuracy`` cells: the same models (cached, or trained as ``accuracy`` trains them), the guard refitted for each.
``ablation``
    Diff-ST with each of ``cam``, ``cigc_graph``, ``hierarchical`` switched off, per dataset, scale and seed (as in
    ``accuracy``, whose Diff-ST is the full model). ``results/ablation_before_issue10.csv`` keeps the earlier run
    (synthetic only, the default before issue 10, 750 steps).
``samples``
    LR consistency on/off × ``n_samples`` ∈ {1, 4, 8}: PCC/RMSE and the calibration of the std map (share of true
    counts within mean ± 2 std).

Datasets: synthetic = ``synthetic_xenium(seed=s)`` (3 mm, 50 genes, H&E guide), 25 genes, LR 100 µm, 400 µm tiles;
MERFISH = the 500 × 450 µm Vizgen crop (DAPI + polyT guide), 25 genes, HR 5 µm from LR 25 µm (5×) or 50 µm (10×),
100 µm tiles. MERFISH needs ``DIFFST_DATA_DIR`` (e.g. ``../shared/data``) or a download.

    python benchmarks/bench_quality.py quality ablation samples            # full (hours on 2 CPU cores)
    python benchmarks/bench_quality.py quality --quick                     # smoke: tiny preset, 1 seed
    python benchmarks/bench_quality.py ablation --scales 10 --seeds 0 1    # a part of one experiment
    python benchmarks/bench_quality.py report                              # tables from the CSVs (markdown)
    python benchmarks/bench_quality.py report --figure docs/_static/benchmark_quality.png
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from _common import append, guard_dict, machine, markdown

import diffst as dst

RESULTS = Path(__file__).parent / "results"
CACHE = Path(__file__).parent / ".cache"
SEEDS = (0, 1, 2)
METRICS = ["pcc", "rmse", "ssim", "lr_consistency", "paper_pcc", "paper_rmse"]


def load(dataset: str, scale: int, seed: int, quick: bool, **prepare_kw):
    """A prepared SpatialData for one benchmark cell.

    ``merfish_roi`` is the small-region setting: the MERFISH crop prepared as ``merfish``, but only the tiles inside
    the 300 × 300 µm region of interest at the grid origin are used for training and validation (its last tile column
    validates, see :func:`roi_split`); every tile outside it is a test tile.
    """
    if dataset == "merfish_roi":
        sdata = load("merfish", scale, seed, quick, **prepare_kw)
        roi_split(sdata, roi_um=300.0)
        return sdata
    if dataset == "merfish_small":
        sdata = load("merfish", scale, seed, quick, **prepare_kw)
        small_region(sdata, roi_um=300.0)
        return sdata
    if dataset == "synthetic":
        size = 1500.0 if quick else "default"
        sdata = dst.datasets.synthetic_xenium(size_um=size, seed=seed, boundaries=False)
        kw = {"genes": 25, **prepare_kw}
        dst.pp.prepare(sdata, scale=scale, lr_um=100, tile_um=400, image_key="he_image", seed=seed, **kw)
    else:
        sdata = dst.datasets.merfish_mouse_brain()
        lr_um = 50 if scale == 10 else 25
        dst.pp.prepare(sdata, genes=25, scale=scale, lr_um=lr_um, tile_um=100, seed=seed, **prepare_kw)
    return sdata


def roi_split(sdata, roi_um: float) -> None:
    """Re-split the prepared tiles: inside ``[0, roi_um)²`` (µm from the grid origin) train, its last tile column val;
    everything else test. The per-gene normalisation stays the one ``prepare`` fitted on its own training tiles."""
    attrs = sdata.attrs["diffst"]
    tiles = sdata[attrs["elements"]["tiles"]]
    lr_um = attrs["grid"]["lr_um"]
    t = int(round(attrs["tile_um"] / lr_um))
    end = int(roi_um // lr_um)
    inside = (tiles["lr_row0"] + t <= end) & (tiles["lr_col0"] + t <= end)
    last_col = tiles.loc[inside, "lr_col0"].max()
    split = np.where(inside, np.where(tiles["lr_col0"] == last_col, "val", "train"), "test")
    tiles["split"] = pd.Categorical(split, categories=["train", "val", "test"])
    attrs["split"].update({k: int((split == k).sum()) for k in ("train", "val", "test")})


def small_region(sdata, roi_um: float | tuple[float, float], test_from_um: float | None = None) -> None:
    """A small region as it comes: the tiles inside ``[0, width) × [0, height)`` (µm from the grid origin; a number
    for a square) train, with no validation tile (``dst.tl.train`` holds out its own band), and the tiles from
    ``test_from_um`` on along x (default: every tile outside the region) are the test tiles; the rest plays no part."""
    attrs = sdata.attrs["diffst"]
    tiles = sdata[attrs["elements"]["tiles"]]
    lr_um = attrs["grid"]["lr_um"]
    t = int(round(attrs["tile_um"] / lr_um))
    width, height = (roi_um, roi_um) if np.isscalar(roi_um) else roi_um
    inside = (tiles["lr_row0"] + t <= int(round(height / lr_um))) & (tiles["lr_col0"] + t <= int(round(width / lr_um)))
    test = ~inside if test_from_um is None else tiles["lr_col0"] >= int(round(test_from_um / lr_um))
    split = np.where(inside & ~test, "train", np.where(test, "test", "none"))
    tiles["split"] = pd.Categorical(split, categories=["train", "val", "test", "none"])
    attrs["split"].update({k: int((split == k).sum()) for k in ("train", "val", "test")})


#: Wall-clock budget of each training in seconds (``--budget``): "default" the package's, None none (the planned steps).
BUDGET: float | None | str = "default"
#: Retrain models even where a run of the same tag finished before (``--fresh``).
RETRAIN = False


def train(sdata, seed: int, quick: bool, tag: str, config: dict | None = None):
    """Train (or reload) one model; a tag names one data set, scale, seed and configuration.

    The same tag in two experiments is the same model (the quality run's Diff-ST is the ablation's full model and the
    samples experiment's model), so it is trained once; ``--fresh`` retrains.
    """
    preset = "tiny" if quick else "default"
    run = CACHE / "runs" / (f"{tag}_quick" if quick else tag)
    if (run / "model.pt").exists() and not RETRAIN:
        return dst.DiffST.load(run / "model.pt")
    extra = {"max_epochs": 2} if quick else {}
    if BUDGET != "default":
        extra["time_budget"] = BUDGET
    return dst.tl.train(sdata, preset=preset, seed=seed, config=config, checkpoint_dir=run,
                        overwrite=True, enable_progress_bar=False, **extra)  # fmt: skip


def cached_cell(spec: str):
    """``"dataset:scale:seed"`` → the prepared data, the ``accuracy`` run's cached Diff-ST, its ``Prepared`` and the
    seed (for ``explore/``: rescoring without retraining)."""
    from diffst._contract import Prepared

    dataset, scale, seed = spec.split(":")
    scale, seed = int(scale), int(seed)
    sdata = load(dataset, scale, seed, False)
    model = dst.DiffST.load(CACHE / "runs" / f"acc_{dataset}{scale}_{seed}" / "model.pt")
    return sdata, model, Prepared.from_sdata(sdata, "diffst"), seed


def score(sdata, key: str, **labels) -> dict:
    df = dst.tl.evaluate(sdata, key=key)
    row = df.loc["mean"]
    return {**labels, **{m: float(row[m]) for m in METRICS if m in row}}


def done(path: Path) -> pd.DataFrame:
    return pd.read_csv(path) if path.exists() else pd.DataFrame()


def cells(name: str, datasets: list[str], args):
    """The benchmark cells (dataset × scale × seed) not yet in ``results/<name>.csv``: yields the prepared data, the
    cell's labels and a list to fill with rows, which are appended to the CSV when the caller moves on."""
    path = RESULTS / f"{name}{'_quick' if args.quick else ''}.csv"
    prev = done(path)
    for dataset in datasets:
        for scale in args.scales:
            for seed in args.seeds:
                if not prev.empty and ((prev.dataset == dataset) & (prev.scale == scale) & (prev.seed == seed)).any():
                    continue
                t0 = time.perf_counter()
                rows: list[dict] = []
                yield load(dataset, scale, seed, args.quick), {"dataset": dataset, "scale": scale, "seed": seed}, rows
                append(path, rows)
                print(f"{name} {dataset} {scale}× seed {seed}: {time.perf_counter() - t0:.0f} s", flush=True)


def tesla_rows(sdata, labels: dict) -> list[dict]:
    """TESLA's score on the same tiles, or nothing (with a message) when it is not installed."""
    try:
        dst.tl.tesla(sdata)
    except ImportError as e:
        print(f"TESLA skipped: {e}")
        return []
    return [score(sdata, "tesla_sr", method="TESLA", **labels)]


def quality(args) -> None:
    datasets = ["synthetic"] if args.quick else ["synthetic", "merfish"]
    for sdata, labels, rows in cells("quality", datasets, args):
        dataset, scale, seed = labels["dataset"], labels["scale"], labels["seed"]
        model = train(sdata, seed, args.quick, f"{dataset}{scale}_{seed}")
        dst.tl.super_resolve(sdata, model=model, n_samples=4, seed=seed, key_added="diffst_sr")
        rows.append(score(sdata, "diffst_sr", method="Diff-ST", train_s=model.info["seconds"], **labels))
        reg = train(sdata, seed, args.quick, f"{dataset}{scale}_{seed}_reg", {"objective": "regression"})
        dst.tl.super_resolve(sdata, model=reg, key_added="regression_sr")
        rows.append(score(sdata, "regression_sr", method="regression", train_s=reg.info["seconds"], **labels))
        for method in ("bicubic", "nearest"):
            dst.tl.upsample(sdata, method=method)
            rows.append(score(sdata, f"{method}_sr", method=method, **labels))
        rows.extend(tesla_rows(sdata, labels))


def accuracy(args) -> None:
    """Issue 10: Diff-ST (refiner, guarded) against regression, bicubic (plain and LR-consistent), the image floor and
    TESLA, with the validation table of the guard and the std coverage on test tiles."""
    for sdata, labels, rows in cells("accuracy", args.datasets, args):
        dataset, scale, seed = labels["dataset"], labels["scale"], labels["seed"]
        model = train(sdata, seed, args.quick, f"acc_{dataset}{scale}_{seed}")
        guard = guard_dict(model)
        val = guard.get("validation", {})
        dst.tl.super_resolve(sdata, model=model, n_samples=4, seed=seed, key_added="diffst_sr")
        rows.append(score(
                    sdata, "diffst_sr", method="Diff-ST", train_s=model.info["seconds"], steps=model.info["steps"],
                    stopped_by=model.info.get("stopped_by"), within_2std=calibration(sdata, "diffst_sr"),
                    val_pcc=val.get("guarded", {}).get("pcc"), val_pcc_model=val.get("model", {}).get("pcc"),
                    val_pcc_floor=val.get("image_floor", {}).get("pcc"),
                    blended_genes=int(sum(a < 1 for a in guard.get("alpha", []))), **labels,
                ))  # fmt: skip
        reg = train(sdata, seed, args.quick, f"acc_{dataset}{scale}_{seed}_reg", {"objective": "regression"})
        dst.tl.super_resolve(sdata, model=reg, key_added="regression_sr")
        rows.append(score(sdata, "regression_sr", method="regression", train_s=reg.info["seconds"],
                                  steps=reg.info["steps"], **labels))  # fmt: skip
        for name, kw in (("bicubic", {"method": "bicubic"}),
                                 ("bicubic (LR-consistent)", {"method": "bicubic", "consistency": True}),
                                 ("image floor", {"method": "image"})):  # fmt: skip
            dst.tl.upsample(sdata, key_added="base_sr", overwrite=True, **kw)
            rows.append(score(sdata, "base_sr", method=name, **labels))
        rows.extend(tesla_rows(sdata, labels))


#: Variants of the ``real`` experiment: the default path and each lever of issue 26 on its own.
VARIANTS = {
    "default": ({}, {}),
    "context": ({"context_genes": 25}, {}),
    "lr_weight": ({}, {"lr_weight": 0.5}),
}


def real(args) -> None:
    """Issue 26: the default path (``prepare`` → ``train`` → ``super_resolve``, default arguments but the training
    budget) on real tissue, and each lever on its own (``--variants``): the panel context (``context_genes``, the next
    25 genes by spatial variability) and the LR self-supervision (``lr_weight``), paired with the default on the same
    data, split and seed; the image floor and LR-consistent bicubic on the same test tiles."""
    path = RESULTS / f"real{'_quick' if args.quick else ''}.csv"
    prev = done(path)
    for dataset in args.datasets:
        for scale in args.scales:
            for seed in args.seeds:
                for variant in args.variants:
                    labels = {"dataset": dataset, "scale": scale, "seed": seed, "variant": variant}
                    if not prev.empty and ((prev.dataset == dataset) & (prev.scale == scale) & (prev.seed == seed)
                                           & (prev.variant == variant)).any():  # fmt: skip
                        continue
                    t0 = time.perf_counter()
                    prepare_kw, config = VARIANTS[variant]
                    sdata = load(dataset, scale, seed, args.quick, **prepare_kw)
                    model = train(sdata, seed, args.quick, f"real_{dataset}{scale}_{seed}_{variant}", config or None)
                    guard = guard_dict(model)
                    val = guard.get("validation") or {}
                    dst.tl.super_resolve(sdata, model=model, seed=seed, key_added="diffst_sr")
                    rows = [score(sdata, "diffst_sr", method="Diff-ST", train_s=model.info["seconds"],
                                  steps=model.info["steps"], stopped_by=model.info.get("stopped_by"),
                                  validation=model.info.get("validation"),
                                  val_pcc=val.get("guarded", {}).get("pcc"), val_pcc_model=val.get("model", {}).get("pcc"),
                                  val_pcc_floor=val.get("image_floor", {}).get("pcc"),
                                  blended_genes=int(sum(a < 1 for a in guard.get("alpha", []))), **labels)]  # fmt: skip
                    if variant == args.variants[0]:
                        for name, kw in (("bicubic (LR-consistent)", {"method": "bicubic", "consistency": True}),
                                         ("image floor", {"method": "image"})):  # fmt: skip
                            dst.tl.upsample(sdata, key_added="base_sr", overwrite=True, **kw)
                            rows.append(score(sdata, "base_sr", method=name, **labels))
                    append(path, rows)
                    print(
                        f"real {dataset} {scale}× seed {seed} {variant}: {time.perf_counter() - t0:.0f} s", flush=True
                    )


#: MERFISH training regions of the learning curve (width × height at the grid origin, µm: 0.04, 0.09 and 0.135 mm²,
#: the last all of the crop left of the test strip) and where the fixed test strip starts (x ≥ 300 µm, 0.09 mm²);
#: synthetic slide sides (mm).
CURVE_MERFISH = ((200.0, 200.0), (300.0, 300.0), (300.0, 450.0))
CURVE_TEST_FROM_UM = 300.0
CURVE_SYNTHETIC = (1.5, 3.0, 6.5)


def curve(args) -> None:
    """The learning curve: Diff-ST's gain over the image floor against the training area, default path.

    MERFISH 5× and 10×: training regions of growing area at the grid origin (no validation tiles: ``train`` holds
    out its band), scored on the same test strip (every tile from 300 µm on, along x) at every size.
    Synthetic Xenium 10×: whole slides of growing side, each with the default split and its own test tiles.
    """
    path = RESULTS / f"curve{'_quick' if args.quick else ''}.csv"
    prev = done(path)
    todo = [("merfish", scale, side) for scale in args.scales for side in CURVE_MERFISH]
    todo += [("synthetic", 10, side) for side in CURVE_SYNTHETIC] if "synthetic" in args.datasets else []
    for dataset, scale, side in todo:
        side = f"{side[0]:g}x{side[1]:g}" if isinstance(side, tuple) else f"{side:g} mm"
        for seed in args.seeds:
            labels = {"dataset": dataset, "scale": scale, "side": side, "seed": seed}
            if not prev.empty and ((prev.dataset == dataset) & (prev.scale == scale) & (prev.side == side)
                                   & (prev.seed == seed)).any():  # fmt: skip
                continue
            t0 = time.perf_counter()
            if dataset == "merfish":
                sdata = load("merfish", scale, seed, args.quick)
                width, height = (float(v) for v in side.split("x"))
                small_region(sdata, roi_um=(width, height), test_from_um=CURVE_TEST_FROM_UM)
            else:
                mm = float(side.split()[0])
                sdata = dst.datasets.synthetic_xenium(size_um=mm * 1000, seed=seed, boundaries=False)
                dst.pp.prepare(sdata, genes=25, scale=10, lr_um=100, tile_um=400, image_key="he_image", seed=seed)
            tiles = sdata[sdata.attrs["diffst"]["elements"]["tiles"]]
            lr_um = sdata.attrs["diffst"]["grid"]["lr_um"]
            model = train(sdata, seed, args.quick, f"curve_{dataset}{scale}_{side.replace(' ', '')}_{seed}")
            area = sum(s_["train_mm2"] + s_["val_mm2"] for s_ in model.info["sections"])
            dst.tl.super_resolve(sdata, model=model, seed=seed, key_added="diffst_sr")
            rows = [score(sdata, "diffst_sr", method="Diff-ST", train_mm2=area, steps=model.info["steps"],
                          test_tiles=int((tiles["split"] == "test").sum()), lr_um=lr_um, **labels)]  # fmt: skip
            dst.tl.upsample(sdata, method="image", key_added="base_sr", overwrite=True)
            rows.append(score(sdata, "base_sr", method="image floor", train_mm2=area, **labels))
            append(path, rows)
            print(f"curve {dataset} {scale}× {side} seed {seed}: {time.perf_counter() - t0:.0f} s", flush=True)


def coverage(args) -> None:
    """Coverage of mean ± 2 std on the test tiles, with the guard's std calibrated as before (the sample spread
    scaled) and with the Poisson term, both fitted on the same validation tiles: the ``accuracy`` experiment's Diff-ST
    models (reloaded from its cache, or trained as it trains them), the guard refitted, no retraining."""
    from diffst._contract import Prepared
    from diffst.tl._guard import Validation, fit_guard

    for sdata, labels, rows in cells("coverage", args.datasets, args):
        dataset, scale, seed = labels["dataset"], labels["scale"], labels["seed"]
        model = train(sdata, seed, args.quick, f"acc_{dataset}{scale}_{seed}")
        prep = Prepared.from_sdata(sdata, "diffst")
        for name, noise in (("sample spread, scaled", None), ("predictive (Poisson)", "poisson")):
            model.guard = fit_guard(Validation(sdata, prep), model, n_samples=4, seed=seed, std_noise=noise)
            dst.tl.super_resolve(sdata, model=model, n_samples=4, seed=seed, key_added="diffst_sr", overwrite=True)
            rows.append({**labels, "std": name, "within_2std": calibration(sdata, "diffst_sr"),
                         "coverage_val": model.guard.coverage_val,
                         "median_std_scale": float(np.median(model.guard.std_scale))})  # fmt: skip


def flips(args) -> None:
    """Paired on the same models: the mean head averaged over the 8 rotations/flips against the plain head."""
    from diffst._contract import Prepared
    from diffst.tl._guard import Validation, fit_guard

    for sdata, labels, rows in cells("flips", args.datasets, args):
        dataset, scale, seed = labels["dataset"], labels["scale"], labels["seed"]
        prep = Prepared.from_sdata(sdata, "diffst")
        for method, tag, config, n in (
            ("Diff-ST", "", None, 4),
            ("regression", "_reg", {"objective": "regression"}, 1),
        ):
            model = train(sdata, seed, args.quick, f"acc_{dataset}{scale}_{seed}{tag}", config)
            for average in (False, True):
                t0 = time.perf_counter()
                model.guard = fit_guard(Validation(sdata, prep), model, n_samples=4, seed=seed,
                                                average_flips=average)  # fmt: skip
                dst.tl.super_resolve(sdata, model=model, n_samples=n, seed=seed, key_added="sr", overwrite=True,
                                     average_flips=average)  # fmt: skip
                val = guard_dict(model).get("validation", {})
                rows.append(score(sdata, "sr", method=method, average_flips=average, train_s=model.info["seconds"],
                                  steps=model.info["steps"], val_pcc=val.get("guarded", {}).get("pcc"),
                                  val_pcc_model=val.get("model", {}).get("pcc"),
                                  within_2std=calibration(sdata, "sr") if n > 1 else None,
                                  seconds=time.perf_counter() - t0, **labels))  # fmt: skip


#: Seed offsets of the second training slide (B) and of the slide no model saw (C) in ``sections``.
SECTION_SEEDS = {"A": 0, "B": 100, "C": 200}


def sections(args) -> None:
    """Issue 26, several sections: a model trained on one synthetic slide (A) against one trained on two (A and B,
    ``dst.tl.train([A, B])``, each slide with its own normalisation), default path, paired by seed, on A's test tiles;
    and both applied to a third slide (C) neither saw, on its test tiles. The slides share the panel's gene
    programmes (a study's sections) but not the tissue. The image floor and LR-consistent bicubic on the same tiles."""
    path = RESULTS / f"sections{'_quick' if args.quick else ''}.csv"
    prev = done(path)
    for scale in args.scales:
        for seed in args.seeds:
            if not prev.empty and ((prev.scale == scale) & (prev.seed == seed)).any():
                continue
            t0 = time.perf_counter()
            slides = {"A": load("synthetic", scale, seed, args.quick)}
            genes = list(slides["A"].attrs["diffst"]["genes"])
            for name in ("B", "C"):
                slides[name] = load("synthetic", scale, seed + SECTION_SEEDS[name], args.quick, genes=genes)
            models = {
                "one slide (A)": train(slides["A"], seed, args.quick, f"sections_A{scale}_{seed}"),
                "two slides (A, B)": train([slides["A"], slides["B"]], seed, args.quick, f"sections_AB{scale}_{seed}"),
            }
            rows = []
            for slide in ("A", "C"):
                sdata = slides[slide]
                labels = {"scale": scale, "seed": seed, "slide": slide}
                for trained_on, model in models.items():
                    dst.tl.super_resolve(sdata, model=model, seed=seed, key_added="sr", overwrite=True)
                    rows.append(score(sdata, "sr", method="Diff-ST", trained_on=trained_on, train_s=model.info["seconds"],
                                      steps=model.info["steps"], **labels))  # fmt: skip
                for name, kw in (("bicubic (LR-consistent)", {"method": "bicubic", "consistency": True}),
                                 ("image floor", {"method": "image"})):  # fmt: skip
                    dst.tl.upsample(sdata, key_added="base_sr", overwrite=True, **kw)
                    rows.append(score(sdata, "base_sr", method=name, **labels))
            append(path, rows)
            print(f"sections {scale}× seed {seed}: {time.perf_counter() - t0:.0f} s", flush=True)


def std_steps(args) -> None:
    """The calibrated std with fewer sampler steps: on the models of ``real`` (cached), the guard refitted and
    ``super_resolve(n_samples=4)`` run with the model's sampler at 20, 10 (the default), 5 and 3 steps, same seed:
    test PCC, the share of test pixels within mean ± 2 std, the std scales and the time."""
    from diffst._contract import Prepared
    from diffst.tl._guard import Validation, fit_guard

    for sdata, labels, rows in cells("std_steps", args.datasets, args):
        seed = labels["seed"]
        model = train(sdata, seed, args.quick, f"real_{labels['dataset']}{labels['scale']}_{seed}_default")
        prep = Prepared.from_sdata(sdata, "diffst")
        for steps in (20, 10, 5, 3):
            model.config.sample_steps = steps
            t0 = time.perf_counter()
            model.guard = fit_guard(Validation(sdata, prep), model, seed=seed)
            guard_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            dst.tl.super_resolve(sdata, model=model, n_samples=4, seed=seed, key_added="sr", overwrite=True)
            rows.append(score(sdata, "sr", steps=steps, within_2std=calibration(sdata, "sr"),
                              median_std_scale=float(np.median(model.guard.std_scale)), guard_s=guard_s,
                              seconds=time.perf_counter() - t0, **labels))  # fmt: skip


def precision(args) -> None:
    """Paired on the models of ``real`` (the default path, cached): ``super_resolve`` with its default arguments in
    float32 and in bfloat16 (``precision=``), same model, seed and tiles: test scores, wall time and the largest change
    of the map. The guard is the one training fitted."""
    for sdata, labels, rows in cells("precision", args.datasets, args):
        seed = labels["seed"]
        model = train(sdata, seed, args.quick, f"real_{labels['dataset']}{labels['scale']}_{seed}_default")
        maps = {}
        for name in ("float32", "bfloat16"):
            t0 = time.perf_counter()
            dst.tl.super_resolve(sdata, model=model, seed=seed, precision=name, key_added=f"sr_{name}")
            seconds = time.perf_counter() - t0
            maps[name] = np.asarray(sdata[f"sr_{name}"].values)
            rows.append(score(sdata, f"sr_{name}", precision=name, seconds=seconds, **labels))
        diff = float(np.abs(maps["bfloat16"] - maps["float32"]).max())
        for r in rows:
            r["max_abs_diff_counts"] = diff


def _arm(flips: pd.DataFrame, averaged: bool) -> pd.DataFrame:
    """The rows of ``flips`` with the head averaged (``True``) or plain (the CSV may read the flag as text)."""
    return flips[flips.average_flips.astype(str) == str(averaged)]


def flips_table(df: pd.DataFrame) -> str:
    """Per setting and method: test PCC / RMSE with the averaged head minus the plain head, paired by seed."""
    keys = ["dataset", "scale", "method", "seed"]
    on = _arm(df, True).set_index(keys)
    off = _arm(df, False).set_index(keys)
    d = (on[["pcc", "rmse", "val_pcc"]] - off[["pcc", "rmse", "val_pcc"]]).dropna(subset=["pcc"])
    rows = []
    for (dataset, scale, method), x in d.groupby(level=[0, 1, 2], sort=False):
        plain, avg = off.loc[x.index], on.loc[x.index]
        rows.append({
            "setting": f"{ACCURACY_NAMES.get(dataset, dataset)} {scale}×", "method": method, "seeds": len(x),
            "test PCC plain → averaged": f"{plain.pcc.mean():.3f} → {avg.pcc.mean():.3f}",
            "Δ PCC": f"{x.pcc.mean():+.4f} (min {x.pcc.min():+.4f})", "PCC higher": f"{int((x.pcc > 0).sum())}/{len(x)}",
            "Δ RMSE": f"{x.rmse.mean():+.4f}", "RMSE lower": f"{int((x.rmse < 0).sum())}/{len(x)}",
            "Δ val PCC (guarded)": f"{x.val_pcc.mean():+.4f}" if x.val_pcc.notna().any() else "",
        })  # fmt: skip
    return markdown(pd.DataFrame(rows))


def flips_targets(flips: pd.DataFrame, acc: pd.DataFrame) -> str:
    """Per seed, the averaged Diff-ST of ``flips`` against the issue's targets: minus the averaged regression of the
    same cell, minus the image floor and the LR-consistent bicubic of ``accuracy`` (training-free, so the same maps
    on the same tiles); whether its RMSE is below all three."""
    keys = ["dataset", "scale", "seed"]
    on = _arm(flips, True).pivot_table(index=keys, columns="method", values=["pcc", "rmse"])
    fixed = ["image floor", "bicubic (LR-consistent)"]
    j = on.join(acc[acc.method.isin(fixed)].pivot_table(index=keys, columns="method", values=["pcc", "rmse"]))
    rows = []
    for (dataset, scale, seed), x in j.iterrows():
        others = ["regression", *fixed]
        rows.append({
            "setting": f"{ACCURACY_NAMES.get(dataset, dataset)} {scale}×", "seed": seed,
            "Diff-ST": f"{x['pcc', 'Diff-ST']:.3f}",
            **{f"vs {m}": f"{x['pcc', 'Diff-ST'] - x['pcc', m]:+.3f}" for m in others},
            "RMSE below all three": "yes" if x["rmse", "Diff-ST"] < min(x["rmse", m] for m in others) else "no",
        })  # fmt: skip
    return markdown(pd.DataFrame(rows))


def base(args) -> None:
    """The fitted floor (the default model's base before any training) against the training-free floor, on the test
    windows: the exponents are fitted on the training windows exactly as ``dst.tl.train`` fits them."""
    from diffst._contract import Prepared
    from diffst.metrics import pearson
    from diffst.model.floor import floor_model_units
    from diffst.tl import _train
    from diffst.tl._data import TileSource, WindowDataset, choose_window, split_region, tiled_origins, window_origins

    for sdata, labels, rows in cells("base", args.datasets, args):
        prep = Prepared.from_sdata(sdata, "diffst")
        region = split_region(prep, sdata, "train")
        w = choose_window(region, prep.tile_lr)
        cfg = _train._config(prep, "tiny" if args.quick else "default", None, None, window_um=w * prep.grid.lr_um)
        source = TileSource.from_sdata(sdata, prep).cache_image(cfg.image_um)
        train_ds = WindowDataset(source, window_origins(region, w), w, image_um=cfg.image_um, gene_scale=prep.hr_scale)
        fitted = _train._fit_base(cfg, train_ds)
        test = WindowDataset(source, tiled_origins(prep.tiles(sdata, "test"), prep.tile_lr, w), w,
                             image_um=cfg.image_um, gene_scale=prep.hr_scale)  # fmt: skip
        batch = {k: torch.stack([test[i][k] for i in range(len(test))]) for k in ("x0", "lr", "mask", "image")}
        kw = {"scale": cfg.scale, "per_hr": cfg.image_per_hr, "kind": cfg.image_kind, "channel": cfg.nuclear_channel,
              "gene_scale": torch.as_tensor(np.asarray(prep.hr_scale, dtype=np.float32))}  # fmt: skip
        ex = np.asarray(fitted.stain_exponents)
        floor_ex = _train.default_exponents(cfg.n_genes, ex.shape[1], cfg.image_kind, cfg.nuclear_channel).numpy()
        changed = int(np.any(ex != floor_ex, axis=1).sum())
        for name, exponents in (("image floor", None), ("fitted floor", torch.from_numpy(ex).float())):
            pred = floor_model_units(batch["lr"], batch["mask"], batch["image"], exponents=exponents, **kw)
            pcc = [pearson(pred[:, g].numpy().ravel(), batch["x0"][:, g].numpy().ravel()) for g in range(cfg.n_genes)]
            rows.append({**labels, "method": name, "pcc": float(np.nanmean(pcc)), "windows": len(test),
                         "changed_genes": changed})  # fmt: skip


def ablation(args) -> None:
    """The paper's Table 2 on the current default: each component switched off, same data, split, preset and budget.
    The full model is the ``accuracy`` experiment's Diff-ST (same tag, so it is trained once)."""
    variants = {"Diff-ST": {}, "w/o CAM": {"cam": False}, "w/o CIGC-Graph": {"cigc_graph": False},
                "w/o hierarchical": {"hierarchical": False}}  # fmt: skip
    for sdata, labels, rows in cells("ablation", args.datasets, args):
        dataset, scale, seed = labels["dataset"], labels["scale"], labels["seed"]
        for name, cfg in variants.items():
            tag = f"acc_{dataset}{scale}_{seed}" + "".join(f"_no_{k}" for k in cfg)
            model = train(sdata, seed, args.quick, tag, cfg or None)
            dst.tl.super_resolve(sdata, model=model, n_samples=4, seed=seed, overwrite=True)
            n_params = sum(p.numel() for p in model.net.parameters())
            rows.append(score(sdata, "diffst_sr", variant=name, params=n_params, steps=model.info["steps"], **labels))
            print(f"ablation {dataset} {name} {scale}× seed {seed} done", flush=True)


def calibration(sdata, key: str) -> float:
    """Share of HR pixels of the test tiles whose true count lies within mean ± 2 std."""
    from diffst._contract import Prepared, read_sr
    from diffst._spatial import image_levels

    record, mean_el, std_el = read_sr(sdata, key)
    prep = Prepared.from_sdata(sdata, record.prepared_key)
    mean = np.asarray(image_levels(mean_el)[0].values)
    std = np.asarray(image_levels(std_el)[0].values)
    truth = np.asarray(sdata[prep.elements["hr"]].values)[[prep.genes.index(g) for g in record.genes]]
    s, t = prep.grid.scale, prep.tile_lr
    inside = []
    for r0, c0 in zip(*(prep.tiles(sdata, "test")[c] for c in ("lr_row0", "lr_col0")), strict=True):
        win = (slice(None), slice(r0 * s, (r0 + t) * s), slice(c0 * s, (c0 + t) * s))
        inside.append((np.abs(truth[win] - mean[win]) <= 2 * std[win]).ravel())
    return float(np.concatenate(inside).mean())


def samples(args) -> None:
    path = RESULTS / f"samples{'_quick' if args.quick else ''}.csv"
    prev = done(path)
    for seed in args.seeds:
        if not prev.empty and (prev.seed == seed).any():
            continue
        sdata = load("synthetic", 10, seed, args.quick)
        model = train(sdata, seed, args.quick, f"synthetic10_{seed}")
        rows = []
        for consistency in (False, True):
            for n in (1, 4, 8):
                key = f"sr_{int(consistency)}_{n}"
                t0 = time.perf_counter()
                dst.tl.super_resolve(sdata, model=model, n_samples=n, consistency=consistency, seed=seed, key_added=key)
                row = score(
                    sdata, key, seed=seed, consistency=consistency, n_samples=n, seconds=time.perf_counter() - t0
                )
                row["within_2std"] = calibration(sdata, key) if n > 1 else np.nan
                rows.append(row)
        append(path, rows)
        print(f"samples seed {seed} done", flush=True)


def paired(df: pd.DataFrame, *, by: str, within: list[str], ref: str = "Diff-ST") -> str:
    """Diff-ST minus every other ``by`` (method or ablation variant) on the same seed, i.e. the same split and test
    tiles, per setting ``within``: mean ± std over seeds and the number of seeds where Diff-ST is better (higher PCC,
    lower RMSE). The seed-to-seed spread of the split is larger than most differences between methods; pairing
    removes it."""
    keys = [*within, "seed"]
    base = df[df[by] == ref].set_index(keys)[["pcc", "rmse"]]
    rows = []
    for labels, other in df[df[by] != ref].groupby([*within, by], sort=False):
        d = (base - other.set_index(keys)[["pcc", "rmse"]]).dropna()
        rows.append({
            **dict(zip([*within, "vs"], labels, strict=True)),
            "Δ PCC": f"{d.pcc.mean():+.3f} ± {d.pcc.std():.3f}", "PCC better": f"{int((d.pcc > 0).sum())}/{len(d)}",
            "Δ RMSE": f"{d.rmse.mean():+.3f} ± {d.rmse.std():.3f}", "RMSE better": f"{int((d.rmse < 0).sum())}/{len(d)}",
        })  # fmt: skip
    return markdown(pd.DataFrame(rows))


#: Per experiment: the columns that make one setting, the column naming what is compared in it, the columns reported.
REPORTS = {
    "quality": (["dataset", "scale"], "method", METRICS),
    "ablation": (["dataset", "scale"], "variant", ["pcc", "rmse", "ssim", "params"]),
    "samples": (["consistency"], "n_samples", ["pcc", "rmse", "lr_consistency", "within_2std", "seconds"]),
    "accuracy": (["dataset", "scale"], "method", ["pcc", "rmse", "ssim", "within_2std", "val_pcc", "train_s"]),
    "coverage": (["dataset", "scale"], "std", ["within_2std", "coverage_val", "median_std_scale"]),
    "base": (["dataset", "scale"], "method", ["pcc"]),
    "flips": (["dataset", "scale", "method"], "average_flips", ["pcc", "rmse", "within_2std", "val_pcc", "seconds"]),
}


#: The issue-10 targets drawn by ``accuracy_figure``: Diff-ST's PCC minus each method's, on the same seed.
TARGETS = {"regression": 0.0, "image floor": 0.02, "bicubic (LR-consistent)": 0.05}


def with_setting(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with a column ``setting``: dataset and scale, e.g. ``"merfish 10×"``."""
    return df.assign(setting=lambda d: d["dataset"] + " " + d["scale"].astype(str) + "×")


#: Dataset names in the accuracy tables of ``docs/benchmarks.md``, in their order there.
ACCURACY_NAMES = {"merfish_roi": "MERFISH small region", "merfish": "MERFISH", "synthetic": "synthetic Xenium"}
ACCURACY_METHODS = ["Diff-ST", "regression", "bicubic", "bicubic (LR-consistent)", "image floor", "TESLA"]


def _delta(pcc: pd.DataFrame, method: str, target: float = 0.0) -> str:
    """Diff-ST minus ``method`` over the seeds (rows of ``pcc``): mean, worst seed, seeds meeting ``target``."""
    x = pcc["Diff-ST"] - pcc[method]
    met = int((x >= target - 1e-12).sum())
    return f"{x.mean():+.3f} (min {x.min():+.3f}; ≥ {target:+.2f} on {met}/{len(x)})"


def _value(v: float, best: bool) -> str:
    return f"**{v:.3f}**" if best else f"{v:.3f}"


def accuracy_tables(df: pd.DataFrame) -> str:
    """The accuracy tables of ``docs/benchmarks.md``: test PCC mean ± std over seeds; Diff-ST minus each method on
    the same seed against the issue's targets; per seed, PCC / RMSE (the best bold), coverage and the guard's
    validation PCC (model alone / guarded / floor)."""
    settings = [(d, s) for d in ACCURACY_NAMES for s in (5, 10) if ((df.dataset == d) & (df.scale == s)).any()]
    methods = [m for m in ACCURACY_METHODS if m in set(df.method)]
    mean = [f"| setting | seeds | {' | '.join(methods)} | coverage |", "|---|---|" + "---|" * (len(methods) + 1)]
    targets = ["| setting | vs regression | vs image floor (target +0.02) | vs LR-consistent bicubic (target +0.05) "
               "| vs TESLA | RMSE below all of regression, floor, LR-cons. bicubic |", "|---|---|---|---|---|---|"]  # fmt: skip
    seeds = [f"| setting | seed | {' | '.join(methods)} | coverage | val: model / guarded / floor |",
             "|---|---|" + "---|" * (len(methods) + 2)]  # fmt: skip
    for dataset, scale in settings:
        c = df[(df.dataset == dataset) & (df.scale == scale)]
        name = f"{ACCURACY_NAMES[dataset]} {scale}×"
        pcc = c.pivot_table(index="seed", columns="method", values="pcc")
        rmse = c.pivot_table(index="seed", columns="method", values="rmse")
        cov = 100 * c[c.method == "Diff-ST"].within_2std
        cells = [f"{pcc[m].mean():.3f}" + (f" ± {pcc[m].std():.3f}" if len(pcc) > 1 else "") for m in methods]
        covs = f"{cov.min():.1f} %" if cov.min() == cov.max() else f"{cov.min():.1f}–{cov.max():.1f} %"
        mean.append(f"| {name} | {len(pcc)} | {' | '.join(cells)} | {covs} |")
        below = rmse[["regression", "image floor", "bicubic (LR-consistent)"]].gt(rmse["Diff-ST"], axis=0).all(axis=1)
        targets.append(f"| {name} | {_delta(pcc, 'regression')} | {_delta(pcc, 'image floor', 0.02)} | "
                       f"{_delta(pcc, 'bicubic (LR-consistent)', 0.05)} | {_delta(pcc, 'TESLA')} | "
                       f"{int(below.sum())}/{len(below)} seeds |")  # fmt: skip
        for seed in pcc.index:
            p, r = pcc.loc[seed], rmse.loc[seed]
            cells = [f"{_value(p[m], m == p.idxmax())} / {_value(r[m], m == r.idxmin())}" for m in methods]
            x = c[(c.seed == seed) & (c.method == "Diff-ST")].iloc[0]
            seeds.append(f"| {name} | {seed} | {' | '.join(cells)} | {100 * x.within_2std:.1f} % | "
                         f"{x.val_pcc_model:.3f} / {x.val_pcc:.3f} / {x.val_pcc_floor:.3f} |")  # fmt: skip
    return "\n\n".join("\n".join(t) for t in (mean, targets, seeds))


def accuracy_figure(df: pd.DataFrame, path: Path) -> None:
    """Diff-ST minus regression, the image floor and LR-consistent bicubic (test PCC), one dot per seed, per setting,
    with the issue's target as a dashed line: paired by seed, so the split's spread does not hide the differences."""
    pcc = with_setting(df).pivot_table(index=["setting", "seed"], columns="method", values="pcc", sort=False)
    settings = list(dict.fromkeys(pcc.index.get_level_values("setting")))
    fig, axes = plt.subplots(1, len(TARGETS), figsize=(4.2 * len(TARGETS), 3.6), layout="constrained", sharey=True)
    for ax, (method, target) in zip(axes, TARGETS.items(), strict=True):
        delta = (pcc["Diff-ST"] - pcc[method]).rename("delta").reset_index()
        for i, setting in enumerate(settings):
            d = delta[delta.setting == setting]["delta"].dropna()
            ax.scatter(np.full(len(d), i), d, s=18, color="C0", zorder=3)
            ax.hlines(d.mean(), i - 0.3, i + 0.3, color="C0", lw=2)
        ax.axhline(target, ls="--", color="C3", lw=1, label=f"target {target:+.2f}")
        ax.axhline(0.0, color="0.6", lw=0.8)
        ax.set_xticks(range(len(settings)), settings, rotation=30, ha="right")
        ax.set_title(f"Diff-ST − {method}")
        ax.legend(loc="upper left", fontsize=8)
    axes[0].set_ylabel("Δ test PCC (per seed; bar: mean)")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    print(f"\nfigure: {path}")


def report(args) -> None:
    def table(df: pd.DataFrame, by: list[str], cols: list[str]) -> str:
        g = df.groupby(by, sort=False)[cols]
        mean, std, n = g.mean(), g.std(), g.size()
        out = mean.copy().astype(object)
        for c in cols:
            if pd.api.types.is_integer_dtype(df[c]):  # a count such as the number of parameters
                out[c] = [f"{m:,.0f}" for m in mean[c]]
                continue
            out[c] = [
                f"{m:.3f} ± {s:.3f}" if np.isfinite(s) else f"{m:.3f}" for m, s in zip(mean[c], std[c], strict=True)
            ]
        out["seeds"] = n
        return markdown(out.reset_index())

    suffix = "_quick" if args.quick else ""
    paths = {name: RESULTS / f"{name}{suffix}.csv" for name in REPORTS}
    results = {name: pd.read_csv(path) for name, path in paths.items() if path.exists()}
    for name, df in results.items():
        within, by, cols = REPORTS[name]
        print(f"\n### {name}\n")
        print(table(df, [*within, by], cols))
    for name in ("quality", "ablation", "accuracy"):
        if name in results:
            within, by, _ = REPORTS[name]
            print(f"\n### {name}: Diff-ST minus each {by}, paired by seed (same split and tiles)\n")
            print(paired(results[name], by=by, within=within))
    if "accuracy" in results:
        print("\n### accuracy: the tables of docs/benchmarks.md\n")
        print(accuracy_tables(results["accuracy"]))
    if "flips" in results:
        print("\n### flips: the mean head averaged over the 8 rotations/flips minus the plain head, same models\n")
        print(flips_table(results["flips"]))
        if "accuracy" in results:
            print("\n### flips: the averaged Diff-ST against the issue's targets (targets: ≥ 0, +0.02, +0.05)\n")
            print(flips_targets(results["flips"], results["accuracy"]))
    if args.accuracy_figure and "accuracy" in results:
        accuracy_figure(results["accuracy"], args.accuracy_figure)
    if args.figure and "quality" in results:
        df = with_setting(results["quality"])
        # one dot per method and setting: the mean over seeds, the bar their standard deviation
        fig, axes = plt.subplots(3, 1, figsize=(9, 9), layout="constrained")
        dst.pl.benchmark(df, metrics=["pcc", "rmse", "ssim"], group_col="setting", kind="dot", axes=axes)
        fig.savefig(args.figure, dpi=110, bbox_inches="tight")
        print(f"\nfigure: {args.figure}")


def _budget(text: str) -> float | None:
    """A time budget in seconds, ``none`` for none (results then do not depend on the machine's load) or ``default``."""
    text = text.strip().lower()
    return text if text == "default" else None if text == "none" else float(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "experiments",
        nargs="+",
        choices=[
            "accuracy",
            "base",
            "coverage",
            "curve",
            "flips",
            "precision",
            "quality",
            "ablation",
            "real",
            "samples",
            "sections",
            "std_steps",
            "report",
        ],
    )
    parser.add_argument(
        "--datasets",
        nargs="*",
        default=["synthetic", "merfish", "merfish_roi"],
        help="accuracy, ablation: default synthetic merfish merfish_roi",
    )
    parser.add_argument(
        "--budget",
        type=_budget,
        default="default",
        help="training time budget in s; 'none': the planned steps whatever the time they take",
    )
    parser.add_argument("--variants", nargs="*", default=["default"], choices=list(VARIANTS),
                        help="real: the default path and the levers to pair with it")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="tiny preset, small slide, one seed")
    parser.add_argument("--seeds", type=int, nargs="*", default=None, help="default: 0 1 2 (0 with --quick)")
    parser.add_argument("--scales", type=int, nargs="*", default=[5, 10], help="quality and ablation: default 5 10")
    parser.add_argument("--fresh", action="store_true", help="discard earlier results of these experiments")
    parser.add_argument("--figure", type=Path, default=None, help="report: also draw the quality table to this PNG")
    parser.add_argument("--accuracy-figure", type=Path, default=None,
                        help="report: also draw Diff-ST minus each baseline of the accuracy table to this PNG")  # fmt: skip
    args = parser.parse_args()
    args.seeds = args.seeds if args.seeds is not None else ([0] if args.quick else list(SEEDS))
    torch.set_num_threads(2)
    dst.settings.verbosity = 0
    print(f"machine: {machine()}")
    global RETRAIN, BUDGET
    RETRAIN = args.fresh
    BUDGET = args.budget
    for exp in args.experiments:
        if args.fresh and exp != "report":
            (RESULTS / f"{exp}{'_quick' if args.quick else ''}.csv").unlink(missing_ok=True)
        experiments = {"accuracy": accuracy, "base": base, "coverage": coverage, "curve": curve, "flips": flips,
                       "precision": precision, "quality": quality, "ablation": ablation, "real": real, "samples": samples, "sections": sections, "std_steps": std_steps,
                       "report": report}  # fmt: skip
        experiments[exp](args)


if __name__ == "__main__":
    main()
