"""MixStyle (Zhou et al., ICLR 2021) for videos, as STDN §4.1 uses it: one style per video, over time and space.

A video's style is the per-channel mean and std of its features over (N, H, W). Mixing re-normalises each video
with its own style and re-scales it with a convex mix of its style and a partner's. Here it acts on cached maps
[B, N, H, W, C]; the end-to-end mode (``pipelines/finetune_model.py``) applies it inside the backbone after
ResNet layers 1-3, as STDN does, on the maps [B, N, h, w, C] of each layer.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from heads.base import HeadError


def mix_video_styles(x: Tensor, lam: Tensor, partner: Tensor, eps: float = 1e-6) -> Tensor:
    """Re-style each video of maps [B, N, H, W, C] with its style mixed with ``partner``'s: [B, N, H, W, C].

    Statistics over (N, H, W) per channel, unbiased variance, detached (MixStyle; STDN code). Video b is
    normalised with its own style and re-scaled with ``lam[b] * style[b] + (1 - lam[b]) * style[partner[b]]``.
    """
    mu = x.mean(dim=(1, 2, 3), keepdim=True).detach()
    sigma = (x.var(dim=(1, 2, 3), keepdim=True) + eps).sqrt().detach()
    lam = lam.view(-1, 1, 1, 1, 1)
    mu_mix = lam * mu + (1 - lam) * mu[partner]
    sigma_mix = lam * sigma + (1 - lam) * sigma[partner]
    return (x - mu) / sigma * sigma_mix + mu_mix


def crosshalf_partners(batch_size: int) -> Tensor:
    """The STDN code's pairing (MixStyle's "crossdomain"): the first half of the batch mixes with the second.

    The first half is the first ⌊B/2⌋ videos. Each half takes its partners from the other half, shuffled, so a
    video's partner always lies in the other half and is never itself. With an odd B the second half has one
    video more: the first half's partners are distinct videos of the second, and the second half's last video
    takes a random video of the first. (The official code cuts the reversed order with ``chunk(2)``, which for an
    odd B puts the middle video in both halves, so it is sometimes paired with itself.) For an even B the draws
    are the official code's, partner for partner.
    """
    if batch_size < 2:
        raise HeadError(f"crosshalf pairing needs batch_size >= 2 (one video per half), got {batch_size}")
    half = batch_size // 2
    order = torch.arange(batch_size - 1, -1, -1)          # the official code's reversed order
    second, first = order[:batch_size - half], order[batch_size - half:]
    # repeat(2)[:len(second)]: the first half shuffled; an odd B's extra video reuses its first draw
    return torch.cat([second[torch.randperm(len(second))[:half]], first[torch.randperm(half).repeat(2)[:len(second)]]])


class VideoMixStyle(nn.Module):
    """MixStyle on maps [B, N, H, W, C], in training only, applied to a whole batch with probability ``p``.

    The mixing weight is drawn per video from Beta(alpha, alpha); ``pairing`` is ``random`` (a permutation of the
    batch, MixStyle's default) or ``crosshalf`` (:func:`crosshalf_partners`).
    """

    def __init__(self, p: float, alpha: float, pairing: str):
        super().__init__()
        self.p, self.alpha, self.pairing = p, alpha, pairing

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or len(x) < 2 or torch.rand(()).item() >= self.p:
            return x
        lam = torch.distributions.Beta(self.alpha, self.alpha).sample((len(x),))
        partner = crosshalf_partners(len(x)) if self.pairing == "crosshalf" else torch.randperm(len(x))
        return mix_video_styles(x, lam.to(x), partner.to(x.device))
