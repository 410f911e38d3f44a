"""Speed and memory of whole-slide super-resolution, and the fast sampler against 1000-step DDPM.

1. Sampler: on the test tiles of ``synthetic_xenium()`` (a default-preset model trained on it), DPM-Solver++ with 10,
   20 and 50 steps and DDIM with 20 against ancestral DDPM with 1000 steps, same tiles, same model, one run: time and
   mean PCC against the truth.
2. Slide: ``dst.tl.super_resolve`` of 25 genes at 10 µm over a 6.5 mm × 6.5 mm synthetic slide read from a zarr store
   (results written back to the store), and of a slide with 4× the area, each in a fresh process: wall time, peak
   resident memory and the overhead ratio total time / (denoiser calls × time of one batched denoiser call).

    python benchmarks/bench_super_resolve.py            # full
    python benchmarks/bench_super_resolve.py --quick    # small slides (CI smoke)

Targets (issue 4): fast sampler ≥ 40× faster than DDPM-1000 with mean PCC within 0.01; the 6.5 mm slide in
≤ 5 min and ≤ 4 GiB; 4× the area in ≤ 4.5× the time and ≤ 1.3× the peak memory.
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


def build_store(size: float, model_path: str, path: str) -> None:
    """Child process: prepare a synthetic slide with the model's genes and write it (with its H&E) to zarr."""
    import spatialdata as sd

    import diffst as dst

    dst.settings.verbosity = 0
    model = dst.DiffST.load(model_path)
    sdata = dst.datasets.synthetic_xenium(size_um=size, seed=1, boundaries=False)
    dst.pp.prepare(sdata, genes=model.genes, image_key="he_image", tile_um=model.config.tile_um)
    keep = sd.SpatialData(
        images={k: sdata.images[k] for k in ("he_image", "diffst_lr", "diffst_lr_mask", "diffst_hr")},
        labels={"diffst_tissue": sdata["diffst_tissue"]},
        shapes={"diffst_tiles": sdata["diffst_tiles"]},
        attrs={"diffst": sdata.attrs["diffst"]},
    )
    keep.write(path, overwrite=True)


def run_slide(model_path: str, path: str) -> None:
    """Child process: super-resolve a stored slide, print JSON with time, memory and denoiser statistics."""
    import spatialdata as sd
    from _common import measure

    import diffst as dst

    torch.set_num_threads(2)
    dst.settings.verbosity = 0
    model = dst.DiffST.load(model_path)
    calls = []
    original = model.net.forward

    def counted(x_t, *a, **k):
        calls.append(x_t.shape[0])
        return original(x_t, *a, **k)

    model.net.forward = counted
    sdata = sd.read_zarr(path)
    with measure() as m:
        dst.tl.super_resolve(sdata, model=model, overwrite=True)
    # one full batched denoiser call on the same shapes
    cfg = model.config
    b = max(calls)
    x = torch.zeros((b, cfg.n_genes, cfg.hr_px, cfg.hr_px))
    lr = torch.zeros((b, cfg.n_genes, cfg.lr_px, cfg.lr_px))
    mask = torch.ones((b, 1, cfg.lr_px, cfg.lr_px))
    image = torch.zeros((b, cfg.image_channels, cfg.image_px, cfg.image_px))
    t = torch.full((b,), 10)
    with torch.inference_mode():
        original(x, t, lr, mask, image)
        t0 = time.perf_counter()
        for _ in range(5):
            original(x, t, lr, mask, image)
        one = (time.perf_counter() - t0) / 5
    hr = sdata.attrs["diffst"]["grid"]["hr_shape"]
    print(json.dumps({**m, "calls": len(calls), "batch": b, "one_call": one, "hr_shape": hr}))


def slides(quick: bool) -> None:
    _, _, model_path = _model(quick)
    base = 1500.0 if quick else 6500.0
    results = {}
    for factor in (1, 2):  # side × 2 = area × 4
        size = base * factor
        store = CACHE / f"slide_{int(size)}.zarr"
        if not store.exists():
            subprocess.run([sys.executable, __file__, "--build", str(size), str(model_path), str(store)], check=True)
        out = subprocess.run(
            [sys.executable, __file__, "--run", str(model_path), str(store)], check=True, capture_output=True, text=True
        )
        results[factor] = json.loads(out.stdout.strip().splitlines()[-1])
    print("\nwhole-slide super-resolution (25 genes, 10 µm, zarr-backed, fresh process each):")
    print("| slide | HR pixels | wall s | peak RSS GiB | denoiser calls × batch | one call s | overhead ratio |")
    print("|---|---|---|---|---|---|---|")
    for factor, r in results.items():
        side = base * factor / 1000
        ratio = r["seconds"] / (r["calls"] * r["one_call"])
        print(
            f"| {side:g} mm × {side:g} mm | {r['hr_shape'][0]}×{r['hr_shape'][1]} | {r['seconds']:.0f} | {r['peak_rss_gib']:.2f} | {r['calls']} × {r['batch']} | {r['one_call']:.3f} | {ratio:.2f} |"
        )
    print(
        f"4× area: time × {results[2]['seconds'] / results[1]['seconds']:.2f}, peak memory × {results[2]['peak_rss_gib'] / results[1]['peak_rss_gib']:.2f}"
    )


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--build":
        build_store(float(sys.argv[2]), sys.argv[3], sys.argv[4])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--run":
        run_slide(sys.argv[2], sys.argv[3])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", choices=["sampler", "slides"], default=None)
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


if __name__ == "__main__":
    main()
