"""Image encoders (issue 14): feature-extraction throughput, and Diff-ST on weight-free features vs the learned encoder.

Experiments (each appends rows to ``benchmarks/results/features_<experiment>.csv`` and skips the cells already there;
``--fresh`` starts over):

``throughput``
    ``dst.pp.image_features`` over a whole synthetic Visium capture area (6.5 mm, H&E at 0.5 µm/px, the prepared
    tissue tiles) with the weight-free ``stain`` encoder and with a ViT-S-sized timm model
    (``vit_small_patch16_224``, random weights: the same computation as pretrained ones) at 0.5 µm/px: seconds,
    mm² of tissue tiles per minute, peak resident memory. ``--encoders`` picks them; the timm one needs timm (run it
    in an environment where timm imports, e.g. CI's ``.venv-timm``).
``accuracy``
    Diff-ST (default preset, ``--budget`` seconds of training) with the learned image encoder and with the ``stain``
    features, paired on the same data, split and seed: the synthetic Xenium slide at 10× and the MERFISH crop at 5×
    (as ``bench_quality.py accuracy`` prepares them), seeds 0–2; test-tile PCC/RMSE beside the image floor.

    python benchmarks/bench_features.py throughput --encoders stain
    .venv-timm/bin/python benchmarks/bench_features.py throughput --encoders vit_s
    DIFFST_DATA_DIR=../shared/data python benchmarks/bench_features.py accuracy --budget 180
    python benchmarks/bench_features.py report
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import torch
from _common import append, guard_dict, machine, markdown, measure, run_experiments

import diffst as dst

RESULTS = Path(__file__).parent / "results"
CACHE = Path(__file__).parent / ".cache"
ENCODERS = {"stain": ("stain", {}), "vit_s": ("timm:vit_small_patch16_224", {"pretrained": False})}


def throughput(args) -> None:
    path = RESULTS / f"features_throughput{'_quick' if args.quick else ''}.csv"
    prev = pd.read_csv(path) if path.exists() else pd.DataFrame()
    sdata = dst.datasets.synthetic_visium(size_um=3000.0 if args.quick else "slide", n_genes=50, seed=0)
    dst.pp.prepare(sdata, genes=25)
    prep = sdata.attrs["diffst"]
    tiles = sdata[prep["elements"]["tiles"]]
    area = len(tiles) * (prep["tile_um"] / 1000.0) ** 2
    for name in args.encoders:
        if not prev.empty and (prev.encoder == name).any():
            continue
        spec, kw = ENCODERS[name]
        with measure() as m:
            dst.pp.image_features(sdata, encoder=spec, progress=False, overwrite=True, **kw)
        info = sdata.attrs["diffst"]["image_features"]
        row = {"encoder": name, "spec": spec, "um_per_px": info["um_per_px"], "dim": info["encoder"]["dim"],
               "tiles": len(tiles), "area_mm2": area, "seconds": m["seconds"],
               "mm2_per_min": area / m["seconds"] * 60, "peak_rss_gib": m["peak_rss_gib"],
               "peak_increase_gib": m["peak_increase_gib"], "machine": machine(),
               "threads": torch.get_num_threads()}  # fmt: skip
        print(row, flush=True)
        append(path, [row])


def accuracy(args) -> None:
    from bench_quality import load

    path = RESULTS / f"features_accuracy{'_quick' if args.quick else ''}.csv"
    prev = pd.read_csv(path) if path.exists() else pd.DataFrame()
    for dataset, scale in (("synthetic", 10), ("merfish", 5)):
        if dataset not in args.datasets:
            continue
        for seed in args.seeds:
            if not prev.empty and ((prev.dataset == dataset) & (prev.seed == seed)).any():
                continue
            t0 = time.perf_counter()
            sdata = load(dataset, scale, seed, args.quick)
            rows = []
            for encoder in ("learned", "stain"):
                run = CACHE / "runs" / f"features_{dataset}_{scale}_{seed}_{encoder}{'_quick' if args.quick else ''}"
                extra = {"max_epochs": 2} if args.quick else {}
                model = dst.tl.train(sdata, preset="tiny" if args.quick else "default", seed=seed, checkpoint_dir=run,
                                     overwrite=True, time_budget=args.budget, image_encoder=encoder, **extra)  # fmt: skip
                dst.tl.super_resolve(sdata, model=model, seed=seed, key_added="sr", overwrite=True)
                row = dst.tl.evaluate(sdata, key="sr").loc["mean"]
                guard = guard_dict(model).get("validation", {})
                rows.append({"dataset": dataset, "scale": scale, "seed": seed, "encoder": encoder,
                             "pcc": float(row["pcc"]), "rmse": float(row["rmse"]), "steps": model.info["steps"],
                             "train_s": model.info["seconds"], "stopped_by": model.info["stopped_by"],
                             "val_pcc_model": guard.get("model", {}).get("pcc"),
                             "val_pcc_floor": guard.get("image_floor", {}).get("pcc")})  # fmt: skip
            dst.tl.upsample(sdata, method="image", key_added="floor_sr", overwrite=True)
            row = dst.tl.evaluate(sdata, key="floor_sr").loc["mean"]
            rows.append({"dataset": dataset, "scale": scale, "seed": seed, "encoder": "image floor",
                         "pcc": float(row["pcc"]), "rmse": float(row["rmse"])})  # fmt: skip
            append(path, rows)
            print(f"{dataset} {scale}x seed {seed}: {time.perf_counter() - t0:.0f} s", flush=True)


def report(args) -> None:
    path = RESULTS / "features_throughput.csv"
    if path.exists():
        print("\n### throughput\n")
        print(pd.read_csv(path).round(3).pipe(markdown))
    path = RESULTS / f"features_accuracy{'_quick' if args.quick else ''}.csv"
    if path.exists():
        df = pd.read_csv(path)
        table = df.pivot_table(index=["dataset", "scale", "seed"], columns="encoder", values=["pcc", "rmse"])
        print("\n### accuracy (test tiles)\n")
        print(table.round(3).pipe(markdown, index=True))
        pcc = df.pivot_table(index=["dataset", "scale", "seed"], columns="encoder", values="pcc")
        print("\nstain minus learned (PCC, paired):\n")
        print((pcc["stain"] - pcc["learned"]).round(3).pipe(markdown, index=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiments", nargs="+", choices=["throughput", "accuracy", "report"])
    parser.add_argument("--encoders", nargs="*", default=["stain", "vit_s"], choices=list(ENCODERS))
    parser.add_argument("--datasets", nargs="*", default=["synthetic", "merfish"])
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--budget", type=float, default=180.0, help="training time budget in s")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--fresh", action="store_true")
    args = parser.parse_args()
    run_experiments(args, "features", {"throughput": throughput, "accuracy": accuracy, "report": report})


if __name__ == "__main__":
    main()
