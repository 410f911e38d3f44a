"""The tables of the README and the documentation, made from ``benchmarks/results/``: one source for every number.

Each table sits in a markdown file between ``<!-- table: NAME -->`` and ``<!-- /table -->``; this script rewrites
what is between them from the results CSVs, with the date, commit and machine they were measured on
(``results/meta.json``). ``tests/test_docs.py`` fails when a table in the docs differs from what it makes.

    python benchmarks/tables.py            # rewrite the tables of README.md and docs/*.md
    python benchmarks/tables.py --check    # list the tables that differ, exit status 1 if any
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).parent
RESULTS = HERE / "results"
ROOT = HERE.parent
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"(<!-- table: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /table -->)", re.S)

sys.path.insert(0, str(HERE))
from _common import markdown  # noqa: E402


def _csv(name: str) -> pd.DataFrame:
    return pd.read_csv(RESULTS / name)


def _provenance(*names: str, command: str) -> str:
    meta = json.loads((RESULTS / "meta.json").read_text())
    parts = []
    for name in names:
        m = meta.get(name, {})
        parts.append(f"`results/{name}`: {m.get('date', '?')}, commit {m.get('commit', '?')}, {m.get('machine', '?')}")
    return f"*Made from {'; '.join(parts)} (`{command}`).*"


def _pm(x: pd.Series) -> str:
    return f"{x.mean():.3f} ± {x.std():.3f}" if len(x) > 1 else f"{x.mean():.3f}"


# --------------------------------------------------------------------------------------------------------------------
# Real tissue (issue 26): the default path, the levers, the learning curve, her2st
# --------------------------------------------------------------------------------------------------------------------
REAL_NAMES = {"merfish": "MERFISH, whole crop", "merfish_small": "MERFISH, 300 × 300 µm region"}
REAL_COMMAND = "cd benchmarks && python bench_quality.py real --budget none ..."


def _real_default() -> pd.DataFrame:
    df = _csv("real.csv")
    return df[df.variant == "default"]


def _real_pcc(df: pd.DataFrame) -> pd.DataFrame:
    return df.pivot_table(index=["dataset", "scale", "seed"], columns="method", values="pcc")


def real() -> str:
    """Per setting: test PCC (mean ± std over seeds) of the default path, the image floor and LR-consistent bicubic,
    and Diff-ST minus the floor on the same seed (mean, worst seed, seeds above the floor)."""
    pcc = _real_pcc(_real_default())
    rows = []
    for (dataset, scale), x in pcc.groupby(level=[0, 1], sort=False):
        d = x["Diff-ST"] - x["image floor"]
        rows.append({
            "setting": f"{REAL_NAMES.get(dataset, dataset)}, {scale}×", "seeds": len(x),
            "Diff-ST": _pm(x["Diff-ST"]), "image floor": _pm(x["image floor"]),
            "bicubic (LR-consistent)": _pm(x["bicubic (LR-consistent)"]),
            "Diff-ST − floor": f"{d.mean():+.3f} (worst {d.min():+.3f}; above on {int((d > 0).sum())}/{len(d)})",
            "Diff-ST − bicubic": f"{(x['Diff-ST'] - x['bicubic (LR-consistent)']).mean():+.3f}",
        })  # fmt: skip
    return markdown(pd.DataFrame(rows)) + "\n\n" + _provenance("real.csv", command=REAL_COMMAND)


def real_levers() -> str:
    """Each lever minus the default path on the same data, split and seed: test PCC."""
    df = _csv("real.csv")
    runs = df[df.method == "Diff-ST"].pivot_table(index=["dataset", "scale", "seed"], columns="variant", values="pcc")
    rows = []
    for (dataset, scale), x in runs.groupby(level=[0, 1], sort=False):
        for lever in [c for c in x.columns if c != "default"]:
            d = (x[lever] - x["default"]).dropna()
            if d.empty:
                continue
            rows.append({
                "setting": f"{REAL_NAMES.get(dataset, dataset)}, {scale}×", "lever": lever, "seeds": len(d),
                "default": f"{x.loc[d.index, 'default'].mean():.3f}", "with the lever": f"{x.loc[d.index, lever].mean():.3f}",
                "Δ PCC": f"{d.mean():+.4f} (min {d.min():+.4f}, max {d.max():+.4f})", "higher": f"{int((d > 0).sum())}/{len(d)}",
            })  # fmt: skip
    return markdown(pd.DataFrame(rows)) + "\n\n" + _provenance("real.csv", command=REAL_COMMAND)


def curve() -> str:
    """Diff-ST minus the image floor on the same test tiles against the training area (mean over seeds)."""
    df = _csv("curve.csv")
    piv = df.pivot_table(index=["dataset", "scale", "side", "seed"], columns="method", values="pcc")
    area = df[df.method == "Diff-ST"].groupby(["dataset", "scale", "side"]).train_mm2.mean()
    rows = []
    for (dataset, scale, side), x in piv.groupby(level=[0, 1, 2], sort=False):
        d = x["Diff-ST"] - x["image floor"]
        rows.append({
            "data": f"{'MERFISH' if dataset == 'merfish' else 'synthetic Xenium'} {scale}×",
            "training area (mm²)": f"{area[dataset, scale, side]:.3f}", "seeds": len(x),
            "Diff-ST": f"{x['Diff-ST'].mean():.3f}", "image floor": f"{x['image floor'].mean():.3f}",
            "Diff-ST − floor": f"{d.mean():+.3f} (min {d.min():+.3f})",
        })  # fmt: skip
    out = pd.DataFrame(rows).sort_values(["data", "training area (mm²)"], key=lambda c: c.map(_sort_key))
    return (
        markdown(out)
        + "\n\n"
        + _provenance("curve.csv", command="cd benchmarks && python bench_quality.py curve --budget none ...")
    )


def sections() -> str:
    """One synthetic slide against two in one model, on the first slide's test tiles and on a slide neither saw."""
    df = _csv("sections.csv")
    df["arm"] = np.where(df.method == "Diff-ST", "Diff-ST, trained on " + df.trained_on.fillna(""), df.method)
    piv = df.pivot_table(index=["scale", "slide", "seed"], columns="arm", values="pcc")
    rows = []
    for (scale, slide), x in piv.groupby(level=[0, 1], sort=False):
        for arm in [c for c in x.columns if c.startswith("Diff-ST")] + ["image floor", "bicubic (LR-consistent)"]:
            d = x[arm] - x["image floor"]
            rows.append({
                "scored on (test tiles)": f"slide {slide}" + (" (trained on)" if slide == "A" else " (never seen)"),
                "scale": f"{scale}×", "method": arm, "seeds": len(x), "PCC": f"{x[arm].mean():.3f}",
                "− image floor": "" if arm == "image floor" else f"{d.mean():+.3f} (min {d.min():+.3f})",
            })  # fmt: skip
    return (
        markdown(pd.DataFrame(rows))
        + "\n\n"
        + _provenance(
            "sections.csv", command="cd benchmarks && python bench_quality.py sections --scales 10 --seeds 0 1 2"
        )
    )


def std_steps() -> str:
    """The calibrated std with the sampler at each number of steps measured, on the same real-tissue models."""
    df = _csv("std_steps.csv")
    steps = sorted(df.steps.unique(), reverse=True)
    rows = []
    for (d, sc, seed), x in df.groupby(["dataset", "scale", "seed"], sort=False):
        by = {int(n): x[x.steps == n].iloc[0] for n in steps if (x.steps == n).any()}
        arrow = " → ".join
        rows.append({
            "data, seed": f"{REAL_NAMES.get(d, d)}, {sc}×, seed {seed}",
            f"within mean ± 2 std, {arrow(str(n) for n in by)} steps": arrow(f"{r.within_2std:.3f}" for r in by.values()),
            "test PCC": arrow(f"{r.pcc:.4f}" for r in by.values()),
            "`n_samples=4` time (s)": arrow(f"{r.seconds:.1f}" for r in by.values()),
        })  # fmt: skip
    return (
        markdown(pd.DataFrame(rows))
        + "\n\n"
        + _provenance("std_steps.csv", command="cd benchmarks && python bench_quality.py std_steps --datasets merfish")
    )


def _sort_key(v):
    try:
        return float(v)
    except ValueError:
        return v


HER2ST_METHODS = [
    "Diff-ST (spots only)",
    "Diff-ST (guarded)",
    "nearest spot",
    "bicubic of spots",
    "image floor",
    "TESLA",
]


def her2st_loso() -> str:
    """Leave one section out: PCC per held-out section (test-tile spots and all spots), mean over seeds."""
    df = _csv("visium_her2st_loso.csv")
    piv = df.pivot_table(index=["scope", "section"], columns="method", values="pcc", aggfunc="mean")
    spots = df.groupby(["scope", "section"]).spots.first()
    seeds = df.groupby(["scope", "section"]).seed.nunique()
    out = piv[[m for m in HER2ST_METHODS if m in piv.columns]].round(3)
    out.insert(0, "seeds", seeds)
    out.insert(0, "spots", spots)
    out = out.sort_index(level=0, ascending=False)
    return (
        markdown(out, index=True)
        + "\n\n"
        + _provenance(
            "visium_her2st_loso.csv", command="cd benchmarks && python bench_visium.py her2st_loso --budget none"
        )
    )


def her2st_pooled() -> str:
    """The held-out spots of the six sections pooled: PCC, difference to nearest-spot and its bootstrap interval."""
    import _pooled

    parts = []
    for prefix, scope, title in (("loso", "all", "leave one section out, all spots of the held-out section"),
                                 ("loso", "test", "leave one section out, the test tiles' spots"),
                                 ("single", "test", "each section trained on its own, the test tiles' spots")):  # fmt: skip
        df = _pooled.pooled(prefix, scope, [0, 1, 2])
        if df is None:
            continue
        df = df.assign(
            interval=[f"[{lo:+.3f}, {hi:+.3f}]" for lo, hi in zip(df.ci_low, df.ci_high, strict=True)],
            pcc=df.pcc.map("{:.3f}".format), minus_nearest=df.minus_nearest.map("{:+.3f}".format),
        )[["seed", "spots", "method", "pcc", "minus_nearest", "interval"]]  # fmt: skip
        df = df.rename(columns={"minus_nearest": "− nearest spot", "interval": "95 % interval of the difference"})
        parts.append(f"**{title}**\n\n" + markdown(df))
    return (
        "\n\n".join(parts)
        + "\n\n"
        + _provenance(
            "visium_her2st_loso.csv", "visium_her2st.csv", command="cd benchmarks && python bench_visium.py report"
        )
    )


# --------------------------------------------------------------------------------------------------------------------
# Speed
# --------------------------------------------------------------------------------------------------------------------
def slides() -> str:
    """Whole-slide super-resolution with the defaults, with n_samples=4 and in float32, and train's time outside its
    loop."""
    df = _csv("slides.csv")
    sr = df[df.what == "super_resolve"]
    rows = [{
        "slide": f"{r.side_mm:g} mm × {r.side_mm:g} mm", "n_samples": int(r.n_samples),
        "precision": r.precision + (" (default)" if r.precision_asked == "auto" else ""),
        "wall time": f"{r.seconds:.0f} s", "peak memory": f"{r.peak_rss_gib:.2f} GiB", "network calls": int(r.calls),
        "windows through the network": int(r.windows),
    } for r in sr.itertuples()]  # fmt: skip
    t = df[df.what != "super_resolve"]
    note = (
        ""
        if t.empty
        else f"`train(max_epochs=1)` on the {t.iloc[0].side_mm:g} mm slide: {t.iloc[0].seconds:.0f} s outside its "
        f"training loop (datasets, fitted floor, guard, saving), {t.iloc[0].loop_seconds:.0f} s in it "
        f"({int(t.iloc[0].steps)} steps).\n\n"
    )
    return (
        markdown(pd.DataFrame(rows))
        + "\n\n"
        + note
        + _provenance("slides.csv", command="python benchmarks/bench_super_resolve.py --only slides")
    )


def precision() -> str:
    """bfloat16 against float32 on the same real-tissue models: test PCC and the largest change of a map."""
    df = _csv("precision.csv")
    piv = df.pivot_table(index=["dataset", "scale", "seed"], columns="precision", values="pcc")
    diff = df.groupby(["dataset", "scale", "seed"])["max_abs_diff_counts"].first()
    rows = [{
        "data, seed": f"{REAL_NAMES.get(d, d)}, {sc}×, seed {seed}", "PCC float32": f"{r['float32']:.4f}",
        "PCC bfloat16": f"{r['bfloat16']:.4f}", "ΔPCC": f"{r['bfloat16'] - r['float32']:+.4f}",
        "largest change of a pixel (counts)": f"{diff[d, sc, seed]:.3f}",
    } for (d, sc, seed), r in piv.iterrows()]  # fmt: skip
    return (
        markdown(pd.DataFrame(rows))
        + "\n\n"
        + _provenance("precision.csv", command="cd benchmarks && python bench_quality.py precision --datasets merfish")
    )


def readme_real() -> str:
    """The README's first table: real tissue, each method's test PCC and Diff-ST's gain (mean over seeds)."""
    pcc = _real_pcc(_real_default())
    rows = []
    for (dataset, scale), x in pcc.groupby(level=[0, 1], sort=False):
        d = x["Diff-ST"] - x["image floor"]
        rows.append({
            "real data (test tiles)": f"{REAL_NAMES.get(dataset, dataset)}, {scale}×", "Diff-ST": f"{x['Diff-ST'].mean():.3f}",
            "training-free image floor": f"{x['image floor'].mean():.3f}",
            "bicubic (LR-consistent)": f"{x['bicubic (LR-consistent)'].mean():.3f}",
            "Diff-ST − floor (worst seed)": f"{d.mean():+.3f} ({d.min():+.3f})",
        })  # fmt: skip
    return markdown(pd.DataFrame(rows)) + "\n\n" + _provenance("real.csv", command=REAL_COMMAND)


def prepare() -> str:
    """``prepare``'s wall time and peak memory against the transcript count, and the growth from the smallest slide."""
    df = _csv("prepare.csv").sort_values("transcripts_m")
    first = df.iloc[0]
    rows = [{
        "transcripts": f"{r.transcripts_m:g} M", "panel": f"{r.panel:,} genes", "slide": f"{r.side_mm:g} mm",
        "genes prepared": int(r.genes), "wall time": f"{r.seconds:.0f} s", "peak RSS": f"{r.peak_rss_gib:.2f} GiB",
        f"time / time at {first.transcripts_m:g} M": f"{r.seconds / first.seconds:.1f}×",
        f"memory / memory at {first.transcripts_m:g} M": f"{r.peak_rss_gib / first.peak_rss_gib:.2f}×",
    } for r in df.itertuples()]  # fmt: skip
    return (
        markdown(pd.DataFrame(rows)) + "\n\n" + _provenance("prepare.csv", command="python benchmarks/bench_prepare.py")
    )


def readme_speed() -> str:
    """The README's time and memory of a whole slide: default arguments, with the calibrated std, in float32."""
    df = _csv("slides.csv")
    sr = df[df.what == "super_resolve"]
    default = sr[sr.precision_asked == "auto"]
    cell = {
        (r.side_mm, r.n_samples, r.precision_asked): f"{r.seconds:.0f} s, {r.peak_rss_gib:.1f} GiB"
        for r in sr.itertuples()
    }
    rows = [{
        "whole slide, 25 genes at 10 µm": f"{side:g} mm × {side:g} mm",
        f"`super_resolve` defaults ({default.precision.iloc[0]} here)": cell.get((side, 1, "auto"), ""),
        "with the std (`n_samples=4`)": cell.get((side, 4, "auto"), "not measured"),
        "defaults in float32 (a CPU without bfloat16)": cell.get(
            (side, 1, "float32"), "same" if default.precision.iloc[0] == "float32" else "not measured"
        ),
    } for side in default.side_mm.unique()]  # fmt: skip
    return (
        markdown(pd.DataFrame(rows))
        + "\n\n"
        + _provenance("slides.csv", command="python benchmarks/bench_super_resolve.py --only slides")
    )


def readme_curve() -> str:
    """One sentence of the learning curve: the gain over the floor at the smallest and the largest training area."""
    df = _csv("curve.csv")
    piv = df.pivot_table(index=["dataset", "scale", "side", "seed"], columns="method", values="pcc")
    gain = (piv["Diff-ST"] - piv["image floor"]).groupby(level=[0, 1, 2]).mean()
    area = df[df.method == "Diff-ST"].groupby(["dataset", "scale", "side"]).train_mm2.mean()
    parts = []
    for (dataset, scale), g in gain.groupby(level=[0, 1]):
        a = area.loc[dataset, scale].sort_values()
        small, large = a.index[0], a.index[-1]
        name = "MERFISH" if dataset == "merfish" else "synthetic Xenium"
        parts.append(f"{name} {scale}×: {g[dataset, scale, small]:+.3f} PCC over the floor from {a[small]:.2f} mm² of "
                     f"training tissue, {g[dataset, scale, large]:+.3f} from {a[large]:.2f} mm²")  # fmt: skip
    return ("**How much tissue it needs** (the learning curve of the benchmark page): " + "; ".join(parts) + ".\n\n"
            + _provenance("curve.csv", command="cd benchmarks && python bench_quality.py curve --budget none ..."))  # fmt: skip


# --------------------------------------------------------------------------------------------------------------------
# Earlier measurements: every results CSV, summarised the same way
# --------------------------------------------------------------------------------------------------------------------
def _summary(name: str, by: list[str], values: list[str], command: str) -> Callable[[], str]:
    """A table of ``results/<name>``: mean ± std over seeds of ``values`` per ``by`` group, and the seed count."""

    def table() -> str:
        df = _csv(name)
        keep = [v for v in values if v in df.columns]
        g = df.groupby(by, sort=False)[keep]
        mean, std, n = g.mean(), g.std(), g.size()
        out = mean.astype(object)
        for c in keep:
            whole = bool(np.all(np.mod(df[c].dropna(), 1) == 0))  # counts (steps, parameters, tiles)
            out[c] = [
                ""
                if not np.isfinite(m)
                else f"{m:,.0f}"
                if whole
                else f"{m:.3f} ± {s:.3f}"
                if np.isfinite(s)
                else f"{m:.3f}"
                for m, s in zip(mean[c], std[c], strict=True)
            ]
        out["runs"] = n
        return markdown(out, index=True) + "\n\n" + _provenance(name, command=command)

    return table


def accuracy() -> str:
    """The issue-10 accuracy tables (``bench_quality.py report``): mean ± std, paired against the targets, per seed."""
    import bench_quality

    return (
        bench_quality.accuracy_tables(_csv("accuracy.csv"))
        + "\n\n"
        + _provenance("accuracy.csv", command="cd benchmarks && python bench_quality.py accuracy report")
    )


def flips() -> str:
    """The mean head averaged over the 8 rotations/flips minus the plain head, and the averaged model's targets."""
    import bench_quality

    df = _csv("flips.csv")
    return (bench_quality.flips_table(df) + "\n\n" + bench_quality.flips_targets(df, _csv("accuracy.csv")) + "\n\n"
            + _provenance("flips.csv", "accuracy.csv", command="cd benchmarks && python bench_quality.py flips report"))  # fmt: skip


_Q = "cd benchmarks && python bench_quality.py"
_V = "cd benchmarks && python bench_visium.py"
METRICS = ["pcc", "rmse", "ssim", "lr_consistency"]
HISTORY: dict[str, Callable[[], str]] = {
    "history-quality": _summary("quality.csv", ["dataset", "scale", "method"], METRICS, f"{_Q} quality"),
    "history-ablation": _summary(
        "ablation.csv", ["dataset", "scale", "variant"], ["pcc", "rmse", "ssim", "params"], f"{_Q} ablation"
    ),  # fmt: skip
    "history-ablation-before-issue10": _summary(
        "ablation_before_issue10.csv", ["scale", "variant"], ["pcc", "rmse", "ssim", "params"], f"{_Q} ablation"
    ),  # fmt: skip
    "history-samples": _summary(
        "samples.csv",
        ["consistency", "n_samples"],
        ["pcc", "rmse", "lr_consistency", "within_2std", "seconds"],
        f"{_Q} samples",
    ),  # fmt: skip
    "history-coverage": _summary(
        "coverage.csv",
        ["dataset", "scale", "std"],
        ["within_2std", "coverage_val", "median_std_scale"],
        f"{_Q} coverage",
    ),  # fmt: skip
    "history-base": _summary("base.csv", ["dataset", "scale", "method"], ["pcc", "changed_genes"], f"{_Q} base"),
    "history-floor-base": _summary(
        "accuracy_floor_base.csv",
        ["dataset", "scale", "method"],
        ["pcc", "rmse", "within_2std"],
        f"{_Q} accuracy (the previous default)",
    ),  # fmt: skip
    "history-bicubic-base": _summary(
        "accuracy_bicubic_base.csv",
        ["dataset", "scale", "method"],
        ["pcc", "rmse", "within_2std"],
        f"{_Q} accuracy (the residual around bicubic)",
    ),  # fmt: skip
    "history-visium-simulated": _summary(
        "visium_simulated.csv", ["dataset", "method"], ["pcc", "rmse", "ssim"], f"{_V} simulated"
    ),  # fmt: skip
    "history-visium-slide": _summary(
        "visium_slide.csv",
        ["spots", "stopped_by"],
        ["train_wall_s", "steps", "pcc_diffst", "pcc_bicubic", "pcc_nearest", "pcc_image_floor"],
        f"{_V} slide",
    ),  # fmt: skip
    "history-features-accuracy": _summary(
        "features_accuracy.csv",
        ["dataset", "scale", "encoder"],
        ["pcc", "rmse", "steps"],
        "python benchmarks/bench_features.py accuracy",
    ),  # fmt: skip
    "history-features-throughput": _summary(
        "features_throughput.csv",
        ["encoder", "um_per_px"],
        ["dim", "tiles", "seconds", "mm2_per_min", "peak_rss_gib"],
        "python benchmarks/bench_features.py throughput",
    ),  # fmt: skip
    "prepare": prepare,
    "her2st-single": _summary(
        "visium_her2st.csv", ["section", "method"], ["pcc", "rmse"], f"{_V} her2st --budget none"
    ),
}


TABLES: dict[str, Callable[[], str]] = {
    "real": real,
    "real-levers": real_levers,
    "curve": curve,
    "her2st-loso": her2st_loso,
    "her2st-pooled": her2st_pooled,
    "slides": slides,
    "sections": sections,
    "std-steps": std_steps,
    "precision": precision,
    "readme-real": readme_real,
    "readme-speed": readme_speed,
    "readme-curve": readme_curve,
    "accuracy": accuracy,
    "flips": flips,
    **HISTORY,
}


def render(text: str) -> tuple[str, list[str]]:
    """``text`` with every table block made anew, and the names of the blocks that changed."""
    changed = []

    def fill(m: re.Match[str]) -> str:
        name = m.group("name")
        if name not in TABLES:
            msg = f"unknown table {name!r} (known: {sorted(TABLES)})"
            raise KeyError(msg)
        try:
            body = TABLES[name]().rstrip() + "\n"
        except FileNotFoundError as e:  # a benchmark not run yet: say so instead of a number
            body = f"*Not measured yet: `{Path(e.filename).name}` is missing from `benchmarks/results/`.*\n"
        if body != m.group("body"):
            changed.append(name)
        return m.group(1) + body + m.group(4)

    return BLOCK.sub(fill, text), changed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report the tables that differ")
    args = parser.parse_args()
    stale = []
    for path in FILES:
        text = path.read_text()
        new, changed = render(text)
        stale += [f"{path.relative_to(ROOT)}: {name}" for name in changed]
        if changed and not args.check:
            path.write_text(new)
    for line in stale:
        print(("differs: " if args.check else "rewrote: ") + line)
    return 1 if (stale and args.check) else 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
