"""TemPooling: TA3N's baseline video model (TA3N §3.1, Fig. 2), trained on source labels only.

Paper: frame-level features x^j -> spatial module G_sf (an MLP) -> temporal module G_tf (mean over the K
sampled frames) -> classifier G_y, trained with the class loss L_y = CE (eq. 1). Without discriminators this
is the "source only" row of TA3N's tables (Table 9: TemPooling 70.28 on U->H).

Official code (``models.py``, ``frame_aggregation=avgpool``, ``add_fc=1``, ``fc_dim=512``):
G_sf = Linear(C -> 512) + ReLU + Dropout(0.5); G_tf = mean over time; then Dropout(0.5) + Linear(512 -> classes).
Both Linears are initialised N(0, 0.001) with zero bias. Two differences from the code: ``frame_dim`` is used
as given (the code takes ``min(fc_dim, C)``), and unlike TSN, which averages per-frame class scores, the mean is
taken over features (the two agree at eval time, since the classifier is linear).

TemRelation (``trn.py``) subclasses this head and replaces G_tf, as the paper does (§3.2).
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from heads.base import OPTIMIZER_HPARAMS, TRAINER_HPARAMS, Head, HParam, LabelledBatch, UnlabelledBatch, register
from heads.common import init_normal_, mlp

# The TA3N-family video model around the temporal module; TemRelation and TA3N reuse these.
VIDEO_MODEL_HPARAMS: dict[str, HParam] = {
    "frame_dim": HParam(512, "output width of the frame MLP G_sf", "TA3N code (add_fc=1, fc_dim=512)"),
    "dropout_frame": HParam(0.5, "dropout after the frame MLP", "TA3N code, script_train_val.sh (dropout_i)"),
    "dropout_video": HParam(0.5, "dropout on the video feature before the classifier",
                            "TA3N code, script_train_val.sh (dropout_v)"),
    "init_std": HParam(0.001, "weights of G_sf and G_y start as N(0, init_std), biases as 0; 0 keeps "
                       "PyTorch's default init",
                       "TA3N code, models.py (std = 0.001)"),
}


class TemporalMean(nn.Module):
    """G_tf of TemPooling: [B, N, D] -> [B, D], the mean over the N segments."""

    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=1)


@register
class TemPooling(Head):
    """Frame MLP, temporal mean, linear classifier; cross-entropy on source labels only.

    Subclasses swap G_tf through :meth:`temporal_module`. The optimiser is built at the end of ``__init__`` over
    the parameters that exist then, so a subclass that adds modules afterwards (e.g. discriminators) must give
    them to an optimiser itself.
    """

    name = "tempooling"
    summary = "TA3N's TemPooling baseline: frame MLP, mean over segments, classifier; source labels only"
    input = "pooled"
    settings = frozenset({"dg", "da"})
    HPARAMS = {**TRAINER_HPARAMS, **OPTIMIZER_HPARAMS, **VIDEO_MODEL_HPARAMS}

    def __init__(self, feat_shape: tuple[int, ...], num_classes: int, num_segments: int, hparams: dict):
        super().__init__(feat_shape, num_classes, num_segments, hparams)
        h = self.hparams
        (feat_dim,) = self.feat_shape
        self.frame_mlp = mlp(feat_dim, h["frame_dim"], dropout=h["dropout_frame"], activate_last=True)  # G_sf
        self.temporal, video_dim = self.temporal_module()                                               # G_tf
        self.classifier = nn.Sequential(nn.Dropout(h["dropout_video"]), nn.Linear(video_dim, num_classes))  # G_y
        if h["init_std"] > 0:  # TA3N's tiny init suits 2048-d inputs; 0 keeps PyTorch's default init
            init_normal_(self.frame_mlp, h["init_std"])
            init_normal_(self.classifier, h["init_std"])
        self.optimizer = self.make_optimizer(self.parameters())

    def temporal_module(self) -> tuple[nn.Module, int]:
        """G_tf and the width of the video feature it produces; subclasses swap in their own."""
        return TemporalMean(), self.hparams["frame_dim"]

    def video_features(self, x: Tensor) -> Tensor:
        """[B, N, C] -> [B, D]: frame MLP on every segment, then the temporal module."""
        return self.temporal(self.frame_mlp(x))

    def forward(self, x: Tensor) -> Tensor:
        """[B, N, C] -> logits [B, num_classes]."""
        return self.classifier(self.video_features(x))

    def update(self, src: LabelledBatch, tgt: UnlabelledBatch | None, progress: float) -> dict[str, float]:
        """One SGD step on L_y (eq. 1). Source only: ``tgt`` is ignored, in ``da`` as in ``dg``."""
        loss = F.cross_entropy(self(src.x), src.y)
        return {"loss": loss.item(), **self.optimizer_step(self.optimizer, loss, progress)}
