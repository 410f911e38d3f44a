"""timm encoders with randomly initialised models (no download): shapes, weights, offline files, the refusal.

timm needs a torchvision built for the installed torch; CI runs these in a second environment
(``.ci/run``: torch 2.14.1 with torchvision 0.29.1) and the main run skips them when timm cannot be imported.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import diffst as dst
from diffst._spatial import image_levels
from diffst.features import TimmEncoder, weights_hash

from .test_features import FAST, _he_with_square

timm = pytest.importorskip("timm", reason="timm (with a torchvision matching torch) is not installed")
pytestmark = pytest.mark.timm

VIT = "vit_tiny_patch16_224"


def _encoder(seed: int = 0, **kw) -> TimmEncoder:
    torch.manual_seed(seed)  # random weights: the seed makes them reproducible
    return TimmEncoder(VIT, pretrained=False, **kw)


def test_vit_features_per_hr_pixel():
    enc = _encoder()
    assert enc.name == f"timm:{VIT}" and enc.dim == 192 and enc.input_px == 224 and enc.prefix == 1
    assert enc.fingerprint() == weights_hash(enc.model.state_dict())
    crop = np.random.default_rng(0).random((2, 3, 300, 260), dtype=np.float32)
    f = enc.encode(crop, per_hr=20)
    assert f.shape == (2, 192, 15, 13) and np.isfinite(f).all()
    assert np.array_equal(f, enc.encode(crop, per_hr=20))  # deterministic
    assert not np.allclose(f[0], f[1])
    assert _encoder().fingerprint() == enc.fingerprint() != _encoder(seed=1).fingerprint()


def test_cnn_features_per_hr_pixel():
    torch.manual_seed(0)
    enc = TimmEncoder("resnet18", pretrained=False)
    f = enc.encode(np.random.default_rng(0).random((1, 3, 224, 224), dtype=np.float32), per_hr=16)
    assert f.shape == (1, 512, 14, 14) and np.isfinite(f).all()


def test_offline_weights_file_gives_the_same_encoder(tmp_path):
    from safetensors.torch import save_file

    enc = _encoder()
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in enc.model.state_dict().items()}, str(path))
    offline = TimmEncoder(VIT, weights=path)
    assert offline.fingerprint() == enc.fingerprint() and offline.pretrained
    crop = np.random.default_rng(1).random((1, 3, 224, 224), dtype=np.float32)
    assert np.allclose(offline.encode(crop, per_hr=16), enc.encode(crop, per_hr=16), atol=1e-5)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TimmEncoder(VIT, weights=tmp_path / "missing.safetensors")


@pytest.mark.slow
def test_timm_features_train_and_refuse_other_weights(tmp_path):
    sdata = _he_with_square()
    dst.pp.image_features(sdata, encoder=_encoder(), n_components=8)
    info = sdata.attrs["diffst"]["image_features"]
    feats = np.asarray(image_levels(sdata.images[info["key"]])[0].values)
    assert feats.shape[0] == 8 and info["encoder"]["name"] == f"timm:{VIT}" and info["um_per_px"] == 0.5
    model = dst.tl.train(sdata, image_encoder=f"timm:{VIT}", checkpoint_dir=tmp_path / "run", **FAST)
    assert model.config.feature_channels == 8 and model.info["image_features"]["fingerprint"] == info["fingerprint"]
    dst.tl.super_resolve(sdata, model=model, n_samples=1, key_added="sr_timm")
    # other random weights: refused, with the command that makes the right ones
    dst.pp.image_features(sdata, encoder=_encoder(seed=1), projection=info["projection"], overwrite=True)
    with pytest.raises(ValueError, match=r"weights or parameters differ.*with the same `weights`"):
        dst.tl.super_resolve(sdata, model=model, n_samples=1, key_added="sr_other")
    # a timm model's features are not computed behind the user's back
    del sdata.images["diffst_features"]
    del sdata.attrs["diffst"]["image_features"]
    with pytest.raises(ValueError, match="lack; compute them as in training"):
        dst.tl.super_resolve(sdata, model=model, n_samples=1, key_added="sr_other")
