"""Late fusion of several streams (RGB + flow, EPIC's RGB/Flow/Audio): one architecture per stream, logits averaged.

This is the two-stream fusion of TSN and TBN: each stream has its own architecture and classifier, and the class
scores are averaged. To a method, the fused model is one architecture: its frame and relation features are the
streams' features side by side (concatenated on the last axis; every stream has the same segments and scales),
its video representation z is the streams' z side by side, and ``classify`` averages the streams' logits. So a
method written for one stream (a discriminator on the relation features, MCD's second classifier, an adversarial
step on z) runs on several unchanged.

Early fusion (EPIC's ``ALL``: features concatenated per step before one architecture) needs no module: the data
pipeline concatenates the streams' features (``pipelines/data.py``).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from heads.architecture import Architecture, Encoding
from heads.base import HeadError


class SplitClassifier(nn.Module):
    """Classifies fused z [B, Σ video_dim] with one classifier per stream, averaging the logits."""

    def __init__(self, classifiers: dict[str, nn.Module], widths: list[int]):
        super().__init__()
        self.streams = nn.ModuleDict(classifiers)
        self.widths = widths

    def forward(self, z: Tensor) -> Tensor:
        pieces = z.split(self.widths, dim=-1)
        return torch.stack([classify(piece) for classify, piece in zip(self.streams.values(), pieces)]).mean(dim=0)


class LateFusion(Architecture):
    """One architecture per stream; features side by side, logits averaged (TSN's two-stream fusion)."""

    name = "late-fusion"
    summary = "one architecture per stream, class scores averaged"

    def __init__(self, streams: dict[str, Architecture]):
        nn.Module.__init__(self)    # the per-stream architectures checked their own feature shapes
        if not streams:
            raise HeadError("late fusion needs at least one stream")
        self.streams = nn.ModuleDict(streams)
        self.feat_shape = {stream: arch.feat_shape for stream, arch in streams.items()}
        first = next(iter(streams.values()))
        self.input, self.num_classes, self.num_segments, self.hparams = (
            first.input, first.num_classes, first.num_segments, first.hparams)
        self.frame_dim = sum(arch.frame_dim for arch in streams.values())
        self.video_dim = sum(arch.video_dim for arch in streams.values())
        self.relation_dim = first.relation_dim and sum(arch.relation_dim for arch in streams.values())
        self.num_scales = first.num_scales

    def _part_widths(self) -> list[int]:
        """Each stream's share of the last axis of ``Encoding.parts``: relation features if any, else frames."""
        return [arch.relation_dim if self.relation_dim else arch.frame_dim for arch in self.streams.values()]

    def encode(self, x: dict[str, Tensor], split: int | None = None) -> Encoding:
        if not isinstance(x, dict) or set(x) != set(self.streams):
            got = sorted(x) if isinstance(x, dict) else "one tensor"
            raise HeadError(f"late fusion of streams {sorted(self.streams)} got inputs for {got}")
        encodings = {stream: arch.encode(x[stream], split) for stream, arch in self.streams.items()}
        frames = torch.cat([e.frames for e in encodings.values()], dim=-1)
        relations = (torch.cat([e.relations for e in encodings.values()], dim=-1)
                     if self.relation_dim else None)
        return Encoding(frames, relations, {"streams": encodings})

    def aggregate(self, parts: Tensor) -> Tensor:
        pieces = parts.split(self._part_widths(), dim=-1)
        return torch.cat([arch.aggregate(piece) for arch, piece in zip(self.streams.values(), pieces)], dim=-1)

    def _video_widths(self) -> list[int]:
        return [arch.video_dim for arch in self.streams.values()]

    def drop_video(self, z: Tensor) -> Tensor:
        pieces = z.split(self._video_widths(), dim=-1)
        return torch.cat([arch.drop_video(piece) for arch, piece in zip(self.streams.values(), pieces)], dim=-1)

    def class_logits(self, dropped: Tensor) -> Tensor:
        pieces = dropped.split(self._video_widths(), dim=-1)
        return torch.stack([arch.class_logits(piece)
                            for arch, piece in zip(self.streams.values(), pieces)]).mean(dim=0)

    def aux_losses(self, encoding: Encoding, labels: Tensor) -> dict[str, Tensor]:
        return {f"{name}_{stream}": term
                for stream, arch in self.streams.items()
                for name, term in arch.aux_losses(encoding.extras["streams"][stream], labels).items()}

    def classifier_parameters(self) -> list[nn.Parameter]:
        return [p for arch in self.streams.values() for p in arch.classifier_parameters()]

    def new_classifier(self) -> nn.Module:
        return SplitClassifier({stream: arch.new_classifier() for stream, arch in self.streams.items()},
                               self._video_widths())

    @torch.no_grad()
    def diagnostics(self, x: dict[str, Tensor]) -> dict[str, float]:
        return {f"{name}_{stream}": value for stream, arch in self.streams.items()
                for name, value in arch.diagnostics(x[stream]).items()}
