"""Architectures: cached features per time step in, a video representation and class logits out.

An architecture is the model of a paper's table *row* (TemPooling, TemRelation, STDN and its ablations, ...). It
knows nothing about domains or objectives: a method (``heads/method.py``) trains it. The named parts a method may
use are

- ``encode(x, split) -> Encoding``: per-segment frame features ``frames`` [B, N, frame_dim] and, where the architecture
  has them, per-scale relation features ``relations`` [B, S, relation_dim] (TA3N's attention and relation
  discriminators read these);
- ``aggregate(parts) -> z``: the video representation [B, video_dim] from ``Encoding.parts`` (the relations if
  there are any, else the frames), so a method can re-weight the parts first (TA3N eq. 8);
- ``features(x) = aggregate(encode(x).parts)``, ``classify(z) = class_logits(drop_video(z))``;
- ``aux_losses(encoding, labels)``: the architecture's own loss terms (STDN's L_emin, L_emax, L_rel), which every
  method adds to its objective;
- ``new_classifier()``: a fresh classifier of the same shape and init (MCD's second classifier).

``pixels`` is None for cached features; an architecture that reads frames through a backbone (``vidshift
finetune``) describes its input there (:class:`PixelSpace`), so a method that perturbs its input (DRL's FGSM) can
do it in pixel units.
"""
from __future__ import annotations

import abc
import copy
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Literal

import torch
from torch import Tensor, nn

from heads.base import HeadError, HParam


@dataclass
class Encoding:
    """What one pass of an architecture computes before aggregation."""

    frames: Tensor                      # per-segment frame features [B, N, frame_dim]
    relations: Tensor | None = None     # per-scale relation features [B, S, relation_dim], if the model has them
    extras: dict = field(default_factory=dict)   # the architecture's own intermediate values (for aux_losses)

    @property
    def parts(self) -> Tensor:
        """What ``aggregate`` reduces: the relations where there are any, else the frames."""
        return self.relations if self.relations is not None else self.frames


@dataclass(frozen=True)
class PixelSpace:
    """Inputs that are frames, not features: x [B, N, S, S, 3] channels last, each channel (v - mean) / std of
    v in [0, 1]. ``frame_encoder()`` builds a fresh 2D CNN from such frames to per-frame vectors [B, N, channels]
    (DRL's spatial model on frames)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    frame_encoder: Callable[[], nn.Module]
    channels: int

    def unit(self, like: Tensor) -> Tensor:
        """One [0, 1] pixel unit in the normalised input, per channel [3], on ``like``'s device and dtype."""
        return 1.0 / torch.tensor(self.std, device=like.device, dtype=like.dtype)

    def clamp(self, x: Tensor) -> Tensor:
        """``x`` clamped to the image: every value the normalisation of one in [0, 1]."""
        mean, std = (torch.tensor(v, device=x.device, dtype=x.dtype) for v in (self.mean, self.std))
        return torch.maximum(torch.minimum(x, (1 - mean) / std), -mean / std)


class Architecture(nn.Module, abc.ABC):
    """Base class. A subclass sets ``frame_dim``, ``video_dim`` (and ``relation_dim``, ``num_scales`` where it has
    relations) and builds ``self.classifier = nn.Sequential(dropout or Identity, Linear(video_dim, classes))``.

    ``feat_shape`` is the shape of one time step's features: (C,) for ``pooled``, (H, W, C) for ``maps``.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    input: ClassVar[Literal["maps", "pooled"]]
    HPARAMS: ClassVar[dict[str, HParam]] = {}
    # Defaults of the shared trainer/optimiser hyper-parameters this architecture's paper trains with (STDN §4.1).
    RECIPE: ClassVar[dict[str, HParam]] = {}

    frame_dim: int
    video_dim: int
    relation_dim: int | None = None
    num_scales: int = 0
    pixels: PixelSpace | None = None     # set where the input is frames (module docstring)

    def __init__(self, feat_shape: tuple[int, ...], num_classes: int, num_segments: int, hparams: dict):
        super().__init__()
        expected_dims = {"pooled": 1, "maps": 3}[self.input]
        if len(feat_shape) != expected_dims:
            raise HeadError(f"architecture '{self.name}' reads {self.input} features with {expected_dims} dims per "
                            f"step, got feat_shape {tuple(feat_shape)}")
        self.feat_shape = tuple(feat_shape)
        self.num_classes = num_classes
        self.num_segments = num_segments
        self.hparams = hparams

    @classmethod
    def provides(cls, hparams: dict) -> frozenset[str]:
        """The parts an instance built with ``hparams`` has, beyond frames (``heads.method.PART_NAMES``):
        "encoder" (trainable layers before the classifier; all but a bare linear classifier have them),
        "relations", "batchnorm", "pyramid" (relations laid out as APN's relational feature pyramid)."""
        return frozenset({"encoder"})

    @abc.abstractmethod
    def encode(self, x: Tensor, split: int | None = None) -> Encoding:
        """Frame (and relation) features of a batch of cached features.

        ``split``: the first ``split`` videos come from one domain and the rest from another (a method passing
        [source; target] through one call says so), so that parts coupling the videos of a batch (STDN's
        MixStyle) keep the domains apart; None: one domain.
        """

    @abc.abstractmethod
    def aggregate(self, parts: Tensor) -> Tensor:
        """The video representation z [B, video_dim] from ``Encoding.parts``."""

    def features(self, x: Tensor) -> Tensor:
        return self.aggregate(self.encode(x).parts)

    def drop_video(self, z: Tensor) -> Tensor:
        """The dropout in front of the classifier (identity in eval mode, or where the model has none)."""
        return self.classifier[0](z)

    def class_logits(self, dropped: Tensor) -> Tensor:
        return self.classifier[1](dropped)

    def classify(self, z: Tensor) -> Tensor:
        return self.class_logits(self.drop_video(z))

    def forward(self, x: Tensor) -> Tensor:
        """Class logits [B, num_classes]."""
        return self.classify(self.features(x))

    def aux_losses(self, encoding: Encoding, labels: Tensor) -> dict[str, Tensor]:
        """The architecture's own weighted loss terms for the first ``len(labels)`` (labelled) videos."""
        return {}

    def classifier_parameters(self) -> list[nn.Parameter]:
        """The parameters of G_y (MCD trains them apart from the rest, its generator)."""
        return list(self.classifier.parameters())

    def new_classifier(self) -> nn.Module:
        """A fresh copy of ``self.classifier`` (same modules, new weights), initialised the same way."""
        classifier = copy.deepcopy(self.classifier)
        for layer in classifier.modules():
            if isinstance(layer, nn.Linear):
                layer.reset_parameters()     # draws as constructing the layer does
        return self.init_classifier(classifier)

    def init_classifier(self, classifier: nn.Module) -> nn.Module:
        """Initialise a classifier as this architecture initialises its own (PyTorch's default here)."""
        return classifier

    @torch.no_grad()
    def diagnostics(self, x: Tensor) -> dict[str, float]:
        """The architecture's own measures on a batch (STDN §4.2); none by default."""
        return {}


# ----------------------------------------------------------------------------------------------------------
# registry

_ARCHITECTURES: dict[str, type[Architecture]] = {}


def register_architecture(cls: type[Architecture]) -> type[Architecture]:
    """Class decorator adding an architecture under ``cls.name``; a duplicate name is an error."""
    if cls.name in _ARCHITECTURES:
        raise HeadError(f"architecture name '{cls.name}' is already registered by {_ARCHITECTURES[cls.name]}")
    if cls.input not in ("maps", "pooled"):
        raise HeadError(f"architecture '{cls.name}': input must be 'maps' or 'pooled', got {cls.input!r}")
    _ARCHITECTURES[cls.name] = cls
    return cls


def architectures() -> dict[str, type[Architecture]]:
    """Registered architectures by name, sorted."""
    return dict(sorted(_ARCHITECTURES.items()))
