"""Speed and memory of whole-slide super-resolution, and the fast sampler against 1000-step DDPM.

1. Sampler: on the test tiles of ``synthetic_xenium()`` (a default-preset model trained on it), DPM-Solver++ with 10,
   20 and 50 steps and DDIM with 20 against ancestral DDPM with 1000 steps, same tiles, same model, one run: time and
   mean PCC against the truth.
2. Slide: ``dst.tl.super_resolve`` with its default arguments (the mean head averaged over the 8 rotations/flips,
   the guard's blend with the floor, one sample: no std) and with ``n_samples=4`` (the calibrated std), of 25 genes at
   10 µm over a 6.5 mm × 6.5 mm synthetic slide read from a zarr store (results written back to the store), and of a
   slide with 4× the area (defaults only), each in a fresh process: wall time, peak resident memory, network calls; on
   the first slide also with ``precision="float32"`` where the default (``"auto"``) chose bfloat16. The model is a
   default-preset one with a guard, untrained (the weights do not change the time). Then one epoch of
   ``dst.tl.train`` on the 6.5 mm slide: the time outside its training loop (datasets, fitted floor, guard, saving).

    python benchmarks/bench_super_resolve.py            # full
    python benchmarks/bench_super_resolve.py --quick    # small slides (CI smoke)

Targets (issue 27): the 6.5 mm slide with default arguments ≤ 30 s, with ``n_samples=4`` ≤ 120 s, ≤ 2 GiB; 4× the
area ≤ 4.2× the time and ≤ 1.2× the memory; ``train``'s work outside its loop on the 6.5 mm slide ≤ 30 s. (Issue 4:
the fast sampler ≥ 40× faster than DDPM-1000 with mean PCC within 0.01.)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

CACHE = Path(__file__).parent / ".cache"


def _model(quick: bool):
    import diffst as dst

    path = CACHE / ("model_quick.pt" if quick else "model_default.pt")
    sdata = dst.datasets.synthetic_xenium(size_um=1500.0 if quick else "default", boundaries=False)
    preset = "tiny" if quick else "default"
    dst.pp.prepare(sdata, genes=25, image_key="he_image", tile_um=dst.model.DiffSTConfig.preset(preset).tile_um)
    if path.exists():
        model = dst.DiffST.load(path)
    else:
        model = dst.tl.train(sdata, preset=preset, checkpoint_dir=CACHE / f"run_{preset}", overwrite=True,
                             enable_progress_bar=False, **({"max_epochs": 2} if quick else {}))  # fmt: skip
        model.save(path)
    return sdata, model, path


def sampler_comparison(quick: bool) -> None:
    from diffst.tl._data import Prepared, TileDataset
    from diffst.tl._lightning import pearson_per_map

    sdata, model, _ = _model(quick)
    prep = Prepared.from_sdata(sdata, "diffst")
    ds = TileDataset(sdata, prep, "test", image_um=model.config.image_um, gene_scale=model.gene_scale)
    batch = {k: torch.stack([ds[i][k] for i in range(len(ds))]) for k in ("x0", "lr", "mask", "image")}
    args = (batch["lr"], batch["mask"], batch["image"])
    rows = []
    # warm-up (thread pools, allocator) outside the timings, so the first sampler timed is not penalised
    model.diffusion.sample(model.net, *args, sampler="ddim", steps=2, generator=torch.Generator().manual_seed(0))
    runs = [("dpmsolver", 10), ("dpmsolver", 20), ("dpmsolver", 50), ("ddim", 20), ("ddpm", 50 if quick else 1000)]
    for sampler, steps in runs:
        t0 = time.perf_counter()
        x = model.diffusion.sample(
            model.net, *args, sampler=sampler, steps=steps, generator=torch.Generator().manual_seed(0)
        )
        seconds = time.perf_counter() - t0
        pcc = float(torch.nanmean(pearson_per_map(x, batch["x0"])))
        rows.append((sampler, steps, seconds, pcc))
    ddpm = rows[-1]
    print(f"\nsampler comparison on {len(ds)} test tiles (per-tile PCC in model units, one sample):")
    print("| sampler | steps | seconds | speed-up vs DDPM | mean PCC | ΔPCC vs DDPM |")
    print("|---|---|---|---|---|---|")
    for sampler, steps, seconds, pcc in rows:
        print(f"| {sampler} | {steps} | {seconds:.1f} | {ddpm[2] / seconds:.0f}× | {pcc:.3f} | {pcc - ddpm[3]:+.3f} |")


def build_store(size: float, path: str) -> None:
    """Child process: prepare a synthetic slide (25 genes, 100 µm → 10 µm, 400 µm tiles) and write it to zarr."""
    import spatialdata as sd

    import diffst as dst

    dst.settings.verbosity = 0
    sdata = dst.datasets.synthetic_xenium(size_um=size, seed=1, boundaries=False)
    dst.pp.prepare(sdata, genes=25, image_key="he_image", tile_um=400)
    keep = sd.SpatialData(
        images={k: sdata.images[k] for k in ("he_image", "diffst_lr", "diffst_lr_mask", "diffst_hr")},
        labels={"diffst_tissue": sdata["diffst_tissue"]},
        shapes={"diffst_tiles": sdata["diffst_tiles"]},
        attrs={"diffst": sdata.attrs["diffst"]},
    )
    keep.write(path, overwrite=True)


def slide_model(sdata):
    """A default-preset model for the slide with a guard as training fits one (half the genes blended with the floor):
    untrained, since the time of inference does not depend on the weights."""
    from diffst._contract import Prepared
    from diffst.model import DiffSTConfig, DiffSTNet
    from diffst.tl._model import DiffST, Guard, ModelUnits, fingerprint

    prep = Prepared.from_sdata(sdata, "diffst")
    torch.manual_seed(0)
    cfg = DiffSTConfig.preset("default", n_genes=len(prep.genes), image_channels=3, hr_um=prep.grid.hr_um,
                              scale=prep.grid.scale, tile_um=prep.record.tile_um, image_kind="rgb")  # fmt: skip
    g = len(prep.genes)
    guard = Guard([1.0 if i % 2 else 0.7 for i in range(g)], [1.2] * g, std_noise="poisson", validation={})
    return DiffST(config=cfg, net=DiffSTNet(cfg, coexpr=torch.tensor(prep.coexpression)), genes=list(prep.genes),
                  gene_scale=prep.hr_scale, lr_scale=prep.lr_scale, units=ModelUnits.of(prep, cfg.image_um),
                  guard=guard, info={"prepared_fingerprint": fingerprint(prep)})  # fmt: skip


def run_slide(path: str, n_samples: int, precision: str = "auto") -> None:
    """Child process: super-resolve a stored slide with the defaults (and ``n_samples``, ``precision``); print JSON
    with time, memory, network calls and the precision used."""
    import spatialdata as sd
    from _common import measure

    import diffst as dst

    torch.set_num_threads(2)
    dst.settings.verbosity = 0
    sdata = sd.read_zarr(path)
    model = slide_model(sdata)
    calls = []
    original = model.net.forward

    def counted(x_t, *a, **k):
        calls.append(x_t.shape[0])
        return original(x_t, *a, **k)

    model.net.forward = counted
    with measure() as m:
        dst.tl.super_resolve(sdata, model=model, n_samples=n_samples, precision=precision, overwrite=True)
    hr = sdata.attrs["diffst"]["grid"]["hr_shape"]
    used = sdata.attrs["diffst_sr"]["precision"]
    print(json.dumps({**m, "calls": len(calls), "windows_in_calls": sum(calls), "hr_shape": hr, "precision": used}))


def run_train(path: str) -> None:
    """Child process: one epoch of ``dst.tl.train`` on a stored slide; the time outside its training loop (the
    datasets, the fitted floor, the guard, saving) and what the loop took."""
    import spatialdata as sd
    from _common import measure

    import diffst as dst

    torch.set_num_threads(2)
    dst.settings.verbosity = 0
    sdata = sd.read_zarr(path)
    with measure() as m:
        model = dst.tl.train(sdata, max_epochs=1, checkpoint_dir=Path(path).parent / "train_run", overwrite=True)
    loop = model.info["seconds"]
    print(json.dumps({**m, "loop_seconds": loop, "outside_seconds": m["seconds"] - loop, "steps": model.info["steps"]}))


def child(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def slides(quick: bool) -> None:
    from _common import append

    base = 1500.0 if quick else 6500.0
    path = Path(__file__).parent / "results" / f"slides{'_quick' if quick else ''}.csv"
    path.unlink(missing_ok=True)
    results = {}
    for factor in (1, 2):  # side × 2 = area × 4
        size = base * factor
        store = CACHE / f"slide25_{int(size)}.zarr"
        if not store.exists():
            subprocess.run([sys.executable, __file__, "--build", str(size), str(store)], check=True)
        # the defaults and n_samples=4 (the calibrated std); on the first slide also float32, where "auto" chose
        # bfloat16 (this CPU computes it natively; a laptop CPU without bfloat16 units runs float32)
        for n, precision in ((1, "auto"), (4, "auto"), *([(1, "float32")] if factor == 1 else [])):
            r = child(["--run", str(store), str(n), precision])
            if precision == "float32" and r["precision"] == results[factor, 1, "auto"]["precision"]:
                continue  # "auto" was float32 already
            results[factor, n, precision] = r
            # each slide's row as soon as it is measured: a long run stopped midway keeps what it measured
            append(path, [{"what": "super_resolve", "side_mm": size / 1000, "hr_pixels": r["hr_shape"][0] * r["hr_shape"][1],
                           "n_samples": n, "precision_asked": precision, "precision": r["precision"], "seconds": r["seconds"],
                           "peak_rss_gib": r["peak_rss_gib"], "calls": r["calls"],
                           "windows": r["windows_in_calls"]}])  # fmt: skip
    print("\nwhole-slide super-resolution (25 genes at 10 µm, default preset, zarr-backed, a fresh process each; "
          "default arguments, then n_samples=4 for the calibrated std):")  # fmt: skip
    print(
        "| slide | HR pixels | n_samples | precision | wall s | peak RSS GiB | network calls | windows through the network |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for key, r in results.items():
        side = base * key[0] / 1000
        print(f"| {side:g} mm × {side:g} mm | {r['hr_shape'][0]}×{r['hr_shape'][1]} | {key[1]} | {r['precision']} | "
              f"{r['seconds']:.0f} | {r['peak_rss_gib']:.2f} | {r['calls']} | {r['windows_in_calls']} |")  # fmt: skip
    a, b = results[1, 1, "auto"], results[2, 1, "auto"]
    print(f"4× area, defaults: time × {b['seconds'] / a['seconds']:.2f}, "
          f"peak memory × {b['peak_rss_gib'] / a['peak_rss_gib']:.2f}")  # fmt: skip
    if (1, 1, "float32") in results:
        print(f"bfloat16 against float32 (6.5 mm, n_samples=1): time × "
              f"{a['seconds'] / results[1, 1, 'float32']['seconds']:.2f}")  # fmt: skip
    train_cost(quick)


def train_cost(quick: bool) -> None:
    """One epoch of ``dst.tl.train`` on the first slide, in a fresh process: its time outside the training loop (the
    row replaces an earlier one in ``slides.csv``)."""
    import pandas as pd
    from _common import append

    base = 1500.0 if quick else 6500.0
    path = Path(__file__).parent / "results" / f"slides{'_quick' if quick else ''}.csv"
    store = CACHE / f"slide25_{int(base)}.zarr"
    if not store.exists():
        subprocess.run([sys.executable, __file__, "--build", str(base), str(store)], check=True)
    t = child(["--train", str(store)])
    if path.exists():
        df = pd.read_csv(path)
        df[df.what == "super_resolve"].to_csv(path, index=False)
    rows = [{"what": "train, outside its loop", "side_mm": base / 1000, "seconds": t["outside_seconds"],
              "loop_seconds": t["loop_seconds"], "steps": t["steps"], "peak_rss_gib": t["peak_rss_gib"]}]  # fmt: skip
    append(path, rows)
    print(f"\ntrain(max_epochs=1) on the {base / 1000:g} mm slide: {t['seconds']:.0f} s in all, {t['loop_seconds']:.0f} s "
          f"in its training loop ({t['steps']} steps), {t['outside_seconds']:.0f} s outside it (datasets, fitted floor, "
          f"guard, saving); peak RSS {t['peak_rss_gib']:.2f} GiB")  # fmt: skip


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--build":
        build_store(float(sys.argv[2]), sys.argv[3])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--run":
        run_slide(sys.argv[2], int(sys.argv[3]), *sys.argv[4:5])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--train":
        run_train(sys.argv[2])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--only",
        choices=["sampler", "slides", "train"],
        default=None,
        help="train: only train's cost outside its loop (replaces that row of slides.csv)",
    )
    args = parser.parse_args()
    torch.set_num_threads(2)
    from _common import machine

    import diffst as dst

    dst.settings.verbosity = 0
    CACHE.mkdir(exist_ok=True)
    print(f"machine: {machine()}")
    if args.only in (None, "sampler"):
        sampler_comparison(args.quick)
    if args.only in (None, "slides"):
        slides(args.quick)
    if args.only == "train":
        train_cost(args.quick)


if __name__ == "__main__":
    main()
