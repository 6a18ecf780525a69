"""TemRelation: TA3N's multi-scale temporal relation model (TA3N §3.2, eq. 5), trained on source labels only.

Paper: TemPooling (``pooling.py``) with the temporal mean replaced by the multi-scale Temporal Relation
module of TRN (Zhou et al. 2018): the n-frame relation is ``R_n = sum_m g_phi(n)((V^n)_m)``, where
``(V^n)_m`` is the m-th time-ordered tuple of n frame features (concatenated) and ``g_phi(n)`` an MLP; the
video feature is the sum of R_n over n = K, ..., 2 (eq. 5; Table 9: TemRelation 71.67 on U->H).

Official code (``TRNmodule.RelationModuleMultiScale``, ``frame_aggregation=trn-m``, ``num_bottleneck=256``):
scales [K, K-1, ..., 2]; per scale ``g = ReLU -> Linear(n * 512 -> 256) -> ReLU`` with PyTorch's default init;
``subsample_num = 3`` tuples per scale picked at evenly spaced positions among all ordered tuples (the one
K-frame tuple for scale K), their outputs summed (not averaged); scales then summed, Dropout(0.5), classifier.
Here the leading ReLU is dropped: its input is already ReLU'd (then dropped out), so it is the identity.
``tuples="random"`` restores the original TRN, which draws the tuples at random at every forward pass; here
only in training, so evaluation stays deterministic (TRN also draws them at test time).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from heads.base import HeadError, HParam, register
from heads.common import even_tuples, mlp, random_tuples
from heads.pooling import TemPooling


class MultiScaleRelation(nn.Module):
    """TRN-M over N segments: frame features [B, N, D] -> relation features per scale, or their sum."""

    def __init__(self, num_segments: int, frame_dim: int, relation_dim: int, num_tuples: int, tuples: str):
        super().__init__()
        if num_segments < 2:
            raise HeadError(f"temporal relations need at least 2 segments, got num_segments={num_segments}")
        self.num_segments = num_segments
        self.num_tuples = num_tuples
        self.random = tuples == "random"
        self.scales = list(range(num_segments, 1, -1))                         # N, N-1, ..., 2 as in TA3N
        self.even = {n: even_tuples(num_segments, n, num_tuples) for n in self.scales}
        self.fusion = nn.ModuleList(mlp(n * frame_dim, relation_dim, activate_last=True) for n in self.scales)

    def tuples_for(self, size: int) -> list[tuple[int, ...]]:
        """The tuples of ``size`` segments used in this forward pass."""
        if self.random and self.training:
            return random_tuples(self.num_segments, size, self.num_tuples)
        return self.even[size]

    def relations(self, x: Tensor) -> Tensor:
        """[B, N, D] -> [B, N-1, R]: row i is R_n for n = N - i, each the sum over its tuples (eq. 5)."""
        if x.shape[1] != self.num_segments:
            raise HeadError(f"TRN was built for {self.num_segments} segments per video, got {x.shape[1]}")
        per_scale = []
        for size, fuse in zip(self.scales, self.fusion):
            index = torch.tensor(self.tuples_for(size), device=x.device)          # [k, n]
            tuples = x[:, index].flatten(start_dim=2)                          # [B, k, n * D], time-ordered
            per_scale.append(fuse(tuples).sum(dim=1))                          # [B, R]
        return torch.stack(per_scale, dim=1)

    def forward(self, x: Tensor) -> Tensor:
        """[B, N, D] -> [B, R]: the video feature, summed over scales."""
        return self.relations(x).sum(dim=1)


@register
class TemRelation(TemPooling):
    """TemPooling with G_tf = TRN-M; cross-entropy on source labels only."""

    name = "trn"
    summary = "TA3N's TemRelation baseline: frame MLP, multi-scale temporal relations (TRN-M), classifier; source only"
    HPARAMS = {
        **TemPooling.HPARAMS,
        "relation_dim": HParam(256, "width of each relation MLP g_phi(n)", "TA3N code (num_bottleneck=256)"),
        "num_tuples": HParam(3, "tuples summed per scale", "TA3N code, TRNmodule.py (subsample_num = 3)"),
        "tuples": HParam("even", "even: evenly spaced fixed tuples (TA3N code); random: drawn at each training "
                         "step (original TRN)", "TA3N code, TRNmodule.py", choices=("even", "random")),
    }

    def temporal_module(self) -> tuple[nn.Module, int]:
        h = self.hparams
        relation = MultiScaleRelation(self.num_segments, h["frame_dim"], h["relation_dim"], h["num_tuples"],
                                      h["tuples"])
        return relation, h["relation_dim"]
