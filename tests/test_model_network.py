from __future__ import annotations

import pytest
import torch

from diffst.model import DiffSTConfig, DiffSTNet, coexpression_intensity


def _inputs(cfg: DiffSTConfig, batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h = cfg.lr_px
    return {
        "x_t": torch.randn(batch, cfg.n_genes, cfg.hr_px, cfg.hr_px, generator=g),
        "t": torch.randint(0, cfg.num_train_timesteps, (batch,), generator=g),
        "lr": torch.rand(batch, cfg.n_genes, h, h, generator=g) * 2 - 1,
        "mask": torch.ones(batch, 1, h, h),
        "image": torch.rand(batch, cfg.image_channels, cfg.image_px, cfg.image_px, generator=g),
    }


def _randomize(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter (zero-initialised ones included) a deterministic, name-keyed random value."""
    for name, p in net.named_parameters():
        g = torch.Generator().manual_seed(seed + sum(map(ord, name)))
        with torch.no_grad():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 + float(p.ndim == 1 and name.endswith("weight")))
    return net


def _n_params(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize(
    ("name", "overrides", "batch"),
    [("tiny", {}, 2), ("default", {}, 2), ("paper", {"tile_um": 500.0}, 1)],
)
def test_output_shapes(name, overrides, batch):
    cfg = DiffSTConfig.preset(name, **overrides)
    net = DiffSTNet(cfg).eval()
    with torch.no_grad():
        out = net(**_inputs(cfg, batch), progress=0.5)
    assert out.sample.shape == (batch, cfg.n_genes, cfg.hr_px, cfg.hr_px)
    assert out.dis_loss.ndim == 0 and torch.isfinite(out.dis_loss)
    assert 0 < out.kept_fraction <= 1
    if name == "paper":
        assert cfg.d_tissue == cfg.d_cell == cfg.d_attn == 128 and cfg.cam_window == 32 and cfg.graph_dim == 676


def test_untrained_output_is_zero_and_gradients_flow():
    cfg = DiffSTConfig.preset("tiny")
    net = DiffSTNet(cfg)
    out = net(**_inputs(cfg, 2))
    assert out.sample.abs().max() == 0  # zero-initialised last conv
    (out.sample.sum() + out.dis_loss).backward()
    assert net.unet.out[-1].weight.grad.abs().sum() > 0
    assert net.image_encoder.cell.proj.weight.grad is not None


@pytest.mark.parametrize("channels", [1, 2, 4])
def test_any_image_channels(channels):
    cfg = DiffSTConfig.preset("tiny", image_channels=channels)
    out = DiffSTNet(cfg)(**_inputs(cfg, 1))
    assert out.sample.shape == (1, cfg.n_genes, cfg.hr_px, cfg.hr_px)


@pytest.mark.parametrize("switch", ["cam", "cigc_graph", "hierarchical"])
def test_ablation_switch_changes_output_and_parameters(switch):
    full_cfg = DiffSTConfig.preset("tiny")
    ablated_cfg = DiffSTConfig.preset("tiny", **{switch: False})
    full, ablated = _randomize(DiffSTNet(full_cfg)).eval(), _randomize(DiffSTNet(ablated_cfg)).eval()
    # same weights wherever the two networks share a parameter, so only the switch differs
    full_state = full.state_dict()
    shared = {k: v for k, v in ablated.state_dict().items() if k in full_state and full_state[k].shape == v.shape}
    ablated.load_state_dict({**ablated.state_dict(), **{k: full_state[k] for k in shared}})
    inputs = _inputs(full_cfg, 2)
    with torch.no_grad():
        a, b = full(**inputs), ablated(**inputs)
    assert _n_params(ablated) < _n_params(full)
    assert not torch.allclose(a.sample, b.sample, atol=1e-4)
    if switch == "cam":
        assert a.dis_loss > 0 and b.dis_loss == 0
    if switch == "hierarchical":
        assert b.kept_fraction == 0.0
    if switch == "cigc_graph":
        assert ablated.graph is None


def test_coexpr_buffer_is_saved():
    cfg = DiffSTConfig.preset("tiny")
    counts = torch.poisson(torch.full((cfg.n_genes, 50), 0.7), generator=torch.Generator().manual_seed(0))
    coexpr = torch.tensor(coexpression_intensity(counts), dtype=torch.float32)
    net = DiffSTNet(cfg, coexpr=coexpr)
    state = net.state_dict()
    torch.testing.assert_close(state["graph.coexpr"], coexpr)
    restored = DiffSTNet(cfg)
    restored.load_state_dict(state)
    torch.testing.assert_close(restored.graph.coexpr, coexpr)


def test_input_checks():
    cfg = DiffSTConfig.preset("tiny")
    net = DiffSTNet(cfg)
    inputs = _inputs(cfg, 1)
    with pytest.raises(ValueError, match="gene channels"):
        net(**{**inputs, "x_t": inputs["x_t"][:, :2]})
    with pytest.raises(ValueError, match="image has shape"):
        net(**{**inputs, "image": inputs["image"][..., :-1]})
    with pytest.raises(ValueError, match="lr has shape"):
        net(**{**inputs, "lr": inputs["lr"][..., :-1]})
