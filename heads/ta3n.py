"""TA2N and TA3N (Chen et al., ICCV 2019): adversarial alignment of frame, relation and video features.

Read beside the paper (``papers/ta3n_temporal_attentive_alignment.txt``):

- ``VideoModel``: TemPooling (§3.1) or TemRelation (§3.2), picked by the ``temporal`` hyper-parameter; the
  video model every DA head of this file and of ``da_baselines.py`` is built on.
- ``ta2n`` (§3.2, Table 6 "All Ĝd"): three adversarial discriminators Ĝd = GRL + MLP: Ĝsd on every frame feature
  (eq. 2), one Ĝ^n_rd per scale on the n-frame relation feature (eq. 6), Ĝtd on the video feature (eq. 3);
  loss eq. 4 extended by L_rd (eq. 10 without attention).
- ``ta3n`` (§3.3): ta2n plus the domain attention w = 1 - H(d̂) on each relation feature with the residual
  h = Σ_n (1 + w_n) R_n (eq. 7-8), and the attentive entropy (1 + H(d̂)) H(ŷ) over source and target (eq. 9);
  total loss eq. 10. With ``temporal=pooling`` it attends the frame features with the frame discriminator
  instead (§7.2, Fig. 7, Table 7).

How λ acts: eq. 4/10 write L = L_y - λ L_d. As in DANN's GRL formulation and TA3N's code, the domain losses
enter the total unweighted, so the discriminators train at full strength, and λ is the GRL coefficient: the
features receive -λ times the domain-loss gradient.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from heads.base import HeadError, HParam, LabelledBatch, UnlabelledBatch, register
from heads.common import GRL_SCHEDULES, entropy, grad_reverse, grl_coefficient, init_normal_, mlp
from heads.pooling import TemPooling
from heads.trn import TemRelation

LEVELS = ("frame", "relation", "video")           # where a discriminator can sit: Ĝsd, Ĝ^n_rd, Ĝtd
ENTROPY_UNITS = {"bits": math.log(2.0), "nats": 1.0}


# ----------------------------------------------------------------------------------------------------------
# the equations


def entropy_in(logits: Tensor, unit: str) -> Tensor:
    """Entropy of ``softmax(logits)`` over the last axis, in ``unit`` ("bits" or "nats")."""
    return entropy(logits) / ENTROPY_UNITS[unit]


def domain_attention(domain_logits: Tensor, unit: str) -> Tensor:
    """Eq. 7: w = 1 - H(d̂) from discriminator logits [..., 2] -> [...].

    In bits w spans [0, 1]: 0 where the discriminator is at chance, 1 where it is certain. In nats (the
    official code) it spans [1 - ln 2, 1] = [0.307, 1].
    """
    return 1.0 - entropy_in(domain_logits, unit)


def attentive_entropy(class_logits: Tensor, domain_logits: Tensor, unit: str) -> Tensor:
    """Eq. 9 averaged over the batch: mean_i (1 + H(d̂_i)) H(ŷ_i); ``domain_logits`` [B, 2] or [B, P, 2].

    With several discriminator outputs per video (relation scales, frames), H(d̂_i) is their mean entropy.
    """
    domain_entropy = entropy_in(domain_logits, unit)
    if domain_entropy.dim() > 1:
        domain_entropy = domain_entropy.mean(dim=1)
    return ((1.0 + domain_entropy) * entropy_in(class_logits, unit)).mean()


# ----------------------------------------------------------------------------------------------------------
# building blocks


def require_target(head: nn.Module, tgt: UnlabelledBatch | None) -> UnlabelledBatch:
    """The target batch of a DA update; a clear error when there is none (``dg`` protocol)."""
    if tgt is None:
        raise HeadError(f"head '{head.name}' adapts to a target domain: train it with --setting da --target D")
    return tgt


class DomainDiscriminator(nn.Module):
    """Ĝd (§3.1): a gradient reversal layer, then a domain classifier MLP dim -> dim -> 2 (official code sizes)."""

    def __init__(self, dim: int):
        super().__init__()
        self.classifier = mlp(dim, dim, 2)

    def forward(self, x: Tensor, coefficient: float) -> Tensor:
        """Domain logits [..., 2] (0 = source, 1 = target); gradients reach ``x`` times ``-coefficient``."""
        return self.classifier(grad_reverse(x, coefficient))


class VideoModel(TemRelation):
    """TemPooling or TemRelation, picked by ``temporal``: the video model of every DA head (Tables 3-4 columns).

    Unregistered: it trains on source labels only, exactly as ``tempooling`` / ``trn``. The relation
    hyper-parameters are used with ``temporal=relation`` only.
    """

    HPARAMS = {
        **TemRelation.HPARAMS,
        "temporal": HParam("relation", "temporal module G_tf: pooling (TemPooling, §3.1) or relation "
                           "(TemRelation, §3.2)", "TA3N Tables 3-4", choices=("pooling", "relation")),
    }

    @property
    def relational(self) -> bool:
        return self.hparams["temporal"] == "relation"

    def temporal_module(self) -> tuple[nn.Module, int]:
        return super().temporal_module() if self.relational else TemPooling.temporal_module(self)

    def replace_optimizers(self, *param_groups) -> list[torch.optim.SGD]:
        """TemPooling built one optimiser over the modules that existed then; swap in one per parameter group."""
        self.optimizers.clear()
        return [self.make_optimizer(params) for params in param_groups]


@dataclass
class Outputs:
    """Everything one pass of a TA2N/TA3N model computes, for the losses and the diagnostics."""

    logits: Tensor                  # class logits ŷ, [B, classes]
    video: Tensor                   # final video representation h (before the classifier's dropout), [B, D]
    domain: dict[str, Tensor]       # discriminator logits: frame [B, N, 2], relation [B, N-1, 2], video [B, 2]
    attention: Tensor | None        # domain attention w per relation scale [B, N-1] (per frame [B, N] on pooling)


# ----------------------------------------------------------------------------------------------------------
# the heads


@register
class TA2N(VideoModel):
    """TA2N (§3.2): TemRelation with adversarial discriminators on frames (eq. 2), relations (eq. 6), video (eq. 3).

    Loss: L_y on source + the unweighted domain losses of source and target (0 = source, 1 = target), each a
    mean over its samples (frames, relation features or videos), λ acting through the GRLs (module docstring).
    ``discriminators`` picks the levels (Table 6 ablations); the relation level exists only with
    ``temporal=relation`` and is left out with pooling (Table 6: "All Ĝd" on TemPooling is Ĝsd + Ĝtd).

    Deviations from the official code (``models.py``), each an option defaulting to the paper:
    the video discriminator sees h, as eq. 3 (code: h after the classifier's dropout; ``video_disc_after_dropout``).
    Same as the code: frame and video discriminators start N(0, init_std), relation ones at PyTorch's default;
    the frame discriminator sees G_sf's output after its dropout; λ is fixed (``grl_schedule=constant``; the
    code ramps it as DANN only when given β < 0).
    """

    name = "ta2n"
    summary = "TA3N's TA2N: TemRelation + adversarial discriminators on frames, each relation scale and the video"
    settings = frozenset({"da"})
    HPARAMS = {
        **VideoModel.HPARAMS,
        "discriminators": HParam(LEVELS, f"levels with an adversarial discriminator, among {', '.join(LEVELS)}",
                                 "TA3N §3.2, Table 6 (All Ĝd)"),
        "lambda_s": HParam(0.75, "λs: GRL coefficient of the frame discriminator Ĝsd", "TA3N §7.3"),
        "lambda_r": HParam(0.5, "λr: GRL coefficient of the relation discriminators Ĝ^n_rd", "TA3N §7.3"),
        "lambda_t": HParam(0.75, "λt: GRL coefficient of the video discriminator Ĝtd", "TA3N §7.3"),
        "grl_schedule": HParam("constant", "constant: λ throughout; dann: λ * (2/(1+exp(-10p)) - 1)",
                               "TA3N §7.3 (fixed λ); DANN for the ramp", choices=tuple(GRL_SCHEDULES)),
        "video_disc_after_dropout": HParam(False, "Ĝtd sees the video feature after the classifier's dropout "
                                           "(official code) instead of h (eq. 3)", "TA3N eq. 3; code models.py"),
    }

    def __init__(self, feat_shape: tuple[int, ...], num_classes: int, num_segments: int, hparams: dict):
        super().__init__(feat_shape, num_classes, num_segments, hparams)
        h = self.hparams
        unknown = set(h["discriminators"]) - set(LEVELS)
        if unknown:
            raise HeadError(f"head '{self.name}': discriminators {sorted(unknown)} unknown; choose among {LEVELS}")
        video_dim = self.classifier[1].in_features
        self.discriminators = nn.ModuleDict()
        if "frame" in h["discriminators"]:
            self.discriminators["frame"] = DomainDiscriminator(h["frame_dim"])                    # Ĝsd
        if "relation" in h["discriminators"] and self.relational:
            self.discriminators["relation"] = nn.ModuleList(                                       # Ĝ^n_rd
                DomainDiscriminator(h["relation_dim"]) for _ in self.temporal.scales)
        if "video" in h["discriminators"]:
            self.discriminators["video"] = DomainDiscriminator(video_dim)                         # Ĝtd
        if h["init_std"] > 0:   # as the official code: frame and video discriminators only
            for level in ("frame", "video"):
                if level in self.discriminators:
                    init_normal_(self.discriminators[level], h["init_std"])
        (self.optimizer,) = self.replace_optimizers(self.parameters())

    def grl_coefficients(self, progress: float) -> dict[str, float]:
        """λs, λr, λt at training progress ``progress`` under ``grl_schedule``."""
        h = self.hparams
        return {level: grl_coefficient(h[f"lambda_{key}"], h["grl_schedule"], progress)
                for level, key in zip(LEVELS, "srt")}

    def run(self, x: Tensor, coefficients: dict[str, float] | None = None) -> Outputs:
        """One pass over [B, N, C]; ``coefficients`` are the GRL's (None in evaluation: nothing flows back)."""
        coefficient = coefficients or dict.fromkeys(LEVELS, 0.0)
        frames = self.frame_mlp(x)                                                  # G_sf: [B, N, D]
        domain = {}
        if "frame" in self.discriminators:
            domain["frame"] = self.discriminators["frame"](frames, coefficient["frame"])            # eq. 2
        parts = self.temporal.relations(frames) if self.relational else frames     # R_n [B, N-1, R] (eq. 5)
        if "relation" in self.discriminators:
            domain["relation"] = torch.stack([discriminator(parts[:, i], coefficient["relation"])  # eq. 6
                                              for i, discriminator in enumerate(self.discriminators["relation"])],
                                             dim=1)
        parts, attention = self.attend(parts, domain)
        video = parts.sum(dim=1) if self.relational else parts.mean(dim=1)          # eq. 5 / temporal mean
        dropout, linear = self.classifier                                           # G_y = Dropout + Linear
        dropped = dropout(video)
        if "video" in self.discriminators:
            seen = dropped if self.hparams["video_disc_after_dropout"] else video
            domain["video"] = self.discriminators["video"](seen, coefficient["video"])               # eq. 3
        return Outputs(linear(dropped), video, domain, attention)

    def attend(self, parts: Tensor, domain: dict[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        """TA2N has no attention: the relation (or frame) features are aggregated as they are."""
        return parts, None

    def forward(self, x: Tensor) -> Tensor:
        return self.run(x).logits

    def video_features(self, x: Tensor) -> Tensor:
        return self.run(x).video

    def loss_terms(self, out: Outputs, labels: Tensor) -> dict[str, Tensor]:
        """Eq. 10's terms as they enter the total: L_y on the first ``len(labels)`` videos, L_sd, L_rd, L_td."""
        n_source = len(labels)
        is_target = torch.zeros(len(out.logits), dtype=torch.long, device=labels.device)
        is_target[n_source:] = 1
        terms = {"loss_y": F.cross_entropy(out.logits[:n_source], labels)}
        for level, logits in out.domain.items():
            domain_labels = is_target.view(-1, *[1] * (logits.dim() - 2)).expand(logits.shape[:-1])
            terms[f"loss_{level}"] = F.cross_entropy(logits.flatten(0, -2), domain_labels.flatten())
        return terms

    def update(self, src: LabelledBatch, tgt: UnlabelledBatch | None, progress: float) -> dict[str, float]:
        """One SGD step on eq. 10 over the source and target batches, passed through the model together."""
        tgt = require_target(self, tgt)
        coefficients = self.grl_coefficients(progress)
        out = self.run(torch.cat([src.x, tgt.x]), coefficients)
        terms = self.loss_terms(out, src.y)
        loss = sum(terms.values())
        logs = {"loss": loss.item(), **{name: term.item() for name, term in terms.items()},
                **{f"grl_{level}": coefficients[level] for level in out.domain}}
        if out.attention is not None:
            logs["attention"] = out.attention.mean().item()
        return {**logs, **self.optimizer_step(self.optimizer, loss, progress)}

    @torch.no_grad()
    def diagnostics(self, x: Tensor) -> dict[str, float]:
        """Mean target probability each discriminator gives ``x`` (0.5: the domains are confused), and mean w."""
        out = self.run(x)
        measures = {f"p_target_{level}": logits.softmax(-1)[..., 1].mean().item()
                    for level, logits in out.domain.items()}
        if out.attention is not None:
            for i, w in enumerate(out.attention.mean(dim=0).tolist()):
                part = f"scale_{self.temporal.scales[i]}" if self.relational else f"frame_{i}"
                measures[f"attention_{part}"] = w
        return measures


@register
class TA3N(TA2N):
    """TA3N (§3.3): TA2N + domain attention (eq. 7-8) + attentive entropy (eq. 9); total loss eq. 10.

    Attention: w_n = 1 - H(d̂_n) from the relation discriminator of scale n; h = Σ_n (1 + w_n) R_n. With
    ``temporal=pooling``, w_j comes from the frame discriminator and h = mean_j (1 + w_j) f_j (§7.2, Fig. 7).
    Attentive entropy: γ mean_i (1 + H(d̂_i)) H(ŷ_i) over source and target videos, d̂ from Ĝtd (eq. 9).

    Deviations from the official code, each an option defaulting to the paper (``ta3n-official-*`` presets
    switch all of them to the code's behaviour, with the script's λ and γ):
    - ``detach_attention``: the paper presents w and 1 + H(d̂) as attention values computed from the domain
      predictions; the code leaves them attached, so L_y and L_ae also train the discriminators and, through
      their GRLs, push the features with a reversed gradient.
    - ``entropy_unit``: the paper's H has no base; we read it in bits, where w = 1 - H spans [0, 1]; the code
      uses nats (w in [0.307, 1]). It applies to every H here, H(ŷ) included.
    - ``video_disc_after_dropout`` (from TA2N).
    - ``nesterov`` (shared optimiser): §7.3 gives SGD with momentum 0.9; the code's SGD is Nesterov.
    ``entropy_weight_from`` picks the discriminator whose entropy weighs L_ae: the video one, as eq. 9 and the
    code (which takes ``pred_domain_all[1]``, the video level when all three discriminators are on).
    """

    name = "ta3n"
    summary = "TA3N: TA2N + domain attention on relation (or frame) features + attentive entropy loss"
    HPARAMS = {
        **TA2N.HPARAMS,
        "gamma": HParam(0.3, "γ: weight of the attentive entropy loss", "TA3N §7.3"),
        "detach_attention": HParam(True, "treat w and 1 + H(d̂) as constants; False back-propagates through them "
                                   "into the discriminators (official code)", "TA3N §3.3; code models.py, loss.py"),
        "entropy_unit": HParam("bits", "unit of every entropy H: bits (w in [0, 1]) or nats (official code)",
                               "TA3N eq. 7 (base unstated); code get_trans_attn", choices=tuple(ENTROPY_UNITS)),
        "entropy_weight_from": HParam("video", "discriminator whose entropy weighs the attentive entropy",
                                      "TA3N eq. 9 (Ĝtd); code main.py (pred_domain_all[1])", choices=LEVELS),
    }
    _CODE = {"detach_attention": False, "entropy_unit": "nats", "video_disc_after_dropout": True, "nesterov": True}
    PRESETS = {   # script_train_val.sh per-direction comments; --beta is (relation, video, frame)
        "ta3n-official-u2h": {**_CODE, "lambda_r": 0.75, "lambda_t": 0.75, "lambda_s": 0.5, "gamma": 0.003},
        "ta3n-official-h2u": {**_CODE, "lambda_r": 1.0, "lambda_t": 0.75, "lambda_s": 0.5, "gamma": 0.3},
    }

    def __init__(self, feat_shape: tuple[int, ...], num_classes: int, num_segments: int, hparams: dict):
        super().__init__(feat_shape, num_classes, num_segments, hparams)
        needed = {"attention": self.attention_level, "entropy_weight_from": self.hparams["entropy_weight_from"]}
        for use, level in needed.items():
            if level not in self.discriminators:
                raise HeadError(f"head '{self.name}': {use} needs the {level} discriminator, which is not built "
                                f"(discriminators={list(self.discriminators)}, temporal={self.hparams['temporal']})")

    @property
    def attention_level(self) -> str:
        """Relation features are attended with the relation discriminators; on pooling, frames with Ĝsd."""
        return "relation" if self.relational else "frame"

    def attend(self, parts: Tensor, domain: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Eq. 7-8: each part (relation scale or frame) scaled by 1 + w, w = 1 - H(its domain prediction)."""
        w = domain_attention(domain[self.attention_level], self.hparams["entropy_unit"])
        if self.hparams["detach_attention"]:
            w = w.detach()
        return parts * (1.0 + w).unsqueeze(-1), w

    def loss_terms(self, out: Outputs, labels: Tensor) -> dict[str, Tensor]:
        """TA2N's terms plus γ L_ae over source and target (eq. 9-10)."""
        h = self.hparams
        domain_logits = out.domain[h["entropy_weight_from"]]
        if h["detach_attention"]:
            domain_logits = domain_logits.detach()
        terms = super().loss_terms(out, labels)
        terms["loss_ae"] = h["gamma"] * attentive_entropy(out.logits, domain_logits, h["entropy_unit"])
        return terms
