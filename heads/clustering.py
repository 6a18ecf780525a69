"""Generic clustering measures: the Davies-Bouldin index and a seeded Lloyd's K-means, batched over sets.

Nothing here is specific to a paper. STDN's §4.2 diagnostics (``heads/stdn.py``, ``STDN.diagnostics``) use them
for Fig. 5: K-means clusters each frame's cached position features as the paper's reference, and the
Davies-Bouldin index scores both that clustering and the SGM's grouping of the same positions.

The index follows scikit-learn's ``davies_bouldin_score``: a pair of clusters whose centroids coincide (zero
separation, M_kj = 0) contributes 0 to its ratio, as scikit-learn sets such a distance to infinity; a set with
fewer than two non-empty clusters has no index (NaN).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

KMEANS_ITERATIONS = 10   # Lloyd steps of Fig. 5's reference clustering (the paper does not say)


def davies_bouldin(points: Tensor, labels: Tensor, num_clusters: int) -> Tensor:
    """Davies-Bouldin index of each set (Fig. 5; as scikit-learn): points [..., P, D], labels [..., P] -> [...].

    S_k is the mean distance of cluster k's points to their centroid, M_kj the distance between centroids,
    DB = mean over clusters of max_{j != k} (S_k + S_j) / M_kj, over non-empty clusters; lower is better
    separated. Two clusters with the same centroid (M_kj = 0) give their pair 0, as scikit-learn does (it sets
    M_kj = inf). NaN for a set with fewer than two non-empty clusters.
    """
    members = F.one_hot(labels, num_clusters).to(points.dtype)                       # [..., P, K]
    counts = members.sum(dim=-2)                                                      # [..., K]
    centroids = members.transpose(-1, -2) @ points / counts.clamp(min=1)[..., None]   # [..., K, D]
    distances = (points - members @ centroids).norm(dim=-1)                           # to own centroid, [..., P]
    spread = (members * distances[..., None]).sum(dim=-2) / counts.clamp(min=1)       # S_k, [..., K]
    separation = (centroids[..., :, None, :] - centroids[..., None, :, :]).norm(dim=-1)   # M_kj, [..., K, K]
    present = counts > 0
    pairs = present[..., :, None] & present[..., None, :] & ~torch.eye(num_clusters, dtype=torch.bool,
                                                                       device=points.device)
    ratio = torch.where(separation > 0, (spread[..., :, None] + spread[..., None, :]) / separation, 0.0)
    worst = ratio.masked_fill(~pairs, -torch.inf).amax(dim=-1).masked_fill(~present, 0.0)   # [..., K]
    clusters = present.sum(dim=-1)
    return torch.where(clusters >= 2, worst.sum(dim=-1) / clusters.clamp(min=1), torch.nan)


def kmeans(points: Tensor, num_clusters: int, iterations: int = KMEANS_ITERATIONS, seed: int = 0) -> Tensor:
    """Lloyd's K-means of each set, as Fig. 5 clusters spatial features: points [F, P, D] -> labels [F, P].

    Starts from ``num_clusters`` distinct points of each set, drawn with a generator seeded by ``seed`` (so it is
    repeatable), then ``iterations`` times assigns each point to its nearest centroid and moves each centroid to
    its members' mean (a cluster left empty keeps its centroid).
    """
    if points.shape[1] < num_clusters:
        raise ValueError(f"kmeans needs at least {num_clusters} points per set, got {points.shape[1]}")
    generator = torch.Generator().manual_seed(seed)
    start = torch.rand(points.shape[:2], generator=generator).argsort(dim=1)[:, :num_clusters]       # [F, K]
    centroids = points.gather(1, start.to(points.device)[..., None].expand(-1, -1, points.shape[2]))
    for _ in range(iterations):
        members = F.one_hot(torch.cdist(points, centroids).argmin(dim=-1), num_clusters).to(points.dtype)
        counts = members.sum(dim=1)[..., None]                                                    # [F, K, 1]
        centroids = torch.where(counts > 0, members.transpose(1, 2) @ points / counts.clamp(min=1), centroids)
    return torch.cdist(points, centroids).argmin(dim=-1)
