"""Mixup (Zhang et al., ICLR 2018; DomainBed's ``Mixup``), a general DG baseline of STDN Table 2, on every architecture.

x̃ = λ x_i + (1 - λ) x_j, λ ~ Beta(α, α) (§2): :func:`mix_inputs`; loss λ CE(f(x̃), y_i) + (1 - λ) CE(f(x̃), y_j):
:meth:`Mixup.mixed_terms`. Source labels only; in ``da`` the target batch is ignored.

Forced by the cache: the inputs are cached backbone features per segment, not pixels, so ``mixup_on=inputs`` mixes
the features (the nearest we have to Zhang et al.'s pixel mixup); ``video`` mixes the video representation z.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from heads.base import HParam, Inputs, LabelledBatch, UnlabelledBatch, map_inputs
from heads.method import Method, register_method


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
