"""STCDA: spatio-temporal contrastive domain adaptation (Song et al., CVPR 2021), re-implemented from the paper.

No public code exists; every choice the paper leaves open is named here and in README.md ("STCDA"). Files: this one
(the losses of §3.1-3.2 and the intra-negatives), ``heads/stcda_net.py`` (φ_m, clips, the video aggregation V: the
``stcda`` / ``stcda-maps`` architectures), ``heads/stcda_memory.py`` (the memory bank and the K-means
pseudo-labels), ``heads/stcda_method.py`` (eq. 10 in §4.2's three stages: the ``stcda`` method, its presets).

- **STCL** (§3.1): Θ (eq. 3, :func:`theta`); the clip-level loss (eq. 1, :func:`clip_loss`) of a clip v_i^1 with
  positives {its video V^1, the same clip in the other modality v_i^2} against the other modality's clips (the
  positive and k memory-bank clips) and the clip's intra-negatives; the video-level loss (eq. 2,
  :func:`video_loss`) of V^1 with positive V^2 against its intra-negative videos; summed over both modalities,
  clips averaged, averaged over the videos of S ∪ T (eq. 4, :func:`contrastive_loss`). Intra-negatives (Fig. 3,
  :func:`temporal_negatives`, :func:`spatial_negatives`, :func:`order_negatives`, :func:`clip_negatives`).
- **VCA** (§3.2): the class-aware relation r (eq. 5-6, :func:`class_relation`), D (eq. 7) and D_VCA (eq. 8,
  :func:`vca_discrepancy`, :func:`vca`) per modality with a multi-Gaussian kernel, on source labels and target
  pseudo-labels (``heads/stcda_memory.py``).
- **Total** (eq. 10, ``heads/stcda_method.py``): L = L_CE + α L_Contrast + β D_VCA, α = 2, β = 0.5, in the three
  stages of §4.2 (STCL only; + CE with β = 0; + VCA), one run whose stage boundaries are hyper-parameters.

Choices the paper leaves open (ours): τ = 0.07, k = 4096 memory negatives drawn once per batch and modality
(shared by the batch's anchors; CMC draws per anchor), μ = 0.5 (CMC's code); positives are the current batch's
features (both modalities get gradients), negatives the bank's (constants); intra-negatives are built from the
anchor's own modality (as IIC) and encoded by the same network; eq. 1's second sum runs over the intra-negatives
the clip has (one of each available kind), not k + 1. VCA: features L2-normalised, DAN/JAN's 5 Gaussian kernels
(multiplier 2) around the mean squared distance of the batch's video features, the same bandwidth for clips and
videos (the paper: "clip-level and video-level features share the same kernel"); a clip-level pair of videos is
the mean kernel over their clips' pairs; classes not present in both domains of a batch drop out of eq. 8's
expectations. L_CE is the cross-entropy of the late-fused (averaged) logits, as the source-only row trains.
With one stream (the paper's "RGB" rows) the other view is the video's own memory-bank entry (its features from
its previous batch: instance discrimination), since no second modality exists.

Forced by cached features: the backbone is fixed, φ_m is the trainable network above it; a spatial negative flips
or rotates the cached *maps* of some steps of a clip (an approximation of flipping the frames: a CNN's map of a
flipped frame is only roughly the flipped map); on pooled vectors spatial negatives do not exist and are skipped
(logged), and with one cached step per clip (I3D clip stores) so are temporal negatives.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from heads.cop import clip_orders
from heads.da_baselines import multi_gaussian_kernel, squared_distances

INTRA_NEGATIVES = ("temporal", "spatial", "order", "clip")
STCL_LEVELS = ("clip", "video")

# ----------------------------------------------------------------------------------------------------------
# STCL (§3.1)


def theta(a: Tensor, b: Tensor, tau: float) -> Tensor:
    """Eq. 3: Θ({a, b}) = exp(cos(a, b) / τ), over the last axis (broadcasting)."""
    return torch.exp(F.cosine_similarity(a, b, dim=-1) / tau)


def _similarity(a: Tensor, b: Tensor, tau: float) -> Tensor:
    """log Θ: cos(a, b) / τ, so the losses can be evaluated as log-sum-exps (exp(1/τ) overflows at small τ)."""
    return F.cosine_similarity(a, b, dim=-1) / tau


def clip_loss(clip: Tensor, video: Tensor, partner: Tensor, memory: Tensor, intra: Tensor | None,
              tau: float) -> Tensor:
    """Eq. 1 per anchor clip v = v_i^1 [P, D]:
    -log (Θ(v, V) + Θ(v, v_i^2)) / (Θ(v, V) + Σ_j Θ(v, v_j^2) + Σ_j Θ(v, v_j^neg)).

    ``video`` V^1 [P, D] of the anchor's video, ``partner`` v_i^2 [P, D]; the j-sum over the other modality is the
    partner plus ``memory`` [K, D] (shared by all anchors); ``intra`` [P, J, D] the anchor's intra-negatives, or
    None. Returns [P].
    """
    s_video, s_partner = _similarity(clip, video, tau), _similarity(clip, partner, tau)
    memory_normed = F.normalize(memory, dim=-1)
    s_memory = (F.normalize(clip, dim=-1) @ memory_normed.T / tau) if len(memory) else clip.new_zeros(len(clip), 0)
    denominator = [s_video[:, None], s_partner[:, None], s_memory]
    if intra is not None:
        denominator.append(_similarity(clip[:, None], intra, tau))
    numerator = torch.stack([s_video, s_partner], dim=1)
    return torch.logsumexp(torch.cat(denominator, dim=1), dim=1) - torch.logsumexp(numerator, dim=1)


def video_loss(video: Tensor, partner: Tensor, intra: Tensor | None, tau: float) -> Tensor:
    """Eq. 2 per anchor video V^1 [B, D]: -log Θ(V^1, V^2) / (Θ(V^1, V^2) + Σ Θ(V^1, V^neg)), ``intra`` [B, J, D]
    (None: no intra-negative, the loss is 0). Returns [B]."""
    positive = _similarity(video, partner, tau)
    if intra is None:
        return torch.zeros_like(positive)
    scores = torch.cat([positive[:, None], _similarity(video[:, None], intra, tau)], dim=1)
    return torch.logsumexp(scores, dim=1) - positive


def contrastive_loss(per_modality: dict[str, dict[str, Tensor]], levels: tuple[str, ...]) -> Tensor:
    """Eq. 4: mean over videos of Σ_m [mean_i L_clip(v_i^m) + L_vid(V^m)], from each modality's ``clip`` [B, n]
    and ``video`` [B] losses (``levels`` picks the terms: Table 5's clip-only / video-only rows)."""
    total = 0.0
    for losses in per_modality.values():
        if "clip" in levels:
            total = total + losses["clip"].mean(dim=1)
        if "video" in levels:
            total = total + losses["video"]
    return total.mean()


# ----------------------------------------------------------------------------------------------------------
# intra-negatives (Fig. 3), drawn from torch's global generator (checkpointed: a resumed run draws the same)


def non_identity_orders(items: int, count: int, device: torch.device | None = None) -> Tensor:
    """``count`` uniform draws among the items! - 1 orders that are not the identity, [count, items].

    ``heads.cop.clip_orders`` lists the orders with the identity first, so a draw from 1..items!-1 is never it."""
    orders = torch.tensor(clip_orders(items), device=device)
    return orders[torch.randint(1, len(orders), (count,), device=device)]


def _at_least_one(shape: tuple[int, ...], device: torch.device) -> Tensor:
    """A random boolean mask over the last axis with at least one True per row (each entry otherwise p = 1/2)."""
    mask = torch.rand(shape, device=device) < 0.5
    forced = F.one_hot(torch.randint(shape[-1], shape[:-1], device=device), shape[-1]).bool()
    return mask | forced


def temporal_negatives(x: Tensor, clip_steps: int) -> Tensor:
    """x [B, clips·L, ...] with the L steps of every clip in a wrong order (each clip its own non-identity order)."""
    batch, steps = x.shape[:2]
    clips = steps // clip_steps
    orders = non_identity_orders(clip_steps, batch * clips, x.device).view(batch, clips, clip_steps)
    source = (orders + torch.arange(clips, device=x.device)[:, None] * clip_steps).view(batch, steps)
    return x[torch.arange(batch, device=x.device)[:, None], source]


def map_transforms(x: Tensor) -> list[Tensor]:
    """The "wrong pose" versions of maps [..., H, W, C]: horizontal and vertical flips, rotation by 180° and,
    for square maps, by ±90°."""
    h_axis, w_axis = x.dim() - 3, x.dim() - 2
    versions = [x.flip(w_axis), x.flip(h_axis), x.flip(h_axis, w_axis)]
    if x.shape[h_axis] == x.shape[w_axis]:
        versions += [x.rot90(1, (h_axis, w_axis)), x.rot90(-1, (h_axis, w_axis))]
    return versions


def spatial_negatives(x: Tensor, clip_steps: int) -> Tensor:
    """Maps x [B, clips·L, H, W, C] where in every clip a random non-empty subset of steps is flipped or rotated
    (one transform per clip, drawn uniformly from :func:`map_transforms`)."""
    batch, steps = x.shape[:2]
    clips = steps // clip_steps
    versions = torch.stack(map_transforms(x))                                        # [T, B, steps, H, W, C]
    kind = torch.randint(len(versions), (batch, clips), device=x.device).repeat_interleave(clip_steps, dim=1)
    chosen = _at_least_one((batch, clips, clip_steps), x.device).view(batch, steps)
    transformed = versions[kind, torch.arange(batch, device=x.device)[:, None], torch.arange(steps, device=x.device)]
    return torch.where(chosen.view(batch, steps, 1, 1, 1), transformed, x)


def order_negatives(clips: Tensor) -> Tensor:
    """Clip features [B, n, D] in a wrong clip order (Fig. 3's order negative; a non-identity order per video)."""
    orders = non_identity_orders(clips.shape[1], len(clips), clips.device)
    return clips.gather(1, orders[..., None].expand(-1, -1, clips.shape[-1]))


def clip_negatives(clips: Tensor, negative_clips: Tensor) -> Tensor:
    """Clip features [B, n, D] with a random non-empty subset of clips replaced by their intra-negative clips
    (Fig. 3's clip negative: a video with at least one negative clip)."""
    replaced = _at_least_one(clips.shape[:2], clips.device)
    return torch.where(replaced[..., None], negative_clips, clips)


# ----------------------------------------------------------------------------------------------------------
# VCA (§3.2)


def class_relation(kernel: Tensor, labels_a: Tensor, labels_b: Tensor, num_classes: int) -> Tensor:
    """Eq. 5-6 for every class pair: r[c1, c2] = Σ_ij μ_c1c2(y_i, y_j) k_ij / Σ_ij μ_c1c2(y_i, y_j), [C, C], from
    the kernel values ``kernel`` [Na, Nb] (clip + video terms) and labels (-1: unlabelled, never weighted); 0
    where no pair has the classes."""
    a = F.one_hot(labels_a.clamp(min=0), num_classes).to(kernel.dtype) * (labels_a >= 0)[:, None]
    b = F.one_hot(labels_b.clamp(min=0), num_classes).to(kernel.dtype) * (labels_b >= 0)[:, None]
    pairs = a.sum(dim=0)[:, None] * b.sum(dim=0)[None, :]
    return (a.T @ kernel @ b) / pairs.clamp(min=1)


def vca_discrepancy(r_ss: Tensor, r_tt: Tensor, r_st: Tensor, valid: Tensor) -> Tensor:
    """Eq. 7-8: D(c1, c2) = r_SS(c1, c1) + r_TT(c2, c2) - 2 r_ST(c1, c2); D_VCA = E_c D(c, c) - E_c E_{c'≠c} D(c, c')
    over the classes ``valid`` [C] (present in both domains). Minimising it pulls same-class source and target
    together and pushes different classes apart."""
    d = r_ss.diagonal()[:, None] + r_tt.diagonal()[None, :] - 2 * r_st                     # D(c1, c2), [C, C]
    idx = valid.nonzero().squeeze(1)
    if len(idx) == 0:
        return r_ss.sum() * 0.0
    d = d[idx][:, idx]
    intra = d.diagonal().mean()
    if len(idx) == 1:
        return intra
    off = ~torch.eye(len(idx), dtype=torch.bool, device=d.device)
    inter = (d * off).sum(dim=1) / (len(idx) - 1)
    return intra - inter.mean()


def vca(source: tuple[Tensor, Tensor], target: tuple[Tensor, Tensor], source_labels: Tensor,
        target_labels: Tensor, num_classes: int, kernel_mul: float, kernel_num: int) -> Tensor:
    """D_VCA (eq. 8) of one modality from (clips [N, n, D], videos [N, D]) of source and target, L2-normalised,
    with κ_m the multi-Gaussian kernel whose bandwidth comes from the video features (shared by both levels)."""
    clips = F.normalize(torch.cat([source[0], target[0]]), dim=-1)
    videos = F.normalize(torch.cat([source[1], target[1]]), dim=-1)
    rows, n_clips = len(videos), clips.shape[1]
    bandwidth = (squared_distances(videos.detach()).sum() / max(rows * rows - rows, 1)).clamp(
        min=torch.finfo(videos.dtype).tiny).item()
    clip_kernel = multi_gaussian_kernel(clips.flatten(0, 1), kernel_mul, kernel_num, bandwidth)
    clip_kernel = clip_kernel.view(rows, n_clips, rows, n_clips).mean(dim=(1, 3))   # mean over the clip pairs
    kernel = clip_kernel + multi_gaussian_kernel(videos, kernel_mul, kernel_num, bandwidth)   # eq. 5's bracket
    s, t = slice(None, len(source_labels)), slice(len(source_labels), None)
    r_ss = class_relation(kernel[s, s], source_labels, source_labels, num_classes)
    r_tt = class_relation(kernel[t, t], target_labels, target_labels, num_classes)
    r_st = class_relation(kernel[s, t], source_labels, target_labels, num_classes)
    present = lambda labels: torch.bincount(labels[labels >= 0], minlength=num_classes) > 0   # noqa: E731
    return vca_discrepancy(r_ss, r_tt, r_st, present(source_labels) & present(target_labels))
