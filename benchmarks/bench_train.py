"""Training speed of each preset, and how long the default preset takes to be useful on a CPU.

1. Throughput: optimiser steps (forward + backward + AdamW) on tiles of each preset's own size, in tiles/s, and the
   time of one epoch over the training tiles of ``synthetic_xenium()`` prepared at that tile size.
2. Convergence: ``dst.tl.train`` with the default preset on ``synthetic_xenium()`` defaults (25 genes, 10×, H&E),
   reporting the CPU time until the validation loss plateaus (within 2 % of its best), then test-tile metrics of
   the trained model (``dst.tl.super_resolve`` + ``dst.tl.evaluate``) beside bicubic up-sampling.

    python benchmarks/bench_train.py            # full
    python benchmarks/bench_train.py --quick    # tiny settings (CI smoke)

Target (issue 3): the default preset beats bicubic on held-out synthetic tiles within 5 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from _common import machine, measure

import diffst as dst
from diffst.model import DiffSTConfig, DiffSTNet, Diffusion


def throughput(preset: str, steps: int, n_genes: int = 25, batch_size: int | None = None) -> float:
    """Tiles per second of training steps with random inputs of the preset's shapes."""
    cfg = DiffSTConfig.preset(preset, n_genes=n_genes, **({"batch_size": batch_size} if batch_size else {}))
    net, diffusion = DiffSTNet(cfg), Diffusion(cfg)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.learning_rate)
    g = torch.Generator().manual_seed(0)
    b = cfg.batch_size
    x0 = torch.rand((b, n_genes, cfg.hr_px, cfg.hr_px), generator=g) * 2 - 1
    lr = torch.nn.functional.avg_pool2d(x0, cfg.scale)
    mask = torch.ones((b, 1, cfg.lr_px, cfg.lr_px))
    image = torch.rand((b, cfg.image_channels, cfg.image_px, cfg.image_px), generator=g)

    def step() -> None:
        loss = diffusion.training_losses(net, x0, lr, mask, image, progress=0.5)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()  # warm-up
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * b / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", choices=["throughput", "convergence"], default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)
    dst.settings.verbosity = 0
    print(f"machine: {machine()}, torch threads {torch.get_num_threads()}")

    sdata = dst.datasets.synthetic_xenium(size_um=1500.0 if args.quick else "default", boundaries=False)
    # the paper preset's batch of 4 tiles (2500 µm, 5000 × 5000 image pixels each, 256 cell patches) needs about
    # 45 GiB on a CPU; one tile per step fits in about 13 GiB
    presets = [("tiny", 10, None)] if args.quick else [("tiny", 20, None), ("default", 10, None), ("paper", 2, 1)]
    print("\n| preset | tile | HR px | batch | tiles/s | peak RSS GiB | s/epoch on synthetic_xenium() |")
    print("|---|---|---|---|---|---|---|")
    for preset, steps, batch in presets if args.only in (None, "throughput") else []:
        cfg = DiffSTConfig.preset(preset, **({"batch_size": batch} if batch else {}))
        with measure() as mem:
            tps = throughput(preset, steps, batch_size=batch)
        key = f"tile{int(cfg.tile_um)}"
        try:
            dst.pp.prepare(
                sdata,
                genes=25,
                image_key="he_image",
                tile_um=cfg.tile_um,
                lr_um=cfg.lr_um,
                scale=cfg.scale,
                key_added=key,
            )
            n_train = sdata.attrs[key]["split"]["train"]
            epoch = f"{n_train / tps:.1f} ({n_train} tiles)"
        except ValueError as e:  # e.g. paper tiles larger than the default slide
            epoch = f"n/a ({str(e).split('.')[0]})"
        print(
            f"| {preset} | {cfg.tile_um:g} µm | {cfg.hr_px} | {cfg.batch_size} | {tps:.3g} | {mem['peak_rss_gib']:.1f} "
            f"| {epoch} |",
            flush=True,
        )

    if args.only == "throughput":
        return
    # convergence of the default preset
    preset = "tiny" if args.quick else "default"
    key = "bench"
    dst.pp.prepare(sdata, genes=25, image_key="he_image", key_added=key, tile_um=DiffSTConfig.preset(preset).tile_um)
    t0 = time.process_time()
    w0 = time.perf_counter()
    model = dst.tl.train(
        sdata,
        prepared_key=key,
        preset=preset,
        checkpoint_dir=Path(__file__).parent / ".cache" / "bench_train",
        overwrite=True,
        enable_progress_bar=False,
        **({"max_epochs": 3} if args.quick else {}),
    )
    cpu, wall = time.process_time() - t0, time.perf_counter() - w0
    hist = [r for r in model.history if "val_loss" in r]  # validation runs about every 50 steps, not every epoch
    best = min(r["val_loss"] for r in hist)
    plateau = next(r for r in hist if r["val_loss"] <= best * 1.02)
    epochs = model.history[-1]["epoch"] + 1
    print(f"\ntraining ({preset}): {model.info['steps']} steps, {epochs} epochs, wall {wall:.0f} s, CPU {cpu:.0f} s")
    print(
        f"validation loss within 2 % of its best ({best:.4f}) at epoch {plateau['epoch']} (step {plateau['step']}), after {plateau['seconds']:.0f} s wall"
    )
    ahead = next((r for r in hist if r["val_pcc"] > r["val_pcc_bicubic"]), None)
    if ahead is not None:
        print(
            f"validation PCC first above bicubic at step {ahead['step']}, after {ahead['seconds']:.0f} s wall "
            f"({ahead['val_pcc']:.3f} vs {ahead['val_pcc_bicubic']:.3f})"
        )
    else:
        print("validation PCC never above bicubic")
    print(f"last validation: val_pcc {hist[-1]['val_pcc']:.3f}, val_pcc_bicubic {hist[-1]['val_pcc_bicubic']:.3f}")
    dst.tl.super_resolve(sdata, model=model, prepared_key=key, key_added="sr")
    dst.tl.upsample(sdata, prepared_key=key, method="bicubic", key_added="bicubic")
    for k in ("sr", "bicubic"):
        m = dst.tl.evaluate(sdata, key=k).loc["mean"]
        print(f"test tiles, {k:8s}: PCC {m['pcc']:.3f}, RMSE {m['rmse']:.3f}, SSIM {m['ssim']:.3f}")


if __name__ == "__main__":
    main()
