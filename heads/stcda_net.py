"""STCDA's network per modality (Song et al., CVPR 2021, §3 and §4.2): clip features v = φ_m(x), video V, classifier.

A video is ``clips`` clips (3 in §4.2) of ``clip_steps`` cached time steps each, so ``--segments`` must be
clips × clip_steps. Per modality m (one stream; two-stream runs put one network per stream under late fusion,
``heads/fusion.py``, whose averaged logits are the paper's two-stream prediction):

- φ_m on cached features: G_sf, the frame MLP of TA3N's TemPooling (Linear C -> ``frame_dim``, ReLU, Dropout) on
  every step; the paper fine-tunes its backbone, here the backbone's cached features are fixed and φ_m is what
  trains (forced by the cache). With ``clip_steps`` = 1 one cached step *is* a clip: an I3D clip store
  (``extract/clips.py``: one step a 16-frame window) maps to this, as the paper's I3D rows do. With ``clip_steps``
  = L > 1 a clip is L consecutive TSN segments of per-frame features (a 2D backbone: the paper's BN-Inception
  rows, whose 16-frame clips are per-frame 2D features), joined by a small temporal encoder: the L step features
  concatenated in time order -> Linear(L·frame_dim -> frame_dim) -> ReLU, which is order-sensitive, as STCL's
  temporal negatives need (a mean would see a shuffled clip as the clip itself).
- V = aggregation of the clip features (Table 6a): ``mean``; ``concat-fc`` (the clips concatenated -> Linear ->
  ReLU); ``gru`` (a GRU with ``gru_hidden`` = 512 units over the clips, the last step's output: the paper's best).
  STCL compares v with V (eq. 1's Θ(v_i, V)), so V has the clips' width (``gru_hidden`` = ``frame_dim``).
- the classifier: Dropout + Linear on V.

``Encoding.frames`` are the clip features [B, clips, frame_dim] and ``aggregate`` gives V, so the method
(``heads/stcda.py``) reads both through the interface every method uses. The architecture provides the part
"clips" (frames that are clip features in V's space), which the ``stcda`` method needs. The paper gives no
dropout or initialisation; TA3N's dropout values and PyTorch's default init are ours. ``stcda-maps`` reads
cached maps through a 3x3 convolution before the spatial mean, so that a flipped map (STCL's spatial negatives)
gives another feature (a spatial mean of the map itself would not change under a flip).
"""
from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor, nn

from heads.architecture import Architecture, Encoding, register_architecture
from heads.base import OPTIMIZER_HPARAMS, TRAINER_HPARAMS, HeadError, HParam
from heads.common import init_normal_
from heads.pooling import VIDEO_MODEL_HPARAMS, frame_mlp

AGGREGATIONS = ("mean", "concat-fc", "gru")
_SHARED = {**TRAINER_HPARAMS, **OPTIMIZER_HPARAMS}

# §4.2's optimiser: SGD, momentum 0.9, weight decay 1e-7, batch 64, 300 + 300 + 400 epochs from lr 0.01 (the
# per-stage learning rates and steps are the method's, heads/stcda.py).
STCDA_RECIPE: dict[str, HParam] = {
    "epochs": replace(_SHARED["epochs"], default=1000, source="STCDA §4.2 (300 + 300 + 400 epochs)"),
    "batch_size": replace(_SHARED["batch_size"], default=64, source="STCDA §4.2"),
    "lr": replace(_SHARED["lr"], default=0.01, source="STCDA §4.2 (stages 1-2 start at 0.01)"),
    "lr_schedule": replace(_SHARED["lr_schedule"], default="step",
                           source="STCDA §4.2 (divided by 10 after 100 and 200 epochs)"),
    "weight_decay": replace(_SHARED["weight_decay"], default=1e-7, source="STCDA §4.2"),
}


class ClipEncoder(nn.Module):
    """[B, clips * L, D] step features -> [B, clips, D] clip features: identity for L = 1, else each clip's L
    steps concatenated in time order -> Linear(L·D -> D) -> ReLU."""

    def __init__(self, clips: int, clip_steps: int, dim: int):
        super().__init__()
        self.clips, self.clip_steps = clips, clip_steps
        self.join = (nn.Sequential(nn.Linear(clip_steps * dim, dim), nn.ReLU()) if clip_steps > 1
                     else nn.Identity())

    def forward(self, steps: Tensor) -> Tensor:
        if self.clip_steps == 1:
            return steps
        return self.join(steps.reshape(len(steps), self.clips, -1))


class VideoAggregation(nn.Module):
    """[B, clips, D] -> V [B, D] by ``mean``, ``concat-fc`` or ``gru`` (Table 6a)."""

    def __init__(self, kind: str, clips: int, dim: int):
        super().__init__()
        self.kind = kind
        if kind == "concat-fc":
            self.fc = nn.Sequential(nn.Linear(clips * dim, dim), nn.ReLU())
        elif kind == "gru":
            self.gru = nn.GRU(dim, dim, batch_first=True)

    def forward(self, clips: Tensor) -> Tensor:
        if self.kind == "mean":
            return clips.mean(dim=1)
        if self.kind == "concat-fc":
            return self.fc(clips.flatten(1))
        return self.gru(clips)[0][:, -1]             # the output of the last GRU node (§4.4)


@register_architecture
class STCDANet(Architecture):
    """φ_m (frame MLP, clip encoder), the video aggregation and the classifier of one modality (module docstring)."""

    name = "stcda"
    summary = "STCDA's per-modality network: frame MLP, clips of clip_steps steps, GRU/concat-fc/mean video feature"
    input = "pooled"
    RECIPE = STCDA_RECIPE
    HPARAMS = {
        **{name: VIDEO_MODEL_HPARAMS[name] for name in ("frame_dim", "dropout_frame", "dropout_video")},
        "init_std": replace(VIDEO_MODEL_HPARAMS["init_std"], default=0.0,
                            source="ours (STCDA gives no init: PyTorch's default; TA3N's is init_std=0.001)"),
        "clip_steps": HParam(1, "cached steps per clip: 1 = a step is a clip (I3D clip stores); L > 1 = L per-frame "
                             "steps joined by a temporal encoder (2D backbones: the paper's BN-Inception)",
                             "STCDA §4.2 (16-frame clips); ours (how a cached clip is formed)", interval="[1, 6]"),
        "aggregation": HParam("gru", "video aggregation of the clip features (Table 6a)",
                              "STCDA Table 6a (GRU best)", choices=AGGREGATIONS),
        "gru_hidden": HParam(512, "GRU units; must equal frame_dim (STCL compares clips with the video)",
                             "STCDA §4.4 (512 hidden units)", interval="[1, inf)"),
    }

    def __init__(self, feat_shape: tuple[int, ...], num_classes: int, num_segments: int, hparams: dict):
        super().__init__(feat_shape, num_classes, num_segments, hparams)
        h = self.hparams
        if num_segments % h["clip_steps"]:
            raise HeadError(f"architecture '{self.name}': --segments {num_segments} is not a multiple of "
                            f"clip_steps={h['clip_steps']}; use clips x clip_steps segments (§4.2: 3 clips)")
        if h["aggregation"] == "gru" and h["gru_hidden"] != h["frame_dim"]:
            raise HeadError(f"architecture '{self.name}': gru_hidden={h['gru_hidden']} must equal frame_dim="
                            f"{h['frame_dim']} (STCL's Θ compares each clip feature with the video feature V)")
        self.clips = num_segments // h["clip_steps"]
        self.frame_dim = self.video_dim = h["frame_dim"]
        self.step_encoder = self.build_step_encoder(h)                                            # φ_m per step
        self.clip_encoder = ClipEncoder(self.clips, h["clip_steps"], self.frame_dim)
        self.aggregation = VideoAggregation(h["aggregation"], self.clips, self.frame_dim)
        self.classifier = nn.Sequential(nn.Dropout(h["dropout_video"]), nn.Linear(self.video_dim, num_classes))
        if h["init_std"] > 0:
            init_normal_(self, h["init_std"])

    def build_step_encoder(self, h: dict) -> nn.Module:
        (feat_dim,) = self.feat_shape
        return frame_mlp(feat_dim, h["frame_dim"], h["dropout_frame"], "none")

    @classmethod
    def provides(cls, hparams: dict) -> frozenset[str]:
        return super().provides(hparams) | {"clips"}

    def encode(self, x: Tensor, split: int | None = None) -> Encoding:   # nothing couples the videos
        return Encoding(frames=self.clip_encoder(self.step_encoder(x)))

    def aggregate(self, parts: Tensor) -> Tensor:
        return self.aggregation(parts)

    def init_classifier(self, classifier: nn.Module) -> nn.Module:
        return init_normal_(classifier, self.hparams["init_std"]) if self.hparams["init_std"] > 0 else classifier


class MapStepEncoder(nn.Module):
    """φ_m's step encoder on maps [..., H, W, C]: 3x3 convolution C -> D, ReLU, spatial mean, Dropout."""

    def __init__(self, channels: int, dim: int, dropout: float):
        super().__init__()
        self.conv = nn.Conv2d(channels, dim, kernel_size=3, padding=1)
        self.dropout = nn.Dropout(dropout)

    def forward(self, maps: Tensor) -> Tensor:
        lead, (height, width, channels) = maps.shape[:-3], maps.shape[-3:]
        grid = maps.reshape(-1, height, width, channels).permute(0, 3, 1, 2)
        pooled = torch.relu(self.conv(grid)).mean(dim=(2, 3))
        return self.dropout(pooled.reshape(*lead, -1))


@register_architecture
class STCDAMapsNet(STCDANet):
    """``stcda`` on cached maps: a 3x3 convolution before the spatial mean, so spatial negatives apply."""

    name = "stcda-maps"
    summary = "STCDA's network on cached maps (3x3 conv, spatial mean), where spatial negatives apply"
    input = "maps"

    def build_step_encoder(self, h: dict) -> nn.Module:
        return MapStepEncoder(self.feat_shape[-1], h["frame_dim"], h["dropout_frame"])
