"""Methods: the objective and update rule that train an architecture, written once for every architecture.

DomainBed's ``Algorithm`` over a featurizer, with video parts: a method holds its architecture (``self.arch``), its
own modules (discriminators, a second classifier, ...) and its optimisers, and does one training step in
``update``. Most methods only write ``objective``, the loss terms whose sum is minimised; ``update`` backwards and
steps, so a wrapper (DRL) can add a term to another method's objective before the backward pass.

A method states what it needs beyond per-frame features (``needs``: "encoder", "relations", "batchnorm") and in which
protocols it runs (``settings``); ``missing_parts`` names what an architecture lacks, so the error is clear and
``vidshift train --head help`` can print the matrix of which method runs on which architecture. A method may also
name parts it ``uses`` where present and replaces where not (``fallback_parts``; video-ada: the pyramid).

Adding a method: copy ``heads/erm.py`` (the smallest method) into a new file, decorate the class with
``@register_method``, import the file in ``heads/__init__.py``. Nothing else changes: the trainer, the CLI, the
matrix and the registry tests pick it up.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, ClassVar, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from heads.architecture import Architecture, Encoding, architectures
from heads.base import (OPTIMIZER_HPARAMS, TRAINER_HPARAMS, HeadError, HParam, Inputs, LabelledBatch,
                        UnlabelledBatch, make_optimizer, optimizer_step, resolve)

PART_NAMES = {"encoder": "trainable layers before the classifier", "relations": "relation features",
              "batchnorm": "batch-norm layers",
              # relations that are a relational feature pyramid (APN): parts[:, 0] the global relation, parts[:, 1:]
              # the cross-relations, so aggregate(parts[:, 1:]) is level II and aggregate(parts) level III
              "pyramid": "a relational feature pyramid (levels II and III)",
              # frames that are clip features in the video representation's space (STCDA's networks)
              "clips": "clip features comparable with the video feature"}


class Method(nn.Module):
    """Base class: ``self.arch`` plus the method's own modules; ``update`` is one full training step."""

    name: ClassVar[str]
    summary: ClassVar[str]
    settings: ClassVar[frozenset[str]] = frozenset({"dg", "da"})
    needs: ClassVar[frozenset[str]] = frozenset()
    # Parts the method uses where the architecture has them and replaces where it has not (``--head help`` marks
    # such pairs "~"; video-ada: the pyramid's levels, else the video representation).
    uses: ClassVar[frozenset[str]] = frozenset()
    HPARAMS: ClassVar[dict[str, HParam]] = {}
    # Defaults this method wants from an architecture that declares them (AdaBN: a batch-norm in the frame MLP).
    ARCH_DEFAULTS: ClassVar[dict[str, object]] = {}

    def __init__(self, arch: Architecture, hparams: dict):
        super().__init__()
        self.arch = arch
        self.hparams = hparams
        self.optimizers: list = []      # the trainer checkpoints and restores these

    # --- optimisation -------------------------------------------------------------------------------------

    def param_groups(self) -> list[list[nn.Parameter]]:
        """One list of parameters per optimiser (MCD: generator, classifiers); default: one over everything."""
        return [list(self.parameters())]

    def setup_optimizers(self) -> None:
        """Called by :func:`build` once every module exists."""
        self.optimizers = [make_optimizer(group, self.hparams) for group in self.param_groups()]

    @property
    def optimizer(self):
        return self.optimizers[0]

    def step(self, optimizer, loss: Tensor, progress: float) -> dict[str, float]:
        return optimizer_step(optimizer, loss, self.hparams, progress)

    # --- training -----------------------------------------------------------------------------------------

    def objective(self, src: LabelledBatch, tgt: UnlabelledBatch | None,
                  progress: float) -> tuple[dict[str, Tensor], dict[str, float]]:
        """The loss terms whose sum one step minimises, and other scalars to log (GRL coefficients, ...)."""
        raise NotImplementedError(f"method '{self.name}' defines neither objective nor update")

    def update(self, src: LabelledBatch, tgt: UnlabelledBatch | None, progress: float) -> dict[str, float]:
        """One training step; ``progress`` in [0, 1] drives the schedules. ``tgt`` is None in ``dg``.

        Returns scalars to log: ``loss`` (the total minimised), its terms, and ``lr`` / ``grad_norm``.
        """
        terms, logs = self.objective(src, tgt, progress)
        loss = sum(terms.values())
        return {"loss": loss.item(), **{name: term.item() for name, term in terms.items()}, **logs,
                **self.step(self.optimizer, loss, progress)}

    def supervised_terms(self, encoding: Encoding, logits: Tensor, labels: Tensor) -> dict[str, Tensor]:
        """L_y on the first ``len(labels)`` videos plus the architecture's own loss terms."""
        return {"loss_y": F.cross_entropy(logits[:len(labels)], labels), **self.arch.aux_losses(encoding, labels)}

    def before_epoch(self, source: Callable[[], Iterable[LabelledBatch]], progress: float) -> dict[str, float]:
        """Hook at each epoch start; ``source()`` iterates once over the source train set (Volpi's ADA max phase)."""
        return {}

    def extra_examples(self) -> tuple[Inputs, Tensor] | None:
        """Labelled examples the method added to the training data, ([E, N, ...] features, [E] labels), or None.

        The trainer draws training batches from the source train set and these together; the method keeps them
        in its state (``get_extra_state``), so they are checkpointed and a resume is exact.
        """
        return None

    # --- evaluation ---------------------------------------------------------------------------------------

    def predict(self, x: Inputs) -> Tensor:
        """Class logits [B, classes] in eval mode."""
        return self.arch(x)

    def forward(self, x: Inputs) -> Tensor:
        return self.predict(x)

    def features(self, x: Inputs) -> Tensor:
        """The video representation z [B, video_dim] the predictions come from (``vidshift diagnose``)."""
        return self.arch.features(x)

    def set_eval_domain(self, domain: str) -> None:
        """Which domain ("source" or "target") the following predictions are for; AdaBN uses it."""

    def diagnostics(self, x: Inputs) -> dict[str, float]:
        """The method's and the architecture's own measures on a batch (``vidshift diagnose``)."""
        return self.arch.diagnostics(x)


class CountedMethod(Method):
    """A method that counts its own updates in a buffer, so its schedules (IRM's anneal, ADA's phases) are part of
    ``state_dict`` and a resumed run continues exactly."""

    def __init__(self, arch: Architecture, hparams: dict):
        super().__init__(arch, hparams)
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    def update(self, src: LabelledBatch, tgt: UnlabelledBatch | None, progress: float) -> dict[str, float]:
        logs = super().update(src, tgt, progress)
        self.updates += 1
        return logs


def require_target(method: Method, tgt: UnlabelledBatch | None) -> UnlabelledBatch:
    """The target batch of a DA update; a clear error when there is none (``dg`` protocol)."""
    if tgt is None:
        raise HeadError(f"method '{method.name}' adapts to a target domain: train it with --setting da --target D")
    return tgt


# ----------------------------------------------------------------------------------------------------------
# registry, presets, hyper-parameters, the matrix

_METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator adding a method under ``cls.name``; a duplicate name is an error."""
    if cls.name in _METHODS:
        raise HeadError(f"method name '{cls.name}' is already registered by {_METHODS[cls.name]}")
    if not cls.settings or not cls.settings <= {"dg", "da"}:
        raise HeadError(f"method '{cls.name}': settings must be a non-empty subset of {{'dg', 'da'}}")
    unknown = (set(cls.needs) | set(cls.uses)) - set(PART_NAMES)
    if unknown:
        raise HeadError(f"method '{cls.name}' needs or uses unknown parts {sorted(unknown)}; known: "
                        f"{sorted(PART_NAMES)}")
    _METHODS[cls.name] = cls
    return cls


def methods() -> dict[str, type[Method]]:
    """Registered methods by name, sorted."""
    return dict(sorted(_METHODS.items()))


@dataclass(frozen=True)
class Preset:
    """A named set of hyper-parameters (and trainer options) for the (method, architecture) pairs it names.

    Empty ``methods`` / ``architectures`` mean any. ``trainer`` holds run options that are not hyper-parameters
    (``train_sampling``), which ``vidshift train`` applies unless given on the command line.
    """

    name: str
    help: str
    hparams: dict = field(default_factory=dict)
    trainer: dict = field(default_factory=dict)
    methods: tuple[str, ...] = ()
    architectures: tuple[str, ...] = ()

    def applies_to(self, arch: str, method: str) -> bool:
        return (not self.methods or method in self.methods) and (not self.architectures or arch in self.architectures)


_PRESETS: list[Preset] = []


def register_preset(preset: Preset) -> Preset:
    _PRESETS.append(preset)
    return preset


def registered_presets() -> list[Preset]:
    """Every registered preset, in registration order (one name may be registered for several pairs)."""
    return list(_PRESETS)


def presets_for(arch: str, method: str) -> list[str]:
    """Names of the presets that apply to this pair, in registration order."""
    return list(dict.fromkeys(p.name for p in _PRESETS if p.applies_to(arch, method)))


def preset(name: str, arch: str, method: str) -> Preset:
    """Preset ``name`` for the pair: the union of every registered preset of that name that applies to it."""
    matching = [p for p in _PRESETS if p.name == name and p.applies_to(arch, method)]
    if not matching:
        names = ", ".join(presets_for(arch, method)) or "none"
        raise HeadError(f"no preset {name!r} for method '{method}' on architecture '{arch}'; its presets: {names}")
    merged_hparams, merged_trainer = {}, {}
    for p in matching:
        merged_hparams.update(p.hparams)
        merged_trainer.update(p.trainer)
    return Preset(name, "; ".join(p.help for p in matching), merged_hparams, merged_trainer)


def lookup(arch: str, method: str) -> tuple[type[Architecture], type[Method]]:
    registry_a, registry_m = architectures(), methods()
    if arch not in registry_a:
        raise HeadError(f"unknown architecture {arch!r}; available: {', '.join(registry_a)} "
                        f"(`vidshift train --head help`)")
    if method not in registry_m:
        raise HeadError(f"unknown method {method!r}; available: {', '.join(registry_m)} (`vidshift train --head help`)")
    return registry_a[arch], registry_m[method]


def hparam_specs(arch_cls: type[Architecture], method_cls: type[Method]) -> dict[str, HParam]:
    """Every hyper-parameter of the pair: trainer, optimiser (the architecture's recipe), architecture, method."""
    clash = sorted(set(arch_cls.HPARAMS) & set(method_cls.HPARAMS))
    if clash:
        raise HeadError(f"architecture '{arch_cls.name}' and method '{method_cls.name}' both declare {clash}")
    specs = {**TRAINER_HPARAMS, **OPTIMIZER_HPARAMS, **arch_cls.RECIPE, **arch_cls.HPARAMS, **method_cls.HPARAMS}
    for name, value in method_cls.ARCH_DEFAULTS.items():
        if name in specs:
            specs[name] = replace(specs[name], default=value, source=f"method '{method_cls.name}' needs it")
    return specs


def resolve_hparams(arch: str, method: str, overrides: dict) -> dict:
    """The pair's defaults with ``overrides`` applied, each checked against its type, choices and range."""
    arch_cls, method_cls = lookup(arch, method)
    return resolve(hparam_specs(arch_cls, method_cls), overrides, f"method '{method}' on architecture '{arch}'")


def missing_parts(arch_cls: type[Architecture], method_cls: type[Method], hparams: dict | None = None) -> list[str]:
    """What ``method_cls`` needs that ``arch_cls`` built with ``hparams`` (default: the pair's defaults) lacks."""
    if hparams is None:
        hparams = {name: spec.default for name, spec in hparam_specs(arch_cls, method_cls).items()}
    return sorted(method_cls.needs - arch_cls.provides(hparams))


def fallback_parts(arch_cls: type[Architecture], method_cls: type[Method], hparams: dict | None = None) -> list[str]:
    """What ``method_cls`` uses where present that ``arch_cls`` built with ``hparams`` lacks (it then falls back)."""
    if hparams is None:
        hparams = {name: spec.default for name, spec in hparam_specs(arch_cls, method_cls).items()}
    return sorted(method_cls.uses - arch_cls.provides(hparams))


def build(arch: str, method: str, feat_shape: tuple[int, ...] | dict[str, tuple[int, ...]], num_classes: int,
          num_segments: int, overrides: dict,
          wrap: Callable[[Architecture], Architecture] | None = None) -> Method:
    """The method ``method`` over architecture ``arch``, with the pair's defaults plus ``overrides``.

    ``feat_shape`` is one step's feature shape, or {stream: shape} for late fusion of several streams (one
    architecture per stream, ``heads/fusion.py``). ``wrap`` replaces the architecture by what the method then
    trains, e.g. the architecture behind a backbone that reads frames (``vidshift finetune``).
    """
    from heads.fusion import LateFusion   # fusion builds on Architecture; imported here to keep the order plain

    arch_cls, method_cls = lookup(arch, method)
    hparams = resolve_hparams(arch, method, overrides)
    missing = missing_parts(arch_cls, method_cls, hparams)
    if missing:
        raise HeadError(f"method '{method}' needs {' and '.join(PART_NAMES[p] for p in missing)}, which architecture "
                        f"'{arch}' does not have with these hyper-parameters; `vidshift train --head help` shows "
                        f"which architectures provide them")
    if isinstance(feat_shape, dict):
        model = LateFusion({stream: arch_cls(shape, num_classes, num_segments, hparams)
                            for stream, shape in feat_shape.items()})
    else:
        model = arch_cls(feat_shape, num_classes, num_segments, hparams)
    if wrap is not None:
        model = wrap(model)
    trained = method_cls(model, hparams)
    trained.setup_optimizers()
    return trained
