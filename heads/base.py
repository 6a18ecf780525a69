"""What every stage-two model shares: batches, hyper-parameters with their ranges, the optimiser recipe.

A model is an **architecture** (``heads/architecture.py``: features per step in, a video representation and
logits out) trained by a **method** (``heads/method.py``: the objective and update rule, DomainBed's
``Algorithm``). Hyper-parameters of both live in one namespace, each declared once with its paper default, its
source and its valid range; ``--set name=value`` overrides any of them.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Union

import torch
from torch import Tensor

# x of a batch: one stream's features [B, N, C] / [B, N, H, W, C], or {stream: features} for a multi-stream model
Inputs = Union[Tensor, dict[str, Tensor]]


class HeadError(ValueError):
    """An unknown architecture or method, a bad hyper-parameter, a missing part, or features of the wrong shape."""


# ----------------------------------------------------------------------------------------------------------
# batches


def map_inputs(function: Callable[..., Tensor], *inputs: Inputs) -> Inputs:
    """``function`` applied to the tensor(s), stream by stream for multi-stream inputs."""
    if isinstance(inputs[0], dict):
        return {stream: function(*(x[stream] for x in inputs)) for stream in inputs[0]}
    return function(*inputs)


def cat_inputs(inputs: list[Inputs]) -> Inputs:
    """Videos of several batches concatenated along the batch axis."""
    return map_inputs(lambda *xs: torch.cat(xs), *inputs)


def batch_size(x: Inputs) -> int:
    return len(next(iter(x.values())) if isinstance(x, dict) else x)


@dataclass(frozen=True)
class LabelledBatch:
    """Source videos with labels: ``x`` (:data:`Inputs`), class ids ``y`` [B] (int64) and, for methods that use
    training environments (IRM), an environment id per video ``env`` [B] or None. ``index`` [B]: each video's
    position in its training set (the trainer's; a method's added examples follow the set), for methods that
    keep something per training video (STCDA's memory bank), or None."""

    x: Inputs
    y: Tensor
    env: Tensor | None = None
    index: Tensor | None = None

    def __post_init__(self) -> None:
        if self.y.dim() != 1 or len(self.y) != batch_size(self.x):
            raise HeadError(f"LabelledBatch: x holds {batch_size(self.x)} videos but y has shape "
                            f"{tuple(self.y.shape)}; expected one class id per video")


@dataclass(frozen=True)
class UnlabelledBatch:
    """Target videos for domain adaptation. It has no label field, so target labels cannot reach a method.
    ``index`` [B]: each video's position in the target training set, or None (as ``LabelledBatch.index``)."""

    x: Inputs
    index: Tensor | None = None


# ----------------------------------------------------------------------------------------------------------
# hyper-parameters

_INTERVAL = re.compile(r"^([\[(])\s*(-inf|[-+0-9.e]+)\s*,\s*(inf|[-+0-9.e]+)\s*([\])])$")


def _interval_test(interval: str) -> Callable[[float], bool]:
    """A membership test for ``interval`` in the usual notation: ``[0, 1)``, ``(0, inf)``, ``[1, inf)``."""
    match = _INTERVAL.match(interval)
    if not match:
        raise ValueError(f"bad interval {interval!r}; write e.g. '[0, 1)' or '(0, inf)'")
    left, low, high, right = match.groups()
    low, high = float(low), float(high)
    return lambda v: (low <= v if left == "[" else low < v) and (v <= high if right == "]" else v < high)


@dataclass(frozen=True)
class HParam:
    """One hyper-parameter: its paper default, a one-line meaning, where the default comes from, and what is valid.

    ``choices``: the allowed values when the value is one of a few names. ``interval``: the allowed numbers, in
    interval notation (``"[0, 1)"``); for a tuple it applies to every element.
    """

    default: object
    help: str
    source: str                     # e.g. "TA3N §7.3" or "TA3N code, script_train_val.sh"
    choices: tuple = ()
    interval: str = ""

    def __post_init__(self) -> None:
        if self.interval:
            _interval_test(self.interval)   # a malformed interval fails where it is declared

    def check(self, name: str, value: object) -> object:
        """``value`` converted to the default's type and checked against choices and interval; HeadError if not."""
        try:
            value = _conform(value, self.default)
        except TypeError:
            raise HeadError(f"hyper-parameter {name}={value!r} is a {type(value).__name__}, expected "
                            f"{type(self.default).__name__} like its default {self.default!r}") from None
        if self.choices:
            values = value if isinstance(self.default, tuple) else (value,)
            wrong = [v for v in values if v not in self.choices]
            if wrong:
                raise HeadError(f"hyper-parameter {name}={value!r}: {wrong[0]!r} is not one of {self.choices}")
        if self.interval:
            inside = _interval_test(self.interval)
            values = value if isinstance(value, tuple) else (value,)
            if not all(inside(v) for v in values):
                raise HeadError(f"hyper-parameter {name}={value!r} is out of range: it must be in {self.interval}")
        return value


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


def resolve(specs: dict[str, HParam], overrides: dict, owner: str) -> dict:
    """Every spec's default with ``overrides`` applied, each checked; ``owner`` names the model in errors."""
    unknown = sorted(set(overrides) - set(specs))
    if unknown:
        raise HeadError(f"{owner} has no hyper-parameter {', '.join(map(repr, unknown))}; valid names: "
                        f"{', '.join(sorted(specs))}")
    resolved = {}
    for name, spec in specs.items():
        try:
            resolved[name] = spec.check(name, overrides.get(name, spec.default))
        except HeadError as error:
            raise HeadError(f"{owner}: {error}") from None
    return resolved


# Read by the trainer (how many videos per update, how long to train), not by the model.
TRAINER_HPARAMS: dict[str, HParam] = {
    "epochs": HParam(30, "passes over the source train split", "TA3N code, script_train_val.sh (--epochs 30)",
                     interval="[1, inf)"),
    "batch_size": HParam(128, "source videos per update", "TA3N §7.3 (128 for UCF-HMDB_full)", interval="[1, inf)"),
}

# Read by Method.make_optimizer / Method.optimizer_step: SGD as TA3N §7.3, or AdamW.
OPTIMIZER_HPARAMS: dict[str, HParam] = {
    "optimizer": HParam("sgd", "sgd (the papers' choice) or adamw (what most current video code uses; momentum "
                        "and nesterov then do not apply)", "TA3N §7.3 (SGD)", choices=("sgd", "adamw")),
    "lr": HParam(0.03, "initial learning rate lr0", "TA3N §7.3", interval="(0, inf)"),
    "lr_schedule": HParam("dann", "dann: lr0/(1+10p)^0.75 at every update; step: lr0*lr_decay^(steps passed); "
                          "constant: lr0", "TA3N §7.3 (follows DANN)", choices=("dann", "step", "constant")),
    "lr_steps": HParam((1 / 3, 2 / 3), "training progress points where the 'step' schedule decays",
                       "EPIC-100 TA3N baseline (epochs 10 and 20 of 30)", interval="[0, 1]"),
    "lr_decay": HParam(0.1, "factor applied at each of lr_steps", "EPIC-100 TA3N baseline", interval="(0, 1]"),
    "momentum": HParam(0.9, "SGD momentum", "TA3N §7.3", interval="[0, 1)"),
    "nesterov": HParam(False, "Nesterov momentum (on in the official TA3N code: its ta3n-official-* presets)",
                       "TA3N §7.3 (SGD with momentum 0.9)"),
    "weight_decay": HParam(1e-4, "L2 penalty on all parameters (AdamW: decoupled decay)", "TA3N §7.3",
                           interval="[0, inf)"),
    "clip_grad": HParam(20.0, "max global gradient norm per optimiser; 0 disables", "TA3N code (--gd 20)",
                        interval="[0, inf)"),
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


LR_MULT = "lr_mult"   # a parameter's attribute: its lr is lr0 times this (end-to-end mode: the backbone's)


def make_optimizer(params, hparams: dict) -> torch.optim.Optimizer:
    """SGD (TA3N §7.3) or AdamW with the shared hyper-parameters; ``initial_lr`` is what the schedule scales.

    Parameters carrying an ``lr_mult`` attribute (:data:`LR_MULT`) get a param group of their own with lr0 times
    it (a fine-tuned backbone's lr multiplier); without any there is one group, as before.
    """
    groups: dict[float, list] = {}
    for param in params:
        groups.setdefault(float(getattr(param, LR_MULT, 1.0)), []).append(param)
    param_groups = [{"params": members, "lr": hparams["lr"] * mult} for mult, members in groups.items()]
    if hparams["optimizer"] == "adamw":
        optimizer = torch.optim.AdamW(param_groups, lr=hparams["lr"], weight_decay=hparams["weight_decay"])
    else:
        optimizer = torch.optim.SGD(param_groups, lr=hparams["lr"], momentum=hparams["momentum"],
                                    nesterov=hparams["nesterov"], weight_decay=hparams["weight_decay"])
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]   # saved with the optimiser's state, so resume keeps the schedule
    return optimizer


def optimizer_step(optimizer: torch.optim.Optimizer, loss: Tensor, hparams: dict,
                   progress: float) -> dict[str, float]:
    """Backward ``loss``, clip the gradient norm, set the scheduled lr and step ``optimizer``.

    Returns ``lr`` (of the first param group) and ``grad_norm`` (global norm before clipping).
    """
    if not 0.0 <= progress <= 1.0:
        raise ValueError(f"progress must be in [0, 1], got {progress}")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    # max_norm=inf measures the norm without clipping, so grad_norm is logged either way
    grad_norm = torch.nn.utils.clip_grad_norm_(params, hparams["clip_grad"] or math.inf)
    factor = lr_factor(hparams, progress)
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * factor
    optimizer.step()
    return {"lr": optimizer.param_groups[0]["lr"], "grad_norm": grad_norm.item()}
