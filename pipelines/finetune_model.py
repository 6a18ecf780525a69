"""End-to-end mode's model (``vidshift finetune``): a stage-one backbone in front of any architecture, trained by
any method, as APN (§5.1) and STDN (§4.1) fine-tune ImageNet ResNet-50 from frames.

:class:`EndToEnd` is an architecture whose input x is normalised frames [B, N, S, S, 3] (channels last, as cached
maps are). It runs the backbone over the B·N frames and hands the architecture inside it exactly what that
architecture reads from a store: maps [B, N, h, w, C] (the layer4 map, channels last) or pooled [B, N, C] (their
spatial mean, as stage one pools). A method trains it as it trains any architecture: its objective backpropagates
into the backbone, and an input-space method acts on pixels (APN's video ADA ascends on the frames; DRL-aug's FGSM
runs in [0, 1] pixel units through ``pixels``). The backbone's parameters carry ``lr_mult`` (``heads.base.LR_MULT``),
so every optimiser a method makes gives them a param group of their own at ``backbone_lr_mult`` x lr.

Backbone-side parts (:class:`TrainableBackbone`):

- **Partial BN** (TSN ``partialBN``, the APN and STDN code): every BatchNorm but the first runs on its running
  statistics with frozen affine parameters (``backbone_bn=partial``); ``frozen`` freezes all (DRL's fine-tuning),
  ``train`` none.
- **In-backbone MixStyle** (STDN §4.1; code ``resnet_spatial_mixstyle.py``): an architecture with a MixStyle
  (STDN's ``mixstyle`` component, ``heads/mixstyle.py``) has it moved from the layer4 maps into the backbone, after
  each layer of ``mixstyle_layers`` (1, 2, 3 as the code), each drawing on its own (p, Beta(α, α), the pairing of
  ``mixstyle_pairing``), with video-level statistics: per channel over (T, H, W) of each video, so all its frames
  share one style mix; the domains of a DA batch mix apart. Under several processes each mixes its own share of
  the batch, as the code's DataParallel mixes within each GPU's videos.
- bf16 autocast of the backbone on CUDA (``--precision``; the architecture and the losses stay float32), and
  optional gradient checkpointing of each ResNet layer (``gradient_checkpointing``).
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from extract.backbones import AUTOCAST_DTYPES, build_backbone
from heads.architecture import Architecture, Encoding, PixelSpace
from heads.base import LR_MULT, HeadError, HParam
from pipelines.video_data import eval_preprocess

BN_POLICIES = ("partial", "frozen", "train")
FINETUNE_HPARAMS: dict[str, HParam] = {
    "backbone_lr_mult": HParam(1.0, "the backbone's lr as a multiple of lr0 (the architecture's)",
                               "APN and STDN code: one lr for backbone and head", interval="[0, inf)"),
    "backbone_bn": HParam("partial", "partial: every BatchNorm but the first frozen (running statistics, fixed "
                          "affine); frozen: all; train: none", "TSN partialBN, used by the APN and STDN code",
                          choices=BN_POLICIES),
    "mixstyle_layers": HParam((1, 2, 3), "ResNet layers after which the architecture's MixStyle (STDN) mixes; 4 is "
                              "the layer4 map, where the cached-feature mode mixes", "STDN code (--mix-layers 1 2 3)",
                              choices=(1, 2, 3, 4)),
    "gradient_checkpointing": HParam(False, "recompute each ResNet layer in the backward pass instead of keeping "
                                     "its activations (less memory, about a third more compute)", "ours"),
}


class TrainableBackbone(nn.Module):
    """A torchvision ResNet cut after layer4 (``net``, torchvision-keyed) run on frames [B, N, S, S, 3]: maps
    [B·N, C, h, w] in float32, with partial BN, an optional MixStyle after some layers, autocast, checkpointing."""

    def __init__(self, net: nn.Sequential, hparams: dict, autocast_dtype: torch.dtype | None):
        super().__init__()
        self.net = net
        norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        policy = hparams["backbone_bn"]
        self.frozen_norms = {"partial": norms[1:], "frozen": norms, "train": []}[policy]
        if hparams["gradient_checkpointing"] and policy == "train":
            raise HeadError("gradient_checkpointing recomputes each layer's forward, which would update the running "
                            "statistics of training BatchNorms twice per step: use backbone_bn=partial or frozen")
        for norm in self.frozen_norms:
            norm.requires_grad_(False)
        for param in net.parameters():
            setattr(param, LR_MULT, hparams["backbone_lr_mult"])
        self.mixstyle: nn.Module | None = None
        self.mix_after = {f"layer{index}" for index in hparams["mixstyle_layers"]}
        self.checkpointing = hparams["gradient_checkpointing"]
        self.autocast_dtype = autocast_dtype

    def train(self, mode: bool = True) -> TrainableBackbone:
        super().train(mode)
        for norm in self.frozen_norms:   # TSN: frozen BatchNorms run on their running statistics in training too
            norm.eval()
        return self

    def forward(self, x: Tensor, split: int | None = None) -> Tensor:
        batch = x.shape[0]
        out = x.flatten(0, 1).permute(0, 3, 1, 2)        # [B·N, 3, S, S], a channels-last view
        autocast = (torch.autocast("cuda", dtype=self.autocast_dtype) if self.autocast_dtype and x.is_cuda
                    else contextlib.nullcontext())
        with autocast:
            for name, module in self.net.named_children():
                if self.checkpointing and self.training and name.startswith("layer"):
                    out = checkpoint(module, out, use_reentrant=False)
                else:
                    out = module(out)
                if self.mixstyle is not None and name in self.mix_after:
                    out = self._mix(out, batch, split)
        return out.float()

    def _mix(self, out: Tensor, batch: int, split: int | None) -> Tensor:
        """MixStyle of [B·N, C, h, w] with each video's statistics over its (N, h, w), each domain apart."""
        maps = out.float().unflatten(0, (batch, -1)).permute(0, 1, 3, 4, 2)          # [B, N, h, w, C] view
        parts = maps.tensor_split([split]) if split else (maps,)
        mixed = torch.cat([self.mixstyle(part) for part in parts if len(part)])
        return mixed.permute(0, 1, 4, 2, 3).flatten(0, 1)


class PooledFrames(nn.Module):
    """A backbone as a per-frame encoder: frames [B, N, S, S, 3] -> spatially averaged maps [B, N, C]."""

    def __init__(self, backbone: TrainableBackbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(x).mean(dim=(2, 3)).unflatten(0, x.shape[:2])


class EndToEnd(Architecture):
    """An architecture (``head``) behind a trainable backbone; x is frames (module docstring)."""

    name = "end-to-end"
    summary = "a backbone fine-tuned with an architecture, from frames"

    def __init__(self, head: Architecture, backbone: TrainableBackbone, pixels: PixelSpace, frame_size: int):
        nn.Module.__init__(self)     # the architecture inside checked its own feature shape
        self.head = head
        self.backbone = backbone
        self.pixels = pixels
        self.feat_shape = (frame_size, frame_size, 3)
        self.input = head.input
        self.num_classes, self.num_segments, self.hparams = head.num_classes, head.num_segments, head.hparams
        self.frame_dim, self.video_dim = head.frame_dim, head.video_dim
        self.relation_dim, self.num_scales = head.relation_dim, head.num_scales
        if getattr(head, "mixstyle", None) is not None:   # STDN's MixStyle acts inside the backbone here
            backbone.mixstyle, head.mixstyle = head.mixstyle, None

    def step_features(self, x: Tensor, split: int | None = None) -> Tensor:
        """What the architecture reads from a store: maps [B, N, h, w, C] or pooled [B, N, C], of frames x."""
        maps = self.backbone(x, split).unflatten(0, x.shape[:2])                 # [B, N, C, h, w]
        return maps.mean(dim=(3, 4)) if self.input == "pooled" else maps.permute(0, 1, 3, 4, 2)

    def encode(self, x: Tensor, split: int | None = None) -> Encoding:
        return self.head.encode(self.step_features(x, split), split)

    def aggregate(self, parts: Tensor) -> Tensor:
        return self.head.aggregate(parts)

    def drop_video(self, z: Tensor) -> Tensor:
        return self.head.drop_video(z)

    def class_logits(self, dropped: Tensor) -> Tensor:
        return self.head.class_logits(dropped)

    def aux_losses(self, encoding: Encoding, labels: Tensor) -> dict[str, Tensor]:
        return self.head.aux_losses(encoding, labels)

    def classifier_parameters(self) -> list[nn.Parameter]:
        return self.head.classifier_parameters()

    def new_classifier(self) -> nn.Module:
        return self.head.new_classifier()

    @torch.no_grad()
    def diagnostics(self, x: Tensor) -> dict[str, float]:
        return self.head.diagnostics(self.step_features(x))


def end_to_end(head: Architecture, backbone: TrainableBackbone, pixels: PixelSpace, frame_size: int) -> EndToEnd:
    """``head`` behind ``backbone``. Methods ask an architecture's class which parts it has
    (``type(arch).provides(hparams)``), so the wrapper's class answers for the architecture inside it."""
    inner = type(head)
    wrapper = type(f"EndToEnd[{inner.name}]", (EndToEnd,),
                   {"provides": classmethod(lambda _cls, hparams: inner.provides(hparams))})
    return wrapper(head, backbone, pixels, frame_size)


def backbone_state(model: nn.Module) -> dict[str, Tensor]:
    """The backbone of a fine-tuned model (a method over :class:`EndToEnd`) as a torchvision-keyed state dict
    (``conv1.weight``, ``layer1.0.bn1.running_mean``, ...): what ``vidshift extract --weights`` reads."""
    return {name: tensor.detach().cpu().clone() for name, tensor in model.arch.backbone.net.state_dict().items()}


class BackboneFactory:
    """Builds the run's backbone (and fresh copies of it: DRL's spatial model) from ``--backbone`` / ``--weights``."""

    def __init__(self, name: str, weights: str, frame_size: int, precision: str, hparams: dict, seed: int):
        self.name, self.weights, self.hparams, self.seed = name, weights, hparams, seed
        self.preprocess = eval_preprocess(frame_size)
        self.autocast_dtype = AUTOCAST_DTYPES[precision]
        # built on the CPU in float32 (the caller moves the model); the probe forward gives the map shape
        frozen = build_backbone(name, weights, self.preprocess, "cpu", "fp32", seed)
        self.map_shape, self.identity, self.weights_sha256 = frozen.map_shape(), frozen.weights, frozen.weights_sha256
        self._first = frozen.model

    def build(self) -> TrainableBackbone:
        """The run's backbone at its initial weights: the probed model the first time, a fresh build after."""
        net = self._first if self._first is not None else build_backbone(
            self.name, self.weights, self.preprocess, "cpu", "fp32", self.seed).model
        self._first = None
        return TrainableBackbone(net, self.hparams, self.autocast_dtype)

    def pixel_space(self) -> PixelSpace:
        """The input space of models on this backbone, whose frame encoder is a fresh copy of it (pooled)."""
        frame_encoder: Callable[[], nn.Module] = lambda: PooledFrames(self.build())
        return PixelSpace(self.preprocess.mean, self.preprocess.std, frame_encoder, self.map_shape[-1])

    def feature_shape(self, architecture_input: str) -> tuple[int, ...]:
        """One step's features as the architecture reads them: (h, w, C) maps or (C,) pooled."""
        return self.map_shape if architecture_input == "maps" else (self.map_shape[-1],)
