"""DRL (Li & Vasconcelos, *Improving Video Model Transfer with Dynamic Representation Learning*, CVPR 2022) on
cached features: the dynamic score and the three DRL methods, each over any architecture.

Paper -> function:

- eq. 1, the purely spatial classifier f_s(x) = 1/T Σ_t g(x_t): :class:`SpatialModel` (g = an MLP over one step's
  features; a map is averaged over its positions first). The steps' *logits* are averaged, as the official
  ``ResNet2D.feat`` averages frame features before its linear fc (the same thing for a linear last layer); the
  mean makes f_s invariant to the order of the steps.
- eq. 3, L(ỹ, ŷ) = Σ_i ŷ_i log(ŷ_i / ỹ_i) = KL(ŷ ‖ ỹ), ŷ the video model's (teacher's) prediction:
  :func:`kd_loss` (per video; the official ``KDLoss`` with T = 1).
- eq. 2, γ by knowledge distillation: :func:`fit_spatial_model` on the teacher's predictions, then :func:`kd_loss`
  on held-out videos (``pipelines/dynamic_score.py`` runs it for a trained run).
- eq. 4, γ by input modulation, L(f(x̃), f(x)): x̃ from :func:`freeze_steps` (every step replaced by one step:
  the first, as the official code's ``inputs[:, :, :, :1].expand_as``) or :func:`shuffle_steps` (a random order
  per video, seeded; the official code draws one order per batch).
- eq. 5, the dataset's static bias: :func:`fit_spatial_model` on the labels, its CE on held-out videos.
- Algorithm 1 (eq. 6-9), ``drl-aug``: :class:`DRLAug`; eq. 6 / eq. 10: :func:`spatial_loss`; eq. 8: :func:`fgsm`;
  PGD (Madry et al.): :func:`pgd`; on frames (``vidshift finetune``): :func:`pixel_fgsm` against
  :class:`PixelSpatialModel`.
- Algorithm 2 (eq. 10-11), ``drl-minmax``: :class:`DRLMinMax`.
- Algorithm 3 (eq. 12), ``drl-fast``: :class:`DRLFast`.

Composition: every DRL method runs over a base method (``drl_base``, default ``erm``): the base's ``objective``
gives the terms on the clean batch (its L_y, domain losses, ...) and DRL adds its own; the video model f is the
base's ``predict``. Supported bases (:data:`DRL_BASES`) are those whose training step is one sum of objective terms
with one optimiser and no examples of their own: erm, ta2n, ta3n, jan, mixup, cop (``dann`` is
``drl_base=ta2n --set discriminators=[frame,video]``). Methods with their own update rule or data (mcd, irm, ada,
m-ada, adabn) are not bases.

Deviations and choices (README "DRL"):

- The inputs are cached backbone features, not pixels: the spatial model is an MLP on one step's (spatially
  averaged) feature, not a 2D CNN on the frame, and FGSM/PGD perturb the cached features. ε is in units of each
  channel's standard deviation over the batch (videos, steps and positions), since feature channels have no common
  scale; the default 0.13 is the official ε = 0.03 on [0, 1] pixels divided by ImageNet's std (~0.225), i.e. the
  same fraction of a channel's spread. Perturbed features are clamped at 0 when the clean batch is non-negative
  (post-ReLU features), as pixel attacks clamp to the image range.
- eq. 8 attacks L_kd against the teacher's probabilities (the paper); the official code attacks CE against the
  teacher's argmax with 5 momentum iterations. One FGSM step is the paper's; ``drl_attack=pgd`` is the option.
- On frames (the end-to-end mode, where the architecture's ``pixels`` is set) the attack is the official code's
  iterative FGSM in pixel space: ε = 0.03 in [0, 1] units (÷ ImageNet's std per channel), 5 steps of ε/5 in the
  sign of the gradients accumulated so far, clamped to the image, on L_kd (the paper's loss); f_s is a 2D CNN
  (a fresh copy of the run's backbone, as the code's ImageNet ResNet-18) per frame, then g, averaged (eq. 1).
- Algorithm 1's order (student step, then the attack with the updated student, then the video step) is the
  paper's; the official code makes one joint step of both models with the attack on the pre-step student.
- The official ``main-drl.py`` never runs the adversary (it looks for it in the wrong config) and imports a missing
  ``training/train_scoring.py``: here the adversary always runs, and the scoring is written from §3.2.
- drl-fast follows ``train_drl_dir.py`` without a spatial model: f(x̃) in train mode, detached
  (``model(inputs_sp).detach()``), λ = 0.5 (``kd0.5-freeze.yaml``); drl-minmax follows it with one: the student
  minimises λ·KL + CE (a GRL on its output), i.e. eq. 10 with α = λ / (1 + λ) = 1/3 up to a step-size factor.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from heads.architecture import Architecture, PixelSpace
from heads.base import HeadError, HParam, Inputs, LabelledBatch, UnlabelledBatch, map_inputs
from heads.fusion import LateFusion
from heads.method import PART_NAMES, Method, methods, register_method

# ----------------------------------------------------------------------------------------------------------
# the spatial model (eq. 1) and the distillation loss (eq. 3)


def summarize_steps(x: Tensor) -> Tensor:
    """One vector per step: a map [B, N, H, W, C] averaged over its positions; pooled [B, N, C] as it is."""
    return x.mean(dim=(2, 3)) if x.dim() == 5 else x


class Standardise(nn.Module):
    """(x - mean) / std per channel, fixed buffers (identity until :meth:`fit`): a per-step affine map, so a
    spatial model with it in front stays purely spatial."""

    def __init__(self, channels: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("std", torch.ones(channels))

    @torch.no_grad()
    def fit(self, steps: Tensor) -> None:
        """Set mean and std from step vectors [..., C] (std floored at 1e-6: dead channels stay 0)."""
        flat = steps.reshape(-1, steps.shape[-1])
        self.mean.copy_(flat.mean(dim=0))
        self.std.copy_(flat.std(dim=0).clamp(min=1e-6) if len(flat) > 1 else torch.ones_like(self.std))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


class SpatialModel(nn.Module):
    """f_s(x) = 1/T Σ_t g(x_t) (eq. 1) in logits; g = Standardise -> Linear(C, hidden) -> ReLU -> Linear(hidden, K).

    ``channels`` is one stream's channel count, or {stream: channels} for several streams (one g per stream, the
    streams' logits averaged, as late fusion). No dropout, so the FGSM gradient is deterministic.
    """

    def __init__(self, channels: int | dict[str, int], num_classes: int, hidden: int):
        super().__init__()
        self.multi = isinstance(channels, dict)
        per_stream = channels if self.multi else {"x": channels}
        self.g = nn.ModuleDict({stream: nn.Sequential(Standardise(c), nn.Linear(c, hidden), nn.ReLU(),
                                                      nn.Linear(hidden, num_classes))
                                for stream, c in per_stream.items()})

    def _streams(self, x: Inputs) -> dict[str, Tensor]:
        return x if self.multi else {"x": x}

    def fit_standardisation(self, summaries: Inputs) -> None:
        for stream, steps in self._streams(summaries).items():
            self.g[stream][0].fit(steps)

    def step_logits(self, summaries: Inputs) -> Tensor:
        """g of every step: step vectors [B, N, C] (or {stream: ...}) -> [B, N, K]."""
        streams = self._streams(summaries)
        return torch.stack([self.g[stream](steps) for stream, steps in streams.items()]).mean(dim=0)

    def from_summaries(self, summaries: Inputs) -> Tensor:
        return self.step_logits(summaries).mean(dim=1)

    def forward(self, x: Inputs) -> Tensor:
        """Logits [B, K] of cached features [B, N, C] / [B, N, H, W, C] (or {stream: ...})."""
        return self.from_summaries(map_inputs(summarize_steps, x))


class PixelSpatialModel(nn.Module):
    """f_s on frames (eq. 1): a 2D CNN per frame [B, N, S, S, 3] -> [B, N, C], then :class:`SpatialModel`'s g."""

    def __init__(self, pixels: PixelSpace, num_classes: int, hidden: int):
        super().__init__()
        self.encoder = pixels.frame_encoder()
        self.head = SpatialModel(pixels.channels, num_classes, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(x))


def spatial_model_for(arch: Architecture, hidden: int) -> SpatialModel | PixelSpatialModel:
    """A spatial model that reads what ``arch`` reads (each stream of a late fusion; frames in end-to-end mode)."""
    if arch.pixels is not None:
        return PixelSpatialModel(arch.pixels, arch.num_classes, hidden)
    if isinstance(arch, LateFusion):
        return SpatialModel({s: a.feat_shape[-1] for s, a in arch.streams.items()}, arch.num_classes, hidden)
    return SpatialModel(arch.feat_shape[-1], arch.num_classes, hidden)


def kd_loss(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Eq. 3, L(ỹ, ŷ) = KL(ŷ ‖ ỹ) per video [B], ŷ = softmax(teacher), ỹ = softmax(student); nats.

    The gradient reaches whichever argument is not detached (eq. 6: the student; eq. 11-12: the teacher)."""
    teacher = F.log_softmax(teacher_logits, dim=-1)
    return (teacher.exp() * (teacher - F.log_softmax(student_logits, dim=-1))).sum(dim=-1)


def spatial_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, alpha: float) -> Tensor:
    """Eq. 6 / eq. 10: α L_kd(f_s(x), f(x)) + (1 - α) L_cls(f_s(x), y), the teacher detached."""
    distill = kd_loss(student_logits, teacher_logits.detach()).mean()
    return alpha * distill + (1.0 - alpha) * F.cross_entropy(student_logits, labels)


def fit_spatial_model(summaries: Inputs, targets: Tensor, num_classes: int, hidden: int = 512, steps: int = 300,
                      lr: float = 1e-3, weight_decay: float = 0.1, seed: int = 0) -> SpatialModel:
    """The spatial model of eq. 2 (``targets``: teacher logits [V, K]) or eq. 5 (class ids [V]) on step vectors.

    Full-batch Adam for ``steps`` steps on inputs standardised with the fitting set's statistics; the init is
    drawn from ``seed`` under a forked RNG, so the caller's random stream does not move.
    """
    channels = ({s: t.shape[-1] for s, t in summaries.items()} if isinstance(summaries, dict)
                else summaries.shape[-1])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SpatialModel(channels, num_classes, hidden)
    model.fit_standardisation(summaries)
    # foreach: one multi-tensor update instead of a loop over the parameters (PyTorch's default on CUDA only);
    # bitwise the same numbers in our checks, half the time of a CPU fit, which every run pays after training
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay, foreach=True)
    soft = targets.dim() == 2
    for _ in range(steps):
        optimizer.zero_grad()
        logits = model.from_summaries(summaries)
        loss = kd_loss(logits, targets).mean() if soft else F.cross_entropy(logits, targets)
        loss.backward()
        optimizer.step()
    return model.eval()


# ----------------------------------------------------------------------------------------------------------
# clips without their dynamics (eq. 4, eq. 12)


def take_steps(x: Inputs, index: Tensor) -> Inputs:
    """x̃[b, t] = x[b, index[b, t]] for index [B, N], the same for every stream."""
    rows = torch.arange(len(index), device=index.device)[:, None]
    return map_inputs(lambda t: t[rows, index.to(t.device)], x)


def freeze_index(batch: int, num_steps: int, which: str, device: torch.device | None = None) -> Tensor:
    """[B, N] indices of a clip frozen at one step: "first" (official code), "middle", or "random" (one step
    per video from the global RNG: the paper's "sampling a single frame")."""
    if which == "first":
        steps = torch.zeros(batch, dtype=torch.long, device=device)
    elif which == "middle":
        steps = torch.full((batch,), num_steps // 2, dtype=torch.long, device=device)
    elif which == "random":
        steps = torch.randint(num_steps, (batch,), device=device)
    else:
        raise HeadError(f"frozen step {which!r}: use first, middle or random")
    return steps[:, None].expand(batch, num_steps)


def freeze_steps(x: Inputs, which: str = "first") -> Inputs:
    """The clip frozen at one step, repeated over the N steps (Fig. 2b)."""
    first = next(iter(x.values())) if isinstance(x, dict) else x
    return take_steps(x, freeze_index(first.shape[0], first.shape[1], which, first.device))


def shuffle_steps(x: Inputs, generator: torch.Generator | None = None) -> Inputs:
    """Each video's steps in a random order (one uniform permutation per video, drawn on the CPU from
    ``generator``, default the global RNG), the same order for every stream."""
    first = next(iter(x.values())) if isinstance(x, dict) else x
    order = torch.rand(first.shape[0], first.shape[1], generator=generator).argsort(dim=1)
    return take_steps(x, order)


def static_copy(x: Inputs, static: str, frozen_step: str) -> Inputs:
    """x̃ of Algorithm 3: ``static`` = freeze (at ``frozen_step``) or shuffle."""
    return freeze_steps(x, frozen_step) if static == "freeze" else shuffle_steps(x)


# ----------------------------------------------------------------------------------------------------------
# adversarial examples against the spatial model (eq. 8, PGD)


def _tensors(x: Inputs) -> list[Tensor]:
    return list(x.values()) if isinstance(x, dict) else [x]


def _rebuild(x: Inputs, tensors: list[Tensor]) -> Inputs:
    return dict(zip(x, tensors)) if isinstance(x, dict) else tensors[0]


def channel_scale(x: Tensor) -> Tensor:
    """Each channel's standard deviation over the batch's videos, steps and positions: ε's unit, [C]."""
    flat = x.detach().reshape(-1, x.shape[-1])
    return flat.std(dim=0) if len(flat) > 1 else torch.ones(x.shape[-1], device=x.device)


def _kd_gradient(student: SpatialModel, x: list[Tensor], like: Inputs, teacher_logits: Tensor) -> list[Tensor]:
    """∇_z L_kd(f_s(z), f(x)) at z = x, through f_s only (eq. 8)."""
    z = [t.detach().requires_grad_() for t in x]
    loss = kd_loss(student(_rebuild(like, z)), teacher_logits.detach()).sum()   # per video: its own gradient
    return list(torch.autograd.grad(loss, z))


def _clamp(perturbed: Tensor, clean: Tensor) -> Tensor:
    """Keep non-negative (post-ReLU) features non-negative."""
    return perturbed.clamp(min=0.0) if bool((clean >= 0).all()) else perturbed


def fgsm(student: SpatialModel, x: Inputs, teacher_logits: Tensor, epsilon: float) -> Inputs:
    """Eq. 8: x̃ = x + ε σ ⊙ sgn ∇_z L_kd(f_s(z), f(x)) |_{z=x}, σ = :func:`channel_scale`; detached."""
    clean = _tensors(x)
    grads = _kd_gradient(student, clean, x, teacher_logits)
    return _rebuild(x, [_clamp(t + epsilon * channel_scale(t) * g.sign(), t).detach() for t, g in zip(clean, grads)])


def pgd(student: SpatialModel, x: Inputs, teacher_logits: Tensor, epsilon: float, steps: int,
        step_fraction: float) -> Inputs:
    """PGD (Madry et al. 2018) on L_kd: a uniform random start in the L∞ ball of radius ε σ, ``steps`` signed steps
    of ``step_fraction`` · ε σ, each projected back onto the ball; detached."""
    clean = _tensors(x)
    radius = [epsilon * channel_scale(t) for t in clean]
    current = [_clamp(t + (torch.rand_like(t) * 2 - 1) * r, t) for t, r in zip(clean, radius)]
    for _ in range(steps):
        grads = _kd_gradient(student, current, x, teacher_logits)
        current = [_clamp(t + torch.maximum(torch.minimum(c + step_fraction * r * g.sign() - t, r), -r), t)
                   for t, c, r, g in zip(clean, current, radius, grads)]
    return _rebuild(x, [c.detach() for c in current])


def pixel_fgsm(student: nn.Module, x: Tensor, teacher_logits: Tensor, pixels: PixelSpace, epsilon: float,
               steps: int) -> Tensor:
    """Eq. 8 on frames, as the official code iterates it: ``steps`` steps of ε/steps [0, 1]-pixel units in the sign
    of the gradients of L_kd accumulated so far (momentum 1 over the raw gradients), each clamped to the image.
    The steps add up to at most ε per pixel, so no projection is needed; detached."""
    step = epsilon / steps * pixels.unit(x)
    current, accumulated = x.detach(), torch.zeros_like(x)
    for _ in range(steps):
        accumulated = accumulated + _kd_gradient(student, [current], current, teacher_logits)[0]
        current = pixels.clamp(current + step * accumulated.sign()).detach()
    return current


# ----------------------------------------------------------------------------------------------------------
# the methods

DRL_BASES = ("erm", "ta2n", "ta3n", "jan", "mixup", "cop")


def _base_hparams() -> dict[str, HParam]:
    """Every supported base's hyper-parameters (a name declared twice must be declared the same way)."""
    merged: dict[str, HParam] = {}
    for name in DRL_BASES:
        for key, spec in methods()[name].HPARAMS.items():
            if merged.get(key, spec) != spec:
                raise HeadError(f"DRL bases declare hyper-parameter {key!r} differently; drop one from DRL_BASES")
            merged[key] = spec
    return merged


SHARED_HPARAMS: dict[str, HParam] = {
    "drl_base": HParam("erm", "the method whose objective DRL adds its terms to (the other methods' "
                       "hyper-parameters listed here apply only when drl_base names them)", "ours (composition)",
                       choices=DRL_BASES),
    **_base_hparams(),
}
SPATIAL_HPARAMS: dict[str, HParam] = {
    "drl_spatial_hidden": HParam(512, "hidden width of the spatial model's per-step MLP g (eq. 1)",
                                 "ours (TA3N's frame MLP width: TemPooling is then one of the spatial models)",
                                 interval="[1, inf)"),
}


class DRLMethod(Method):
    """What the DRL methods share: a base method (``drl_base``) whose objective gives the clean-batch terms, and
    the video model f = the base's ``predict``. The architecture is reached through the base (``self.arch`` is
    ``self.base.arch``), so the state dict holds it once."""

    settings = frozenset({"dg", "da"})   # the base's protocol is checked by the base (e.g. ta3n needs a target)
    HPARAMS = SHARED_HPARAMS

    def __init__(self, arch: Architecture, hparams: dict):
        super().__init__(arch, hparams)
        base_cls = methods()[hparams["drl_base"]]
        streams = list(arch.streams.values()) if isinstance(arch, LateFusion) else [arch]
        missing = sorted(set().union(*(base_cls.needs - type(a).provides(hparams) for a in streams)))
        if missing:
            raise HeadError(f"method '{self.name}' with drl_base={base_cls.name} needs "
                            f"{' and '.join(PART_NAMES[p] for p in missing)}, which architecture "
                            f"'{streams[0].name}' does not have; choose another drl_base or architecture")
        del self._modules["arch"]           # Method.__init__ registered it; it lives in the base
        self.base = base_cls(arch, hparams)

    @property
    def arch(self) -> Architecture:
        return self.base.arch

    def clean_terms(self, src: LabelledBatch, tgt: UnlabelledBatch | None,
                    progress: float) -> tuple[dict[str, Tensor], dict[str, float], Tensor]:
        """The base's terms on the clean batch and f(x) of the source videos, with its graph.

        Over ``erm`` one forward pass gives both (eq. 9, 11, 12 exactly); over another base f(x) is one more pass
        (the base's objective does not return its logits, and some never compute f(x) itself: mixup)."""
        if self.hparams["drl_base"] == "erm":
            encoding = self.arch.encode(src.x)
            logits = self.arch.classify(self.arch.aggregate(encoding.parts))
            return self.supervised_terms(encoding, logits, src.y), {}, logits
        terms, logs = self.base.objective(src, tgt, progress)
        return terms, logs, self.base.predict(src.x)

    def predict(self, x: Inputs) -> Tensor:
        return self.base.predict(x)

    def features(self, x: Inputs) -> Tensor:
        return self.base.features(x)

    def set_eval_domain(self, domain: str) -> None:
        self.base.set_eval_domain(domain)

    def diagnostics(self, x: Inputs) -> dict[str, float]:
        return self.base.diagnostics(x)


@register_method
class DRLFast(DRLMethod):
    """Algorithm 3 (eq. 12): L_cls(f(x), y) − λ L_kd(f(x̃; ψ), f(x; θ))|ψ=θ, x̃ frozen or shuffled.

    As the official ``train_drl_dir.py``: f(x̃) is computed in train mode and detached, so the gradient of the KL
    reaches θ through f(x) only and the KL is *maximised* (f is pushed away from its own static prediction).
    """

    name = "drl-fast"
    summary = "DRL, Algorithm 3: cross-entropy minus λ·KL(f(x) ‖ f(frozen or shuffled x)), no second model"
    HPARAMS = {
        **DRLMethod.HPARAMS,
        "drl_lambda": HParam(0.5, "λ: weight of the dynamic loss", "DRL §5.2, Table 2; code kd0.5-freeze.yaml",
                             interval="[0, inf)"),
        "drl_static": HParam("freeze", "x̃: freeze (one step repeated; the paper's best, §5.2) or shuffle",
                             "DRL §5.2; code kd0.5-freeze.yaml / kd0.5-shuffle.yaml", choices=("freeze", "shuffle")),
        "drl_frozen_step": HParam("first", "the step a frozen clip repeats: first (official code), middle, or "
                                  "random (one per video)", "code train_drl_dir.py (inputs[:, :, :, :1])",
                                  choices=("first", "middle", "random")),
    }

    def objective(self, src: LabelledBatch, tgt: UnlabelledBatch | None,
                  progress: float) -> tuple[dict[str, Tensor], dict[str, float]]:
        h = self.hparams
        terms, logs, logits = self.clean_terms(src, tgt, progress)
        with torch.no_grad():
            static = self.base.predict(static_copy(src.x, h["drl_static"], h["drl_frozen_step"]))
        dynamic = kd_loss(static, logits).mean()
        terms["loss_dynamic"] = -h["drl_lambda"] * dynamic
        return terms, {**logs, "dynamic_kl": dynamic.item()}


class SpatialAdversary(DRLMethod):
    """A DRL method with a learnt spatial model f_s (ψ) and its own optimiser (the trainer checkpoints both).

    ``update``: one step of ψ on eq. 6 / eq. 10 against the current f(x), then one step of θ on
    :meth:`video_terms`, which sees the updated f_s (Algorithms 1 and 2)."""

    def __init__(self, arch: Architecture, hparams: dict):
        super().__init__(arch, hparams)
        self.spatial = spatial_model_for(arch, hparams["drl_spatial_hidden"])

    def param_groups(self) -> list[list[nn.Parameter]]:
        return [list(self.base.parameters()), list(self.spatial.parameters())]

    def video_terms(self, src: LabelledBatch, terms: dict[str, Tensor],
                    logits: Tensor) -> tuple[dict[str, Tensor], dict[str, float]]:
        """The terms of θ's step from the clean-batch ``terms`` and f(x) ``logits`` (each subclass's eq.), and logs."""
        raise NotImplementedError(f"method '{self.name}' defines no video_terms")

    def update(self, src: LabelledBatch, tgt: UnlabelledBatch | None, progress: float) -> dict[str, float]:
        terms, logs, logits = self.clean_terms(src, tgt, progress)
        student = spatial_loss(self.spatial(src.x), logits, src.y, self.hparams["drl_alpha"])
        spatial_logs = self.step(self.optimizers[1], student, progress)
        more, extra_logs = self.video_terms(src, terms, logits)
        loss = sum(more.values())
        return {"loss": loss.item(), **{name: term.item() for name, term in more.items()}, **logs, **extra_logs,
                "loss_spatial": student.item(), "spatial_grad_norm": spatial_logs["grad_norm"],
                **self.step(self.optimizers[0], loss, progress)}


@register_method
class DRLAug(SpatialAdversary):
    """Algorithm 1 (eq. 6-9): f_s distilled from f (α), x̃ adversarial to f_s (FGSM eq. 8, or PGD), then
    β L_cls(f(x̃), y) + (1 - β) L_cls(f(x), y) for f (eq. 7/9).

    Over a base, (1 - β) scales the base's L_y and its other terms are kept as they are. The attack runs on the
    student after its step and does not touch its parameters."""

    name = "drl-aug"
    summary = "DRL, Algorithm 1: train on features adversarial to a distilled spatial model (FGSM/PGD)"
    HPARAMS = {
        **DRLMethod.HPARAMS, **SPATIAL_HPARAMS,
        "drl_alpha": HParam(1.0, "α: weight of distillation vs labels in the spatial model's loss (eq. 6)",
                            "code train_drl_aug.py (the spatial model's loss is the KL alone)", interval="[0, 1]"),
        "drl_beta": HParam(0.5, "β: weight of the adversarial examples' CE (eq. 9)",
                           "code train_drl_aug.py ((CE(x) + CE(x_adv)) / 2)", interval="[0, 1]"),
        "drl_attack": HParam("fgsm", "fgsm (one signed step of ε, eq. 8) or pgd (random start, projected steps)",
                             "DRL §4.1, Table 2 (FGSM, PGD)", choices=("fgsm", "pgd")),
        "drl_epsilon": HParam(0.13, "ε in units of each channel's std over the batch (module doc)",
                              "code fgsm-e3-i5.yaml (ε = 0.03 on [0, 1] pixels / ImageNet std 0.229)",
                              interval="[0, inf)"),
        "drl_pgd_steps": HParam(7, "PGD iterations", "code pgd-e3-i7.yaml (iters 7)", interval="[1, inf)"),
        "drl_pgd_step": HParam(0.27, "PGD step size as a fraction of ε", "code pgd-e3-i7.yaml (α = 0.008 at "
                               "ε = 0.03)", interval="(0, inf)"),
        "drl_pixel_epsilon": HParam(0.03, "ε on frames (vidshift finetune), in [0, 1] pixel units",
                                    "code fgsm-e3-i5.yaml (eps 0.03)", interval="[0, inf)"),
        "drl_pixel_steps": HParam(5, "FGSM iterations on frames (vidshift finetune), each of ε / steps",
                                  "code fgsm-e3-i5.yaml (iters 5)", interval="[1, inf)"),
    }

    def perturb(self, x: Inputs, teacher_logits: Tensor) -> Inputs:
        h = self.hparams
        if self.arch.pixels is not None:
            if h["drl_attack"] != "fgsm":
                raise HeadError("drl-aug on frames runs the official code's iterative FGSM (drl_pixel_epsilon, "
                                "drl_pixel_steps); drl_attack=pgd is for cached features")
            return pixel_fgsm(self.spatial, x, teacher_logits, self.arch.pixels, h["drl_pixel_epsilon"],
                              h["drl_pixel_steps"])
        if h["drl_attack"] == "pgd":
            return pgd(self.spatial, x, teacher_logits, h["drl_epsilon"], h["drl_pgd_steps"], h["drl_pgd_step"])
        return fgsm(self.spatial, x, teacher_logits, h["drl_epsilon"])

    def video_terms(self, src: LabelledBatch, terms: dict[str, Tensor],
                    logits: Tensor) -> tuple[dict[str, Tensor], dict[str, float]]:
        beta = self.hparams["drl_beta"]
        adversarial = self.perturb(src.x, logits)
        adv_logits = self.base.predict(adversarial)
        with torch.no_grad():
            spatial_clean = (self.spatial(src.x).argmax(1) == src.y).float().mean().item()
            spatial_adv = (self.spatial(adversarial).argmax(1) == src.y).float().mean().item()
        terms = {**terms, "loss_y": (1.0 - beta) * terms["loss_y"],
                 "loss_adv": beta * F.cross_entropy(adv_logits, src.y)}
        return terms, {"spatial_acc": spatial_clean, "spatial_acc_adv": spatial_adv}


@register_method
class DRLMinMax(SpatialAdversary):
    """Algorithm 2 (eq. 10-11): f_s distilled from f (α), then L_cls(f(x), y) − λ L_kd(f_s(x), f(x)) for f, f_s
    fixed: the min-max game of eq. 13, one alternating step each."""

    name = "drl-minmax"
    summary = "DRL, Algorithm 2: alternate spatial-model distillation and CE − λ·KL(f ‖ f_s) for the video model"
    HPARAMS = {
        **DRLMethod.HPARAMS, **SPATIAL_HPARAMS,
        "drl_lambda": HParam(0.5, "λ: weight of the dynamic loss (eq. 11)", "DRL §5.2, Table 2 (DRL Distill, "
                             "λ = 0.5)", interval="[0, inf)"),
        "drl_alpha": HParam(1 / 3, "α: weight of distillation vs labels in the spatial model's loss (eq. 10)",
                            "code train_drl_dir.py (student loss λ·KL + CE: α = λ/(1+λ))", interval="[0, 1]"),
    }

    def video_terms(self, src: LabelledBatch, terms: dict[str, Tensor],
                    logits: Tensor) -> tuple[dict[str, Tensor], dict[str, float]]:
        with torch.no_grad():
            spatial = self.spatial(src.x)
        dynamic = kd_loss(spatial, logits).mean()
        return ({**terms, "loss_dynamic": -self.hparams["drl_lambda"] * dynamic},
                {"dynamic_kl": dynamic.item(), "spatial_acc": (spatial.argmax(1) == src.y).float().mean().item()})
