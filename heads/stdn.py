"""STDN, the Spatial-Temporal Diversification Network (Lin et al., NeurIPS 2022), on cached maps [B, N, H, W, C],
and the ablation variants of its Table 3, as architectures. The paper trains them with eq. 8 on source labels
only (domain generalisation): that is ``--method erm``, whose L_y is L_cls; the architecture adds its own terms.

Where the equations live:
- MixStyle (§4.1, video variant): ``heads/mixstyle.py``.
- SGM (§3.3): eq. 1 ``assign_to_anchors``; eq. 2 ``group_weights`` and ``SpatialGrouping``; eq. 3-4
  ``grouping_losses``, weighted in ``STDN.aux_losses`` (``loss_grouping``).
- STRM (§3.4): eq. 5 ``SpatialRelations``; G and the frame feature ``FrameEncoder``; eq. 6 ``TemporalRelations``;
  eq. 7 ``relation_labels`` and ``STDN.aux_losses`` (``loss_relation``); H^a_m ``SqueezeExcite``; the feature
  aggregation ž = Σ_m H^a_m(z̃_m) ``STDN.aggregate``.
- Eq. 8, L = L_cls + λ_ent (L_emin + L_emax) + λ_rel L_rel: the method's ``loss_y`` plus ``STDN.aux_losses``.
- §4.2 diagnostics: Fig. 4 ``scale_nmse``; Fig. 5 ``davies_bouldin`` and ``kmeans`` (``heads/clustering.py``),
  in ``STDN.diagnostics``.

Defaults, the ``official`` preset and every deviation from the paper and the official code: docs/heads_stdn.md.
"""
from __future__ import annotations

import itertools
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from heads.architecture import Architecture, Encoding, register_architecture
from heads.base import OPTIMIZER_HPARAMS, TRAINER_HPARAMS, HeadError, HParam
from heads.clustering import davies_bouldin, kmeans
from heads.common import entropy, mlp, ordered_tuples
from heads.method import Preset, register_preset
from heads.mixstyle import VideoMixStyle

GROUP_EPS = 1e-6         # eq. 2's denominator (official code: ``ws_sum + 1e-6``)
OFFICIAL_LOG_EPS = 1e-5  # the official code's entropy: -sum p log(p + 1e-5)

# ----------------------------------------------------------------------------------------------------------
# Spatial Grouping Module (§3.3)


def assign_to_anchors(positions: Tensor, anchors: Tensor, tau: float) -> Tensor:
    """Eq. 1 as log-probabilities: positions [F, P, C], anchors [F, K, C] -> log p [F, P, K] (rows sum to 1).

    p_{i,k} = softmax_k(-||z_i - a_k|| / tau). Logs are kept because with tau = 0.5 and 2048-d features many
    probabilities underflow to 0, where entropies computed from p would have NaN gradients.
    """
    return torch.log_softmax(-torch.cdist(positions, anchors) / tau, dim=-1)


def group_weights(assign: Tensor, detach_normaliser: bool = False) -> Tensor:
    """Eq. 2's weights p_{i,k} / sum_i p_{i,k}: [F, P, K], each group's column summing to 1 over positions.

    ``detach_normaliser`` is the official code's variant (same values, the sum is treated as a constant).
    """
    normaliser = assign.sum(dim=1, keepdim=True)
    return assign / ((normaliser.detach() if detach_normaliser else normaliser) + GROUP_EPS)


def grouping_losses(log_assign: Tensor, variant: str) -> tuple[Tensor, Tensor]:
    """L_emin (eq. 3) and L_emax (eq. 4) of log-assignments [F, P, K], averaged over the F frames.

    ``paper``: entropies of the assignment rows p_i and of their mean p̄ over positions. L_emax = sum p̄ log p̄
    is minus an entropy, so minimising it spreads the positions over the groups.
    ``official``: the same formulas on the column-normalised assignment (``group_weights`` with a detached
    normaliser) and ``log(q + 1e-5)``. Its mean over positions is 1/P for every group, so L_emax's value is a
    constant, (K/P) log(1/P) (-0.318 for K=4, P=49); only its gradient acts, pushing towards equal group sizes.
    """
    if variant == "paper":
        emin = entropy(log_assign).mean()
        # log(P * p̄_k) = logsumexp_i log p_ik; ``entropy`` renormalises over k, so the log P drops out
        emax = -entropy(torch.logsumexp(log_assign, dim=1)).mean()
        return emin, emax
    weights = group_weights(log_assign.exp(), detach_normaliser=True)

    def official_entropy(q: Tensor) -> Tensor:
        return -(q * torch.log(q + OFFICIAL_LOG_EPS)).sum(dim=-1)

    return official_entropy(weights).mean(), -official_entropy(weights.mean(dim=1)).mean()


class SpatialGrouping(nn.Module):
    """SGM: frames [F, C, H, W] -> group features [F, K, C] (eq. 2) and log-assignments [F, HW, K] (eq. 1)."""

    def __init__(self, channels: int, num_groups: int, hidden: int, tau: float, variant: str):
        super().__init__()
        # "a lightweight two-layer convolutional network" (§3.3); its sizes are the official code's
        self.anchor_weights = nn.Sequential(nn.Conv2d(channels, hidden, 3, padding=1), nn.ReLU(),
                                            nn.Conv2d(hidden, num_groups, 3, padding=1))
        self.tau, self.variant = tau, variant

    def forward(self, maps: Tensor) -> tuple[Tensor, Tensor]:
        positions = maps.flatten(2).transpose(1, 2)                             # z_{n,i}: [F, HW, C]
        anchor_mix = self.anchor_weights(maps).flatten(2).softmax(dim=-1)      # [F, K, HW], over positions
        anchors = anchor_mix @ positions                                        # a_{n,k}: [F, K, C]
        log_assign = assign_to_anchors(positions, anchors, self.tau)
        weights = group_weights(log_assign.exp(), detach_normaliser=self.variant == "official")
        return weights.transpose(1, 2) @ positions, log_assign


# ----------------------------------------------------------------------------------------------------------
# Spatial-Temporal Relation Module (§3.4)


def pick_tuples(tuples: list[tuple[int, ...]], count: int, draw: bool, device: torch.device) -> Tensor:
    """``count`` of ``tuples`` drawn without replacement (``draw``), else all of them: an index tensor [k, size]."""
    if draw and count < len(tuples):
        tuples = [tuples[i] for i in torch.randperm(len(tuples))[:count].tolist()]
    return torch.tensor(tuples, device=device)


class SpatialRelations(nn.Module):
    """Eq. 5: group features [F, K, C] -> [R^s_2, ..., R^s_K] [F, (K-1)·Ds].

    R^s_l is the mean over tuples of l distinct groups (ordered, as the official ``itertools.permutations``) of
    a linear map of their concatenation. Because the map is linear, the mean of its outputs is its output on the
    mean tuple, whose slot j averages the groups that fill slot j; no concatenation is built per tuple. (A
    consequence of eq. 5: averaged over *all* l-permutations every slot holds the mean group feature, so at
    evaluation R^s_l is a linear map of that mean; only the training draws see individual groups.)
    """

    def __init__(self, channels: int, num_groups: int, dim: int, num_tuples: int):
        super().__init__()
        self.num_groups, self.num_tuples = num_groups, num_tuples
        self.scales = list(range(2, num_groups + 1))
        self.tuples = {size: list(itertools.permutations(range(num_groups), size)) for size in self.scales}
        self.projections = nn.ModuleList(nn.Linear(size * channels, dim) for size in self.scales)

    def forward(self, groups: Tensor, draw: bool) -> Tensor:
        relations = []
        for size, project in zip(self.scales, self.projections):
            tuples = pick_tuples(self.tuples[size], self.num_tuples, draw, groups.device)        # [k, l]
            slot_mix = F.one_hot(tuples, self.num_groups).to(groups.dtype).mean(dim=0)          # [l, K]
            relations.append(project((slot_mix @ groups).flatten(start_dim=1)))                # [F, Ds]
        return torch.cat(relations, dim=1)


class FrameEncoder(nn.Module):
    """The spatial part of STDN: frames [F, C, H, W] -> frame features [F, D] and log-assignments (or None).

    With ``grouping`` and ``spatial_relations`` it is ẑ_n = [R^s_2, ..., R^s_K, G(z_n)] (§3.4); with ``grouping``
    only, the K group features side by side [K·C]; with neither, the spatial average of the map [C] (TSN).
    """

    def __init__(self, map_shape: tuple[int, int, int], h: dict):
        super().__init__()
        height, width, channels = map_shape
        self.grouping = (SpatialGrouping(channels, h["num_groups"], h["anchor_hidden"], h["tau"],
                                         h["grouping_variant"]) if h["grouping"] else None)
        self.relations = self.global_conv = None
        if h["spatial_relations"]:
            self.relations = SpatialRelations(channels, h["num_groups"], h["spatial_dim"], h["spatial_tuples"])
            self.global_conv = nn.Conv2d(channels, h["spatial_dim"], kernel_size=(height, width))   # G(z_n)
            self.dim = h["num_groups"] * h["spatial_dim"]
        else:
            self.dim = channels * (h["num_groups"] if h["grouping"] else 1)

    def forward(self, maps: Tensor, draw: bool) -> tuple[Tensor, Tensor | None]:
        if self.grouping is None:
            return maps.mean(dim=(2, 3)), None
        groups, log_assign = self.grouping(maps)
        if self.relations is None:
            return groups.flatten(start_dim=1), log_assign
        spatial = self.relations(groups, draw)
        return torch.cat([spatial, self.global_conv(maps).flatten(start_dim=1)], dim=1), log_assign


class TemporalRelations(nn.Module):
    """Eq. 6: frame features [B, N, D] (one tensor per scale) -> [R^t_2, ..., R^t_N] stacked, [B, N-1, Dt].

    H^t_m is the official ReLU -> Dropout -> Linear -> ReLU over the concatenation of a time-ordered tuple of m
    frames. ``reduction`` says how a scale reduces its tuples' outputs:

    - ``mean``: R^t_m is their mean, eq. 6's expectation.
    - ``official``: ``ops/STDNmodule.py``'s sum. The code sums the ``num_tuples`` tuples it draws at each scale
      and multiplies the one N-frame tuple by ``num_tuples`` (its L179). Here a scale's weight is the number of
      tuples the code sums (``num_tuples`` at scale N, else min(num_tuples, its tuples)) times their mean,
      which is that sum when the tuples are drawn and its expectation when every tuple is used (evaluation
      with ``eval_tuples=all``). Downstream this is not a factor of ``num_tuples``: the SE gate and the
      biases of the relation and class classifiers see the summed feature.
    """

    def __init__(self, num_segments: int, frame_dim: int, dim: int, num_tuples: int, dropout: float,
                 reduction: str = "mean"):
        super().__init__()
        self.num_tuples = num_tuples
        self.scales = list(range(2, num_segments + 1))
        self.tuples = {size: ordered_tuples(num_segments, size) for size in self.scales}
        self.blocks = nn.ModuleList(nn.Sequential(nn.ReLU(), nn.Dropout(dropout), nn.Linear(size * frame_dim, dim),
                                                  nn.ReLU()) for size in self.scales)
        self.tuple_weights = [1.0 if reduction == "mean"
                        else float(num_tuples if size == num_segments else min(num_tuples, len(self.tuples[size])))
                        for size in self.scales]

    def forward(self, frames_per_scale: list[Tensor], draw: bool) -> Tensor:
        relations = []
        for size, block, weight, frames in zip(self.scales, self.blocks, self.tuple_weights, frames_per_scale):
            tuples = pick_tuples(self.tuples[size], self.num_tuples, draw, frames.device)         # [k, m]
            # x * 1.0 is exactly x, so ``mean`` stays bit-for-bit the plain mean
            relations.append(weight * block(frames[:, tuples].flatten(start_dim=2)).mean(dim=1))  # [B, Dt]
        return torch.stack(relations, dim=1)


class ScaleSummedLinear(nn.Linear):
    """The official code's Σ_m F(H^a_m(z̃_m)) for a linear F, from the summed input: W Σ_m x_m + S·b."""

    def __init__(self, in_features: int, out_features: int, scales: int):
        super().__init__(in_features, out_features)
        self.scales = scales

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) + (self.scales - 1) * self.bias


class SqueezeExcite(nn.Module):
    """H^a_m of §3.4 (official ``Adapter``): g * sigmoid(W2 ReLU(W1 g)), without biases."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(dim, hidden, bias=False), nn.ReLU(), nn.Linear(hidden, dim, bias=False),
                                  nn.Sigmoid())

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gate(x)


def relation_labels(y: Tensor, num_segments: int) -> Tensor:
    """Eq. 7's relation labels ỹ_m = y·(N-1) + (m-2) for m = 2..N: class ids [B] -> [B, N-1]."""
    scales = num_segments - 1
    return y[:, None] * scales + torch.arange(scales, device=y.device)


# ----------------------------------------------------------------------------------------------------------
# diagnostics (§4.2)


def scale_nmse(relations: Tensor) -> Tensor:
    """Fig. 4's diversity across time scales: relation features [B, S, D] -> [B].

    The paper names a "normalized MSE" without a formula; here it is the squared distance between
    L2-normalised features, 2 - 2 cos (0: same direction; 2: orthogonal), averaged over all pairs of scales.
    An all-zero feature (a scale whose ReLU units all died) stays zero, at distance 1 from any other scale.
    """
    unit = F.normalize(relations, dim=-1)
    squared = (unit[:, :, None] - unit[:, None]).pow(2).sum(dim=-1)                   # [B, S, S], 0 on the diagonal
    num_scales = relations.shape[1]
    return squared.sum(dim=(1, 2)) / (num_scales * (num_scales - 1))


# ----------------------------------------------------------------------------------------------------------
# the architectures

# The components that Table 3 adds one at a time. "+SGM" keeps the TSN classifier on the K group features side
# by side; "+TRM" adds temporal relations with L_rel on them (Fig. 4's "SGM+TRM": 56.7 - 54.9 = the 1.8 points
# the text credits to TRM over +SGM); "+STRM" adds spatial relations and G; "+MixStyle" MixStyle; the full STDN
# the SE aggregation (before it, the scales are summed as they are).
COMPONENTS = {
    "mixstyle": "MixStyle on the cached maps (§4.1; Table 3 '+MixStyle')",
    "grouping": "Spatial Grouping Module (§3.3; Table 3 '+SGM'); off: spatial average pooling of the map",
    "spatial_relations": "spatial relations over the groups and the global conv G (eq. 5; Table 3 '+STRM'); "
                         "needs grouping",
    "temporal_relations": "temporal relations and L_rel (eq. 6-7; Table 3 '+TRM'); off: TSN's mean over segments",
    "se_aggregation": "SE modulation of each scale before the sum (§3.4 'Feature Aggregation'; Table 3 "
                      "'Full STDN'); needs temporal_relations; off: plain sum of the scales",
}

_SHARED = {**TRAINER_HPARAMS, **OPTIMIZER_HPARAMS}


def _recipe(name: str, default: object, source: str) -> HParam:
    """A shared trainer/optimiser hyper-parameter with STDN's default and its source (meaning and range kept)."""
    return replace(_SHARED[name], default=default, source=source)


@register_architecture
class STDN(Architecture):
    """Full STDN (§3, eq. 1-8): MixStyle, SGM, spatial and temporal relations, L_rel, SE aggregation.

    ``encode`` gives the per-segment frame features ẑ_n and the temporal relations z̃_m; ``aggregate`` is ž;
    ``aux_losses`` are λ_ent (L_emin + L_emax) and λ_rel L_rel, so a method's L_y completes eq. 8. The
    components of Table 3 are boolean hyper-parameters (``COMPONENTS``); the registered variants below only
    change their defaults, and a component's own hyper-parameters act only while it is on. ``diagnostics``
    gives §4.2's measures.
    """

    name = "stdn"
    summary = "STDN (NeurIPS'22): spatial grouping + spatial-temporal relations + MixStyle on cached maps"
    input = "maps"
    RECIPE = {
        "epochs": _recipe("epochs", 25, "STDN code, scripts/train_hmdbucf.sh (--epochs 25)"),
        "batch_size": _recipe("batch_size", 32, "STDN §4.1"),
        "lr": _recipe("lr", 1e-3, "STDN §4.1"),
        "lr_schedule": _recipe("lr_schedule", "step", "STDN code, scripts/train_hmdbucf.sh (--lr_steps 10 20 of 25 "
                               "epochs)"),
        "lr_steps": _recipe("lr_steps", (0.4, 0.8), "STDN code, scripts/train_hmdbucf.sh (epochs 10 and 20 of 25)"),
        "lr_decay": _recipe("lr_decay", 0.1, "STDN code, main.py (lr x0.1 at each step)"),
        "momentum": _recipe("momentum", 0.9, "STDN §4.1"),
        "nesterov": _recipe("nesterov", False, "STDN §4.1 (momentum SGD); code main.py (plain SGD)"),
        "weight_decay": _recipe("weight_decay", 5e-4, "STDN §4.1"),
        "clip_grad": _recipe("clip_grad", 20.0, "STDN code, scripts/train_hmdbucf.sh (--gd 20)"),
    }
    HPARAMS = {
        **{name: HParam(True, meaning, "STDN Table 3") for name, meaning in COMPONENTS.items()},
        "mixstyle_p": HParam(0.5, "probability that a training batch is mixed", "STDN §4.1 (code --mix-prob 0.5)",
                             interval="[0, 1]"),
        "mixstyle_alpha": HParam(0.1, "Beta(alpha, alpha) of the mixing weight", "STDN §4.1 (code --mix-alpha 0.1)",
                                 interval="(0, inf)"),
        "mixstyle_pairing": HParam("random", "random: a random permutation of the batch (MixStyle's default); "
                                   "crosshalf: each half mixes with the other (official code)",
                                   "MixStyle (Zhou et al. 2021), cited in STDN §4.1", choices=("random", "crosshalf")),
        # K >= 2: spatial relations start at pairs of groups, and Fig. 5's K-means needs two clusters
        "num_groups": HParam(4, "K, spatial groups per frame", "STDN §4.1", interval="[2, inf)"),
        "tau": HParam(0.5, "temperature of the assignment softmax (eq. 1)", "STDN §4.1", interval="(0, inf)"),
        "anchor_hidden": HParam(256, "channels of the anchor network's first conv", "STDN code (img_feature_dim 256)",
                                interval="[1, inf)"),
        "grouping_variant": HParam("paper", "paper: entropies of the row-stochastic assignment (eq. 3-4); "
                                   "official: of the column-normalised one, detached normaliser",
                                   "STDN §3.3; code ops/STDNmodule.py", choices=("paper", "official")),
        "spatial_dim": HParam(192, "Ds, width of each spatial relation and of G", "STDN §4.1", interval="[1, inf)"),
        "spatial_tuples": HParam(12, "group tuples drawn per spatial scale in training",
                                 "STDN code, SpatialRelationModuleMultiScale (subsample_num = 12)",
                                 interval="[1, inf)"),
        "temporal_dim": HParam(256, "Dt, width of each temporal relation", "STDN §4.1", interval="[1, inf)"),
        "temporal_tuples": HParam(3, "frame tuples drawn per temporal scale in training",
                                  "STDN code, RelationModuleMultiScale (subsample_num = 3)", interval="[1, inf)"),
        "tuple_reduction": HParam("mean", "mean: each temporal scale averages its tuples (eq. 6's expectation) and "
                                  "one classifier reads the sum of the scales; official: as ops/STDNmodule.py, each "
                                  "scale sums its drawn tuples (the one N-frame tuple x temporal_tuples) and the "
                                  "per-scale logits of the shared classifier are summed (its bias counts N-1 times)",
                                  "STDN eq. 6 (mean); code ops/STDNmodule.py L179, main.py L367 (official)",
                                  choices=("mean", "official")),
        "eval_tuples": HParam("all", "all: evaluation averages over every tuple (repeatable); random: draws as "
                              "in training (official code; evaluation is then not repeatable)",
                              "STDN code re-draws at evaluation", choices=("all", "random")),
        "dropout": HParam(0.3, "dropout inside each temporal relation block; without temporal relations, before "
                          "the classifier", "STDN code, scripts/train_hmdbucf.sh (--dropout 0.3)", interval="[0, 1)"),
        "se_hidden": HParam(64, "bottleneck width of each SE block", "STDN code (aggregator_dim 64)",
                            interval="[1, inf)"),
        "relation_hidden": HParam(128, "hidden width of the MLP relation classifier F_rel",
                                  "STDN code, main.py (relation_classifier_feat_dim 128)", interval="[1, inf)"),
        "spatial_modules": HParam("shared", "shared: one SGM, spatial relation module and G for all temporal "
                                  "scales; per_scale: one copy per scale (official code, ~4x the parameters)",
                                  "STDN code, RelationModuleMultiScale", choices=("shared", "per_scale")),
        "lambda_ent": HParam(0.1, "weight of L_emin and of L_emax (eq. 8)", "STDN §4.1", interval="[0, inf)"),
        "lambda_rel": HParam(0.5, "weight of L_rel (eq. 8)", "STDN §4.1", interval="[0, inf)"),
    }

    def __init__(self, feat_shape: tuple[int, ...], num_classes: int, num_segments: int, hparams: dict):
        super().__init__(feat_shape, num_classes, num_segments, hparams)
        h = self.hparams
        self._check_components()
        # The modules are created in this order so that a seed gives the weights of the former Head class.
        self.mixstyle = (VideoMixStyle(h["mixstyle_p"], h["mixstyle_alpha"], h["mixstyle_pairing"])
                         if h["mixstyle"] else None)
        temporal = h["temporal_relations"]
        copies = num_segments - 1 if temporal and h["spatial_modules"] == "per_scale" else 1
        self.frame_encoders = nn.ModuleList(FrameEncoder(self.feat_shape, h) for _ in range(copies))
        self.frame_dim = self.frame_encoders[0].dim
        self.temporal = self.modulators = self.relation_classifier = None
        if temporal:
            self.temporal = TemporalRelations(num_segments, self.frame_dim, h["temporal_dim"], h["temporal_tuples"],
                                              h["dropout"], h["tuple_reduction"])
            if h["se_aggregation"]:
                self.modulators = nn.ModuleList(SqueezeExcite(h["temporal_dim"], h["se_hidden"])
                                                for _ in self.temporal.scales)
            self.relation_classifier = mlp(h["temporal_dim"], h["relation_hidden"], (num_segments - 1) * num_classes)
            self.relation_dim, self.num_scales, self.video_dim = h["temporal_dim"], num_segments - 1, h["temporal_dim"]
            dropout: nn.Module = nn.Identity()           # the code's classifier reads the relations as they are
        else:
            self.video_dim = self.frame_dim
            dropout = nn.Dropout(h["dropout"])
        # The official code applies this classifier (F) to each scale and sums the logits: by linearity, F of the
        # sum with F's bias once per scale (``ScaleSummedLinear``).
        per_scale = self.temporal is not None and h["tuple_reduction"] == "official"
        linear = ScaleSummedLinear(self.video_dim, num_classes, self.num_scales) if per_scale else nn.Linear(
            self.video_dim, num_classes)
        self.classifier = nn.Sequential(dropout, linear)

    def _check_components(self) -> None:
        h = self.hparams
        if h["spatial_relations"] and not h["grouping"]:
            raise HeadError(f"architecture '{self.name}': spatial_relations=true needs grouping=true (relations are "
                            f"between the SGM's groups)")
        if h["se_aggregation"] and not h["temporal_relations"]:
            raise HeadError(f"architecture '{self.name}': se_aggregation=true needs temporal_relations=true (it "
                            f"modulates each temporal scale)")
        if h["temporal_relations"] and self.num_segments < 2:
            raise HeadError(f"architecture '{self.name}': temporal relations need at least 2 segments, got "
                            f"num_segments={self.num_segments}")

    @classmethod
    def provides(cls, hparams: dict) -> frozenset[str]:
        trainable = hparams["grouping"] or hparams["temporal_relations"]   # tsn-maps: a linear classifier only
        return frozenset({"relations"} if hparams["temporal_relations"] else set()) | (
            {"encoder"} if trainable else set())

    def encode(self, x: Tensor, split: int | None = None) -> Encoding:
        """Maps [B, N, H, W, C] (channels last, as cached) -> frames ẑ [B, N, frame_dim], relations z̃ [B, N-1, Dt].

        With per-scale module copies each temporal scale reads its own copy's frame features; ``frames`` is
        then their mean over the copies (what a method's frame-level part reads). ``extras["log_assignments"]``
        holds one [B·N, HW, K] per SGM copy (empty without grouping). MixStyle mixes within each domain of
        ``split`` (a DA method's [source; target]): across them it would be a cross-domain augmentation that only
        the methods passing both domains together would get.
        """
        if x.dim() != 5 or x.shape[1] != self.num_segments or tuple(x.shape[2:]) != self.feat_shape:
            expected = (self.num_segments, *self.feat_shape)
            raise HeadError(f"architecture '{self.name}' expects maps [B, N, H, W, C] with (N, H, W, C) = "
                            f"{expected}, got {tuple(x.shape)}")
        if self.mixstyle is not None:
            x = torch.cat([self.mixstyle(part) for part in (x.tensor_split([split]) if split else (x,)) if len(part)])
        batch, segments = x.shape[:2]
        maps = x.flatten(0, 1).permute(0, 3, 1, 2)                      # channels first for the convs
        draw = self.training or self.hparams["eval_tuples"] == "random"
        encoded = [encoder(maps, draw) for encoder in self.frame_encoders]
        per_copy = [features.view(batch, segments, -1) for features, _ in encoded]
        extras = {"log_assignments": [log_assign for _, log_assign in encoded if log_assign is not None]}
        frames = per_copy[0] if len(per_copy) == 1 else torch.stack(per_copy).mean(dim=0)
        if self.temporal is None:
            return Encoding(frames, None, extras)
        shared = len(per_copy) == 1      # one frame encoder serves every temporal scale
        relations = self.temporal(per_copy * len(self.temporal.scales) if shared else per_copy, draw)
        return Encoding(frames, relations, extras)

    def aggregate(self, parts: Tensor) -> Tensor:
        """ž = Σ_m H^a_m(z̃_m) over relations [B, N-1, Dt] (the plain sum without SE); TSN's mean over frames."""
        if self.temporal is None:
            return parts.mean(dim=1)
        if self.modulators is None:
            return parts.sum(dim=1)
        return sum(modulate(parts[:, i]) for i, modulate in enumerate(self.modulators))

    def aux_losses(self, encoding: Encoding, labels: Tensor) -> dict[str, Tensor]:
        """``loss_grouping`` = λ_ent (L_emin + L_emax) (eq. 3-4) over every encoded video, as they need no labels;
        ``loss_relation`` = λ_rel L_rel (eq. 7) over the first ``len(labels)`` videos. Each is present only while
        its component is on. Per-scale SGM copies: their losses are averaged, as the official code does."""
        h = self.hparams
        terms = {}
        log_assignments = encoding.extras["log_assignments"]
        if log_assignments:
            parts = [grouping_losses(log_assign, h["grouping_variant"]) for log_assign in log_assignments]
            emin = torch.stack([p[0] for p in parts]).mean()
            emax = torch.stack([p[1] for p in parts]).mean()
            terms["loss_grouping"] = h["lambda_ent"] * (emin + emax)
        if encoding.relations is not None:
            relation_logits = self.relation_classifier(encoding.relations[:len(labels)])       # [B, N-1, (N-1)C]
            relation = F.cross_entropy(relation_logits.flatten(0, 1),
                                       relation_labels(labels, self.num_segments).flatten())
            terms["loss_relation"] = h["lambda_rel"] * relation
        return terms

    @torch.no_grad()
    def diagnostics(self, x: Tensor) -> dict[str, float]:
        """§4.2's measures on a batch of maps (call in eval mode for repeatable values).

        ``relation_nmse`` (Fig. 4, with temporal relations): :func:`scale_nmse` of z̃, averaged over videos.
        ``kmeans_db_index`` (Fig. 5's reference, every variant): Davies-Bouldin index of each frame's HW cached
        position features clustered into K groups by :func:`kmeans`, averaged over frames; NaN when HW < K
        (e.g. 1x1 maps), where K-means is undefined.
        ``group_db_index`` (Fig. 5, with grouping): the same positions clustered by their most likely SGM group,
        averaged over frames with at least two non-empty groups (NaN if none); ``groups_used``: non-empty groups
        per frame. The cached positions are fixed, so the K-means index is a property of the cache (the same for
        every architecture) and the SGM's index says how it partitions those positions, not (as in the paper)
        how a fine-tuned backbone moves them.
        """
        encoding = self.encode(x)
        results = {}
        if encoding.relations is not None:
            results["relation_nmse"] = scale_nmse(encoding.relations).mean().item()
        positions = x.flatten(0, 1).flatten(1, 2)                                           # [B·N, HW, C]
        k = self.hparams["num_groups"]
        results["kmeans_db_index"] = (davies_bouldin(positions, kmeans(positions, k), k).nanmean().item()
                                      if positions.shape[1] >= k else torch.nan)     # K-means starts from K points
        log_assignments = encoding.extras["log_assignments"]
        if log_assignments:
            labels = [log_assign.argmax(dim=-1) for log_assign in log_assignments]
            index = torch.cat([davies_bouldin(positions, label, k) for label in labels])
            results["group_db_index"] = index.nanmean().item()
            used = torch.cat([F.one_hot(label, k).amax(dim=1).sum(dim=1) for label in labels])
            results["groups_used"] = used.float().mean().item()
        return results


def with_components(*switched_on: str) -> dict[str, HParam]:
    """STDN's hyper-parameters with the component flags defaulting to on for ``switched_on`` only."""
    return {name: replace(spec, default=name in switched_on) if name in COMPONENTS else spec
            for name, spec in STDN.HPARAMS.items()}


@register_architecture
class STDNWithoutSE(STDN):
    """Table 3 '+MixStyle': STDN with the temporal scales summed as they are, without SE modulation."""

    name = "stdn-mixstyle"
    summary = "STDN ablation (Table 3 '+MixStyle'): full STDN without the SE aggregation"
    HPARAMS = with_components("mixstyle", "grouping", "spatial_relations", "temporal_relations")


@register_architecture
class STDNRelations(STDN):
    """Table 3 '+STRM': SGM and the full spatial-temporal relation module, no MixStyle, no SE aggregation."""

    name = "stdn-strm"
    summary = "STDN ablation (Table 3 '+STRM'): SGM + spatial and temporal relations with L_rel"
    HPARAMS = with_components("grouping", "spatial_relations", "temporal_relations")


@register_architecture
class STDNTemporalRelations(STDN):
    """Table 3 '+TRM': SGM, then temporal relations with L_rel over the K group features side by side.

    Table 3 read cumulatively keeps the SGM; preset ``no-sgm`` drops it (temporal relations on the spatially
    pooled maps: Fig. 4's "TRM"); "TRM w/o L_rel" is also ``lambda_rel=0``.
    """

    name = "stdn-trm"
    summary = "STDN ablation (Table 3 '+TRM'): SGM + temporal relations with L_rel (no spatial relations)"
    HPARAMS = with_components("grouping", "temporal_relations")


@register_architecture
class STDNGrouping(STDN):
    """Table 3 '+SGM': the TSN baseline on the K SGM group features side by side, with the entropy losses."""

    name = "stdn-sgm"
    summary = "STDN ablation (Table 3 '+SGM'): spatial grouping, then TSN's classifier and mean over segments"
    HPARAMS = with_components("grouping")


@register_architecture
class TSNMaps(STDN):
    """Table 3 'Backbone' (TSN): spatial average of each map, dropout, linear classifier, mean over segments.

    TSN averages class scores over segments; with a linear classifier that equals classifying the mean feature.
    """

    name = "tsn-maps"
    summary = "STDN's baseline (Table 3 'Backbone'): TSN on spatially pooled maps, linear classifier"
    HPARAMS = with_components()


STDN_FAMILY = ("tsn-maps", "stdn-sgm", "stdn-trm", "stdn-strm", "stdn-mixstyle", "stdn")

register_preset(Preset(
    "official", "STDN's scripts/train_hmdbucf.sh and ops/STDNmodule.py: lambda_ent 0.15, the column-normalised "
    "assignment, per-scale module copies, tuples re-drawn at evaluation, cross-half MixStyle, summed tuples and "
    "per-scale logits",
    {"lambda_ent": 0.15, "grouping_variant": "official", "spatial_modules": "per_scale", "eval_tuples": "random",
     "mixstyle_pairing": "crosshalf", "tuple_reduction": "official"},
    architectures=STDN_FAMILY))
register_preset(Preset("no-sgm", "issue 5's '+TRM' and Fig. 4's 'TRM': temporal relations with L_rel on the "
                       "spatially pooled maps, no SGM", {"grouping": False}, architectures=("stdn-trm",)))
