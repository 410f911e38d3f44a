from __future__ import annotations

import json
from dataclasses import asdict

import pytest

from diffst.model import DiffSTConfig


@pytest.mark.parametrize("name", ["paper", "default", "tiny"])
def test_preset_json_round_trip(name):
    cfg = DiffSTConfig.preset(name)
    assert DiffSTConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert DiffSTConfig.from_dict(asdict(cfg)) == cfg


def test_paper_preset_matches_table3():
    cfg = DiffSTConfig.preset("paper")
    assert cfg.n_genes == 25
    assert cfg.n_patches == 256
    assert cfg.cell_patch_px == 320  # 160 µm at 0.5 µm/px
    assert (cfg.d_tissue, cfg.d_cell, cfg.d_attn) == (128, 128, 128)
    assert cfg.cam_window == 32
    assert cfg.graph_dim == 676
    assert cfg.graph_alpha == 0.2
    assert (cfg.learning_rate, cfg.weight_decay, cfg.adam_betas, cfg.adam_eps) == (1e-4, 1e-5, (0.9, 0.999), 1e-8)
    assert cfg.batch_size == 4
    assert cfg.num_train_timesteps == 1000
    assert (cfg.sampler, cfg.sample_steps, cfg.prediction_type) == ("ddpm", 1000, "epsilon")
    assert (cfg.hr_px, cfg.lr_px, cfg.image_px) == (250, 25, 5000)


def test_default_preset_geometry():
    cfg = DiffSTConfig.preset("default")
    assert (cfg.hr_px, cfg.lr_px, cfg.image_px, cfg.image_per_hr) == (40, 4, 200, 5)
    assert (cfg.cell_patch_px, cfg.n_patches) == (80, 9)
    assert cfg.lr_um == 100.0


def test_overrides_and_explicit_patch_count():
    cfg = DiffSTConfig.preset("tiny", n_genes=7, n_cell_patches=9)
    assert cfg.n_genes == 7
    assert cfg.cell_grid == 3


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"tile_um": 150.0}, "multiple of scale"),
        ({"image_um": 3.0}, "whole number"),
        ({"n_cell_patches": 10}, "square"),
        ({"prediction_type": "eps"}, "prediction_type"),
        ({"sampler": "euler"}, "sampler"),
        ({"curriculum_end": 1.0}, "curriculum"),
    ],
)
def test_invalid_configs(overrides, match):
    with pytest.raises(ValueError, match=match):
        DiffSTConfig.preset("tiny", **overrides)


def test_unknown_preset_and_fields():
    with pytest.raises(ValueError, match="Unknown preset"):
        DiffSTConfig.preset("huge")
    with pytest.raises(ValueError, match="Unknown DiffSTConfig fields"):
        DiffSTConfig.from_dict({"n_genes": 3, "bogus": 1})
