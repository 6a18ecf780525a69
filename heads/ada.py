"""ADA (Volpi et al., NeurIPS 2018, Algorithm 1), a general DG baseline of STDN Table 2 and APN Table 1.

The surrogate ℓ(θ; x', y) - γ c_θ((x', y), (x, y)) with c_θ = ½‖z' - z‖² on the semantic (last hidden) layer
(Volpi §3; APN eqs. 2-4): :meth:`ADA.ascent_objective`; T_max ascent steps (APN eq. 5): :meth:`ADA.perturb` via
:func:`ascend`; the max phase over the source set: :meth:`ADA.max_phase`; K phases T_min updates apart:
:meth:`ADA.before_epoch`. Source labels only; in ``da`` the target batch is ignored.

Forced by the cache: ADA perturbs the cached backbone features, not pixels. The min and max phases meet at epoch
boundaries: the trainer calls ``before_epoch``, and a max phase runs there once T_min updates have passed since
the last one (Volpi: exactly every T_min updates).
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from heads.architecture import Architecture
from heads.base import HeadError, HParam, Inputs, LabelledBatch, UnlabelledBatch, cat_inputs, map_inputs
from heads.method import CountedMethod, register_method


def ascend(x: Inputs, objective: Callable[[Inputs], Tensor], step: float) -> Inputs:
    """One gradient-ascent step ``x + step * ∇_x objective(x)``, stream by stream; the result is detached."""
    x = map_inputs(lambda t: t.detach().requires_grad_(), x)
    tensors = list(x.values()) if isinstance(x, dict) else [x]
    grads = torch.autograd.grad(objective(x), tensors)
    if isinstance(x, dict):
        return {stream: (t + step * g).detach() for (stream, t), g in zip(x.items(), grads)}
    return (x + step * grads[0]).detach()


def take(x: Inputs, index: Tensor | slice) -> Inputs:
    """The videos ``index`` of a batch, every stream."""
    return map_inputs(lambda t: t[index], x)


@register_method
class ADA(CountedMethod):
    """ADA (Volpi et al. 2018, Algorithm 1), the "ADA" of STDN Table 2 and of APN Table 1 ("activation of the last
    hidden layer", APN Table 2).

    Min phase: ERM on the current data, the source set plus every appended example (the trainer draws its batches
    from both; :meth:`extra_examples`). Max phase k (k = 1..K), after T_min updates and then every T_min updates:
    for every source example (x, y), not the appended ones, T_max ascent steps of size η on
    ℓ(θ; x', y) - γ ½‖z' - z‖² from x' = x, z = ``arch.features`` (the video representation, the semantic space
    of c_θ), then (x', y) is appended. Each example has its own gradient (the objective is summed over a batch).
    The max phase runs in eval mode (no dropout; batch norm on its running statistics), as M-ADA's code.

    Phases fall at epoch boundaries: ``before_epoch`` runs one when T_min updates have passed since the last (so
    with epochs longer than T_min they are an epoch apart). ``ada_max_videos`` caps the videos perturbed per phase
    (the first the source iterator yields) to bound memory. The appended examples, kept on the CPU, and the phase
    counters are in ``state_dict``, so a resume is exact.

    Deviations: x is the cached backbone feature, not the pixels (the backbone is frozen). Volpi's code
    (``generalize-unseen-domains``) takes the batch mean of the CE and the element mean of ‖z' - z‖², so each
    example moves by η/B times its gradient and γ weighs an element mean; here the per-example form of the paper
    is used with the code's values (γ = 1, η = 1). Volpi ensembles models trained with several γ (APN §5.1 too);
    that is a choice of runs, not of the method.
    """

    name = "ada"
    summary = "ADA (Volpi et al. 2018): appends adversarial examples near the source in the semantic space"
    HPARAMS = {
        "ada_phases": HParam(3, "K: maximisation phases (augmented domains)", "Volpi et al. code, exp_configuration "
                             "(k = 3)", interval="[0, inf)"),
        "ada_min_updates": HParam(100, "T_min: updates before the first max phase and between phases",
                                  "Volpi et al. code, exp_configuration (T_min = 100)", interval="[1, inf)"),
        "ada_max_steps": HParam(15, "T_max: gradient-ascent steps per example in a max phase",
                                "Volpi et al. code, exp_configuration (T_adv = 15)", interval="[1, inf)"),
        "ada_gamma": HParam(1.0, "γ: weight of the transport cost ½‖z' - z‖² in the ascent objective",
                            "Volpi et al. code, exp_configuration (gamma = 1.0)", interval="[0, inf)"),
        "ada_step": HParam(1.0, "η: step size of the gradient ascent", "Volpi et al. code, exp_configuration "
                           "(learning_rate_max = 1.0); APN §5.1 (η = 1)", interval="(0, inf)"),
        "ada_max_videos": HParam(0, "source videos perturbed per max phase (the first the source iterator yields: "
                                 "the trainer yields the source set in a seeded random order, so a uniform random "
                                 "subset); 0 = all", "ours (memory bound)", interval="[0, inf)"),
    }

    def __init__(self, arch: Architecture, hparams: dict):
        super().__init__(arch, hparams)
        self.register_buffer("ada_phases_done", torch.zeros((), dtype=torch.long))
        self.register_buffer("ada_last_phase", torch.zeros((), dtype=torch.long))   # update count at the last one
        # the augmented domains: inputs [E, N, ...], labels [E], and the phase (0-based) that made each example
        self.augmented: tuple[Inputs, Tensor, Tensor] | None = None

    # --- state ------------------------------------------------------------------------------------------

    def get_extra_state(self) -> dict:
        return {"augmented": self.augmented}

    def set_extra_state(self, state: dict) -> None:
        self.augmented = state["augmented"]

    def extra_examples(self) -> tuple[Inputs, Tensor] | None:
        return None if self.augmented is None else self.augmented[:2]

    # --- min phase --------------------------------------------------------------------------------------

    def objective(self, src: LabelledBatch, tgt: UnlabelledBatch | None,
                  progress: float) -> tuple[dict[str, Tensor], dict[str, float]]:
        """ERM on the current data (the min phase of Algorithm 1)."""
        encoding = self.arch.encode(src.x)
        logits = self.arch.classify(self.arch.aggregate(encoding.parts))
        return self.supervised_terms(encoding, logits, src.y), {}

    # --- max phase --------------------------------------------------------------------------------------

    def before_epoch(self, source: Callable[[], Iterable[LabelledBatch]], progress: float) -> dict[str, float]:
        """A max phase when one is due: fewer than K done and T_min updates since the last."""
        h = self.hparams
        if self.ada_phases_done.item() >= h["ada_phases"] or \
                (self.updates - self.ada_last_phase).item() < h["ada_min_updates"]:
            return {}
        x, y = self.max_phase(source)
        phase = torch.full_like(y, self.ada_phases_done.item())
        if self.augmented is None:
            self.augmented = (x, y, phase)
        else:
            old_x, old_y, old_phase = self.augmented
            self.augmented = (cat_inputs([old_x, x]), torch.cat([old_y, y]), torch.cat([old_phase, phase]))
        self.ada_phases_done += 1
        self.ada_last_phase.copy_(self.updates)
        return {"ada_phase": float(self.ada_phases_done.item()), "ada_new_examples": float(len(y)),
                "ada_examples": float(len(self.augmented[1]))}

    def source_batches(self, source: Callable[[], Iterable[LabelledBatch]]) -> Iterator[LabelledBatch]:
        """One pass over the source set, stopping after ``ada_max_videos`` videos (0: all)."""
        cap = self.hparams["ada_max_videos"]
        seen = 0
        for batch in source():
            if cap and seen + len(batch.y) > cap:
                keep = cap - seen
                batch = LabelledBatch(take(batch.x, slice(keep)), batch.y[:keep])
            if len(batch.y):
                yield batch
            seen += len(batch.y)
            if cap and seen >= cap:
                return

    def max_phase(self, source: Callable[[], Iterable[LabelledBatch]]) -> tuple[Inputs, Tensor]:
        """The perturbed source set (the max phase of Algorithm 1), on the CPU: inputs [E, N, ...] and labels [E]."""
        was_training = self.training
        self.eval()
        inputs, labels = [], []
        for batch in self.source_batches(source):
            inputs.append(map_inputs(lambda t: t.cpu(), self.perturb(batch.x, batch.y)))
            labels.append(batch.y.cpu())
        self.train(was_training)
        if not labels:
            raise HeadError(f"method '{self.name}': the source set given to before_epoch holds no videos")
        return cat_inputs(inputs), torch.cat(labels)

    def perturb(self, x: Inputs, y: Tensor) -> Inputs:
        """T_max ascent steps of size η from x' = x (Algorithm 1; APN eq. 5)."""
        with torch.no_grad():
            z = self.arch.features(x)
        adversarial = x
        for _ in range(self.hparams["ada_max_steps"]):
            adversarial = ascend(adversarial, lambda x_adv: self.ascent_objective(x_adv, z, y),
                                 self.hparams["ada_step"])
        return adversarial

    def ascent_objective(self, x_adv: Inputs, z: Tensor, y: Tensor) -> Tensor:
        """Σ_b ℓ(θ; x'_b, y_b) - γ ½‖z'_b - z_b‖² (Volpi §3 and Algorithm 1; APN eqs. 2-4)."""
        z_adv = self.arch.features(x_adv)
        loss = F.cross_entropy(self.arch.classify(z_adv), y, reduction="sum")
        return loss - self.hparams["ada_gamma"] * 0.5 * (z_adv - z).pow(2).sum()
