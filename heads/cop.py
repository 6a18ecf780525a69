"""COP: clip-order prediction (Xu et al., CVPR 2019, VCOP) as an auxiliary task, a DG baseline of STDN Table 2.

Clips = means of consecutive segments (:func:`clip_features`), shuffled by one of the n! orders
(:func:`clip_orders`, :func:`shuffle_clips`), VCOP's pairwise order head (:class:`OrderClassifier`); loss
L_y + w CE(order). Source labels only; in ``da`` the target batch is ignored.

Forced by the cache: a clip is the mean of a run of consecutive cached segments, not a 3D-CNN clip.
"""
from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from heads.architecture import Architecture
from heads.base import HeadError, HParam, LabelledBatch, UnlabelledBatch, batch_size
from heads.method import Method, register_method


def clip_orders(clips: int) -> list[tuple[int, ...]]:
    """Every order of ``clips`` clips; an order's class is its index in this list (VCOP code:
    ``itertools.permutations``): for 3 clips the identity is class 0 and the reversal class 5."""
    return list(itertools.permutations(range(clips)))


def clip_features(frames: Tensor, clips: int) -> Tensor:
    """[B, N, D] -> [B, clips, D]: the mean frame feature of each of ``clips`` consecutive runs of segments (the
    first N mod clips runs are one segment longer, as ``tensor_split``)."""
    return torch.stack([run.mean(dim=1) for run in frames.tensor_split(clips, dim=1)], dim=1)


def shuffle_clips(clips: Tensor, orders: Tensor, labels: Tensor) -> Tensor:
    """Video b's clips in order ``orders[labels[b]]``: out[b, k] = clips[b, orders[labels[b], k]] (VCOP's shuffle)."""
    index = orders[labels]                                                    # [B, n]
    return clips.gather(1, index[..., None].expand(-1, -1, clips.shape[-1]))


class OrderClassifier(nn.Module):
    """VCOP's order head (Xu et al. §3; code ``models/vcopn.py``): each pair (i < j) of clip features
    concatenated -> shared fc -> ReLU, the pairs' outputs concatenated -> dropout -> fc -> n! order logits."""

    def __init__(self, dim: int, clips: int, hidden: int, dropout: float):
        super().__init__()
        self.pairs = list(itertools.combinations(range(clips), 2))
        self.pair = nn.Sequential(nn.Linear(2 * dim, hidden), nn.ReLU())
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(len(self.pairs) * hidden, math.factorial(clips))

    def forward(self, clips: Tensor) -> Tensor:
        """[B, n, D] -> [B, n!]."""
        pairs = [self.pair(torch.cat([clips[:, i], clips[:, j]], dim=-1)) for i, j in self.pairs]
        return self.fc(self.dropout(torch.cat(pairs, dim=-1)))


@register_method
class COP(Method):
    """Clip order prediction (Xu et al., CVPR 2019, VCOP) as a self-supervised auxiliary task, STDN Table 2's COP.

    The N segments' frame features (``Encoding.frames``) are cut into ``cop_clips`` consecutive clips, each the mean
    of its frames; the clips of each video are shuffled by one of the n! orders, drawn uniformly, and
    :class:`OrderClassifier` predicts the order. Loss: L_y + ``cop_weight`` · CE(order).

    Deviations: VCOP samples n clips of 16 frames with gaps between them and encodes each with a 3D CNN; here a
    clip is a run of cached segment features through the architecture's frame module. STDN does not give the
    weight of the order loss; 1 is the unweighted multi-task sum.
    """

    name = "cop"
    needs = frozenset({"encoder"})    # an auxiliary task only acts through the layers it trains
    summary = "COP (Xu et al. 2019): classification plus prediction of the order of shuffled clips"
    HPARAMS = {
        "cop_clips": HParam(3, "clips per video whose order is predicted (n; n! classes)",
                            "VCOP code, train_vcop.py (--tl 3)", interval="[2, inf)"),
        "cop_weight": HParam(1.0, "weight of the order-prediction loss", "ours (STDN gives none; 1 = the plain "
                             "multi-task sum)", interval="[0, inf)"),
        "cop_hidden": HParam(512, "width of the pairwise fc of the order head", "VCOP code, models/vcopn.py (fc7: "
                             "512)", interval="[1, inf)"),
        "cop_dropout": HParam(0.5, "dropout before the order classifier", "VCOP code, models/vcopn.py (p = 0.5)",
                              interval="[0, 1)"),
    }

    def __init__(self, arch: Architecture, hparams: dict):
        super().__init__(arch, hparams)
        h = self.hparams
        if arch.num_segments < h["cop_clips"]:
            raise HeadError(f"method 'cop' cuts each video into cop_clips={h['cop_clips']} clips of consecutive "
                            f"segments, but videos have num_segments={arch.num_segments}; use fewer clips or more "
                            f"segments")
        self.order_head = OrderClassifier(arch.frame_dim, h["cop_clips"], h["cop_hidden"], h["cop_dropout"])
        self.register_buffer("orders", torch.tensor(clip_orders(h["cop_clips"])), persistent=False)

    def objective(self, src: LabelledBatch, tgt: UnlabelledBatch | None,
                  progress: float) -> tuple[dict[str, Tensor], dict[str, float]]:
        encoding = self.arch.encode(src.x)
        logits = self.arch.classify(self.arch.aggregate(encoding.parts))
        terms = self.supervised_terms(encoding, logits, src.y)
        labels = torch.randint(len(self.orders), (batch_size(src.x),), device=src.y.device)
        clips = shuffle_clips(clip_features(encoding.frames, self.hparams["cop_clips"]), self.orders, labels)
        order_logits = self.order_head(clips)
        terms["loss_cop"] = self.hparams["cop_weight"] * F.cross_entropy(order_logits, labels)
        return terms, {"cop_accuracy": (order_logits.argmax(dim=1) == labels).float().mean().item()}
