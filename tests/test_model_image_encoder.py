from __future__ import annotations

import math

import pytest
import torch

from diffst.model import DiffSTConfig, patch_entropy
from diffst.model.image_encoder import (
    CellToTissueAttention,
    HierarchicalImageEncoder,
    extract_patches,
    select_patches,
)


def test_entropy_closed_form():
    constant = torch.full((3, 8, 8), 0.37)
    assert patch_entropy(constant).item() == pytest.approx(0.0, abs=1e-6)

    two_levels = torch.full((3, 8, 8), 0.1)
    two_levels[:, :4] = 0.9  # half the pixels in another bin
    assert patch_entropy(two_levels).item() == pytest.approx(1.0, abs=1e-6)

    four_levels = torch.zeros(1, 8, 8)
    for i, v in enumerate([0.05, 0.3, 0.6, 0.95]):
        four_levels[:, 2 * i : 2 * i + 2] = v
    assert patch_entropy(four_levels).item() == pytest.approx(2.0, abs=1e-6)

    # grey level = mean over channels: any number of channels works
    assert patch_entropy(torch.rand(2, 5, 1, 16, 16)).shape == (2, 5)
    uniform = torch.linspace(0, 1 - 1e-6, 32 * 8).reshape(1, 16, 16)
    assert patch_entropy(uniform, bins=32).item() == pytest.approx(math.log2(32), abs=1e-5)


def test_extract_patches_cover_image_with_overlap():
    image = torch.arange(2 * 1 * 10 * 10, dtype=torch.float32).reshape(2, 1, 10, 10)
    patches = extract_patches(image, patch=4, grid=3)  # starts 0, 3, 6
    assert patches.shape == (2, 9, 1, 4, 4)
    torch.testing.assert_close(patches[:, 0], image[:, :, 0:4, 0:4])
    torch.testing.assert_close(patches[:, 5], image[:, :, 3:7, 6:10])
    torch.testing.assert_close(patches[:, 8], image[:, :, 6:10, 6:10])


def test_select_patches_rank_rule():
    entropy = torch.tensor([[0.5, 2.0, 1.0, 3.0], [1.0, 1.0, 1.0, 1.0]])
    assert select_patches(entropy, 0.0).all()
    keep = select_patches(entropy, 0.5)
    assert keep[0].tolist() == [False, True, False, True]
    assert keep.sum(1).tolist() == [2, 2]
    assert select_patches(entropy, 0.99).sum(1).tolist() == [1, 1]  # always at least one


def _varied_entropy_image(cfg: DiffSTConfig, generator: torch.Generator) -> torch.Tensor:
    """An image whose cell patches have increasing numbers of grey levels (so increasing entropy)."""
    image = torch.zeros(2, cfg.image_channels, cfg.image_px, cfg.image_px)
    grid, step = cfg.cell_grid, cfg.image_px // cfg.cell_grid
    for m in range(grid * grid):
        r, c = divmod(m, grid)
        levels = (torch.randint(0, m + 1, (2, 1, step, step), generator=generator) + 0.5) / (m + 1)
        image[:, :, r * step : (r + 1) * step, c * step : (c + 1) * step] = levels
    return image


def test_curriculum_keeps_fewer_more_complex_patches():
    cfg = DiffSTConfig.preset("default", curriculum_start=0.0, curriculum_end=0.6)
    encoder = HierarchicalImageEncoder(cfg).eval()
    image = _varied_entropy_image(cfg, torch.Generator().manual_seed(0))
    fractions, mean_entropies = [], []
    for progress in [0.0, 0.25, 0.5, 0.75, 1.0]:
        _, entropy, keep = encoder.curriculum(image, progress)
        with torch.no_grad():
            _, kept_fraction = encoder(image, progress)
        assert kept_fraction == pytest.approx(keep.float().mean().item())
        fractions.append(kept_fraction)
        mean_entropies.append((entropy * keep).sum().item() / keep.sum().item())
    assert fractions[0] == 1.0
    assert all(a >= b for a, b in zip(fractions, fractions[1:]))
    assert fractions[-1] < fractions[0]
    assert all(a <= b + 1e-9 for a, b in zip(mean_entropies, mean_entropies[1:]))
    assert mean_entropies[-1] > mean_entropies[0]


def test_curriculum_changes_features():
    torch.manual_seed(0)
    cfg = DiffSTConfig.preset("tiny", curriculum_end=0.7)
    encoder = HierarchicalImageEncoder(cfg).eval()
    image = _varied_entropy_image(cfg, torch.Generator().manual_seed(1))
    with torch.no_grad():
        early, _ = encoder(image, 0.0)
        late, _ = encoder(image, 1.0)
    assert not torch.allclose(early, late)


def test_attention_ignores_dropped_patches():
    torch.manual_seed(0)
    attention = CellToTissueAttention(d_tissue=8, d_cell=6, d_attn=4)
    f_tissue, f_cell = torch.randn(2, 8, 5, 5), torch.randn(2, 4, 6)
    keep = torch.tensor([[True, False, True, False], [False, False, False, True]])
    changed = f_cell.clone()
    changed[~keep] = 100 * torch.randn(int((~keep).sum()), 6)
    torch.testing.assert_close(attention(f_tissue, f_cell, keep), attention(f_tissue, changed, keep))


def test_non_hierarchical_has_no_cell_branch():
    cfg = DiffSTConfig.preset("tiny", hierarchical=False)
    encoder = HierarchicalImageEncoder(cfg)
    assert not hasattr(encoder, "cell") and not hasattr(encoder, "attention")
    full = HierarchicalImageEncoder(DiffSTConfig.preset("tiny"))
    assert sum(p.numel() for p in encoder.parameters()) < sum(p.numel() for p in full.parameters())
    features, kept = encoder(torch.rand(1, 3, cfg.image_px, cfg.image_px))
    assert features.shape == (1, cfg.d_tissue, cfg.hr_px, cfg.hr_px)
    assert kept == 0.0
