"""Exploration (not adopted): a log-linear image density fitted by likelihood, in place of the fitted floor's exponents.

Within each LR pixel the counts are shared in proportion to ``exp(w_g0 · log bicubic + Σ_f w_gf · feature_f)``, the
features being the log of each stain averaged over 1 (and, with ``--multiscale``, 3 and 9) HR pixels; each LR pixel
keeps its counts, as in the floor. The weights start at the fitted floor's (``w_g0 = 1``, its stain exponents) and
are fitted per gene by the multinomial likelihood of the HR counts on the same training windows as
``dst.tl.train``'s fitted floor, with an L2 pull ``λ`` towards the start. Scored like ``bench_quality.py base``
(pooled PCC over test windows), beside a per-gene gate that keeps the log-linear weights only where they beat the
fitted floor on the validation windows by more than 0.005. No model is trained. Run from ``benchmarks/``::

    DIFFST_DATA_DIR=../../shared/data python explore/base_loglinear.py merfish:10:2 merfish_roi:10:2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_quality as bq

from diffst._contract import Prepared
from diffst.metrics import pearson
from diffst.model.floor import _counts_in, floor_model_units, hr_stains
from diffst.tl import _train
from diffst.tl._data import TileSource, WindowDataset, choose_window, split_region, tiled_origins, window_origins

EPS = 1e-3


def features(stains: torch.Tensor, scales: tuple[int, ...]) -> torch.Tensor:
    """``(B, K, H, W)`` stains → ``(B, K·len(scales), H, W)``: the log of each stain averaged over ``s × s`` HR pixels."""
    out = []
    for s in scales:
        x = stains if s == 1 else F.avg_pool2d(stains, s, stride=1, padding=s // 2, count_include_pad=False)
        out.append(torch.log(x.clamp_min(0) + EPS))
    return torch.cat(out, 1)


def block_logp(z: torch.Tensor, scale: int) -> torch.Tensor:
    """Log share of each HR pixel within its LR pixel, for logits ``z`` ``(B, G, H, W)``."""
    b, g, h, w = z.shape
    zb = z.reshape(b, g, h // scale, scale, w // scale, scale)
    return (zb - torch.logsumexp(zb, dim=(3, 5), keepdim=True)).reshape(b, g, h, w)


class Windows:
    """The inputs of the density on a set of windows, in counts."""

    def __init__(self, ds: WindowDataset, idx, cfg, gene_scale: torch.Tensor, scales: tuple[int, ...]) -> None:
        batch = {k: torch.stack([ds[int(i)][k] for i in idx]) for k in ("x0", "lr", "mask", "image")}
        self.batch = batch
        self.base, self.total, self.observed, self.s_g = _counts_in(batch["lr"], batch["mask"], cfg.scale, gene_scale)
        n_stains = None if cfg.image_kind == "rgb" else cfg.image_channels
        self.features = features(hr_stains(batch["image"], cfg.image_kind, cfg.image_per_hr, n_stains), scales)
        self.observed_hr = F.interpolate(self.observed, scale_factor=cfg.scale, mode="nearest")
        self.counts = torch.expm1((batch["x0"] + 1) * 0.5 * self.s_g).clamp_min(0)
        self.scale = cfg.scale

    def logits(self, w: torch.Tensor) -> torch.Tensor:
        return w[:, 0].view(1, -1, 1, 1) * torch.log(self.base + EPS) + torch.einsum(
            "bfhw,gf->bghw", self.features, w[:, 1:]
        )

    def units(self, w: torch.Tensor) -> torch.Tensor:
        """The density's map in model units (unobserved LR pixels keep the bicubic base)."""
        up = F.interpolate(self.total, scale_factor=self.scale, mode="nearest")
        mu = block_logp(self.logits(w), self.scale).exp() * up
        mu = torch.where(self.observed_hr.expand_as(mu) > 0, mu, self.base)
        return 2 * torch.log1p(mu) / self.s_g - 1

    def pcc(self, pred_units: torch.Tensor) -> np.ndarray:
        m = self.observed_hr[:, 0] > 0
        truth = self.batch["x0"]
        return np.array([pearson(pred_units[:, g][m].numpy(), truth[:, g][m].numpy()) for g in range(truth.shape[1])])


def fit(win: Windows, w0: torch.Tensor, lam: float, fixed_bicubic: bool) -> torch.Tensor:
    """Per-gene weights by the multinomial likelihood of the HR counts given each LR pixel's total (L-BFGS)."""
    free = torch.ones_like(w0)
    if fixed_bicubic:
        free[:, 0] = 0
    w = w0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([w], lr=1, max_iter=150, line_search_fn="strong_wolfe")
    weight = win.observed_hr.float()
    n = (win.counts * weight).sum((0, 2, 3)).clamp_min(1)

    def closure():
        opt.zero_grad()
        lp = block_logp(win.logits(w * free + w0 * (1 - free)), win.scale)
        loss = -((win.counts * lp * weight).sum((0, 2, 3)) / n).sum() + lam * (w - w0).square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return (w * free + w0 * (1 - free)).detach()


def run(dataset: str, scale: int, seed: int, args) -> None:
    sdata = bq.load(dataset, scale, seed, False)
    prep = Prepared.from_sdata(sdata, "diffst")
    region = split_region(prep, sdata, "train")
    size = choose_window(region, prep.tile_lr)
    cfg = _train._config(prep, "default", None, None, window_um=size * prep.grid.lr_um)
    source = TileSource.from_sdata(sdata, prep).cache_image(cfg.image_um)
    train_ds = WindowDataset(
        source, window_origins(region, size), size, image_um=cfg.image_um, gene_scale=prep.hr_scale
    )
    exponents = torch.tensor(_train._fit_base(cfg, train_ds).stain_exponents, dtype=torch.float32)
    gene_scale = torch.as_tensor(np.asarray(prep.hr_scale, dtype=np.float32))
    scales = (1, 3, 9) if args.multiscale else (1,)
    idx = np.unique(np.linspace(0, len(train_ds) - 1, min(_train.BASE_FIT_WINDOWS, len(train_ds))).round().astype(int))
    wins = {"train": Windows(train_ds, idx, cfg, gene_scale, scales)}
    for split in ("val", "test"):
        ds = WindowDataset(source, tiled_origins(prep.tiles(sdata, split), prep.tile_lr, size), size,
                           image_um=cfg.image_um, gene_scale=prep.hr_scale)  # fmt: skip
        wins[split] = Windows(ds, range(len(ds)), cfg, gene_scale, scales)
    kw = {"scale": cfg.scale, "per_hr": cfg.image_per_hr, "kind": cfg.image_kind, "channel": cfg.nuclear_channel,
          "gene_scale": gene_scale}  # fmt: skip

    def floor_pcc(split: str, ex) -> np.ndarray:
        b = wins[split].batch
        return wins[split].pcc(floor_model_units(b["lr"], b["mask"], b["image"], exponents=ex, **kw))

    res = {"floor": np.nanmean(floor_pcc("test", None))}
    fitted_val, fitted_test = floor_pcc("val", exponents), floor_pcc("test", exponents)
    res["fitted floor"] = np.nanmean(fitted_test)
    w0 = torch.zeros(cfg.n_genes, 1 + wins["train"].features.shape[1])
    w0[:, 0] = 1.0
    w0[:, 1 : 1 + exponents.shape[1]] = exponents  # the fitted exponents on the stains of the HR pixel
    for lam in args.lams:
        w = fit(wins["train"], w0, lam, args.fixed_bicubic)
        test, val = wins["test"].pcc(wins["test"].units(w)), wins["val"].pcc(wins["val"].units(w))
        use = np.nan_to_num(val - fitted_val) > 0.005
        res[f"log-linear λ={lam:g}"] = np.nanmean(test)
        res[f"gated λ={lam:g} ({int(use.sum())} genes)"] = np.nanmean(np.where(use, test, fitted_test))
    print(f"{dataset} {scale}× seed {seed}:", {k: round(float(v), 4) for k, v in res.items()}, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cells", nargs="+", help="dataset:scale:seed, e.g. merfish:10:2")
    parser.add_argument("--lams", type=float, nargs="*", default=[1.0, 0.1, 0.01])
    parser.add_argument("--multiscale", action="store_true", help="stains averaged over 1, 3 and 9 HR pixels")
    parser.add_argument("--fixed-bicubic", action="store_true", help="keep the bicubic factor's exponent at 1")
    args = parser.parse_args()
    torch.set_num_threads(2)
    for cell in args.cells:
        dataset, scale, seed = cell.split(":")
        run(dataset, int(scale), int(seed), args)


if __name__ == "__main__":
    main()
