from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import sparse

from diffst.model import coexpression_intensity, normalize_coexpression
from diffst.model.graph import CIGCGraph

# 3 genes x 4 pixels. Detected: g0 in {0, 2}, g1 in {0, 1}, g2 in {3}.
COUNTS = np.array(
    [
        [2, 0, 1, 0],  # total 3
        [1, 1, 0, 0],  # total 2
        [0, 0, 0, 4],  # total 4
    ]
)
# p(0|1) = share of g1's counts where g0 is detected = 1/2; p(1|0) = 2/3; g2 never co-occurs.
I_HAND = np.array([[1, 7 / 12, 0], [7 / 12, 1, 0], [0, 0, 1]])
# D = diag(19/12, 19/12, 1): Î = D^-1/2 I D^-1/2
I_NORM_HAND = np.array([[12 / 19, 7 / 19, 0], [7 / 19, 12 / 19, 0], [0, 0, 1]])


def test_coexpression_intensity_by_hand():
    intensity = coexpression_intensity(COUNTS)
    np.testing.assert_allclose(intensity, I_HAND)
    np.testing.assert_allclose(coexpression_intensity(sparse.csr_matrix(COUNTS)), I_HAND)
    np.testing.assert_allclose(coexpression_intensity(torch.tensor(COUNTS)), I_HAND)


def test_coexpression_intensity_properties():
    rng = np.random.default_rng(0)
    counts = rng.poisson(0.5, size=(6, 200))
    counts[5] = 0  # a gene without counts
    intensity = coexpression_intensity(counts)
    np.testing.assert_allclose(intensity, intensity.T)
    np.testing.assert_allclose(np.diag(intensity), 1.0)
    assert intensity.min() >= 0 and intensity.max() <= 1
    np.testing.assert_allclose(intensity[5, :5], 0.0)


def test_coexpression_intensity_rejects_bad_counts():
    with pytest.raises(ValueError, match="non-negative"):
        coexpression_intensity(-COUNTS)
    with pytest.raises(ValueError, match="2-D"):
        coexpression_intensity(COUNTS.ravel())


def test_normalized_matrix_by_hand():
    normalized = normalize_coexpression(torch.tensor(I_HAND, dtype=torch.float64))
    np.testing.assert_allclose(normalized.numpy(), I_NORM_HAND, rtol=1e-12)
    np.testing.assert_allclose(normalized.numpy(), normalized.numpy().T)


def test_graph_residual_formula():
    torch.manual_seed(0)
    graph = CIGCGraph(n_genes=3, grid=2, node_channels=2, alpha=0.2, coexpr=torch.tensor(I_HAND))
    f_x = torch.randn(4, 3, 8)
    i_norm = torch.tensor(I_NORM_HAND, dtype=torch.float32)
    f_mid = F.silu(torch.einsum("ij,bjc->bic", i_norm, f_x) @ graph.w_g.weight.T)
    torch.testing.assert_close(graph.propagate(f_x), 0.2 * f_mid + 0.8 * f_x)
    out = graph(torch.randn(4, 3, 16, 16))
    assert out.shape == (4, 3, 16, 16)
    assert "coexpr" in graph.state_dict()


def test_graph_shares_information_only_along_coexpression():
    torch.manual_seed(0)
    graph = CIGCGraph(n_genes=3, grid=2, node_channels=2, alpha=0.2, coexpr=torch.tensor(I_HAND))
    x = torch.randn(1, 3, 16, 16)
    changed = x.clone()
    changed[:, 0] += 1.0  # g0 co-occurs with g1 only
    delta = (graph(changed) - graph(x)).abs().flatten(2).amax(-1)[0]
    assert delta[1] > 0 and delta[2] == 0


def test_graph_rejects_bad_coexpr():
    with pytest.raises(ValueError, match="symmetric"):
        CIGCGraph(3, 2, 2, 0.2, coexpr=torch.tensor([[1.0, 0.2, 0], [0.5, 1, 0], [0, 0, 1]]))
    with pytest.raises(ValueError, match=r"\(3, 3\)"):
        CIGCGraph(3, 2, 2, 0.2, coexpr=torch.eye(4))
