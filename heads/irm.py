"""IRM (Arjovsky et al. 2019; DomainBed's ``IRM``), a general DG baseline of STDN Table 2, on every architecture.

The IRMv1 objective of §3.1: the squared gradient of the risk with respect to a fixed scale w = 1.0 on the logits,
estimated unbiasedly from two halves of each environment: :func:`irm_penalty`; the environments:
:meth:`IRM.environments`. Source labels only; in ``da`` the target batch is ignored.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from heads.architecture import Architecture
from heads.base import HeadError, HParam, LabelledBatch, UnlabelledBatch, batch_size, make_optimizer
from heads.method import CountedMethod, register_method


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
