from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffst.model import DiffSTConfig, DiffSTNet, DiffSTOutput, Diffusion, upsample_lr
from diffst.model.upsample import fill_unobserved

# diffusers' DPM-Solver calls np.array(tensor, copy=False) internally (numpy 2 deprecation, harmless)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


class DummyNet(nn.Module):
    """Deterministic stand-in denoiser: predicts ε = 0.1 x_t."""

    def forward(self, x_t, t, lr, mask, image, *, progress=1.0):
        return DiffSTOutput(sample=0.1 * x_t, dis_loss=x_t.new_zeros(()), kept_fraction=0.0)


def _conditions(cfg: DiffSTConfig, batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = cfg.lr_px
    lr = torch.rand(batch, cfg.n_genes, h, h, generator=g) * 2 - 1
    mask = torch.ones(batch, 1, h, h)
    image = torch.rand(batch, cfg.image_channels, cfg.image_px, cfg.image_px, generator=g)
    return lr, mask, image


def _smooth_batch(cfg: DiffSTConfig, batch: int = 2, seed: int = 0):
    """HR maps with structure finer than the LR grid, their sum-pooled LR maps and a matching image."""
    g = torch.Generator().manual_seed(seed)
    field = F.interpolate(torch.randn(batch, cfg.n_genes, 8, 8, generator=g), size=cfg.hr_px, mode="bicubic")
    x0 = torch.tanh(field)
    lr = F.avg_pool2d(x0, cfg.scale)
    image = F.interpolate(x0[:, :3].sigmoid(), size=cfg.image_px, mode="nearest")
    return x0, lr, torch.ones_like(lr[:, :1]), image


# ---------------------------------------------------------------------------------------- schedule
def test_schedule_closed_form():
    cfg = DiffSTConfig.preset("tiny", objective="diffusion", base="bicubic")
    diffusion = Diffusion(cfg)
    abar = diffusion.alphas_cumprod
    assert abar.shape == (1000,)
    assert abar[0].item() == pytest.approx(1 - cfg.beta_start, rel=1e-6)
    assert (abar[1:] < abar[:-1]).all()
    assert abar[-1].item() < 1e-4

    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    t0 = torch.zeros(2, dtype=torch.long)
    expected = (1 - cfg.beta_start) ** 0.5 * x0 + cfg.beta_start**0.5 * noise
    torch.testing.assert_close(diffusion.scheduler.add_noise(x0, noise, t0), expected)
    t = torch.tensor([10, 900])
    a = abar[t].reshape(-1, 1, 1, 1)
    torch.testing.assert_close(diffusion.scheduler.add_noise(x0, noise, t), a.sqrt() * x0 + (1 - a).sqrt() * noise)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_predict_x0_inverts_the_target(prediction_type):
    cfg = DiffSTConfig.preset("tiny", objective="diffusion", base="bicubic", prediction_type=prediction_type)
    diffusion = Diffusion(cfg)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    t = torch.tensor([0, 500, 999])
    x_t = diffusion.scheduler.add_noise(x0, noise, t)
    target = {"epsilon": noise, "sample": x0, "v_prediction": diffusion.scheduler.get_velocity(x0, noise, t)}
    torch.testing.assert_close(diffusion.predict_x0(target[prediction_type], x_t, t), x0, atol=2e-3, rtol=1e-3)


# ---------------------------------------------------------------------------------------- sampling
# Recorded with DummyNet on the tiny preset (ε-prediction, residual, clipping off so the numbers test the
# scheduler arithmetic), _conditions(seed=0), generator seed 0, default steps (1000 / 10 / 10).
GOLDEN = {
    "ddpm": (-1.8199116, [-63.417446, 28.584511, -18.020903, -18.302704]),
    "ddim": (0.8743817, [-113.63884, -116.29488, -25.182467, -43.461941]),
    "dpmsolver": (0.7934178, [-103.64864, -106.06937, -22.958946, -39.611893]),
}


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmsolver"])
def test_sampler_golden_numbers(sampler):
    cfg = DiffSTConfig.preset(
        "tiny", objective="diffusion", base="bicubic", prediction_type="epsilon", x0_range=(-1e3, 1e3)
    )
    lr, mask, image = _conditions(cfg)
    out = Diffusion(cfg).sample(
        DummyNet(), lr, mask, image, sampler=sampler, generator=torch.Generator().manual_seed(0)
    )
    assert out.shape == (2, cfg.n_genes, cfg.hr_px, cfg.hr_px)
    mean, first = GOLDEN[sampler]
    assert out.mean().item() == pytest.approx(mean, rel=1e-4)
    torch.testing.assert_close(out.flatten()[:4], torch.tensor(first), atol=0, rtol=1e-4)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize(("sampler", "steps"), [("ddpm", None), ("ddim", 10), ("dpmsolver", 10)])
def test_oracle_denoiser_recovers_x0(prediction_type, sampler, steps):
    # For a point-mass data distribution the exact denoiser is known in closed form: every sampler
    # must then land on that point, whatever the prediction type.
    cfg = DiffSTConfig.preset("tiny", objective="diffusion", base="bicubic", prediction_type=prediction_type)
    diffusion = Diffusion(cfg)
    lr, mask, image = _conditions(cfg)
    base = diffusion.baseline(lr, mask)
    x0 = (base + 0.3 * torch.randn(base.shape, generator=torch.Generator().manual_seed(1))).clamp(-1, 1)
    residual = x0 - base

    class Oracle(nn.Module):
        def forward(self, x_t, t, lr, mask, image, *, progress=1.0):
            a = diffusion.alphas_cumprod[t].reshape(-1, 1, 1, 1)
            eps = (x_t - a.sqrt() * residual) / (1 - a).sqrt()
            out = {"epsilon": eps, "sample": residual, "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * residual}
            return DiffSTOutput(sample=out[prediction_type], dis_loss=x_t.new_zeros(()), kept_fraction=0.0)

    out = diffusion.sample(Oracle(), lr, mask, image, sampler=sampler, steps=steps, generator=torch.Generator())
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=0)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmsolver"])
def test_same_seed_same_samples(sampler):
    cfg = DiffSTConfig.preset("tiny", objective="diffusion", base="bicubic", prediction_type="epsilon")
    diffusion, net = Diffusion(cfg), DummyNet()
    lr, mask, image = _conditions(cfg)

    def draw(seed):
        return diffusion.sample(
            net, lr, mask, image, sampler=sampler, steps=10, generator=torch.Generator().manual_seed(seed)
        )

    a, b, c = draw(0), draw(0), draw(1)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert (a - c).abs().max() > 1e-3


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmsolver"])
def test_untrained_residual_x0_model_returns_the_baseline(sampler):
    # zero-initialised output + residual + x0-prediction: every step predicts "no residual"
    cfg = DiffSTConfig.preset("tiny", objective="diffusion", base="bicubic", prediction_type="sample")
    lr, mask, image = _conditions(cfg, batch=1)
    out = Diffusion(cfg).sample(DiffSTNet(cfg).eval(), lr, mask, image, sampler=sampler, steps=5)
    torch.testing.assert_close(out, upsample_lr(lr, mask, cfg.scale).clamp(*cfg.x0_range), atol=1e-5, rtol=0)


def test_samples_are_clipped_to_x0_range():
    cfg = DiffSTConfig.preset(
        "tiny", objective="diffusion", base="bicubic", prediction_type="epsilon", x0_range=(-1.0, 1.0)
    )
    lr, mask, image = _conditions(cfg)
    out = Diffusion(cfg).sample(DummyNet(), lr, mask, image, steps=10, generator=torch.Generator().manual_seed(0))
    assert out.min() >= -1 - 1e-5 and out.max() <= 1 + 1e-5


# ---------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("residual", [True, False])
def test_training_losses(prediction_type, residual):
    cfg = DiffSTConfig.preset(
        "tiny", objective="diffusion", base="bicubic", prediction_type=prediction_type, residual=residual
    )
    x0, lr, mask, image = _smooth_batch(cfg)
    losses = Diffusion(cfg).training_losses(
        DiffSTNet(cfg), x0, lr, mask, image, progress=0.3, generator=torch.Generator().manual_seed(0)
    )
    assert set(losses) == {"loss", "mse", "dis", "kept_fraction"}
    assert all(torch.isfinite(v) for v in losses.values())
    torch.testing.assert_close(losses["loss"], losses["mse"] + cfg.dis_weight * losses["dis"])
    losses["loss"].backward()


def test_training_losses_are_reproducible():
    cfg = DiffSTConfig.preset("tiny", objective="diffusion", base="bicubic")
    x0, lr, mask, image = _smooth_batch(cfg)
    torch.manual_seed(0)
    net, diffusion = DiffSTNet(cfg), Diffusion(cfg)
    with torch.no_grad():
        a = diffusion.training_losses(net, x0, lr, mask, image, generator=torch.Generator().manual_seed(3))
        b = diffusion.training_losses(net, x0, lr, mask, image, generator=torch.Generator().manual_seed(3))
    assert a["mse"].item() == b["mse"].item()


@pytest.mark.slow
def test_overfits_a_tiny_batch():
    cfg = DiffSTConfig.preset("tiny", objective="diffusion", base="bicubic")
    x0, lr, mask, image = _smooth_batch(cfg)
    torch.manual_seed(0)
    net, diffusion = DiffSTNet(cfg), Diffusion(cfg)
    optimizer = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=cfg.weight_decay)

    def eval_mse():
        with torch.no_grad():
            return diffusion.training_losses(net, x0, lr, mask, image, generator=torch.Generator().manual_seed(123))[
                "mse"
            ].item()

    before = eval_mse()
    g = torch.Generator().manual_seed(0)
    for step in range(40):
        loss = diffusion.training_losses(net, x0, lr, mask, image, progress=step / 40, generator=g)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert eval_mse() < 0.5 * before


# ---------------------------------------------------------------------------------------- LR baseline
def test_upsample_fully_observed_is_bicubic():
    lr = torch.rand(2, 3, 4, 4) * 2 - 1
    expected = F.interpolate(lr, scale_factor=5, mode="bicubic", align_corners=False)
    torch.testing.assert_close(upsample_lr(lr, torch.ones(2, 1, 4, 4), 5), expected)


def test_fill_unobserved_by_hand():
    lr = torch.tensor([[[[1.0, 2.0, 3.0], [4.0, -1.0, 6.0], [7.0, 8.0, 9.0]]]])
    mask = torch.ones(1, 1, 3, 3)
    mask[..., 1, 1] = 0.0
    mask[..., 0, 0] = 0.5  # a partly observed pixel counts half
    filled = fill_unobserved(lr, mask)
    expected_centre = (0.5 * 1 + 2 + 3 + 4 + 6 + 7 + 8 + 9) / 7.5
    assert filled[0, 0, 1, 1].item() == pytest.approx(expected_centre)
    observed = mask > 0
    torch.testing.assert_close(filled[observed.expand_as(lr)], lr[observed.expand_as(lr)])
    # nothing observed anywhere: no counts
    assert (fill_unobserved(lr, torch.zeros_like(mask)) == -1).all()


def test_regression_objective_is_a_one_step_mse_model():
    import torch

    from diffst.model import DiffSTConfig, DiffSTNet, Diffusion

    cfg = DiffSTConfig.preset("tiny", objective="regression", base="bicubic")
    net, diffusion = DiffSTNet(cfg), Diffusion(cfg)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand((2, cfg.n_genes, cfg.hr_px, cfg.hr_px), generator=g) * 2 - 1
    lr = torch.nn.functional.avg_pool2d(x0, cfg.scale)
    mask = torch.ones((2, 1, cfg.lr_px, cfg.lr_px))
    image = torch.rand((2, cfg.image_channels, cfg.image_px, cfg.image_px), generator=g)
    losses = diffusion.training_losses(net, x0, lr, mask, image)
    # untrained (zero-initialised output): the prediction is the bicubic baseline, so the MSE is its residual error
    base = diffusion.baseline(lr, mask)
    assert torch.allclose(losses["mse"], ((x0 - base) ** 2).mean(), atol=1e-6)
    a = diffusion.sample(net, lr, mask, image, generator=torch.Generator().manual_seed(1))
    b = diffusion.sample(net, lr, mask, image, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)  # deterministic: no noise
    assert torch.allclose(a, base.clamp(*cfg.x0_range))
    with pytest.raises(ValueError, match="objective"):
        DiffSTConfig.preset("tiny", objective="gan")
