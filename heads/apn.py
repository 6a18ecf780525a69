"""APN, the Adversarial Pyramid Network (Yao et al., "Adversarial Pyramid Network for Video Domain Generalization",
arXiv 1912.03716), on cached per-segment features [B, M, C]: the relational feature pyramid as architecture ``apn``,
its video ADA as method ``video-ada``, and Table 2's ``trn-attn``. Read beside
``papers/apn_adversarial_pyramid_network.txt`` and ``research/heads_official_code.md`` §2 (``thuml/VideoDG``).

Paper -> code:

- §4.1 frame encoder (pooled feature, Dropout 0.8, Linear to D = 256; F_M in R^{M x D}): ``APN.encode``.
- §4.1 Attention-Block(Query, Key), keys = values; three multi-head attention layers and two feed-forward layers,
  each with a residual and layer norm: :class:`AttentionBlock` (:class:`MultiHeadAttention`,
  :func:`attention_weights`, :class:`FeedForward`), the encoder-decoder layout of the code's ``AttModel``.
- §4.2 level I: R^I_Global = Att(F_M, F_M), R^I_m = Att(F_m, F_m) over m consecutive segments, m = 2..M-1:
  :meth:`RelationalPyramid.forward` with :meth:`RelationalPyramid.windows_for`.
- eq. 6, R^II_m = Att(R^I_Global, R^I_m); eq. 7, R^II = Σ_m R^II_m; level III, R^III = R^II + R^I_Global:
  :meth:`RelationalPyramid.forward` (``relations`` = [R^I_Global, R^II_2, ..., R^II_{M-1}]) and
  :func:`pyramid_levels` (level II and III as sums of those rows; ``APN.aggregate`` is level III).
- §4.3 h, "a fully-connected layer" on the flattened level feature: ``APN.classifier``.
- §4.3, eq. 8-9 and Algorithm 1: :class:`VideoADA` (eq. 8/9's objective :meth:`VideoADA.ascent_objective`, the
  transport cost :func:`transport_cost`, lines 6-12 :meth:`VideoADA.adversarial_copies`, lines 5, 13, 14
  :meth:`VideoADA.update`). The γ ensemble of §5.1 combines runs at test time: ``vidshift eval --ensemble``
  (``pipelines/evaluate.py``).
- §5.3 Table 2, TRN-ATTN: :class:`TRNAttention`.

Evaluation is deterministic by default: the random local draws of level I are replaced by their expectation, the
mean of R^II_m over every candidate window of m segments (``eval_local=expectation``), which is what the training
draw averages to at level II (and so at level III, a sum); ``eval_local=random`` re-draws as the code does. Every
choice and deviation from the paper and ``thuml/VideoDG`` is in README.md ("APN").
"""
from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from heads.architecture import Architecture, Encoding, register_architecture
from heads.base import (OPTIMIZER_HPARAMS, TRAINER_HPARAMS, HeadError, HParam, Inputs, LabelledBatch, UnlabelledBatch,
                        cat_inputs)
from heads.common import init_normal_, ordered_tuples
from heads.ada import ascend, take
from heads.fusion import LateFusion
from heads.method import Method, Preset, register_method, register_preset
from heads.trn import MultiScaleRelation, TemRelation

CODE_MASK_SCORE = -2.0 ** 32 + 1      # the official code's score for a masked key
CODE_NORM_EPS = 1e-8                  # the official code's layer norm: gamma (x - mu) / (std + 1e-8) + beta

# The attention blocks' hyper-parameters, shared by ``apn`` and ``trn-attn``. Defaults: the Transformer block APN
# §4.1 cites [30] (Vaswani et al. 2017); the ``official`` preset switches each to the code's.
ATTENTION_HPARAMS: dict[str, HParam] = {
    "attention_heads": HParam(4, "heads of every multi-head attention layer (the width must divide by it)",
                              "APN code, opts/hyper.py (num_heads = 4)", interval="[1, inf)"),
    "attention_ffn_ratio": HParam(4, "width of each feed-forward layer's hidden layer, in multiples of its input",
                                  "APN code, Attmodules.py (4 * hidden_units); Vaswani et al. (d_ff = 4 d_model)",
                                  interval="[1, inf)"),
    "attention_projection": HParam("linear", "linear: Q, K, V and output projections (Vaswani et al.); relu: "
                                   "Linear + ReLU on Q, K, V and no output projection (APN code)",
                                   "APN §4.1 cites Vaswani et al.; code Attmodules.multihead_attention",
                                   choices=("linear", "relu")),
    "attention_dropout": HParam(0.1, "dropout on the attention weights and on each block's output",
                                "Vaswani et al. §5.4 (P_drop = 0.1; APN names no rate); code: 0.3 (dropout_rate)",
                                interval="[0, 1)"),
    "attention_masking": HParam(False, "the code's masking: a key whose input features sum to exactly 0 scores "
                                "-2^32+1, a query that does gets no attention output", "APN code, Attmodules.py"),
    "attention_causal": HParam(False, "a causal (lower-triangular) mask in each block's decoder self-attention",
                               "APN code, AttModel (causality=True); the paper names none"),
    "attention_norm": HParam("standard", "standard: LayerNorm (Ba et al.); official: gamma (x - mu) / (unbiased "
                             "std + 1e-8) + beta (APN code)", "APN §4.1; code Attmodules.layer_normalization",
                             choices=("standard", "official")),
    "attention_shared": HParam(False, "one attention block for every call (global, local, cross; APN code) instead "
                               "of one per role and scale", "APN §4.2 ('stacking the attention blocks'); code: one "
                               "AttModel"),
}

# APN §5.1's training, with the code's values where the paper is silent (the trainer's shared hyper-parameters).
_SHARED = {**TRAINER_HPARAMS, **OPTIMIZER_HPARAMS}
APN_RECIPE: dict[str, HParam] = {
    name: replace(_SHARED[name], default=default, source=source) for name, default, source in (
        ("epochs", 150, "APN §5.1 (150 epochs)"),
        ("batch_size", 40, "APN §5.1 (40 clips); code train.sh (--batch-size 40)"),
        ("lr", 1e-3, "APN §5.1; code train.sh (--lr 0.001)"),
        ("lr_schedule", "step", "APN §5.1 (x0.1 every 30 epochs)"),
        ("lr_steps", (0.2, 0.4, 0.6, 0.8), "APN §5.1 (epochs 30, 60, 90, 120 of 150)"),
        ("lr_decay", 0.1, "APN §5.1"),
        ("momentum", 0.9, "APN code, main_val.py (SGD momentum 0.9; the paper: SGD)"),
        ("weight_decay", 5e-4, "APN code, main_val.py (5e-4; the paper names none)"),
        ("clip_grad", 20.0, "APN code, train.sh (--gd 20)"))}


# ----------------------------------------------------------------------------------------------------------
# the attention block (§4.1)


class CodeLayerNorm(nn.Module):
    """The official code's layer norm: gamma (x - mean) / (unbiased std + 1e-8) + beta over the last axis."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))
        self.beta = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.gamma * (x - x.mean(-1, keepdim=True)) / (x.std(-1, keepdim=True) + CODE_NORM_EPS) + self.beta


def layer_norm(kind: str, dim: int) -> nn.Module:
    return nn.LayerNorm(dim) if kind == "standard" else CodeLayerNorm(dim)


def attention_weights(q: Tensor, k: Tensor, heads: int, causal: bool = False,
                      key_valid: Tensor | None = None) -> Tensor:
    """softmax(Q_h K_h^T / sqrt(d_h)) per head: q [B, Lq, D], k [B, Lk, D] -> [B, heads, Lq, Lk].

    Heads are chunks of d_h = D / heads channels (the code's ``torch.chunk``). ``causal`` lets query i attend keys
    j <= i; ``key_valid`` [B, Lk] (bool) gives invalid keys the code's score -2^32+1.
    """
    b, lq, dim = q.shape
    d_head = dim // heads
    q_h = q.view(b, lq, heads, d_head).transpose(1, 2)                     # [B, H, Lq, d]
    k_h = k.view(b, k.shape[1], heads, d_head).transpose(1, 2)             # [B, H, Lk, d]
    scores = q_h @ k_h.transpose(-1, -2) / math.sqrt(d_head)
    if key_valid is not None:
        scores = scores.masked_fill(~key_valid[:, None, None, :], CODE_MASK_SCORE)
    if causal:
        future = torch.ones(lq, k.shape[1], dtype=torch.bool, device=q.device).triu(diagonal=1)
        scores = scores.masked_fill(future, CODE_MASK_SCORE)
    return scores.softmax(dim=-1)


class MultiHeadAttention(nn.Module):
    """One attention layer: LN(queries + O(Σ_j a_ij V_j)), a = :func:`attention_weights` of the projected Q, K.

    ``projection="linear"``: Q, K, V and the output O are linear maps (Vaswani et al.); ``"relu"``: Q, K, V are
    Linear + ReLU and O is the identity (APN code). Dropout acts on the attention weights (as the code).
    """

    def __init__(self, dim: int, hparams: dict, causal: bool = False):
        super().__init__()
        heads = hparams["attention_heads"]
        if dim % heads:
            raise HeadError(f"attention over {dim}-wide features needs attention_heads to divide {dim}, got "
                            f"attention_heads={heads}")
        self.heads, self.causal, self.masking = heads, causal, hparams["attention_masking"]
        relu = hparams["attention_projection"] == "relu"

        def projection() -> nn.Module:
            return nn.Sequential(nn.Linear(dim, dim), nn.ReLU()) if relu else nn.Linear(dim, dim)

        self.q, self.k, self.v = projection(), projection(), projection()
        self.out = nn.Identity() if relu else nn.Linear(dim, dim)
        self.dropout = nn.Dropout(hparams["attention_dropout"])
        self.norm = layer_norm(hparams["attention_norm"], dim)

    def forward(self, queries: Tensor, keys: Tensor) -> Tensor:
        """queries [B, Lq, D], keys (= values) [B, Lk, D] -> [B, Lq, D]."""
        key_valid = keys.sum(-1) != 0 if self.masking else None
        weights = attention_weights(self.q(queries), self.k(keys), self.heads, self.causal, key_valid)
        if self.masking:   # the code zeroes the weights of queries whose input features sum to 0
            weights = weights * (queries.sum(-1) != 0)[:, None, :, None]
        b, lk, dim = keys.shape
        values = self.v(keys).view(b, lk, self.heads, dim // self.heads).transpose(1, 2)    # [B, H, Lk, d]
        attended = (self.dropout(weights) @ values).transpose(1, 2).reshape(queries.shape)
        return self.norm(queries + self.out(attended))


class FeedForward(nn.Module):
    """LN(x + W2 ReLU(W1 x)), hidden width ``ratio`` x D (the code's ``feedforward``, Vaswani et al.'s FFN)."""

    def __init__(self, dim: int, hparams: dict):
        super().__init__()
        hidden = hparams["attention_ffn_ratio"] * dim
        self.layers = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))
        self.norm = layer_norm(hparams["attention_norm"], dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x + self.layers(x))


class AttentionBlock(nn.Module):
    """Attention-Block(Query, Key) of §4.1, keys = values: the code's ``AttModel`` with one layer each side.

    Encoder on the keys: self-attention, feed-forward. Decoder on the queries: self-attention (causal with
    ``attention_causal``), attention to the encoder's output, feed-forward, dropout. Three attention layers and
    two feed-forward layers, each with its residual and layer norm; the output has the queries' length.
    """

    def __init__(self, dim: int, hparams: dict):
        super().__init__()
        self.encoder_attention = MultiHeadAttention(dim, hparams)
        self.encoder_ffn = FeedForward(dim, hparams)
        self.decoder_attention = MultiHeadAttention(dim, hparams, causal=hparams["attention_causal"])
        self.cross_attention = MultiHeadAttention(dim, hparams)
        self.decoder_ffn = FeedForward(dim, hparams)
        self.dropout = nn.Dropout(hparams["attention_dropout"])

    def forward(self, query: Tensor, key: Tensor) -> Tensor:
        """query [B, Lq, D], key [B, Lk, D] -> [B, Lq, D]."""
        memory = self.encoder_ffn(self.encoder_attention(key, key))
        decoded = self.decoder_attention(query, query)
        return self.dropout(self.decoder_ffn(self.cross_attention(decoded, memory)))


# ----------------------------------------------------------------------------------------------------------
# the relational feature pyramid (§4.2)


def consecutive_windows(num_segments: int, size: int) -> list[tuple[int, ...]]:
    """Every run of ``size`` consecutive segments out of ``num_segments``: (0..size-1), (1..size), ..."""
    return [tuple(range(start, start + size)) for start in range(num_segments - size + 1)]


class RelationalPyramid(nn.Module):
    """Levels I and II over frame features F_M [B, M, D]; rows [R^I_Global, R^II_2, ..., R^II_{M-1}], each [M, D].

    One window of m segments per scale is drawn for the whole batch at every training forward pass (the code draws
    one per call, as TRN); in evaluation ``eval_local=expectation`` uses every window and averages R^II_m over
    them. ``attention_shared`` uses one block for all calls (code); otherwise a global block and, per scale m, a
    local and a cross block (the windows of one scale share theirs).
    """

    def __init__(self, num_segments: int, dim: int, hparams: dict):
        super().__init__()
        if num_segments < 3:
            raise HeadError(f"APN's pyramid has local relations over m = 2..M-1 segments, so it needs M >= 3 "
                            f"segments (§5.1: 5 for UCF-HMDB, 3 for PKU-MMD/NTU); got --segments {num_segments}")
        self.num_segments = num_segments
        self.scales = list(range(2, num_segments))
        make_windows = consecutive_windows if hparams["local_windows"] == "consecutive" else ordered_tuples
        self.windows = {m: make_windows(num_segments, m) for m in self.scales}
        self.eval_random = hparams["eval_local"] == "random"
        self.held: dict[int, list[tuple[int, ...]]] | None = None      # set by :func:`hold_local_draws`
        if hparams["attention_shared"]:       # one registered block; the lists only point at it
            self.global_block = AttentionBlock(dim, hparams)
            self.local_blocks = self.cross_blocks = [self.global_block] * len(self.scales)
        else:
            self.global_block = AttentionBlock(dim, hparams)
            self.local_blocks = nn.ModuleList(AttentionBlock(dim, hparams) for _ in self.scales)
            self.cross_blocks = nn.ModuleList(AttentionBlock(dim, hparams) for _ in self.scales)

    def draw(self, size: int) -> list[tuple[int, ...]]:
        """One window of ``size`` segments drawn uniformly (torch's generator, so a seeded run repeats it)."""
        candidates = self.windows[size]
        return [candidates[torch.randint(len(candidates), ()).item()]]

    def windows_for(self, size: int) -> list[tuple[int, ...]]:
        """The windows of ``size`` segments this pass uses: held ones, one drawn, or all (evaluation's expectation)."""
        if self.held is not None:
            return self.held[size]
        return self.draw(size) if self.training or self.eval_random else self.windows[size]

    def forward(self, frames: Tensor) -> Tensor:
        """F_M [B, M, D] -> [B, M-1, M, D]: R^I_Global (level I), then R^II_m for m = 2..M-1 (eq. 6)."""
        if frames.shape[1] != self.num_segments:
            raise HeadError(f"APN was built for {self.num_segments} segments per video, got {frames.shape[1]}")
        b, m_total, dim = frames.shape
        global_relation = self.global_block(frames, frames)                                 # R^I_Global
        rows = [global_relation]
        for size, local_block, cross_block in zip(self.scales, self.local_blocks, self.cross_blocks):
            index = torch.tensor(self.windows_for(size), device=frames.device)               # [W, m]
            windows = frames[:, index].reshape(-1, size, dim)                               # F_m: [B*W, m, D]
            local = local_block(windows, windows)                                           # R^I_m
            queries = global_relation.repeat_interleave(len(index), dim=0)                  # [B*W, M, D]
            cross = cross_block(queries, local).view(b, len(index), m_total, dim)           # R^II_m, eq. 6
            rows.append(cross.mean(dim=1))                                                  # E over windows
        return torch.stack(rows, dim=1)


@contextmanager
def hold_local_draws(module: nn.Module) -> Iterator[None]:
    """Within it, every pyramid in ``module`` uses one window per scale, drawn on entry (as a training pass draws),
    whatever its mode: video ADA's ascent sees one sub-network throughout, so c(R, R_0) vanishes at X' = X."""
    pyramids = [m for m in module.modules() if isinstance(m, RelationalPyramid)]
    for pyramid in pyramids:
        pyramid.held = {size: pyramid.draw(size) for size in pyramid.scales}
    try:
        yield
    finally:
        for pyramid in pyramids:
            pyramid.held = None


def pyramid_levels(arch: Architecture, parts: Tensor) -> dict[str, Tensor]:
    """The pyramid's levels from ``Encoding.parts`` of an architecture that provides "pyramid" (also under late
    fusion): R^I_Global, R^II = Σ_m R^II_m (eq. 7) and R^III = R^II + R^I_Global (level III), each as the
    architecture's aggregate (the sum of the rows, flattened) of the rows it sums."""
    return {"global": arch.aggregate(parts[:, :1]), "level2": arch.aggregate(parts[:, 1:]),
            "level3": arch.aggregate(parts)}


@register_architecture
class APN(Architecture):
    """APN's frame encoder and relational feature pyramid (§4.1-4.2); z = flatten(R^III) [B, M·D], h linear."""

    name = "apn"
    summary = "APN's relational feature pyramid: attention over global, local and cross relations (Yao et al.)"
    input = "pooled"
    RECIPE = APN_RECIPE
    HPARAMS = {
        "frame_dim": HParam(256, "D: width of the frame features f_i and of every attention block",
                            "APN §4.1 (D = 256); code img_feature_dim", interval="[1, inf)"),
        "dropout_frame": HParam(0.8, "dropout on the cached feature before the frame encoder's Linear",
                                "APN §4.1 (0.8); code --dropout 0.8 (replaces ResNet's fc)", interval="[0, 1)"),
        "init_std": HParam(0.001, "the frame encoder's Linear starts as N(0, init_std) with zero bias; 0 keeps "
                           "PyTorch's default init", "APN code, models_adv.py (std = 0.001)", interval="[0, inf)"),
        "local_windows": HParam("consecutive", "consecutive: R^I_m over m consecutive segments (the paper); "
                                "combinations: any m time-ordered segments (the code's itertools.combinations)",
                                "APN §4.2; code Pyramidmodule.py", choices=("consecutive", "combinations")),
        "eval_local": HParam("expectation", "expectation: evaluate with R^II_m averaged over every window "
                             "(deterministic); random: one window drawn per pass, as in training (the code)",
                             "ours (deterministic evaluation); code: np.random.choice at test time",
                             choices=("expectation", "random")),
        "classifier_relu": HParam(False, "a ReLU in front of h (the code's final = ReLU, Linear); the paper: h is "
                                  "one fully-connected layer", "APN §4.3; code Pyramidmodule.py (final)"),
        **ATTENTION_HPARAMS,
    }

    def __init__(self, feat_shape: tuple[int, ...], num_classes: int, num_segments: int, hparams: dict):
        super().__init__(feat_shape, num_classes, num_segments, hparams)
        h = self.hparams
        (feat_dim,) = self.feat_shape
        self.frame_dim = h["frame_dim"]
        self.video_dim = self.relation_dim = num_segments * self.frame_dim
        self.num_scales = num_segments - 1                            # R^I_Global and the M-2 cross relations
        self.frame_encoder = nn.Sequential(nn.Dropout(h["dropout_frame"]), nn.Linear(feat_dim, self.frame_dim))
        self.pyramid = RelationalPyramid(num_segments, self.frame_dim, h)
        self.classifier = self.init_classifier(self.make_classifier())
        if h["init_std"] > 0:
            init_normal_(self.frame_encoder, h["init_std"])

    @classmethod
    def provides(cls, hparams: dict) -> frozenset[str]:
        return super().provides(hparams) | {"relations", "pyramid"}

    def make_classifier(self) -> nn.Sequential:
        front = nn.ReLU() if self.hparams["classifier_relu"] else nn.Identity()
        return nn.Sequential(front, nn.Linear(self.video_dim, self.num_classes))

    def new_classifier(self) -> nn.Module:
        return self.make_classifier()       # keeps the code's ReLU, which the base class would drop

    def encode(self, x: Tensor, split: int | None = None) -> Encoding:   # nothing couples the videos
        frames = self.frame_encoder(x)                                                    # F_M [B, M, D]
        return Encoding(frames=frames, relations=self.pyramid(frames).flatten(start_dim=2))  # [B, M-1, M·D]

    def aggregate(self, parts: Tensor) -> Tensor:
        """The sum of the pyramid's rows: R^III = R^I_Global + Σ_m R^II_m (eq. 7 and level III), flattened."""
        return parts.sum(dim=1)


# ----------------------------------------------------------------------------------------------------------
# TRN-ATTN (§5.3, Table 2)


class AttentiveRelation(MultiScaleRelation):
    """TRN-M whose per-scale tuple features g (TRN's g_theta outputs) pass through a within-relation attention
    block Att(G_n, G_n) before their sum: [B, N, D] -> [B, N-1, R]. The blocks are registered by the owner."""

    def __init__(self, num_segments: int, frame_dim: int, relation_dim: int, num_tuples: int,
                 blocks: list[AttentionBlock]):
        super().__init__(num_segments, frame_dim, relation_dim, num_tuples, "even")
        self.blocks = blocks            # a plain list, one block per scale (the same one when shared)

    def forward(self, x: Tensor) -> Tensor:
        return torch.stack([block(features, features).sum(dim=1)
                            for (features, _), block in zip(self.tuple_features(x), self.blocks)], dim=1)


@register_architecture
class TRNAttention(TemRelation):
    """TRN-ATTN of APN Table 2: TemRelation with the within-relation attention block on the g_theta features (the
    tuples of each scale) and on the h_phi features (the scales' relation features), before each sum."""

    name = "trn-attn"
    summary = "APN Table 2's TRN-ATTN: TemRelation with attention blocks over each scale's tuples and over scales"
    RECIPE = APN_RECIPE
    HPARAMS = {
        **TemRelation.HPARAMS,
        "tuples": replace(TemRelation.HPARAMS["tuples"], choices=("even",),
                          help="even: evenly spaced fixed tuples (TA3N code); attention over a random draw has no "
                               "cheap expectation, so random is not offered"),
        **ATTENTION_HPARAMS,
    }

    def temporal_module(self) -> tuple[nn.Module, int]:
        h = self.hparams
        self.relation_dim, self.num_scales = h["relation_dim"], self.num_segments - 1
        # one block per scale and one over the scales (the last), or one for all
        self.attention_blocks = nn.ModuleList(
            AttentionBlock(h["relation_dim"], h) for _ in range(1 if h["attention_shared"] else self.num_scales + 1))
        per_scale = list(self.attention_blocks)[:-1] or [self.attention_blocks[0]] * self.num_scales
        relations = AttentiveRelation(self.num_segments, h["frame_dim"], h["relation_dim"], h["num_tuples"],
                                      per_scale)
        return relations, h["relation_dim"]

    def aggregate(self, parts: Tensor) -> Tensor:
        scale_block = self.attention_blocks[-1]
        return scale_block(parts, parts).sum(dim=1)


# ----------------------------------------------------------------------------------------------------------
# video ADA (§4.3, eq. 8-9, Algorithm 1)


def transport_cost(features: Tensor, anchors: Tensor) -> Tensor:
    """c(R, R_0): the mean squared difference per video over the feature's elements (§4.3), [B, ...] -> [B]."""
    return (features - anchors).pow(2).flatten(start_dim=1).mean(dim=1)


def relative_shift(moved: Inputs, start: Inputs) -> Tensor:
    """‖x' - x‖ / ‖x‖ per video over all steps and streams [B]: how far an ascent took the cached features."""
    def per_video(x: Inputs) -> Tensor:
        tensors = list(x.values()) if isinstance(x, dict) else [x]
        return torch.cat([t.flatten(start_dim=1) for t in tensors], dim=1)

    start_rows = per_video(start)
    return (per_video(moved) - start_rows).norm(dim=1) / start_rows.norm(dim=1).clamp_min(1e-12)


def provided_parts(arch: Architecture) -> frozenset[str]:
    """The parts ``arch`` provides; under late fusion, those every stream's architecture provides."""
    archs = arch.streams.values() if isinstance(arch, LateFusion) else [arch]
    return frozenset.intersection(*(type(a).provides(a.hparams) for a in archs))


@register_method
class VideoADA(Method):
    """APN's video ADA (§4.3, Algorithm 1), on-line for every mini-batch.

    Line 5: a step on ℓ(h(R^III_0), Y) of the source batch (plus the architecture's own losses). Lines 6-12: one
    adversarial copy of the batch per level L in ``video_ada_levels`` (level II: eq. 8, level III: eq. 9), T_max
    steps of X^L <- X^L + η ∇_X [ℓ(h(R^L), Y) - γ c(R^L, R^L_0)] (eq. 5) from X^L = X. Lines 13-14: one step on
    ℓ(h(R^L(X^L)), Y) per copy. ``video_ada_update=joint`` is the code's: one step on the level-III CE of
    [X, X^II, X^III] after the ascent (main_val.py L93-103).

    X is the cached feature (the input of the frame encoder), as the paper perturbs the encoder's input (pixels):
    every trainable layer then sees the copies, and the method runs unchanged on every architecture. Without a
    pyramid (``tempooling``, ``trn``, ``trn-attn``, STDN) every level is the video representation z (Volpi's last
    hidden layer; APN Table 2's "ADA", here on-line), so the copies would repeat each other: one copy is made.
    Each video's objective is its own (summed over the batch), so the copies ascend together in one batch. In
    ``fixed`` mode (default) the ascent runs without dropout and with one draw of APN's local windows held for all
    its passes (:func:`hold_local_draws`; other architectures run as in evaluation), so the ascent sees one
    sub-network, c vanishes at X' = X and the anchors R_0 are computed once, at the θ of the ascent (after line 5's
    step; Algorithm 1 takes them from line 4's pass, with dropout, where c would not vanish at X' = X). ``train``
    mode is the code's: dropout and local draws at every pass, the anchors re-computed at every step.
    """

    name = "video-ada"
    summary = "APN's video ADA: on-line adversarial copies at pyramid levels II and III (or z without a pyramid)"
    uses = frozenset({"pyramid"})
    HPARAMS = {
        "video_ada_levels": HParam(("level2", "level3"), "pyramid levels with an adversarial copy each: level2 "
                                   "(eq. 8), level3 (eq. 9), global (R^I_Global: §5.3's baseline); architectures "
                                   "without a pyramid use z for all, one copy", "APN §4.3, Algorithm 1",
                                   choices=("global", "level2", "level3")),
        "video_ada_steps": HParam(5, "T_max: ascent steps per copy and mini-batch",
                                  "APN §5.1 (T_max = 5); code main_val.py (range(5))", interval="[1, inf)"),
        "video_ada_step": HParam(1.0, "η: step of the ascent on the cached features (APN's η = 1 is on pixels); "
                                 "re-calibrated on features: the copies move ~2% of the feature norm (README, APN)",
                                 "ours (benchmarks/apn.py --calibrate); APN §5.1 (η = 1 on pixels)",
                                 interval="(0, inf)"),
        "video_ada_gamma": HParam(0.01, "γ: weight of the transport cost c (the MSE) in eq. 8-9; §5.1 ensembles "
                                  "γ in {0.001, 0.01, 0.1, 1}", "APN code, train.sh (--alpha 0.01)",
                                  interval="[0, inf)"),
        "video_ada_mode": HParam("fixed", "fixed: ascend without dropout, APN's local windows drawn once per "
                                 "mini-batch and held (other architectures as in evaluation), anchors once; train: "
                                 "dropout and local draws at every pass, anchors at every step (the code)",
                                 "ours; code main_val.py L68-80", choices=("fixed", "train")),
        "video_ada_update": HParam("algorithm", "algorithm: the steps of lines 5, 13 and 14, each copy on its "
                                   "level's logits; joint: one step on the level-III CE of the source and the "
                                   "copies together (the code)", "APN Algorithm 1; code main_val.py L93-103",
                                   choices=("algorithm", "joint")),
    }

    def __init__(self, arch: Architecture, hparams: dict):
        super().__init__(arch, hparams)
        self.has_pyramid = "pyramid" in provided_parts(arch)
        self.levels = tuple(dict.fromkeys(self.hparams["video_ada_levels"])) if self.has_pyramid else ("video",)

    def level_features(self, encoding: Encoding) -> dict[str, Tensor]:
        """R^L for every level (``pyramid_levels``), or {"video": z} without a pyramid."""
        if self.has_pyramid:
            return pyramid_levels(self.arch, encoding.parts)
        return {"video": self.arch.aggregate(encoding.parts)}

    def copy_features(self, x: Inputs, levels: tuple[str, ...]) -> Tensor:
        """For ``len(levels)`` copies stacked on the batch axis, each copy's videos at its own level."""
        per_level = self.level_features(self.arch.encode(x))
        size = len(next(iter(per_level.values()))) // len(levels)
        return torch.cat([per_level[level][i * size:(i + 1) * size] for i, level in enumerate(levels)])

    def ascent_objective(self, x_adv: Inputs, anchors: Tensor, y: Tensor, levels: tuple[str, ...]) -> Tensor:
        """Σ over copies and videos of ℓ(h(R^L(X^L)), Y) - γ c(R^L(X^L), R^L_0): eq. 8 (L = II), eq. 9 (L = III)."""
        features = self.copy_features(x_adv, levels)
        loss = F.cross_entropy(self.arch.classify(features), y, reduction="sum")
        return loss - self.hparams["video_ada_gamma"] * transport_cost(features, anchors).sum()

    def adversarial_copies(self, src: LabelledBatch) -> tuple[list[Inputs], dict[str, float]]:
        """Lines 6-12 of Algorithm 1: one copy of ``src.x`` per level after T_max ascent steps, and their logs."""
        h, levels = self.hparams, self.levels
        count = len(levels)
        start, y = cat_inputs([src.x] * count), src.y.repeat(count)

        def anchors() -> Tensor:
            with torch.no_grad():
                per_level = self.level_features(self.arch.encode(src.x))
            return torch.cat([per_level[level] for level in levels])

        was_training, fixed = self.arch.training, h["video_ada_mode"] == "fixed"
        self.arch.train(not fixed)
        with hold_local_draws(self.arch) if fixed else nullcontext():
            anchor = anchors()
            moved = start
            for step in range(h["video_ada_steps"]):
                if step and not fixed:
                    anchor = anchors()
                moved = ascend(moved, lambda x_adv: self.ascent_objective(x_adv, anchor, y, levels),
                               h["video_ada_step"])
            with torch.no_grad():
                cost = transport_cost(self.copy_features(moved, levels), anchor).view(count, -1).mean(dim=1)
        self.arch.train(was_training)
        size = len(src.y)
        copies = [take(moved, slice(i * size, (i + 1) * size)) for i in range(count)]
        shift = relative_shift(moved, start).view(count, -1).mean(dim=1)
        logs = {f"video_ada_{name}_{level}": values[i].item() for i, level in enumerate(levels)
                for name, values in (("cost", cost), ("shift", shift))}
        return copies, logs

    def objective(self, src: LabelledBatch, tgt: UnlabelledBatch | None,
                  progress: float) -> tuple[dict[str, Tensor], dict[str, float]]:
        """Line 5: the source batch's classification loss on h(R^III) (and the architecture's own terms)."""
        encoding = self.arch.encode(src.x)
        logits = self.arch.classify(self.arch.aggregate(encoding.parts))
        return self.supervised_terms(encoding, logits, src.y), {}

    def update(self, src: LabelledBatch, tgt: UnlabelledBatch | None, progress: float) -> dict[str, float]:
        if self.hparams["video_ada_update"] == "joint":
            copies, logs = self.adversarial_copies(src)
            joint = LabelledBatch(cat_inputs([src.x, *copies]), src.y.repeat(1 + len(copies)))
            terms, _ = self.objective(joint, None, progress)
            loss = sum(terms.values())
            return {"loss": loss.item(), **{name: term.item() for name, term in terms.items()}, **logs,
                    **self.step(self.optimizer, loss, progress)}
        terms, _ = self.objective(src, tgt, progress)                              # line 5
        loss = sum(terms.values())
        result = {**{name: term.item() for name, term in terms.items()}, **self.step(self.optimizer, loss, progress)}
        total = loss.item()
        copies, logs = self.adversarial_copies(src)                                # lines 6-12
        for level, x_adv in zip(self.levels, copies):                              # lines 13-14
            level_loss = F.cross_entropy(self.arch.classify(self.level_features(self.arch.encode(x_adv))[level]),
                                         src.y)
            result.update({f"loss_adv_{level}": level_loss.item(), **self.step(self.optimizer, level_loss, progress)})
            total += level_loss.item()
        return {"loss": total, **result, **logs}


# ----------------------------------------------------------------------------------------------------------
# presets

register_preset(Preset(
    "official", "thuml/VideoDG train.sh and its attention blocks: lr 0.001, wd 5e-4, batch 40, 200 epochs with x0.1 "
    "at 30/60/90/120 (MultiStepLR), ReLU projections, key masking, dropout 0.3, causal decoder self-attention, one "
    "shared attention block (train.sh runs no ADA: use it with --method erm)",
    {"epochs": 200, "lr": 1e-3, "weight_decay": 5e-4, "batch_size": 40, "lr_schedule": "step",
     "lr_steps": (0.15, 0.3, 0.45, 0.6), "lr_decay": 0.1, "attention_projection": "relu", "attention_masking": True,
     "attention_dropout": 0.3, "attention_causal": True, "attention_norm": "official", "attention_shared": True},
    architectures=("apn", "trn-attn")))
register_preset(Preset(
    "official", "Pyramidmodule.py: any m segments as local windows, re-drawn at test time, ReLU before h",
    {"local_windows": "combinations", "eval_local": "random", "classifier_relu": True}, architectures=("apn",)))
register_preset(Preset(
    "official", "main_val.py with --add_dg: ascent in train mode, anchors re-computed at every step, one joint step "
    "on the level-III CE of [x, x^II, x^III], alpha 0.01",
    {"video_ada_mode": "train", "video_ada_update": "joint", "video_ada_gamma": 0.01}, methods=("video-ada",)))
