"""Exploration (not adopted): the guard blends each gene with the model's fitted floor instead of the training-free one.

Rescores the ``accuracy`` experiment's cached Diff-ST models (no retraining): the guard is refitted and the slide
super-resolved with either blend partner; prints test PCC / RMSE, the guarded validation PCC, the partner's validation
PCC and the number of genes blended. Run from ``benchmarks/`` after ``bench_quality.py accuracy``::

    DIFFST_DATA_DIR=../../shared/data python explore/guard_partner.py merfish:5:1 merfish_roi:10:2
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_quality as bq

import diffst as dst
from diffst.model.floor import hr_stains, image_floor
from diffst.tl._baselines import FLOOR_PX_PER_HR, Upsampler, _interpolate, lr_per_hr_pixel, read_tile
from diffst.tl._guard import Validation, fit_guard

TRAINING_FREE = Upsampler._region
#: The fitted exponents ``(G, K)`` in the model's gene order and the slide's stains ``(K, H, W)``; ``None``: the
#: training-free floor.
EXPONENTS: dict[str, torch.Tensor | None] = {"value": None}
STAINS: dict[str, np.ndarray | None] = {"value": None}


def slide_stains(sdata, prep, n_stains: int, per_hr: int = FLOOR_PX_PER_HR, strip_lr: int = 16) -> np.ndarray:
    """Every stain's mean over each HR pixel of the prepared grid ``(K, H, W)`` (as ``slide_signal`` reads it)."""
    g, spec = prep.grid, prep.image
    h, w = g.lr_shape
    s = g.scale
    x0, y0 = g.origin_um
    parts = []
    for r0 in range(0, h, strip_lr):
        r1 = min(h, r0 + strip_lr)
        crop = read_tile(sdata.images[spec.key], spec, (x0, y0 + r0 * g.lr_um, x0 + w * g.lr_um, y0 + r1 * g.lr_um),
                         g.hr_um / per_hr)  # fmt: skip
        with torch.no_grad():
            parts.append(hr_stains(torch.from_numpy(crop)[None], spec.kind, per_hr,
                                   n_stains if spec.kind != "rgb" else None)[0].numpy())  # fmt: skip
    out = np.concatenate(parts, axis=1)
    return out[:, : h * s, : w * s]


def partner_region(self: Upsampler, r0: int, c0: int, r1: int, c1: int) -> np.ndarray:
    """``Upsampler._region`` with the fitted floor's exponents for the image floor (the guard's and inference's floor:
    both are made for the model's genes, in its order); ``Upsampler.block`` projects it as usual."""
    exponents = EXPONENTS["value"]
    if self.method != "image" or exponents is None:
        return TRAINING_FREE(self, r0, c0, r1, c1)
    assert exponents.shape[0] == len(self.gene_scale), "the floor is not of the model's genes"
    s = self.grid.scale
    lr, cov = self.lr[:, r0:r1, c0:c1], self.coverage[r0:r1, c0:c1]
    base = _interpolate(lr, cov, s, self.gene_scale, "bicubic")
    total = lr_per_hr_pixel(lr, cov, s) * s * s
    stains = np.ascontiguousarray(STAINS["value"][:, r0 * s : r1 * s, c0 * s : c1 * s])
    with torch.no_grad():
        return image_floor(torch.from_numpy(base)[None], torch.from_numpy(total)[None],
                           torch.from_numpy((cov > 0)[None, None]), torch.from_numpy(stains)[None], s,
                           exponents)[0].numpy()  # fmt: skip


def main() -> None:
    Upsampler._region = partner_region  # the floor of the guard's fit and of super_resolve's blend
    for spec in sys.argv[1:]:
        sdata, model, prep, seed = bq.cached_cell(spec)
        fitted = torch.tensor(model.config.stain_exponents, dtype=torch.float32)
        STAINS["value"] = slide_stains(sdata, prep, fitted.shape[1])
        res = {}
        for name, exponents in (("training-free floor", None), ("fitted floor", fitted)):
            EXPONENTS["value"] = exponents
            model.guard = fit_guard(Validation(sdata, prep), model, n_samples=4, seed=seed)
            dst.tl.super_resolve(sdata, model=model, n_samples=4, seed=seed, key_added="diffst_sr", overwrite=True)
            r = bq.score(sdata, "diffst_sr")
            v = model.guard.validation
            res[name] = {"test pcc": round(r["pcc"], 4), "test rmse": round(r["rmse"], 4),
                         "val guarded": round(v["guarded"]["pcc"], 4), "val partner": round(v["image_floor"]["pcc"], 4),
                         "blended genes": int(sum(a < 1 for a in model.guard.alpha))}  # fmt: skip
        print(spec, res, flush=True)


if __name__ == "__main__":
    main()
