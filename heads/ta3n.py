"""TA2N and TA3N (Chen et al., ICCV 2019) as methods: adversarial alignment of frame, relation and video features.

Read beside the paper (``papers/ta3n_temporal_attentive_alignment.txt``). Both run on any architecture: the paper's
pair is TemRelation (``trn``, §3.2) and TemPooling (``tempooling``, §3.1, Table 6-7), picked with ``--head``.

- ``ta2n`` (§3.2, Table 6 "All Ĝd"): adversarial discriminators Ĝd = GRL + MLP (:class:`DomainDiscriminator`):
  Ĝsd on every frame feature (eq. 2, ``Encoding.frames``), one Ĝ^n_rd per scale on the n-frame relation
  feature (eq. 6, ``Encoding.relations``; left out on an architecture without relations, as "All Ĝd" on
  TemPooling), Ĝtd on the video feature (eq. 3); loss eq. 4 extended by L_rd (eq. 10 without attention):
  :meth:`TA2N.loss_terms`.
- ``ta3n`` (§3.3): ta2n plus the domain attention w = 1 - H(d̂) (eq. 7, :func:`domain_attention`) on each
  relation feature with the residual h = aggregate((1 + w) R) (eq. 8, :meth:`TA3N.attend`), and the attentive
  entropy (1 + H(d̂)) H(ŷ) over source and target (eq. 9, :func:`attentive_entropy`); total loss eq. 10. On an
  architecture without relations it attends the frame features with the frame discriminator instead (§7.2,
  Fig. 7, Table 7).
- ``dann`` lives in ``da_baselines.py``: ``ta2n`` with the frame and video discriminators only (§7.3.3).

How λ acts: eq. 4/10 write L = L_y - λ L_d. As in DANN's GRL formulation and TA3N's code, the domain losses
enter the total unweighted, so the discriminators train at full strength, and λ is the GRL coefficient: the
features receive -λ times the domain-loss gradient.

Source and target videos go through the architecture as one batch (``cat_inputs``), as TA3N's code, so the
frame MLP's dropout and any batch statistics see both.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from heads.architecture import Architecture, Encoding
from heads.base import HeadError, HParam, Inputs, LabelledBatch, UnlabelledBatch, cat_inputs
from heads.common import GRL_SCHEDULES, entropy, grad_reverse, grl_coefficient, init_normal_, mlp
from heads.method import Method, Preset, register_method, register_preset, require_target

LEVELS = ("frame", "relation", "video")           # where a discriminator can sit: Ĝsd, Ĝ^n_rd, Ĝtd
ENTROPY_UNITS = {"bits": math.log(2.0), "nats": 1.0}


# ----------------------------------------------------------------------------------------------------------
# the equations


def domain_attention(domain_logits: Tensor, unit: str) -> Tensor:
    """Eq. 7: w = 1 - H(d̂) from discriminator logits [..., 2] -> [...], H in ``unit`` ("bits" or "nats").

    In bits w spans [0, 1]: 0 where the discriminator is at chance, 1 where it is certain. In nats (the
    official code) it spans [1 - ln 2, 1] = [0.307, 1].
    """
    return 1.0 - entropy(domain_logits) / ENTROPY_UNITS[unit]


def attentive_entropy(class_logits: Tensor, domain_logits: Tensor) -> Tensor:
    """Eq. 9 averaged over the batch, entropies in nats: mean_i (1 + H(d̂_i)) H(ŷ_i).

    ``domain_logits`` [B, 2] or [B, P, 2]; with several discriminator outputs per video (relation scales,
    frames), H(d̂_i) is their mean entropy. Nats, as the official code (``loss.attentive_entropy``), in which
    γ = 0.3 was tuned; ``entropy_unit`` does not change this term.
    """
    domain_entropy = entropy(domain_logits)
    if domain_entropy.dim() > 1:
        domain_entropy = domain_entropy.mean(dim=1)
    return ((1.0 + domain_entropy) * entropy(class_logits)).mean()


# ----------------------------------------------------------------------------------------------------------
# building blocks


class DomainDiscriminator(nn.Module):
    """Ĝd (§3.1): a gradient reversal layer, then a domain classifier MLP dim -> dim -> 2 (official code sizes)."""

    def __init__(self, dim: int):
        super().__init__()
        self.classifier = mlp(dim, dim, 2)

    def forward(self, x: Tensor, coefficient: float) -> Tensor:
        """Domain logits [..., 2] (0 = source, 1 = target); gradients reach ``x`` times ``-coefficient``."""
        return self.classifier(grad_reverse(x, coefficient))


@dataclass
class Outputs:
    """Everything one pass of a TA2N/TA3N model computes, for the losses and the diagnostics."""

    encoding: Encoding              # the architecture's frame (and relation) features, for its aux losses
    logits: Tensor                  # class logits ŷ, [B, classes]
    video: Tensor                   # video representation h before the classifier's dropout, [B, video_dim]
    domain: dict[str, Tensor]       # discriminator logits: frame [B, N, 2], relation [B, S, 2], video [B, 2]
    attention: Tensor | None        # domain attention w per relation scale [B, S] (per frame [B, N] without)


# ----------------------------------------------------------------------------------------------------------
# the methods


@register_method
class TA2N(Method):
    """TA2N (§3.2): adversarial discriminators on frames (eq. 2), relations (eq. 6) and the video (eq. 3).

    Loss: L_y on source (plus the architecture's own terms) + the unweighted domain losses of source and target
    (0 = source, 1 = target), each a mean over its samples (frames, relation features or videos), λ acting
    through the GRLs (module docstring). ``discriminators`` picks the levels (Table 6 ablations); the relation
    level exists only on an architecture with relation features.

    Deviations from the official code (``models.py``), each an option defaulting to the paper:
    the video discriminator sees h, as eq. 3 (code: h after the classifier's dropout; ``video_disc_after_dropout``).
    Same as the code: frame and video discriminators start N(0, init_std) (the architecture's ``init_std``;
    PyTorch's default init on an architecture without one), relation ones at PyTorch's default; the frame
    discriminator sees G_sf's output after its dropout; λ is fixed (``grl_schedule=constant``; the code ramps it
    as DANN only when given β < 0).
    """

    name = "ta2n"
    needs = frozenset({"encoder"})    # aligning or shaping fixed features would change nothing
    summary = "TA3N's TA2N: adversarial discriminators on frames, each relation scale (if any) and the video"
    settings = frozenset({"da"})
    HPARAMS = {
        "discriminators": HParam(LEVELS, f"levels with an adversarial discriminator, among {', '.join(LEVELS)} "
                                 "(relation only where the architecture has relation features)",
                                 "TA3N §3.2, Table 6 (All Ĝd)", choices=LEVELS),
        "lambda_s": HParam(0.75, "λs: GRL coefficient of the frame discriminator Ĝsd", "TA3N §7.3",
                           interval="[0, inf)"),
        "lambda_r": HParam(0.5, "λr: GRL coefficient of the relation discriminators Ĝ^n_rd", "TA3N §7.3",
                           interval="[0, inf)"),
        "lambda_t": HParam(0.75, "λt: GRL coefficient of the video discriminator Ĝtd", "TA3N §7.3",
                           interval="[0, inf)"),
        "grl_schedule": HParam("constant", "constant: λ throughout; dann: λ * (2/(1+exp(-10p)) - 1)",
                               "TA3N §7.3 (fixed λ); DANN for the ramp", choices=tuple(GRL_SCHEDULES)),
        "video_disc_after_dropout": HParam(False, "Ĝtd sees the video feature after the classifier's dropout "
                                           "(official code) instead of h (eq. 3)", "TA3N eq. 3; code models.py"),
    }

    def __init__(self, arch: Architecture, hparams: dict):
        super().__init__(arch, hparams)
        levels = self.hparams["discriminators"]
        explicit = levels != type(self).HPARAMS["discriminators"].default
        if "relation" in levels and not arch.relation_dim and explicit:
            raise HeadError(f"method '{self.name}': discriminators={list(levels)} asks for relation discriminators, "
                            f"but this architecture has no relation features; use e.g. trn, or frame/video only")
        self.discriminators = nn.ModuleDict()
        if "frame" in levels:
            self.discriminators["frame"] = DomainDiscriminator(arch.frame_dim)                     # Ĝsd
        if "relation" in levels and arch.relation_dim:
            self.discriminators["relation"] = nn.ModuleList(                                       # Ĝ^n_rd
                DomainDiscriminator(arch.relation_dim) for _ in range(arch.num_scales))
        if "video" in levels:
            self.discriminators["video"] = DomainDiscriminator(arch.video_dim)                     # Ĝtd
        if not self.discriminators:     # an adversarial method without a discriminator would silently be ERM
            raise HeadError(f"method '{self.name}': discriminators={list(levels)} builds no discriminator; choose "
                            f"among {', '.join(LEVELS)}")
        init_std = self.hparams.get("init_std", 0.0)    # the architecture's, where it declares one
        if init_std > 0:   # as the official code: frame and video discriminators only
            for level in ("frame", "video"):
                if level in self.discriminators:
                    init_normal_(self.discriminators[level], init_std)

    def grl_coefficients(self, progress: float) -> dict[str, float]:
        """λs, λr, λt at training progress ``progress`` under ``grl_schedule``."""
        h = self.hparams
        return {level: grl_coefficient(h[f"lambda_{key}"], h["grl_schedule"], progress)
                for level, key in zip(LEVELS, "srt")}

    def run(self, x: Inputs, coefficients: dict[str, float] | None = None, split: int | None = None) -> Outputs:
        """One pass; ``coefficients`` are the GRL's (None in evaluation: nothing flows back); ``split``: the
        number of source videos in front of the target ones (``Architecture.encode``)."""
        coefficient = coefficients or dict.fromkeys(LEVELS, 0.0)
        encoding = self.arch.encode(x, split)
        domain = {}
        if "frame" in self.discriminators:
            domain["frame"] = self.discriminators["frame"](encoding.frames, coefficient["frame"])     # eq. 2
        if "relation" in self.discriminators:
            domain["relation"] = torch.stack([discriminator(encoding.relations[:, i], coefficient["relation"])
                                              for i, discriminator in enumerate(self.discriminators["relation"])],
                                             dim=1)                                                # eq. 6
        parts, attention = self.attend(encoding, domain)
        video = self.arch.aggregate(parts)                                          # h (eq. 5 / temporal mean)
        dropped = self.arch.drop_video(video)
        if "video" in self.discriminators:
            seen = dropped if self.hparams["video_disc_after_dropout"] else video
            domain["video"] = self.discriminators["video"](seen, coefficient["video"])                # eq. 3
        return Outputs(encoding, self.arch.class_logits(dropped), video, domain, attention)

    def attend(self, encoding: Encoding, domain: dict[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        """TA2N has no attention: the relation (or frame) features are aggregated as they are."""
        return encoding.parts, None

    def loss_terms(self, out: Outputs, labels: Tensor) -> dict[str, Tensor]:
        """Eq. 10's terms as they enter the total: L_y (+ the architecture's) on the first ``len(labels)`` videos,
        then L_sd, L_rd, L_td over all videos."""
        is_target = torch.zeros(len(out.logits), dtype=torch.long, device=labels.device)
        is_target[len(labels):] = 1
        terms = self.supervised_terms(out.encoding, out.logits, labels)
        for level, logits in out.domain.items():
            domain_labels = is_target.view(-1, *[1] * (logits.dim() - 2)).expand(logits.shape[:-1])
            terms[f"loss_{level}"] = F.cross_entropy(logits.flatten(0, -2), domain_labels.flatten())
        return terms

    def objective(self, src: LabelledBatch, tgt: UnlabelledBatch | None,
                  progress: float) -> tuple[dict[str, Tensor], dict[str, float]]:
        """Eq. 10 over the source and target batches, passed through the model together."""
        tgt = require_target(self, tgt)
        coefficients = self.grl_coefficients(progress)
        out = self.run(cat_inputs([src.x, tgt.x]), coefficients, split=len(src.y))
        logs = {f"grl_{level}": coefficients[level] for level in out.domain}
        if out.attention is not None:
            logs["attention"] = out.attention.mean().item()
        return self.loss_terms(out, src.y), logs

    def predict(self, x: Inputs) -> Tensor:
        return self.run(x).logits

    def features(self, x: Inputs) -> Tensor:
        return self.run(x).video

    @torch.no_grad()
    def diagnostics(self, x: Inputs) -> dict[str, float]:
        """Mean target probability each discriminator gives ``x`` (0.5: the domains are confused), and mean w
        per relation feature (``attention_relation_i``: the i-th row of ``Encoding.relations``, for ``trn`` the
        scale of N - i frames) or per frame (``attention_frame_j``)."""
        out = self.run(x)
        measures = {**super().diagnostics(x),
                    **{f"p_target_{level}": logits.softmax(-1)[..., 1].mean().item()
                       for level, logits in out.domain.items()}}
        if out.attention is not None:
            part = "relation" if out.encoding.relations is not None else "frame"
            for i, w in enumerate(out.attention.mean(dim=0).tolist()):
                measures[f"attention_{part}_{i}"] = w
        return measures


@register_method
class TA3N(TA2N):
    """TA3N (§3.3): TA2N + domain attention (eq. 7-8) + attentive entropy (eq. 9); total loss eq. 10.

    Attention: w_n = 1 - H(d̂_n) from the relation discriminator of scale n; h = aggregate((1 + w) R) (for
    ``trn``, Σ_n (1 + w_n) R_n). On an architecture without relations, w_j comes from the frame discriminator
    and h = aggregate((1 + w) f) (for ``tempooling``, mean_j (1 + w_j) f_j; §7.2, Fig. 7).
    Attentive entropy: γ mean_i (1 + H(d̂_i)) H(ŷ_i) over source and target videos, d̂ from Ĝtd (eq. 9).

    Units: ``entropy_unit`` applies only inside w (eq. 7), where it sets w's range; L_ae is always in nats, the
    unit in which the official code computes it and γ = 0.3 was tuned (§7.3 gives γ, the code the unit).

    Deviations from the official code, each an option (the ``ta3n-official-*`` presets switch all of them to
    the code's behaviour, with the script's λ and γ):
    - ``detach_attention`` (default True) is our reading, not the paper's: the paper is silent on whether the
      gradient flows through w and 1 + H(d̂); we treat them as attention *values* computed from the domain
      predictions. The code leaves them attached, so L_y and L_ae also train the discriminators and, through
      their GRLs, push the features with a reversed gradient.
    - ``entropy_unit``: the paper's H has no base; we read w in bits, where w = 1 - H spans [0, 1]; the code
      uses nats (w in [0.307, 1]).
    - ``video_disc_after_dropout`` (from TA2N).
    - ``nesterov`` (shared optimiser): §7.3 gives SGD with momentum 0.9; the code's SGD is Nesterov.
    ``entropy_weight_from`` picks the discriminator whose entropy weighs L_ae: the video one, as eq. 9 and the
    code (which takes ``pred_domain_all[1]``, the video level when all three discriminators are on).
    """

    name = "ta3n"
    summary = "TA3N: TA2N + domain attention on relation (or frame) features + attentive entropy loss"
    HPARAMS = {
        **TA2N.HPARAMS,
        "gamma": HParam(0.3, "γ: weight of the attentive entropy loss (entropies in nats)", "TA3N §7.3",
                        interval="[0, inf)"),
        "detach_attention": HParam(True, "treat w and 1 + H(d̂) as constants (our reading: the paper is silent); "
                                   "False back-propagates through them into the discriminators (official code)",
                                   "our reading of TA3N §3.3; code models.py, loss.py leave them attached"),
        "entropy_unit": HParam("bits", "unit of H inside the attention w = 1 - H(d̂): bits (w in [0, 1]) or nats "
                               "(official code, w in [0.307, 1]); L_ae is in nats either way",
                               "TA3N eq. 7 (base unstated); code get_trans_attn", choices=tuple(ENTROPY_UNITS)),
        "entropy_weight_from": HParam("video", "discriminator whose entropy weighs the attentive entropy",
                                      "TA3N eq. 9 (Ĝtd); code main.py (pred_domain_all[1])", choices=LEVELS),
    }

    def __init__(self, arch: Architecture, hparams: dict):
        super().__init__(arch, hparams)
        needed = {"attention": self.attention_level, "entropy_weight_from": self.hparams["entropy_weight_from"]}
        for use, level in needed.items():
            if level not in self.discriminators:
                raise HeadError(f"method '{self.name}': {use} needs the {level} discriminator, which is not built "
                                f"(discriminators={list(self.discriminators)}, architecture relations: "
                                f"{'yes' if arch.relation_dim else 'no'})")

    @property
    def attention_level(self) -> str:
        """Relation features are attended with the relation discriminators; without relations, frames with Ĝsd."""
        return "relation" if self.arch.relation_dim else "frame"

    def attend(self, encoding: Encoding, domain: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Eq. 7-8: each part (relation scale or frame) scaled by 1 + w, w = 1 - H(its domain prediction)."""
        w = domain_attention(domain[self.attention_level], self.hparams["entropy_unit"])
        if self.hparams["detach_attention"]:
            w = w.detach()
        return encoding.parts * (1.0 + w).unsqueeze(-1), w

    def loss_terms(self, out: Outputs, labels: Tensor) -> dict[str, Tensor]:
        """TA2N's terms plus γ L_ae over source and target (eq. 9-10)."""
        h = self.hparams
        domain_logits = out.domain[h["entropy_weight_from"]]
        if h["detach_attention"]:
            domain_logits = domain_logits.detach()
        terms = super().loss_terms(out, labels)
        terms["loss_ae"] = h["gamma"] * attentive_entropy(out.logits, domain_logits)
        return terms


# script_train_val.sh per-direction comments; its --beta is (relation, video, frame)
_CODE = {"detach_attention": False, "entropy_unit": "nats", "video_disc_after_dropout": True, "nesterov": True}
_CODE_SAMPLING = {"train_sampling": "centre"}   # the official dataset.py samples each segment's centre frame
register_preset(Preset("ta3n-official-u2h", "TA3N's official code and script values for UCF→HMDB",
                       {**_CODE, "lambda_r": 0.75, "lambda_t": 0.75, "lambda_s": 0.5, "gamma": 0.003},
                       _CODE_SAMPLING, methods=("ta3n",)))
register_preset(Preset("ta3n-official-h2u", "TA3N's official code and script values for HMDB→UCF",
                       {**_CODE, "lambda_r": 1.0, "lambda_t": 0.75, "lambda_s": 0.5, "gamma": 0.3},
                       _CODE_SAMPLING, methods=("ta3n",)))
