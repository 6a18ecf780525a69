"""TemRelation: TA3N's multi-scale temporal relation architecture (TA3N §3.2, eq. 5).

Paper: TemPooling (``pooling.py``) with the temporal mean replaced by the multi-scale Temporal Relation
module of TRN (Zhou et al. 2018): the n-frame relation is ``R_n = sum_m g_phi(n)((V^n)_m)``, where
``(V^n)_m`` is the m-th time-ordered tuple of n frame features (concatenated) and ``g_phi(n)`` an MLP; the
video feature is the sum of R_n over n = K, ..., 2 (eq. 5; Table 9: TemRelation 71.67 on U->H).

Official code (``TRNmodule.RelationModuleMultiScale``, ``frame_aggregation=trn-m``, ``num_bottleneck=256``):
scales [K, K-1, ..., 2]; per scale ``g = ReLU -> Linear(n * 512 -> 256) -> ReLU`` with PyTorch's default init;
``subsample_num = 3`` tuples per scale picked at evenly spaced positions among all ordered tuples (the one
K-frame tuple for scale K), their outputs summed (not averaged); scales then summed, Dropout(0.5), classifier.
Here the leading ReLU is dropped: its input is already ReLU'd (then dropped out), so it is the identity.

``tuples="random"`` restores the original TRN, which draws k of the M tuples of a scale at random at every
forward pass. In evaluation it uses their expectation instead of a draw: (k / M) times the sum over all M
tuples, which is what the random sum averages to, so evaluation is repeatable and unbiased (TRN itself draws
at test time too).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from heads.architecture import Encoding, register_architecture
from heads.base import HeadError, HParam
from heads.common import even_tuples, mlp, ordered_tuples, random_tuples
from heads.pooling import TemPooling


class MultiScaleRelation(nn.Module):
    """TRN-M over N segments: frame features [B, N, D] -> relation features per scale [B, N-1, R]."""

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

    def tuples_for(self, size: int) -> tuple[list[tuple[int, ...]], float]:
        """The tuples of ``size`` segments used in this forward pass, and the weight of their sum."""
        if not self.random:
            return self.even[size], 1.0
        if self.training:
            return random_tuples(self.num_segments, size, self.num_tuples), 1.0
        every = ordered_tuples(self.num_segments, size)      # the expectation of the random draw
        return every, min(self.num_tuples, len(every)) / len(every)

    def tuple_features(self, x: Tensor) -> list[tuple[Tensor, float]]:
        """Per scale n = N..2: g_phi(n) of each tuple used [B, k, R] (TRN's g features), and the weight of their sum."""
        if x.shape[1] != self.num_segments:
            raise HeadError(f"TRN was built for {self.num_segments} segments per video, got {x.shape[1]}")
        per_scale = []
        for size, fuse in zip(self.scales, self.fusion):
            chosen, weight = self.tuples_for(size)
            index = torch.tensor(chosen, device=x.device)                      # [k, n]
            tuples = x[:, index].flatten(start_dim=2)                          # [B, k, n * D], time-ordered
            per_scale.append((fuse(tuples), weight))
        return per_scale

    def forward(self, x: Tensor) -> Tensor:
        """[B, N, D] -> [B, N-1, R]: row i is R_n for n = N - i, each the (weighted) sum over its tuples (eq. 5)."""
        return torch.stack([weight * features.sum(dim=1) for features, weight in self.tuple_features(x)], dim=1)


@register_architecture
class TemRelation(TemPooling):
    """TemPooling with G_tf = TRN-M: relation features per scale, summed into the video feature (eq. 5)."""

    name = "trn"
    summary = "TA3N's TemRelation: frame MLP, multi-scale temporal relations (TRN-M), classifier"
    HPARAMS = {
        **TemPooling.HPARAMS,
        "relation_dim": HParam(256, "width of each relation MLP g_phi(n)", "TA3N code (num_bottleneck=256)",
                               interval="[1, inf)"),
        "num_tuples": HParam(3, "tuples summed per scale", "TA3N code, TRNmodule.py (subsample_num = 3)",
                             interval="[1, inf)"),
        "tuples": HParam("even", "even: evenly spaced fixed tuples (TA3N code); random: drawn at each training "
                         "step (original TRN), their expectation in evaluation", "TA3N code, TRNmodule.py",
                         choices=("even", "random")),
    }

    @classmethod
    def provides(cls, hparams: dict) -> frozenset[str]:
        return super().provides(hparams) | {"relations"}

    def temporal_module(self) -> tuple[nn.Module, int]:
        h = self.hparams
        self.relation_dim, self.num_scales = h["relation_dim"], self.num_segments - 1
        relations = MultiScaleRelation(self.num_segments, h["frame_dim"], h["relation_dim"], h["num_tuples"],
                                       h["tuples"])
        return relations, h["relation_dim"]

    def encode(self, x: Tensor, split: int | None = None) -> Encoding:
        frames = self.frame_mlp(x)
        return Encoding(frames=frames, relations=self.temporal(frames))

    def aggregate(self, parts: Tensor) -> Tensor:
        return parts.sum(dim=1)
