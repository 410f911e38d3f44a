"""Super-resolving a spot slide from that slide alone (issue 12): simulated Visium with truth, and real held-out spots.

Experiments (each appends rows to ``benchmarks/results/visium_<experiment>.csv`` and skips the cells already there;
``--fresh`` starts over):

``simulated``
    Visium-like spots made from a transcript dataset with the ``visium`` degradation (55 µm discs on a 100 µm
    hexagonal lattice, each disc's counts laid on the LR pixel of its centre), so the HR truth is known. Diff-ST
    trained from the spots alone (``supervision="lr"``; the HR is never read) is scored against the binned
    transcripts on the test tiles, beside bicubic and nearest up-sampling of the spots (LR-consistent), the image
    floor, TESLA (when installed) and Diff-ST trained *with* the HR truth of the same slide (``supervision="hr"``,
    the upper reference). Datasets: ``synthetic`` = ``synthetic_xenium(seed=s)`` (3 mm), 25 genes, 100 µm → 10 µm;
    ``merfish`` = the 500 × 450 µm MERFISH crop, which holds only about 20 spots of real Visium size, so its lattice
    is Visium's scaled down four times (14 µm discs, 25 µm pitch, about 360 spots), 25 µm → 5 µm.
``her2st``
    The six HER2+ ST sections (100 µm spots, 200 µm apart; no HR truth), LR 100 µm → HR 20 µm, each trained on its
    own, with the study's 25 genes (ranked by spatial variability on every section, see ``her2st_loso``, so that
    the spots of all six can be pooled). Training sees the train tiles only; the test tiles (a spatially blocked 15 %) are never trained on. Each test spot is predicted
    while hidden (the leave-spots-out protocol of ``diffst.model.weak``: the test tiles' spots are split in two
    random halves, each half predicted from the image and the other half), the map is degraded through the spot
    discs and compared with the measured counts: PCC per gene over the test spots on the normalised scale, averaged
    over genes. The same split and protocol for every method: Diff-ST, bicubic, nearest-spot (each hidden spot takes
    its nearest measured neighbours' level), the image floor and TESLA (run on each window from the spots left
    visible, as ``dst.tl.tesla`` runs it on a tile).

``her2st_loso``
    Leave one section out: one model trained from the spots of five her2st sections together (``dst.tl.train`` with
    a list; each section with its own normalisation, all of its tiles used: 85 % train, 15 % validation) and
    applied to the sixth, which it never saw. The 25 genes are the study's: ranked by spatial variability on each
    training section (``prepare``'s Moran's I, top 200), the 25 with the highest summed rank score (the held-out
    section plays no part). Scored as ``her2st`` on the held-out section's spots, each predicted while hidden: on its
    test tiles (the tiles of the single-section benchmark) and on all its spots. The per-spot predictions go to
    ``results/her2st_spots/`` so that ``report`` pools them over the six sections with a bootstrap interval.

``slide``
    A whole synthetic Visium capture area (6.5 mm, about 4,000 spots, 25 genes) trained from its spots with the
    package defaults (default preset, 600 s time budget): wall time, steps, why it stopped, and the test tiles'
    held-out spots (``dst.tl.evaluate_spots``).

    DIFFST_DATA_DIR=../shared/data python benchmarks/bench_visium.py simulated her2st --budget 180
    python benchmarks/bench_visium.py slide
    python benchmarks/bench_visium.py simulated --quick          # smoke: tiny preset, small slide, one seed
    python benchmarks/bench_visium.py report                     # tables from the CSVs (markdown)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from _common import append, guard_dict, markdown, run_experiments
from _pooled import SECTIONS, SPOTS, pooled

import diffst as dst
from diffst.metrics import pearson, rmse
from diffst.model import weak
from diffst.tl._baselines import _rgb_uint8, _tesla_imputation, tesla_window
from diffst.tl._data import Prepared
from diffst.tl._guard import heldout_spots, spot_blend

RESULTS = Path(__file__).parent / "results"
CACHE = Path(__file__).parent / ".cache"


def load_simulated(dataset: str, seed: int):
    if dataset == "synthetic":
        sdata = dst.datasets.synthetic_xenium(seed=seed, boundaries=False)
        dst.pp.prepare(sdata, genes=25, scale=10, lr_um=100, degradation="visium", tile_um=400,
                       image_key="he_image", seed=seed)  # fmt: skip
        return sdata
    sdata = dst.datasets.merfish_mouse_brain()
    dst.pp.prepare(sdata, genes=25, scale=5, lr_um=25, degradation="visium", tile_um=100, seed=seed)
    return sdata


def train(sdata, tag: str, seed: int, args, supervision: str):
    run = CACHE / "runs" / (f"{tag}_quick" if args.quick else tag)
    if (run / "model.pt").exists() and not args.fresh:
        return dst.DiffST.load(run / "model.pt")
    extra = {"max_epochs": 2} if args.quick else {}
    return dst.tl.train(sdata, preset="tiny" if args.quick else "default", seed=seed, checkpoint_dir=run,
                        overwrite=True, supervision=supervision, time_budget=args.budget, **extra)  # fmt: skip


def score(sdata, key: str, **labels) -> dict:
    row = dst.tl.evaluate(sdata, key=key).loc["mean"]
    return {**labels, **{m: float(row[m]) for m in ("pcc", "rmse", "ssim", "lr_consistency") if m in row}}


def simulated(args) -> None:
    path = RESULTS / f"visium_simulated{'_quick' if args.quick else ''}.csv"
    prev = pd.read_csv(path) if path.exists() else pd.DataFrame()
    for dataset in args.datasets:
        for seed in args.seeds:
            if not prev.empty and ((prev.dataset == dataset) & (prev.seed == seed)).any():
                continue
            t0 = time.perf_counter()
            sdata = load_simulated(dataset, seed)
            labels = {"dataset": dataset, "seed": seed}
            rows = []
            for name, supervision in (("Diff-ST (spots only)", "lr"), ("Diff-ST (HR truth)", "hr")):
                model = train(sdata, f"visium_{dataset}_{seed}_{supervision}", seed, args, supervision)
                dst.tl.super_resolve(sdata, model=model, seed=seed, key_added="sr", overwrite=True)
                guard = guard_dict(model)
                rows.append(score(sdata, "sr", method=name, steps=model.info["steps"], train_s=model.info["seconds"],
                                  stopped_by=model.info["stopped_by"],
                                  val_pcc=guard.get("validation", {}).get("model", {}).get("pcc"), **labels))  # fmt: skip
            for name, kw in (("bicubic of spots", {"method": "bicubic", "consistency": True}),
                             ("nearest spot", {"method": "nearest", "consistency": True}),
                             ("image floor", {"method": "image"})):  # fmt: skip
                dst.tl.upsample(sdata, key_added="base_sr", overwrite=True, **kw)
                rows.append(score(sdata, "base_sr", method=name, **labels))
            try:
                dst.tl.tesla(sdata)
                rows.append(score(sdata, "tesla_sr", method="TESLA", **labels))
            except ImportError as e:
                print(f"TESLA skipped: {e}")
            append(path, rows)
            print(f"simulated {dataset} seed {seed}: {time.perf_counter() - t0:.0f} s", flush=True)


def tesla_predictor(model, gene_scale, imputation):
    """A factory for :func:`heldout_spots`: TESLA on each window, from the spots the protocol leaves visible.

    As ``dst.tl.tesla`` runs it (superpixels on the HR pixel centres, ``log1p`` counts per HR pixel of the measured
    spots, colour averaged over one HR pixel), on the window image the model sees (``image_um`` per pixel, so TESLA's
    ``res`` is the model's image pixels per HR pixel); HR pixels TESLA leaves NaN take the window's mean.
    """
    cfg, genes = model.config, list(model.genes)
    scale = torch.as_tensor(np.asarray(gene_scale, dtype=np.float32))
    res = cfg.image_per_hr
    lo, hi = res // 2, res - res // 2

    def factory(image):
        def predict(lr, mask):
            log_lr = torch.log1p(weak.to_counts(lr, scale)).numpy()
            out = []
            for b in range(lr.shape[0]):
                img = np.pad(image[b].numpy(), ((0, 0), (lo, hi), (lo, hi)), mode="edge")
                vals = tesla_window(imputation, _rgb_uint8(img), log_lr[b], mask[b, 0].numpy() > 0, genes,
                                    scale=cfg.scale, res=res)  # fmt: skip
                fill = np.nanmean(vals, axis=(1, 2), keepdims=True)
                out.append(np.where(np.isnan(vals), np.nan_to_num(fill), vals))
            return weak.to_units(torch.from_numpy(np.expm1(np.stack(out))), scale)

        return predict

    return factory


def her2st(args) -> None:
    path = RESULTS / f"visium_her2st{'_quick' if args.quick else ''}.csv"
    prev = pd.read_csv(path) if path.exists() else pd.DataFrame()
    sections = args.sections[:1] if args.quick else args.sections
    for section in sections:
        for seed in args.seeds:
            if not prev.empty and ((prev.section == section) & (prev.seed == seed)).any():
                continue
            t0 = time.perf_counter()
            sdata = dst.datasets.her2st(section)
            # the study's genes (the same for every section, so that the spots of all six can be pooled)
            dst.pp.prepare(sdata, genes=study_genes(list(SECTIONS)), lr_um=100, scale=5, seed=seed)  # 800 µm tiles
            prep = Prepared.from_sdata(sdata, "diffst")
            model = train(sdata, f"her2st_{section}_{seed}", seed, args, "lr")
            try:
                extra = {"tesla": tesla_predictor(model, model.gene_scale_for(prep), _tesla_imputation())}
            except ImportError as e:
                print(f"TESLA skipped: {e}")
                extra = {}
            maps = heldout_spots(sdata, prep, model, split="test", seed=seed, extra=extra)
            labels = {"section": section, "seed": seed, "spots": int(maps["truth"].shape[1])}
            alpha = guard_dict(model).get("alpha")
            if alpha is not None:  # what super_resolve writes: each gene blended with the floor by validation's α
                maps["guarded"] = spot_blend(maps, alpha, model.gene_scale_for(prep))
            rows = spot_rows(maps, model, labels)
            save_spots(f"single_{section}_{seed}_test", maps, args)
            append(path, rows)
            print(f"her2st {section} seed {seed}: {time.perf_counter() - t0:.0f} s", flush=True)


#: Genes ranked per section for the study's gene list, and the study's gene count.
RANKED, STUDY_GENES = 200, 25


def ranked_genes(section: str) -> list[str]:
    """The section's genes ranked by spatial variability (``prepare``'s Moran's I), cached in the benchmark cache."""
    path = CACHE / "her2st_ranked" / f"{section}.txt"
    if path.exists():
        return path.read_text().split()
    sdata = dst.datasets.her2st(section)
    dst.pp.prepare(sdata, genes=RANKED, lr_um=100, scale=5)
    genes = list(sdata.attrs["diffst"]["genes"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(genes))
    return genes


def panel() -> set[str]:
    """The genes every section's count table has (a gene a section lacks cannot be applied to it)."""
    path = CACHE / "her2st_ranked" / "panel.txt"
    if path.exists():
        return set(path.read_text().split())
    genes = set.intersection(*(set(dst.datasets.her2st(s)["table"].var_names) for s in SECTIONS))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(sorted(genes)))
    return genes


def study_genes(sections: list[str]) -> list[str]:
    """The genes of the training sections: the highest summed rank score over their spatial-variability rankings,
    among the genes of the panel every section measures."""
    score: dict[str, int] = {}
    for section in sections:
        for rank, gene in enumerate(ranked_genes(section)):
            score[gene] = score.get(gene, 0) + RANKED - rank
    common = panel()
    ranked = sorted(((g, v) for g, v in score.items() if g in common), key=lambda kv: (-kv[1], kv[0]))
    return [g for g, _ in ranked[:STUDY_GENES]]


def spot_rows(maps: dict, model, labels: dict) -> list[dict]:
    """PCC and RMSE per method over the spots of ``maps`` (per gene, then averaged), with the guarded Diff-ST."""
    rows = []
    for name, key in (("Diff-ST (spots only)", "mean"), ("bicubic of spots", "bicubic"), ("nearest spot", "nearest"),
                      ("image floor", "floor"), ("TESLA", "tesla"), ("Diff-ST (guarded)", "guarded")):  # fmt: skip
        if key not in maps:
            continue
        pcc = [pearson(p, t) for p, t in zip(maps[key], maps["truth"], strict=True)]
        err = [rmse(p, t) for p, t in zip(maps[key], maps["truth"], strict=True)]
        rows.append({**labels, "method": name, "pcc": float(np.nanmean(pcc)), "rmse": float(np.nanmean(err)),
                     **({"steps": model.info["steps"], "train_s": model.info["seconds"],
                         "stopped_by": model.info["stopped_by"]} if key == "mean" else {})})  # fmt: skip
    return rows


def her2st_loso(args) -> None:
    path = RESULTS / f"visium_her2st_loso{'_quick' if args.quick else ''}.csv"
    prev = pd.read_csv(path) if path.exists() else pd.DataFrame()
    sections = args.sections[:1] if args.quick else args.sections
    for section in sections:
        for seed in args.seeds:
            if not prev.empty and ((prev.section == section) & (prev.seed == seed)).any():
                continue
            t0 = time.perf_counter()
            others = [s for s in SECTIONS if s != section]
            genes = study_genes(others)
            training = []
            for other in others:
                sdata = dst.datasets.her2st(other)
                dst.pp.prepare(sdata, genes=genes, lr_um=100, scale=5, split=(0.85, 0.15, 0.0), seed=seed)
                training.append(sdata)
            run = CACHE / "runs" / f"her2st_loso_{section}_{seed}{'_quick' if args.quick else ''}"
            extra = {"max_epochs": 2} if args.quick else {}
            model = dst.tl.train(training, preset="tiny" if args.quick else "default", seed=seed, checkpoint_dir=run,
                                 overwrite=True, time_budget=args.budget, **extra)  # fmt: skip
            held = dst.datasets.her2st(section)
            dst.pp.prepare(held, genes=genes, lr_um=100, scale=5, seed=seed)  # the single-section benchmark's tiles
            prep = Prepared.from_sdata(held, "diffst")
            try:
                tesla = {"tesla": tesla_predictor(model, model.gene_scale_for(prep), _tesla_imputation())}
            except ImportError as e:
                print(f"TESLA skipped: {e}")
                tesla = {}
            rows = []
            everywhere = np.zeros(prep.grid.lr_shape, dtype=bool)
            t = prep.tile_lr
            for r0, c0 in zip(prep.tiles(held)["lr_row0"], prep.tiles(held)["lr_col0"], strict=True):
                everywhere[r0 : r0 + t, c0 : c0 + t] = True
            for scope, where in (("test tiles", {"split": "test"}), ("all spots", {"region": everywhere})):
                maps = heldout_spots(held, prep, model, seed=seed, extra=tesla, **where)
                alpha = guard_dict(model).get("alpha")
                if alpha is not None:
                    maps["guarded"] = spot_blend(maps, alpha, model.gene_scale_for(prep))
                labels = {"section": section, "seed": seed, "scope": scope, "spots": int(maps["truth"].shape[1])}
                rows.extend(spot_rows(maps, model, labels))
                save_spots(f"loso_{section}_{seed}_{scope.split()[0]}", maps, args)
            append(path, rows)
            print(f"her2st_loso {section} seed {seed}: {time.perf_counter() - t0:.0f} s", flush=True)


def save_spots(name: str, maps: dict, args) -> None:
    """The per-spot predictions (model units, genes × spots) of every method, for the pooled bootstrap of ``report``."""
    if args.quick:
        return
    SPOTS.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(SPOTS / f"{name}.npz", **{k: np.asarray(v, dtype=np.float32) for k, v in maps.items()})


def slide(args) -> None:
    path = RESULTS / f"visium_slide{'_quick' if args.quick else ''}.csv"
    if path.exists() and not args.fresh:
        print(pd.read_csv(path).to_string())
        return
    t0 = time.perf_counter()
    sdata = dst.datasets.synthetic_visium(size_um=3000.0 if args.quick else "slide", n_genes=50, seed=0)
    dst.pp.prepare(sdata, genes=25)
    prepared_s = time.perf_counter() - t0
    spots = len(sdata["diffst_spots"]) if "diffst_spots" in sdata.shapes else None
    t1 = time.perf_counter()
    model = dst.tl.train(sdata, preset="tiny" if args.quick else "default", checkpoint_dir=CACHE / "runs" / "slide",
                         overwrite=True)  # fmt: skip
    wall = time.perf_counter() - t1
    scores = dst.tl.evaluate_spots(sdata, model=model)
    pcc = scores.xs("pcc", axis=1, level="metric").loc["mean"]
    row = {"spots": spots, "prepare_s": prepared_s, "train_wall_s": wall, "trained_s": model.info["seconds"],
           "steps": model.info["steps"], "planned_steps": model.info["planned_steps"],
           "stopped_by": model.info["stopped_by"], "test_spots": scores.attrs["spots"],
           **{f"pcc_{k}": float(v) for k, v in pcc.items()}}  # fmt: skip
    append(path, [row])
    print(pd.DataFrame([row]).to_string())


def report(args) -> None:
    for name, by in (("simulated", "dataset"), ("her2st", "section"), ("her2st_loso", "section")):
        path = RESULTS / f"visium_{name}{'_quick' if args.quick else ''}.csv"
        if not path.exists():
            continue
        df = pd.read_csv(path)
        index = [by, "seed"] + (["scope"] if "scope" in df else [])
        table = df.pivot_table(index=index, columns="method", values="pcc")
        print(f"\n### {name}: PCC (rows: {', '.join(index)})\n")
        print(table.round(3).pipe(markdown, index=True))
        ref = "Diff-ST (spots only)"
        diffs = table.drop(columns=[ref]).rsub(table[ref], axis=0)
        print(f"\n{ref} minus each method (paired, same tiles):\n")
        print(diffs.round(3).pipe(markdown, index=True))
    for prefix, scope, title in (("single", "test", "one section at a time, test-tile spots"),
                                 ("loso", "test", "leave one section out, test-tile spots"),
                                 ("loso", "all", "leave one section out, all spots of the held-out section")):  # fmt: skip
        df = pooled(prefix, scope, args.seeds)
        if df is None:
            continue
        print(f"\n### her2st pooled over the six sections: {title}\n")
        print("PCC over the pooled spots, its difference to nearest-spot and the bootstrap 95 % interval of the "
              "difference (spots resampled within each section), per seed:\n")  # fmt: skip
        print(df.round(3).pipe(markdown))


def _budget(text: str) -> float | None:
    """A time budget in seconds, or ``none`` for none (results then do not depend on the machine's load)."""
    return None if text.strip().lower() == "none" else float(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiments", nargs="+", choices=["simulated", "her2st", "her2st_loso", "slide", "report"])
    parser.add_argument("--datasets", nargs="*", default=["synthetic", "merfish"])
    parser.add_argument("--sections", nargs="*", default=list(SECTIONS))
    parser.add_argument("--seeds", type=int, nargs="*", default=None, help="default: 0 1 2 (0 with --quick)")
    parser.add_argument(
        "--budget",
        type=_budget,
        default=180.0,
        help="training time budget in s; 'none': the planned steps whatever the time they take",
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--fresh", action="store_true")
    args = parser.parse_args()
    args.seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1, 2])
    run_experiments(args, "visium", {"simulated": simulated, "her2st": her2st, "her2st_loso": her2st_loso,
                                     "slide": slide, "report": report})  # fmt: skip


if __name__ == "__main__":
    main()
