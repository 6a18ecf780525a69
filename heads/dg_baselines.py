"""The general domain-generalisation baselines of STDN Table 2 (and the ADA of APN Table 1), for every architecture.

STDN §4.2 compares against "general domain generalization (DG) methods cooperated with different video
classification architectures": ERM (``heads/erm.py``), Mixup [93], IRM [2], ADA [75] and COP [83]; its Table 1
(from VideoDG/APN) adds M-ADA [60]. APN Table 1 reports every architecture with and without Volpi's ADA [31].
Each method here trains any architecture (and late fusion of several streams) on source labels only; in ``da``
the target batch is ignored.

Paper -> function:

- ``mixup`` (Zhang et al., ICLR 2018; DomainBed's ``Mixup``): x̃ = λ x_i + (1 - λ) x_j, λ ~ Beta(α, α) (§2):
  :func:`mix_inputs`; loss λ CE(f(x̃), y_i) + (1 - λ) CE(f(x̃), y_j): :meth:`Mixup.mixed_terms`.
- ``irm`` (Arjovsky et al. 2019, the IRMv1 objective of §3.1; DomainBed's ``IRM``): the squared gradient of the risk
  with respect to a fixed scale w = 1.0 on the logits, estimated unbiasedly from two halves of each
  environment: :func:`irm_penalty`; environments: :meth:`IRM.environments`.
- ``ada`` (Volpi et al., NeurIPS 2018, Algorithm 1): the surrogate ℓ(θ; x', y) - γ c_θ((x', y), (x, y)) with
  c_θ = ½‖z' - z‖² on the semantic (last hidden) layer (Volpi §3; APN eqs. 2-4): :meth:`ADA.ascent_objective`;
  T_max ascent steps (APN eq. 5): :meth:`ADA.perturb` via :func:`ascend`; the max phase over the source
  set: :meth:`ADA.max_phase`; K phases T_min updates apart: :meth:`ADA.before_epoch`.
- ``m-ada`` (Qiao et al., CVPR 2020, §3 and Algorithm 1; official code ``joffery/M-ADA`` ``main_Digits.py``): ADA's
  surrogate plus β L_relax, the reconstruction error of a Wasserstein auto-encoder: :func:`relaxation`, the WAE
  :class:`WAE` (WAE-MMD, Tolstikhin et al. ICLR 2018, Algorithm 2: :func:`wae_loss`, :func:`imq_mmd2`); the
  meta-learning update (meta-train on the source, one inner SGD step, meta-test on the augmented domains, the
  outer loss their sum): :meth:`MADA.objective`.
- ``cop`` (Xu et al., CVPR 2019, VCOP): clips = means of consecutive segments (:func:`clip_features`), shuffled by
  one of the n! orders (:func:`clip_orders`, :func:`shuffle_clips`), VCOP's pairwise order head
  (:class:`OrderClassifier`); loss L_y + w CE(order).

Deviations forced by the cached-feature setting (listed for README):

- Inputs are cached backbone features per segment, not pixels, and the backbone is frozen. Mixup on ``inputs``
  mixes the features (the nearest we have to Zhang et al.'s pixel mixup); ADA and M-ADA perturb the features
  (APN's and Volpi's ADA perturb pixels); M-ADA's WAE models the segment-mean input feature, not the image.
- ADA's min and max phases meet at epoch boundaries: the trainer calls ``before_epoch``, and a max phase runs
  there once T_min updates have passed since the last one (Volpi: exactly every T_min updates).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import replace
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from heads.architecture import Architecture
from heads.base import (HeadError, HParam, Inputs, LabelledBatch, UnlabelledBatch, batch_size, cat_inputs, lr_factor,
                        make_optimizer, map_inputs)
from heads.common import mlp
from heads.fusion import LateFusion
from heads.method import Method, register_method


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


# ----------------------------------------------------------------------------------------------------------
# Mixup


def mix_inputs(x: Inputs, lam: float, partner: Tensor) -> Inputs:
    """x̃_b = λ x_b + (1 - λ) x_partner[b], every stream with the same λ and partners (Zhang et al. §2)."""
    return map_inputs(lambda t: lam * t + (1 - lam) * t[partner], x)


@register_method
class Mixup(Method):
    """Mixup (Zhang et al. 2018) as DomainBed's ``Mixup``: one λ ~ Beta(α, α) per batch, videos paired by a random
    permutation of the batch (DomainBed pairs the minibatches of two source domains; with one source domain the
    pairs come from one batch, as in Zhang et al.'s code), loss λ L(x̃, y_i) + (1 - λ) L(x̃, y_j).

    ``mixup_on=inputs`` (default, the paper's choice) mixes the cached per-step features; ``video`` mixes the video
    representation z before the classifier (manifold mixup, Verma et al. 2019). With ``inputs`` the architecture's
    own label-dependent losses are mixed the same way; with ``video`` they see the clean video, so they keep y_i.
    """

    name = "mixup"
    summary = "Mixup (Zhang et al. 2018): convex mixes of video pairs and of their labels"
    HPARAMS = {
        "mixup_alpha": HParam(0.2, "α of the mixing weight λ ~ Beta(α, α)", "DomainBed hparams_registry "
                              "(mixup_alpha = 0.2)", interval="(0, inf)"),
        "mixup_on": HParam("inputs", "inputs: mix the cached per-step features (Zhang et al.: the input); video: "
                           "mix the video representation z (manifold mixup)", "Zhang et al. 2018 §2",
                           choices=("inputs", "video")),
    }

    def objective(self, src: LabelledBatch, tgt: UnlabelledBatch | None,
                  progress: float) -> tuple[dict[str, Tensor], dict[str, float]]:
        alpha = self.hparams["mixup_alpha"]
        lam = torch.distributions.Beta(alpha, alpha).sample().item()
        partner = torch.randperm(len(src.y), device=src.y.device)
        return self.mixed_terms(src, lam, partner), {"mixup_lambda": lam}

    def mixed_terms(self, src: LabelledBatch, lam: float, partner: Tensor) -> dict[str, Tensor]:
        """The loss terms for a given λ and pairing: λ terms(y) + (1 - λ) terms(y[partner])."""
        if self.hparams["mixup_on"] == "inputs":
            encoding = self.arch.encode(mix_inputs(src.x, lam, partner))
            logits = self.arch.classify(self.arch.aggregate(encoding.parts))
            second = self.supervised_terms(encoding, logits, src.y[partner])
        else:
            encoding = self.arch.encode(src.x)
            z = self.arch.aggregate(encoding.parts)
            logits = self.arch.classify(lam * z + (1 - lam) * z[partner])
            second = {"loss_y": F.cross_entropy(logits, src.y[partner])}
        first = self.supervised_terms(encoding, logits, src.y)
        return {name: lam * term + (1 - lam) * second[name] if name in second else term
                for name, term in first.items()}


# ----------------------------------------------------------------------------------------------------------
# IRM


def irm_penalty(logits: Tensor, y: Tensor) -> Tensor:
    """IRMv1's ‖∇_w R(w · Φ)‖² at w = 1.0 (Arjovsky et al. §3.1, IRMv1), DomainBed's unbiased estimate: the product of
    the gradients of the CE of the even-indexed and of the odd-indexed videos (one environment's logits)."""
    scale = torch.ones((), device=logits.device, requires_grad=True)
    loss_even = F.cross_entropy(logits[::2] * scale, y[::2])
    loss_odd = F.cross_entropy(logits[1::2] * scale, y[1::2])
    (grad_even,) = torch.autograd.grad(loss_even, scale, create_graph=True)
    (grad_odd,) = torch.autograd.grad(loss_odd, scale, create_graph=True)
    return grad_even * grad_odd


@register_method
class IRM(CountedMethod):
    """IRM (Arjovsky et al. 2019) as DomainBed's ``IRM``: L_y + λ · mean over environments of :func:`irm_penalty`.

    λ is 1 for the first ``irm_anneal_updates`` updates, then ``irm_lambda``; at that switch the optimiser is
    replaced by a fresh one, as DomainBed does ("Adam doesn't like the sharp jump in gradient magnitudes"; here
    it drops SGD's momentum or AdamW's moments). The update count is a buffer, so a resume is exact.

    Environments: ``LabelledBatch.env`` where the trainer provides it (multi-source DG: one environment per source
    domain). A single source domain has no natural environments, so the batch is split into ``irm_envs`` random
    chunks of (nearly) equal size; the penalty then rewards a classifier whose risk gradient is the same on random
    subsets, a variance-of-gradients regulariser. An environment of one video has no split-half estimate and adds
    no penalty. L_y is the CE over the whole batch (DomainBed: the mean of the environments' CEs; the same for
    equal-sized environments).
    """

    name = "irm"
    summary = "IRM (Arjovsky et al. 2019): risk plus the IRMv1 gradient penalty across training environments"
    HPARAMS = {
        "irm_lambda": HParam(1e2, "λ: weight of the IRMv1 penalty after the anneal", "DomainBed hparams_registry "
                             "(irm_lambda = 1e2)", interval="[0, inf)"),
        "irm_anneal_updates": HParam(500, "updates with λ = 1 before irm_lambda applies (and the optimiser is "
                                     "reset)", "DomainBed hparams_registry (irm_penalty_anneal_iters = 500)",
                                     interval="[0, inf)"),
        "irm_envs": HParam(2, "random environments per batch when the batch has no environment ids",
                           "ours (a single source has no environments; 2 is the fewest the penalty compares)",
                           interval="[1, inf)"),
    }

    def __init__(self, arch: Architecture, hparams: dict):
        super().__init__(arch, hparams)
        if hparams["batch_size"] < 2 * hparams["irm_envs"]:   # the split-half estimate needs 2 videos per chunk
            raise HeadError(f"method 'irm': batch_size={hparams['batch_size']} gives environments of fewer than 2 "
                            f"videos with irm_envs={hparams['irm_envs']}, whose penalty is 0; use batch_size >= "
                            f"{2 * hparams['irm_envs']} or fewer irm_envs")

    def environments(self, src: LabelledBatch) -> list[Tensor]:
        """The indices of each environment's videos in the batch."""
        if src.env is not None:
            return [torch.nonzero(src.env == env).squeeze(1) for env in src.env.unique()]
        return list(torch.randperm(len(src.y), device=src.y.device).tensor_split(self.hparams["irm_envs"]))

    def objective(self, src: LabelledBatch, tgt: UnlabelledBatch | None,
                  progress: float) -> tuple[dict[str, Tensor], dict[str, float]]:
        h = self.hparams
        weight = h["irm_lambda"] if self.updates.item() >= h["irm_anneal_updates"] else 1.0
        encoding = self.arch.encode(src.x)
        logits = self.arch.classify(self.arch.aggregate(encoding.parts))
        terms = self.supervised_terms(encoding, logits, src.y)
        penalties = [irm_penalty(logits[index], src.y[index]) for index in self.environments(src) if len(index) > 1]
        penalty = torch.stack(penalties).mean() if penalties else logits.new_zeros(())
        terms["loss_irm"] = weight * penalty
        return terms, {"irm_penalty": penalty.item(), "irm_weight": weight}

    def update(self, src: LabelledBatch, tgt: UnlabelledBatch | None, progress: float) -> dict[str, float]:
        if self.updates.item() == self.hparams["irm_anneal_updates"]:
            # in place, so whoever holds ``optimizers`` (the trainer's checkpoint) sees the new one
            self.optimizers[0] = make_optimizer(self.param_groups()[0], self.hparams)
        return super().update(src, tgt, progress)


# ----------------------------------------------------------------------------------------------------------
# ADA


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


# ----------------------------------------------------------------------------------------------------------
# M-ADA


def pooled_inputs(x: Inputs) -> Tensor:
    """[B, C_total]: each video's input features averaged over segments (and positions), streams side by side."""
    tensors = list(x.values()) if isinstance(x, dict) else [x]
    return torch.cat([t.flatten(1, -2).mean(dim=1) for t in tensors], dim=-1)


def input_width(arch: Architecture) -> int:
    """The width of :func:`pooled_inputs` for ``arch``'s inputs: the channels of each stream, summed."""
    archs = arch.streams.values() if isinstance(arch, LateFusion) else [arch]
    return sum(a.feat_shape[-1] for a in archs)


class WAE(nn.Module):
    """A Wasserstein auto-encoder V = decoder ∘ encoder over pooled input features (M-ADA code: 400-20-400 MLPs;
    its decoder ends in a sigmoid for pixels in [0, 1], here linear for unbounded features)."""

    def __init__(self, dim: int, hidden: int, latent: int):
        super().__init__()
        self.encoder = mlp(dim, hidden, latent)
        self.decoder = mlp(latent, hidden, dim)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The reconstruction V(x) [B, dim] and the code [B, latent]."""
        code = self.encoder(x)
        return self.decoder(code), code

    def reset_parameters(self) -> None:
        for layer in self.modules():
            if isinstance(layer, nn.Linear):
                layer.reset_parameters()


def imq_mmd2(a: Tensor, b: Tensor) -> Tensor:
    """Unbiased MMD² between samples a [n, d] and b [n, d] with the inverse multiquadratics kernel
    k(u, v) = C / (C + ‖u - v‖²), C = 2 d (WAE-MMD, Tolstikhin et al. Algorithm 2 and §4, prior N(0, I))."""
    n, dim = a.shape
    scale = 2.0 * dim

    def kernel(u: Tensor, v: Tensor) -> Tensor:
        return scale / (scale + torch.cdist(u, v).pow(2))

    off_diagonal = 1.0 - torch.eye(n, device=a.device, dtype=a.dtype)
    within = ((kernel(a, a) + kernel(b, b)) * off_diagonal).sum() / (n * (n - 1))
    return within - 2.0 * kernel(a, b).mean()


def wae_loss(wae: WAE, x: Tensor, mmd_weight: float) -> Tensor:
    """WAE-MMD's objective on a batch: mean ‖x - V(x)‖² + λ MMD²(codes, N(0, I) samples) (Tolstikhin Algorithm 2)."""
    reconstruction, code = wae(x)
    return (x - reconstruction).pow(2).sum(dim=1).mean() + mmd_weight * imq_mmd2(code, torch.randn_like(code))


def relaxation(wae: WAE, x: Inputs) -> Tensor:
    """M-ADA's L_relax per video [B]: ‖x̄ - V(x̄)‖², the WAE's squared reconstruction error of the pooled input."""
    pooled = pooled_inputs(x)
    return (pooled - wae(pooled)[0]).pow(2).sum(dim=1)


@register_method
class MADA(ADA):
    """M-ADA (Qiao et al. 2020, Algorithm 1; official code ``joffery/M-ADA``, ``main_Digits.py``). The paper's text
    was not at hand for this port, so no equation numbers are cited: the structure and values follow the code.

    Domain augmentation: ADA's max phase (:class:`ADA`) with the ascent objective
    ℓ(θ; x', y) - γ ½‖z' - z‖² + β L_relax(x'), where L_relax is the squared reconstruction error of a WAE fitted
    to the previous domain (the source for the first phase, then the latest augmented domain: the code re-trains
    it so each new domain moves away from the last), so maximising it pushes x' out of that domain.

    Meta-learning (once an augmented domain exists; plain ERM before): meta-train L_src(θ) on the source batch
    (the architecture's own losses included), one inner SGD step θ' = θ - α ∇θ L_src(θ) kept in the graph
    (second order, as the code's ``create_graph=True``), meta-test L_aug(θ') on a batch as large drawn from all
    augmented domains, and an outer step on L_src(θ) + L_aug(θ'). The augmented examples are therefore not handed to
    the trainer (:meth:`extra_examples` is None): they are the meta-test domains.

    Deviations: as ADA's, plus: the WAE is over the segment-mean input feature, not the image; it is a WAE-MMD
    (IMQ kernel, N(0, I) prior) where the code trains a WAE-GAN; L_relax is the reconstruction error of x' as the
    paper writes it, where the code takes ‖V(x') - V(x)‖²; the max phases perturb the source set only (the code
    mixes in earlier augmented examples); the outer loss is the sum (the code halves it, the same as halving the lr).
    β is converted from the code's units: 2000 on an element mean over 3072 pixel values, i.e. 2000/3072 ≈ 0.65 on
    the summed squared error.
    """

    name = "m-ada"
    summary = "M-ADA (Qiao et al. 2020): WAE-relaxed adversarial domains and a meta-learning update"
    HPARAMS = {
        **ADA.HPARAMS,
        "ada_max_steps": replace(ADA.HPARAMS["ada_max_steps"], source="M-ADA code, main_Digits.py (--T_adv 25)",
                                 default=25),
        "mada_beta": HParam(2000 / 3072, "β: weight of the WAE relaxation L_relax in the ascent objective",
                            "M-ADA code, main_Digits.py (--beta 2000 on a mean over 3072 values)",
                            interval="[0, inf)"),
        "mada_inner_lr": HParam(0.0, "α: step of the inner (meta-train) SGD update; 0 = the optimiser's current lr",
                                "M-ADA code, main_Digits.py (the inner step uses --lr)", interval="[0, inf)"),
        "mada_wae_hidden": HParam(400, "hidden width of the WAE's encoder and decoder",
                                  "M-ADA code, models/ada_conv.py (400)", interval="[1, inf)"),
        "mada_wae_latent": HParam(20, "latent width of the WAE", "M-ADA code, models/ada_conv.py (20)",
                                  interval="[1, inf)"),
        "mada_wae_epochs": HParam(20, "epochs of WAE training before each max phase",
                                  "M-ADA code, main_Digits.py (20 epochs)", interval="[1, inf)"),
        "mada_wae_lr": HParam(1e-3, "Adam learning rate of the WAE", "M-ADA code, main_Digits.py (Adam, lr 1e-3)",
                              interval="(0, inf)"),
        "mada_wae_mmd": HParam(10.0, "λ: weight of the latent MMD penalty of WAE-MMD",
                               "Tolstikhin et al. 2018 §4 (λ = 10 on MNIST)", interval="[0, inf)"),
    }

    def __init__(self, arch: Architecture, hparams: dict):
        super().__init__(arch, hparams)
        h = self.hparams
        self.wae = WAE(input_width(arch), h["mada_wae_hidden"], h["mada_wae_latent"])

    def param_groups(self) -> list[list[nn.Parameter]]:
        """The architecture only: the WAE trains on its own objective in :meth:`fit_wae`."""
        return [list(self.arch.parameters())]

    def extra_examples(self) -> tuple[Inputs, Tensor] | None:
        return None

    # --- domain augmentation ----------------------------------------------------------------------------

    def max_phase(self, source: Callable[[], Iterable[LabelledBatch]]) -> tuple[Inputs, Tensor]:
        if self.augmented is None:
            previous = torch.cat([pooled_inputs(batch.x).cpu() for batch in self.source_batches(source)])
        else:
            x, _, phase = self.augmented
            previous = pooled_inputs(take(x, phase == phase.max()))
        device = next(self.wae.parameters()).device
        self.fit_wae(previous.to(device))
        return super().max_phase(source)

    def fit_wae(self, pooled: Tensor) -> None:
        """A fresh WAE trained on ``pooled`` [E, C] for ``mada_wae_epochs`` epochs of ``batch_size`` minibatches."""
        h = self.hparams
        self.wae.reset_parameters()
        optimizer = torch.optim.Adam(self.wae.parameters(), lr=h["mada_wae_lr"])
        for _ in range(h["mada_wae_epochs"]):
            for index in torch.randperm(len(pooled), device=pooled.device).split(h["batch_size"]):
                if len(index) < 2:        # the unbiased MMD needs two codes
                    continue
                loss = wae_loss(self.wae, pooled[index], h["mada_wae_mmd"])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()

    def ascent_objective(self, x_adv: Inputs, z: Tensor, y: Tensor) -> Tensor:
        """ADA's objective plus β Σ_b L_relax(x'_b)."""
        return super().ascent_objective(x_adv, z, y) + self.hparams["mada_beta"] * relaxation(self.wae, x_adv).sum()

    # --- meta-learning ----------------------------------------------------------------------------------

    def meta_test_batch(self, size: int, device: torch.device) -> tuple[Inputs, Tensor]:
        """``size`` augmented examples drawn without replacement from all augmented domains."""
        x, y, _ = self.augmented
        index = torch.randperm(len(y))[:size]
        return map_inputs(lambda t: t[index].to(device), x), y[index].to(device)

    def objective(self, src: LabelledBatch, tgt: UnlabelledBatch | None,
                  progress: float) -> tuple[dict[str, Tensor], dict[str, float]]:
        terms, logs = super().objective(src, tgt, progress)        # meta-train: L_src(θ) on the source batch
        if self.augmented is None:
            return terms, logs
        h = self.hparams
        inner_lr = h["mada_inner_lr"] or h["lr"] * lr_factor(h, progress)
        params = {name: p for name, p in self.arch.named_parameters() if p.requires_grad}
        grads = torch.autograd.grad(sum(terms.values()), list(params.values()), create_graph=True, allow_unused=True)
        adapted = {name: p if g is None else p - inner_lr * g for (name, p), g in zip(params.items(), grads)}
        x_aug, y_aug = self.meta_test_batch(len(src.y), src.y.device)
        terms["loss_meta_test"] = F.cross_entropy(functional_call(self.arch, adapted, (x_aug,)), y_aug)
        return terms, {**logs, "mada_inner_lr": inner_lr}


# ----------------------------------------------------------------------------------------------------------
# COP


def clip_orders(clips: int) -> list[tuple[int, ...]]:
    """Every order of ``clips`` clips; an order's class is its index in this list (VCOP code:
    ``itertools.permutations``): for 3 clips the identity is class 0 and the reversal class 5."""
    return list(itertools.permutations(range(clips)))


def clip_features(frames: Tensor, clips: int) -> Tensor:
    """[B, N, D] -> [B, clips, D]: the mean frame feature of each of ``clips`` consecutive runs of segments (the
    first N mod clips runs are one segment longer, as ``tensor_split``)."""
    return torch.stack([run.mean(dim=1) for run in frames.tensor_split(clips, dim=1)], dim=1)


def shuffle_clips(clips: Tensor, orders: Tensor, labels: Tensor) -> Tensor:
    """Video b's clips in order ``orders[labels[b]]``: out[b, k] = clips[b, orders[labels[b], k]] (VCOP's shuffle)."""
    index = orders[labels]                                                    # [B, n]
    return clips.gather(1, index[..., None].expand(-1, -1, clips.shape[-1]))


class OrderClassifier(nn.Module):
    """VCOP's order head (Xu et al. §3; code ``models/vcopn.py``): each pair (i < j) of clip features
    concatenated -> shared fc -> ReLU, the pairs' outputs concatenated -> dropout -> fc -> n! order logits."""

    def __init__(self, dim: int, clips: int, hidden: int, dropout: float):
        super().__init__()
        self.pairs = list(itertools.combinations(range(clips), 2))
        self.pair = nn.Sequential(nn.Linear(2 * dim, hidden), nn.ReLU())
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(len(self.pairs) * hidden, math.factorial(clips))

    def forward(self, clips: Tensor) -> Tensor:
        """[B, n, D] -> [B, n!]."""
        pairs = [self.pair(torch.cat([clips[:, i], clips[:, j]], dim=-1)) for i, j in self.pairs]
        return self.fc(self.dropout(torch.cat(pairs, dim=-1)))


@register_method
class COP(Method):
    """Clip order prediction (Xu et al., CVPR 2019, VCOP) as a self-supervised auxiliary task, STDN Table 2's COP.

    The N segments' frame features (``Encoding.frames``) are cut into ``cop_clips`` consecutive clips, each the mean
    of its frames; the clips of each video are shuffled by one of the n! orders, drawn uniformly, and
    :class:`OrderClassifier` predicts the order. Loss: L_y + ``cop_weight`` · CE(order).

    Deviations: VCOP samples n clips of 16 frames with gaps between them and encodes each with a 3D CNN; here a
    clip is a run of cached segment features through the architecture's frame module. STDN does not give the
    weight of the order loss; 1 is the unweighted multi-task sum.
    """

    name = "cop"
    needs = frozenset({"encoder"})    # an auxiliary task only acts through the layers it trains
    summary = "COP (Xu et al. 2019): classification plus prediction of the order of shuffled clips"
    HPARAMS = {
        "cop_clips": HParam(3, "clips per video whose order is predicted (n; n! classes)",
                            "VCOP code, train_vcop.py (--tl 3)", interval="[2, inf)"),
        "cop_weight": HParam(1.0, "weight of the order-prediction loss", "ours (STDN gives none; 1 = the plain "
                             "multi-task sum)", interval="[0, inf)"),
        "cop_hidden": HParam(512, "width of the pairwise fc of the order head", "VCOP code, models/vcopn.py (fc7: "
                             "512)", interval="[1, inf)"),
        "cop_dropout": HParam(0.5, "dropout before the order classifier", "VCOP code, models/vcopn.py (p = 0.5)",
                              interval="[0, 1)"),
    }

    def __init__(self, arch: Architecture, hparams: dict):
        super().__init__(arch, hparams)
        h = self.hparams
        if arch.num_segments < h["cop_clips"]:
            raise HeadError(f"method 'cop' cuts each video into cop_clips={h['cop_clips']} clips of consecutive "
                            f"segments, but videos have num_segments={arch.num_segments}; use fewer clips or more "
                            f"segments")
        self.order_head = OrderClassifier(arch.frame_dim, h["cop_clips"], h["cop_hidden"], h["cop_dropout"])
        self.register_buffer("orders", torch.tensor(clip_orders(h["cop_clips"])), persistent=False)

    def objective(self, src: LabelledBatch, tgt: UnlabelledBatch | None,
                  progress: float) -> tuple[dict[str, Tensor], dict[str, float]]:
        encoding = self.arch.encode(src.x)
        logits = self.arch.classify(self.arch.aggregate(encoding.parts))
        terms = self.supervised_terms(encoding, logits, src.y)
        labels = torch.randint(len(self.orders), (batch_size(src.x),), device=src.y.device)
        clips = shuffle_clips(clip_features(encoding.frames, self.hparams["cop_clips"]), self.orders, labels)
        order_logits = self.order_head(clips)
        terms["loss_cop"] = self.hparams["cop_weight"] * F.cross_entropy(order_logits, labels)
        return terms, {"cop_accuracy": (order_logits.argmax(dim=1) == labels).float().mean().item()}
