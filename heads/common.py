"""Building blocks shared by the architectures and methods: gradient reversal, MLPs, entropy and TRN relation tuples.

Nothing here knows about the Architecture or Method interfaces; these are plain functions and modules that the
paper files (`pooling.py`, `trn.py`, `ta3n.py`, ...) compose.
"""
from __future__ import annotations

import itertools
import math
from typing import Callable

import torch
from torch import Tensor, nn

# ----------------------------------------------------------------------------------------------------------
# gradient reversal


class _GradReverse(torch.autograd.Function):
    """Identity forward, ``-coeff * grad`` backward (Ganin & Lempitsky 2015; TA3N code ``GradReverse``)."""

    @staticmethod
    def forward(ctx, x: Tensor, coeff: float) -> Tensor:
        ctx.coeff = coeff
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return -ctx.coeff * grad, None


def grad_reverse(x: Tensor, coeff: float = 1.0) -> Tensor:
    """Gradient reversal layer: returns ``x`` unchanged; gradients flowing back are multiplied by ``-coeff``.

    The discriminator behind it trains at full strength while the features in front of it receive
    ``coeff`` times the reversed gradient: ``coeff`` is TA3N's per-level β (official code: the domain losses
    themselves are unweighted and β only enters here).
    """
    return _GradReverse.apply(x, coeff)


def dann_ramp(progress: float, gamma: float = 10.0) -> float:
    """``2 / (1 + exp(-gamma * p)) - 1``: 0 at p=0, rising towards 1 (DANN, Ganin et al. 2016, gamma=10).

    TA3N's code applies it when β < 0; the EPIC-100 TA3N baseline uses gamma=1, which only reaches 0.46.
    """
    return 2.0 / (1.0 + math.exp(-gamma * progress)) - 1.0


# A GRL schedule maps (progress, gamma) to a multiplier of β; its name is the hyper-parameter that gets logged.
GRL_SCHEDULES: dict[str, Callable[[float, float], float]] = {
    "constant": lambda progress, gamma: 1.0,
    "dann": dann_ramp,
}


def grl_coefficient(beta: float, schedule: str, progress: float, gamma: float = 10.0) -> float:
    """The GRL coefficient at training progress ``p`` in [0, 1]: ``beta * schedule(p)``."""
    if schedule not in GRL_SCHEDULES:
        raise ValueError(f"unknown GRL schedule {schedule!r}; valid: {sorted(GRL_SCHEDULES)}")
    return beta * GRL_SCHEDULES[schedule](progress, gamma)


# ----------------------------------------------------------------------------------------------------------
# MLPs


def mlp(*dims: int, dropout: float = 0.0, activate_last: bool = False) -> nn.Sequential:
    """Linear layers ``dims[0] -> dims[1] -> ... -> dims[-1]`` with ReLU (then Dropout, if > 0) in between.

    ``activate_last`` also puts ReLU (+ Dropout) after the last layer, for feature blocks such as TA3N's
    frame MLP ``Linear -> ReLU -> Dropout``; leave it off for classifiers and discriminators.
    """
    if len(dims) < 2:
        raise ValueError(f"mlp needs at least an input and an output size, got {dims}")
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(d_in, d_out))
        if i < len(dims) - 2 or activate_last:
            layers.append(nn.ReLU())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


def init_normal_(module: nn.Module, std: float) -> nn.Module:
    """Every Linear inside ``module`` gets weights ~ N(0, std) and zero bias (TA3N code: ``std = 0.001``)."""
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            nn.init.normal_(layer.weight, 0.0, std)
            nn.init.zeros_(layer.bias)
    return module


# ----------------------------------------------------------------------------------------------------------
# entropy


def entropy(logits: Tensor) -> Tensor:
    """Entropy in nats of ``softmax(logits)`` over the last axis: [..., K] -> [...].

    Computed from log-softmax as TA3N's ``get_trans_attn`` does, so it is stable for large logits.
    """
    log_p = torch.log_softmax(logits, dim=-1)
    return -(log_p.exp() * log_p).sum(dim=-1)


def entropy_of_probs(probs: Tensor) -> Tensor:
    """Entropy in nats of probability vectors over the last axis: [..., K] -> [...]; 0 log 0 counts as 0."""
    return -torch.special.xlogy(probs, probs).sum(dim=-1)


# ----------------------------------------------------------------------------------------------------------
# relation tuples (TRN-M)


def ordered_tuples(num_segments: int, size: int) -> list[tuple[int, ...]]:
    """All time-ordered tuples of ``size`` segment indices out of ``num_segments``, in lexicographic order."""
    return list(itertools.combinations(range(num_segments), size))


def even_tuples(num_segments: int, size: int, num_tuples: int) -> list[tuple[int, ...]]:
    """``num_tuples`` tuples picked at evenly spaced positions of :func:`ordered_tuples`.

    This is the official TA3N code (``TRNmodule.py``): ``idx = ceil(i * M / k)`` for ``i < k``, with ``M`` the
    number of tuples and ``k = min(num_tuples, M)``. For 5 segments and 3 tuples it gives
    size 4: (0,1,2,3) (0,1,3,4) (1,2,3,4); size 3: (0,1,2) (0,2,4) (1,2,4); size 2: (0,1) (1,2) (2,3).
    """
    tuples = ordered_tuples(num_segments, size)
    k = min(num_tuples, len(tuples))
    return [tuples[-(-i * len(tuples) // k)] for i in range(k)]  # -(-a // b) is ceil(a / b) in integers


def random_tuples(num_segments: int, size: int, num_tuples: int,
                  generator: torch.Generator | None = None) -> list[tuple[int, ...]]:
    """``num_tuples`` distinct tuples drawn uniformly from :func:`ordered_tuples`, kept in lexicographic order.

    This is the original TRN's choice (``np.random.choice(..., replace=False)`` at every forward pass).
    ``generator`` defaults to torch's global generator, so a seeded run draws the same tuples.
    """
    tuples = ordered_tuples(num_segments, size)
    k = min(num_tuples, len(tuples))
    picked = torch.randperm(len(tuples), generator=generator)[:k].sort().values
    return [tuples[i] for i in picked.tolist()]
