"""MixStyle (Zhou et al., ICLR 2021) for videos, as STDN §4.1 uses it: one style per video, over time and space.

A video's style is the per-channel mean and std of its features over (N, H, W). Mixing re-normalises each video
with its own style and re-scales it with a convex mix of its style and a partner's. Here it acts on cached maps
[B, N, H, W, C]; the in-backbone version (STDN mixes after ResNet layers 1-3) is left to the end-to-end mode.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


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

    The reversed order is cut in two and each half shuffled, so video b's partner always lies in the other half.
    """
    first, second = torch.arange(batch_size - 1, -1, -1).chunk(2)
    return torch.cat([first[torch.randperm(len(first))], second[torch.randperm(len(second))]])


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
