"""Exploration (not adopted): average the mean head over the 8 rotations/flips of each window at inference.

Rescores the ``accuracy`` experiment's cached Diff-ST models (no retraining): the guard is refitted and the slide
super-resolved once with the plain mean head and once with its dihedral average; prints test PCC / RMSE and the
guarded and model validation PCC of each. Run from ``benchmarks/`` after ``bench_quality.py accuracy``::

    DIFFST_DATA_DIR=../../shared/data python explore/tta.py merfish:10:2 merfish_roi:10:2
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_quality as bq

import diffst as dst
from diffst.model.diffusion import Diffusion
from diffst.tl._guard import fit_guard
from diffst.tl._lightning import dihedral, undihedral

PLAIN = Diffusion.predict_mean
TURNS = {"n": 1}


def averaged_mean(self, net, lr, mask, image):
    outs = []
    for k in range(TURNS["n"]):
        out = PLAIN(self, net, dihedral(lr, k), dihedral(mask, k), dihedral(image, k))
        if out is None:
            return None
        outs.append(undihedral(out, k))
    return torch.stack(outs).mean(0)


def main() -> None:
    Diffusion.predict_mean = averaged_mean
    for spec in sys.argv[1:]:
        sdata, model, prep, seed = bq.cached_cell(spec)
        res = {}
        for n in (1, 8):
            TURNS["n"] = n
            t0 = time.perf_counter()
            model.info["guard"] = fit_guard(sdata, prep, model, n_samples=4, seed=seed)
            dst.tl.super_resolve(sdata, model=model, n_samples=4, seed=seed, key_added="diffst_sr", overwrite=True)
            r = bq.score(sdata, "diffst_sr")
            v = model.info["guard"]["validation"]
            res[f"{n} turn(s)"] = {"test pcc": round(r["pcc"], 4), "test rmse": round(r["rmse"], 4),
                                   "val guarded": round(v["guarded"]["pcc"], 4), "val model": round(v["model"]["pcc"], 4),
                                   "seconds": round(time.perf_counter() - t0)}  # fmt: skip
        print(spec, res, flush=True)


if __name__ == "__main__":
    main()
