"""TemPooling: TA3N's baseline video architecture (TA3N §3.1, Fig. 2).

Paper: frame-level features x^j -> spatial module G_sf (an MLP) -> temporal module G_tf (mean over the K
sampled frames) -> classifier G_y. Trained by ``erm`` (the class loss L_y = CE, eq. 1) it is the "source only"
row of TA3N's tables (Table 9: TemPooling 70.28 on U->H).

Official code (``models.py``, ``frame_aggregation=avgpool``, ``add_fc=1``, ``fc_dim=512``):
G_sf = Linear(C -> 512) + ReLU + Dropout(0.5); G_tf = mean over time; then Dropout(0.5) + Linear(512 -> classes).
Both Linears are initialised N(0, 0.001) with zero bias. Two differences from the code: ``frame_dim`` is used
as given (the code takes ``min(fc_dim, C)``), and unlike TSN, which averages per-frame class scores, the mean is
taken over features (the two agree at eval time, since the classifier is linear).

``frame_norm=batch`` puts a batch normalisation in G_sf (Linear -> BN -> ReLU -> Dropout, where TA3N's code puts
AdaBN's), which is what ``adabn`` adapts; ``adabn`` turns it on by default.

TemRelation (``trn.py``) subclasses this architecture and replaces G_tf, as the paper does (§3.2).
"""
from __future__ import annotations

from torch import Tensor, nn

from heads.architecture import Architecture, Encoding, register_architecture
from heads.base import HParam
from heads.common import init_normal_, mlp

# The TA3N-family video model around the temporal module; TemRelation reuses these.
VIDEO_MODEL_HPARAMS: dict[str, HParam] = {
    "frame_dim": HParam(512, "output width of the frame MLP G_sf", "TA3N code (add_fc=1, fc_dim=512)",
                        interval="[1, inf)"),
    "frame_norm": HParam("none", "none: G_sf = Linear-ReLU-Dropout; batch: Linear-BatchNorm-ReLU-Dropout (the "
                         "layer AdaBN adapts)", "TA3N code, models.py (AdaBN's BN after the Linear)",
                         choices=("none", "batch")),
    "dropout_frame": HParam(0.5, "dropout after the frame MLP", "TA3N code, script_train_val.sh (dropout_i)",
                            interval="[0, 1)"),
    "dropout_video": HParam(0.5, "dropout on the video feature before the classifier",
                            "TA3N code, script_train_val.sh (dropout_v)", interval="[0, 1)"),
    "init_std": HParam(0.001, "weights of G_sf and G_y start as N(0, init_std), biases as 0; 0 keeps "
                       "PyTorch's default init", "TA3N code, models.py (std = 0.001)", interval="[0, inf)"),
}


class FrameBatchNorm(nn.BatchNorm1d):
    """BatchNorm1d over the last axis of [..., D]: every frame of every video is one sample (as TA3N's code)."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.reshape(-1, x.shape[-1])).view_as(x)


def frame_mlp(in_dim: int, out_dim: int, dropout: float, norm: str) -> nn.Sequential:
    """G_sf: Linear -> [BatchNorm] -> ReLU -> Dropout."""
    if norm == "none":
        return mlp(in_dim, out_dim, dropout=dropout, activate_last=True)
    layers = [nn.Linear(in_dim, out_dim), FrameBatchNorm(out_dim), nn.ReLU()]
    return nn.Sequential(*layers, *([nn.Dropout(dropout)] if dropout > 0 else []))


class TemporalMean(nn.Module):
    """G_tf of TemPooling: [B, N, D] -> [B, D], the mean over the N segments."""

    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=1)


@register_architecture
class TemPooling(Architecture):
    """Frame MLP G_sf, temporal module G_tf (the mean here; subclasses swap it), Dropout + linear classifier G_y."""

    name = "tempooling"
    summary = "TA3N's TemPooling: frame MLP, mean over segments, classifier (TSN-like)"
    input = "pooled"
    HPARAMS = VIDEO_MODEL_HPARAMS

    def __init__(self, feat_shape: tuple[int, ...], num_classes: int, num_segments: int, hparams: dict):
        super().__init__(feat_shape, num_classes, num_segments, hparams)
        h = self.hparams
        (feat_dim,) = self.feat_shape
        self.frame_dim = h["frame_dim"]
        self.frame_mlp = frame_mlp(feat_dim, self.frame_dim, h["dropout_frame"], h["frame_norm"])       # G_sf
        self.temporal, self.video_dim = self.temporal_module()                                         # G_tf
        self.classifier = nn.Sequential(nn.Dropout(h["dropout_video"]), nn.Linear(self.video_dim, num_classes))
        if h["init_std"] > 0:  # TA3N's tiny init suits 2048-d inputs; 0 keeps PyTorch's default init
            init_normal_(self.frame_mlp, h["init_std"])
            init_normal_(self.classifier, h["init_std"])

    @classmethod
    def provides(cls, hparams: dict) -> frozenset[str]:
        return super().provides(hparams) | ({"batchnorm"} if hparams["frame_norm"] == "batch" else set())

    def temporal_module(self) -> tuple[nn.Module, int]:
        """G_tf and the width of the video feature it produces; subclasses swap in their own."""
        return TemporalMean(), self.frame_dim

    def encode(self, x: Tensor, split: int | None = None) -> Encoding:   # nothing couples the videos
        return Encoding(frames=self.frame_mlp(x))

    def aggregate(self, parts: Tensor) -> Tensor:
        return self.temporal(parts)

    def init_classifier(self, classifier: nn.Module) -> nn.Module:
        return init_normal_(classifier, self.hparams["init_std"]) if self.hparams["init_std"] > 0 else classifier
