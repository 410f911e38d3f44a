from __future__ import annotations

import pytest
import torch

from diffst.model.cam import ConcatFusion, CrossModalModulation, DisentangledFusion, disentangling_loss


def test_disentangling_loss_formula():
    s_y = torch.ones(2, 1, 2, 2)
    s_h = torch.zeros(2, 1, 2, 2)
    s_h[1] = 0.5
    u_y = 3 * torch.ones(2, 1, 2, 2)
    u_h = -torch.ones(2, 1, 2, 2)
    # sample 0: ||1||=2, ||4||=8 -> 0.25; sample 1: ||0.5||=1, 8 -> 0.125
    assert disentangling_loss(s_y, s_h, u_y, u_h).item() == pytest.approx((0.25 + 0.125) / 2, rel=1e-5)
    assert disentangling_loss(s_y, s_y, u_y, u_h).item() == 0.0


def test_modulation_matches_window_loop():
    torch.manual_seed(0)
    c, a, h, w = 3, 4, 6, 7  # padded to 8 x 8: four windows, some partly padding
    cam = CrossModalModulation(c, a)
    with torch.no_grad():  # a non-identity filter so the check means something
        for fc in (cam.fc_h2y, cam.fc_y2h):
            fc.weight.normal_(0, 0.3)
            fc.bias.normal_(0, 0.3)
    f_y, f_h = torch.randn(2, c, h, w), torch.randn(2, c, h, w)
    y_mod, h_mod = cam(f_y, f_h)
    expected_y, expected_h = torch.zeros_like(f_y), torch.zeros_like(f_h)
    for b in range(2):
        for r0 in range(0, h, a):
            for c0 in range(0, w, a):
                ay = f_y[b, :, r0 : r0 + a, c0 : c0 + a].reshape(c, -1).T  # (pixels, c)
                ah = f_h[b, :, r0 : r0 + a, c0 : c0 + a].reshape(c, -1).T
                cov = ay.T @ ah / ay.shape[0]
                w_h2y = cam.fc_h2y(cov.flatten()).reshape(c, c)
                w_y2h = cam.fc_y2h(cov.T.flatten()).reshape(c, c)
                size = f_y[b, :, r0 : r0 + a, c0 : c0 + a].shape[1:]
                expected_y[b, :, r0 : r0 + a, c0 : c0 + a] = (ay @ w_h2y).T.reshape(c, *size)
                expected_h[b, :, r0 : r0 + a, c0 : c0 + a] = (ah @ w_y2h).T.reshape(c, *size)
    torch.testing.assert_close(y_mod, expected_y)
    torch.testing.assert_close(h_mod, expected_h)


def test_modulation_starts_near_identity():
    cam = CrossModalModulation(4, 4)
    torch.nn.init.zeros_(cam.fc_h2y.weight)
    torch.nn.init.zeros_(cam.fc_y2h.weight)
    f_y, f_h = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    y_mod, h_mod = cam(f_y, f_h)
    torch.testing.assert_close(y_mod, f_y)
    torch.testing.assert_close(h_mod, f_h)


def test_disentangling_loss_falls_when_shared_heads_are_trained():
    torch.manual_seed(0)
    fusion = DisentangledFusion(st_channels=6, image_channels=5, cam_dim=8, window=4, out_channels=6)
    f_y, f_h = torch.randn(2, 6, 12, 12), torch.randn(2, 5, 12, 12)
    shared = [*fusion.shared_y.parameters(), *fusion.shared_h.parameters()]
    optimizer = torch.optim.Adam(shared, lr=1e-2)
    with torch.no_grad():
        before = fusion(f_y, f_h)[1].item()
    for _ in range(30):
        cond, loss = fusion(f_y, f_h)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = fusion(f_y, f_h)[1].item()
    assert cond.shape == (2, 6, 12, 12)
    assert after < 0.7 * before


def test_concat_fusion_has_no_dis_loss():
    fusion = ConcatFusion(st_channels=6, image_channels=5, out_channels=4)
    cond, loss = fusion(torch.randn(2, 6, 8, 8), torch.randn(2, 5, 8, 8))
    assert cond.shape == (2, 4, 8, 8)
    assert loss.item() == 0.0
