"""How ``prepared_0.1.0.dev0.zarr`` was written: by diffst at commit 3e6d65e, before ``diffst._contract`` existed.

    git worktree add /tmp/old 3e6d65e
    python tests/data/make_prepared_0.1.0.dev0.py /tmp/old tests/data/prepared_0.1.0.dev0.zarr

A 240 µm toy section (tests/toy.py), 4 genes prepared at 40 → 10 µm, a bicubic SR result and a recorded model path
(the transcripts are dropped to keep the store small). ``tests/test_contract.py`` reads it with the current code.
"""

import shutil
import sys

old, out = sys.argv[1], sys.argv[2]
sys.path[:0] = [f"{old}/src", old]

from tests.toy import toy_xenium  # noqa: E402

import diffst as dst  # noqa: E402

assert dst.__file__.startswith(old), dst.__file__
sdata = toy_xenium(size_um=240.0, pixel_size=1.0, n=6000, seed=3)
dst.settings.verbosity = 0
dst.pp.prepare(sdata, genes=4, lr_um=40.0, scale=4, tile_um=80.0, split=(0.5, 0.25, 0.25), seed=0)
dst.tl.upsample(sdata, method="bicubic")
sdata.attrs["diffst"]["model"] = {
    "path": "/nonexistent/model.pt",
    "preset": "tiny",
    "seed": 0,
    "steps": 1,
    "best_val_loss": 1.0,
}
del sdata.points["transcripts"]
shutil.rmtree(out, ignore_errors=True)
sdata.write(out)
