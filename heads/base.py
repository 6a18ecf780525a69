"""The Head interface (DESIGN §5), its hyper-parameters, the shared optimiser recipe and the head registry.

A head owns its modules, losses, optimiser(s) and update rule (DomainBed's Algorithm pattern), so the trainer
only does::

    head = build("trn", feat_shape=(2048,), num_classes=12, num_segments=5, overrides={"lr": 0.01})
    for step in range(steps):
        logs = head.update(LabelledBatch(x_src, y_src), UnlabelledBatch(x_tgt) or None, progress=step / steps)
    logits = head.eval()(x_test)

Every hyper-parameter is declared once, with its paper default and source, in the head's ``HPARAMS``. The
shared blocks below (``TRAINER_HPARAMS``, ``OPTIMIZER_HPARAMS``) are merged into each head's dict, never copied.
"""
from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from typing import ClassVar, Iterable, Literal

import torch
from torch import Tensor, nn


class HeadError(ValueError):
    """An unknown head, an unknown or ill-typed hyper-parameter, or features of the wrong shape."""


# ----------------------------------------------------------------------------------------------------------
# batches


@dataclass(frozen=True)
class LabelledBatch:
    """Source videos with labels. ``x``: pooled [B, N, C] or maps [B, N, H, W, C]; ``y``: class ids [B] (int64)."""

    x: Tensor
    y: Tensor

    def __post_init__(self) -> None:
        if self.y.dim() != 1 or len(self.y) != len(self.x):
            raise HeadError(f"LabelledBatch: x holds {len(self.x)} videos but y has shape {tuple(self.y.shape)}; "
                            f"expected one class id per video")


@dataclass(frozen=True)
class UnlabelledBatch:
    """Target videos for domain adaptation. It has no label field, so target labels cannot reach a head."""

    x: Tensor


# ----------------------------------------------------------------------------------------------------------
# hyper-parameters


@dataclass(frozen=True)
class HParam:
    """One hyper-parameter: its paper default, a one-line meaning, and where the default comes from."""

    default: object
    help: str
    source: str                     # e.g. "TA3N §7.3" or "TA3N code, script_train_val.sh"
    choices: tuple = ()             # allowed values, when the value is one of a few names


# Read by the trainer (how many videos per update, how long to train), not by the head.
TRAINER_HPARAMS: dict[str, HParam] = {
    "epochs": HParam(30, "passes over the source train split", "TA3N code, script_train_val.sh (--epochs 30)"),
    "batch_size": HParam(128, "source videos per update", "TA3N §7.3 (128 for UCF-HMDB_full)"),
}

# Read by Head.make_optimizer / Head.optimizer_step: SGD as TA3N §7.3.
OPTIMIZER_HPARAMS: dict[str, HParam] = {
    "lr": HParam(0.03, "initial learning rate lr0", "TA3N §7.3"),
    "lr_schedule": HParam("dann", "dann: lr0/(1+10p)^0.75 at every update; step: lr0*lr_decay^(steps passed); "
                          "constant: lr0", "TA3N §7.3 (follows DANN)", choices=("dann", "step", "constant")),
    "lr_steps": HParam((1 / 3, 2 / 3), "training progress points where the 'step' schedule decays",
                       "EPIC-100 TA3N baseline (epochs 10 and 20 of 30)"),
    "lr_decay": HParam(0.1, "factor applied at each of lr_steps", "EPIC-100 TA3N baseline"),
    "momentum": HParam(0.9, "SGD momentum", "TA3N §7.3"),
    "nesterov": HParam(False, "Nesterov momentum (on in the official TA3N code: its ta3n-official-* presets)",
                       "TA3N §7.3 (SGD with momentum 0.9)"),
    "weight_decay": HParam(1e-4, "L2 penalty on all parameters", "TA3N §7.3"),
    "clip_grad": HParam(20.0, "max global gradient norm per optimiser; 0 disables", "TA3N code (--gd 20)"),
}


def lr_factor(hparams: dict, progress: float) -> float:
    """Multiplier of lr0 at training progress ``p`` in [0, 1] under ``hparams["lr_schedule"]``.

    "dann" is ``(1 + 10 p)^-0.75`` (DANN's alpha=10, beta=0.75; TA3N §7.3). TA3N's code feeds it
    ``p = (iteration + epoch * len) / (epochs * len)`` with epochs counted from 1, i.e. p in [1/30, 1.03];
    here p is the trainer's progress, 0 at the first update.
    """
    schedule = hparams["lr_schedule"]
    if schedule == "dann":
        return (1.0 + 10.0 * progress) ** -0.75
    if schedule == "step":
        return hparams["lr_decay"] ** sum(progress >= step for step in hparams["lr_steps"])
    return 1.0


def _conform(value: object, default: object) -> object:
    """``value`` converted to the type of ``default`` (int accepted for float, list for tuple), else TypeError."""
    if isinstance(default, bool) or isinstance(value, bool):
        ok = isinstance(default, bool) and isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float))
        value = float(value) if ok else value
    elif isinstance(default, tuple):
        if not isinstance(value, (list, tuple)):
            raise TypeError
        return tuple(_conform(v, default[0]) for v in value) if default else tuple(value)
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise TypeError
    return value


def resolve_hparams(cls: type[Head], overrides: dict) -> dict:
    """The head's defaults with ``overrides`` applied, each checked against its default's type and choices."""
    valid = sorted(cls.HPARAMS)
    unknown = sorted(set(overrides) - set(cls.HPARAMS))
    if unknown:
        raise HeadError(f"head '{cls.name}' has no hyper-parameter {', '.join(map(repr, unknown))}; "
                        f"valid names: {', '.join(valid)}")
    resolved = {}
    for name, spec in cls.HPARAMS.items():
        value = overrides.get(name, spec.default)
        try:
            value = _conform(value, spec.default)
        except TypeError:
            raise HeadError(f"head '{cls.name}': hyper-parameter {name}={value!r} is a {type(value).__name__}, "
                            f"expected {type(spec.default).__name__} like its default {spec.default!r}") from None
        if spec.choices and value not in spec.choices:
            raise HeadError(f"head '{cls.name}': hyper-parameter {name}={value!r} is not one of {spec.choices}")
        resolved[name] = value
    return resolved


# ----------------------------------------------------------------------------------------------------------
# the interface


class Head(nn.Module, abc.ABC):
    """A stage-two model trained from cached features: it owns modules, losses, optimisers and update rule.

    ``feat_shape`` is the shape of one time step's features: (C,) for ``pooled``, (H, W, C) for ``maps``.
    The trainer sets ``.train()`` before ``update`` and ``.eval()`` before evaluating with ``forward``.
    """

    name: ClassVar[str]                             # registry key, e.g. "trn"
    summary: ClassVar[str]                          # one line for `vidshift train --head help`
    input: ClassVar[Literal["maps", "pooled"]]      # which cached array the head reads
    settings: ClassVar[frozenset[str]]              # protocols it supports: {"dg"}, {"da"} or both
    HPARAMS: ClassVar[dict[str, HParam]]
    PRESETS: ClassVar[dict[str, dict]] = {}         # named override sets, e.g. an official script's values

    def __init__(self, feat_shape: tuple[int, ...], num_classes: int, num_segments: int, hparams: dict):
        super().__init__()
        expected_dims = {"pooled": 1, "maps": 3}[self.input]
        if len(feat_shape) != expected_dims:
            raise HeadError(f"head '{self.name}' reads {self.input} features with {expected_dims} dims per step, "
                            f"got feat_shape {tuple(feat_shape)}")
        self.feat_shape = tuple(feat_shape)
        self.num_classes = num_classes
        self.num_segments = num_segments
        self.hparams = resolve_hparams(type(self), hparams)
        self.optimizers: list[torch.optim.Optimizer] = []   # the trainer checkpoints and restores these

    @abc.abstractmethod
    def forward(self, x: Tensor) -> Tensor:
        """Class logits [B, num_classes] for features [B, N, C] (pooled) or [B, N, H, W, C] (maps)."""

    @abc.abstractmethod
    def update(self, src: LabelledBatch, tgt: UnlabelledBatch | None, progress: float) -> dict[str, float]:
        """One full training step, optimiser step included; ``progress`` in [0, 1] drives the schedules.

        ``tgt`` is None in ``dg``; source-only heads ignore it in ``da``. Returns scalars to log: ``loss``
        (the total minimised), its named parts, and ``lr`` / ``grad_norm`` from :meth:`optimizer_step`.
        """

    def set_eval_domain(self, domain: Literal["source", "target"]) -> None:
        """Say which domain the following ``forward`` calls evaluate; a no-op unless the head keeps per-domain state.

        AdaBN overrides it to normalise with that domain's batch-norm statistics. The trainer calls it before
        evaluating each split: "source" for source val, "target" for the target split.
        """

    def make_optimizer(self, params: Iterable[nn.Parameter] | Iterable[dict]) -> torch.optim.SGD:
        """SGD with the shared hparams (TA3N §7.3), appended to ``self.optimizers``."""
        h = self.hparams
        optimizer = torch.optim.SGD(params, lr=h["lr"], momentum=h["momentum"], nesterov=h["nesterov"],
                                    weight_decay=h["weight_decay"])
        for group in optimizer.param_groups:
            group["initial_lr"] = group["lr"]   # the schedule scales this; saved with the optimiser's state
        self.optimizers.append(optimizer)
        return optimizer

    def optimizer_step(self, optimizer: torch.optim.Optimizer, loss: Tensor, progress: float) -> dict[str, float]:
        """Backward ``loss``, clip the gradient norm, set the scheduled lr and step ``optimizer``.

        Returns ``lr`` (of the first param group) and ``grad_norm`` (global norm before clipping).
        """
        if not 0.0 <= progress <= 1.0:
            raise ValueError(f"progress must be in [0, 1], got {progress}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for group in optimizer.param_groups for p in group["params"]]
        # max_norm=inf measures the norm without clipping, so grad_norm is logged either way
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.hparams["clip_grad"] or math.inf)
        factor = lr_factor(self.hparams, progress)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor
        optimizer.step()
        return {"lr": optimizer.param_groups[0]["lr"], "grad_norm": grad_norm.item()}


# ----------------------------------------------------------------------------------------------------------
# registry

_REGISTRY: dict[str, type[Head]] = {}


def register(cls: type[Head]) -> type[Head]:
    """Class decorator adding a head to the registry under ``cls.name``; a duplicate name is an error."""
    if cls.name in _REGISTRY:
        raise HeadError(f"head name '{cls.name}' is already registered by {_REGISTRY[cls.name].__qualname__}")
    if cls.input not in ("maps", "pooled") or not cls.settings or not cls.settings <= {"dg", "da"}:
        raise HeadError(f"head '{cls.name}': input must be 'maps' or 'pooled' and settings a non-empty subset "
                        f"of {{'dg', 'da'}}, got input={cls.input!r} settings={set(cls.settings)}")
    _REGISTRY[cls.name] = cls
    return cls


def preset(cls: type[Head], name: str) -> dict:
    """The overrides of preset ``name`` of head ``cls``; an unknown name lists the head's presets."""
    if name not in cls.PRESETS:
        names = ", ".join(cls.PRESETS) or "none"
        raise HeadError(f"head '{cls.name}' has no preset {name!r}; its presets: {names}")
    return dict(cls.PRESETS[name])


def available() -> dict[str, type[Head]]:
    """Registered heads by name, sorted."""
    return dict(sorted(_REGISTRY.items()))


def build(name: str, feat_shape: tuple[int, ...], num_classes: int, num_segments: int,
          overrides: dict) -> Head:
    """Instantiate the head registered as ``name`` with its defaults plus ``overrides``."""
    if name not in _REGISTRY:
        raise HeadError(f"unknown head {name!r}; available: {', '.join(available())}")
    return _REGISTRY[name](feat_shape, num_classes, num_segments, overrides)
