"""Write a tiny prepared store with the diffst of commit 3e6d65e (before the contract module)."""

import sys, shutil

sys.path.insert(0, "/tmp/old/src")
sys.path.insert(0, "/tmp/old")
import diffst as dst

assert dst.__file__.startswith("/tmp/old"), dst.__file__
from tests.toy import toy_xenium

out = sys.argv[1]
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
print(sorted(sdata.attrs), sdata.attrs["diffst"]["genes"], list(sdata.images))
