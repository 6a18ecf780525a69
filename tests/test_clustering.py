"""The generic clustering measures of STDN's Fig. 5 diagnostics: Davies-Bouldin index and seeded K-means."""
from __future__ import annotations

import math

import pytest
import torch

from heads.clustering import davies_bouldin, kmeans

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run fastest on one thread


def test_davies_bouldin_matches_a_hand_computation():
    points = torch.tensor([[0.0], [2.0], [10.0], [12.0], [20.0]])           # clusters {0, 2}, {10, 12}, {20}
    labels = torch.tensor([0, 0, 1, 1, 3])                                   # cluster 2 is empty
    # S = (1, 1, 0); centroid distances 10 (A-B), 19 (A-C), 9 (B-C); R_AB = 0.2, R_AC = 1/19, R_BC = 1/9
    expected = (0.2 + 0.2 + 1 / 9) / 3
    assert davies_bouldin(points, labels, 4).item() == pytest.approx(expected, rel=1e-6)
    batched = davies_bouldin(torch.stack([points, points]), torch.stack([labels, torch.zeros(5, dtype=torch.long)]), 4)
    assert batched[0].item() == pytest.approx(expected, rel=1e-6) and math.isnan(batched[1].item())


def test_davies_bouldin_gives_a_pair_with_the_same_centroid_zero_as_scikit_learn():
    points = torch.tensor([[-1.0], [1.0], [0.0], [0.0], [10.0], [12.0]])   # A = {-1, 1}, B = {0, 0}, C = {10, 12}
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    # S = (1, 0, 1); M_AB = 0 -> R_AB = 0 (scikit-learn: M = inf); R_AC = 2/11, R_BC = 1/11
    assert davies_bouldin(points, labels, 3).item() == pytest.approx((2 / 11 + 1 / 11 + 2 / 11) / 3, rel=1e-6)
    identical = davies_bouldin(torch.zeros(4, 2), torch.tensor([0, 0, 1, 1]), 2)    # scikit-learn: 0.0
    assert identical.item() == 0.0


def test_kmeans_finds_separated_clusters_repeatably():
    points = torch.tensor([[[0.0], [10.0], [1.0], [11.0]], [[5.0], [5.0], [-5.0], [-4.0]]])   # two frames
    labels = kmeans(points, 2)
    for frame, (a, b) in zip(labels.tolist(), ([0, 2], [0, 1])):
        assert frame[a] == frame[b] and len(set(frame)) == 2
    assert torch.equal(kmeans(points, 2), labels)
    # frame 0: S = (0.5, 0.5), M = 10 -> 0.1; frame 1: S = (0, 0.5), M = 9.5 -> 0.5 / 9.5
    assert davies_bouldin(points, labels, 2).tolist() == pytest.approx([0.1, 0.5 / 9.5], rel=1e-6)
