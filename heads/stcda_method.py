"""STCDA's objective and training (Song et al., CVPR 2021, §3.3 eq. 9-10, §4.2), re-implemented from the paper.

L = L_CE + α L_Contrast + β D_VCA (eq. 10; the losses in ``heads/stcda.py``) on the ``stcda`` networks
(``heads/stcda_net.py``) of one or two streams, in §4.2's three stages within one ``vidshift train`` run, with
the memory bank and pseudo-labels of ``heads/stcda_memory.py``. The presets scale the paper's 1000 epochs to small
data and give the ablations of Tables 4-6 (registered at the end). Choices the paper leaves open: the module
docstring of ``heads/stcda.py`` and README.md ("STCDA").
"""
from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from heads.architecture import Architecture
from heads.base import HeadError, HParam, LabelledBatch, UnlabelledBatch, cat_inputs, lr_factor, optimizer_step
from heads.fusion import LateFusion
from heads.method import Method, Preset, register_method, register_preset, require_target
from heads.stcda import (INTRA_NEGATIVES, STCL_LEVELS, clip_loss, clip_negatives, contrastive_loss,
                         order_negatives, spatial_negatives, temporal_negatives, vca, video_loss)
from heads.stcda_memory import DOMAINS, MemoryBank, class_centres, cluster_target
from heads import stcda_net  # noqa: F401  (registers the stcda architectures this method needs)

# A child of the trainer's logger, so the notes land in the run's train.log.
log = logging.getLogger("vidshift.train.stcda")


@register_method
class STCDA(Method):
    """STCDA (eq. 10): L_CE + α L_Contrast + β D_VCA on the ``stcda`` networks of one or two streams.

    Stages (§4.2), by epoch: [0, stcl_epochs) STCL only (eq. 4, no labels); then ``ce_epochs`` of L_CE + α
    L_Contrast (β = 0); then the rest of ``epochs`` with + β D_VCA. Each stage starts at its own learning rate
    (lr · stage_lr_scale: 0.01, 0.01, 0.001) and decays it by lr_decay at ``stage_lr_steps`` epochs into the stage
    (100 and 200). Pseudo-labels are clustered from the memory bank at the start of every VCA epoch (or once, with
    ``pseudo_labels=fixed``: Table 6c), so VCA starts one epoch after the bank has seen the target.
    """

    name = "stcda"
    summary = "STCDA (Song et al. 2021): contrastive clip/video learning (STCL) + class-aware kernel alignment (VCA)"
    settings = frozenset({"da"})
    needs = frozenset({"clips"})
    HPARAMS = {
        "alpha": HParam(2.0, "α: weight of L_Contrast in stages 2-3 (eq. 10; stage 1 trains on it alone)",
                        "STCDA §4.2, Table 4", interval="[0, inf)"),
        "beta": HParam(0.5, "β: weight of D_VCA in stage 3 (eq. 10)", "STCDA §4.2, Table 4", interval="[0, inf)"),
        "stcl_epochs": HParam(300, "epochs of stage 1 (STCL only)", "STCDA §4.2", interval="[0, inf)"),
        "ce_epochs": HParam(300, "epochs of stage 2 (CE + α STCL); stage 3 (+ β VCA) runs the rest of epochs",
                            "STCDA §4.2 (then 400 epochs of stage 3)", interval="[0, inf)"),
        "stage_lr_scale": HParam((1.0, 1.0, 0.1), "each stage's starting lr as a multiple of lr",
                                 "STCDA §4.2 (0.01, 0.01, 0.001)", interval="(0, inf)"),
        "stage_lr_steps": HParam((100, 200), "epochs into each stage where lr_schedule=step divides by 1/lr_decay",
                                 "STCDA §4.2 (after 100 and 200 epochs)", interval="[0, inf)"),
        "stcl_tau": HParam(0.07, "temperature τ of Θ (eq. 3)", "ours (paper silent; CMC's code: 0.07)",
                           interval="(0, inf)"),
        "memory_negatives": HParam(4096, "k: memory-bank clips of the other modality per batch (eq. 1)",
                                   "ours (paper silent; CMC draws 16384 from ImageNet-sized banks)",
                                   interval="[0, inf)"),
        "memory_momentum": HParam(0.5, "μ of the memory-bank update", "ours (CMC's code: 0.5)", interval="[0, 1)"),
        "stcl_levels": HParam(STCL_LEVELS, "STCL terms: clip (eq. 1), video (eq. 2)", "STCDA Table 5",
                              choices=STCL_LEVELS),
        "stcl_domains": HParam(DOMAINS, "the videos STCL is applied to", "STCDA Table 5", choices=DOMAINS),
        "intra_negatives": HParam(INTRA_NEGATIVES, "kinds of intra-negatives (Fig. 3); unavailable ones are skipped",
                                  "STCDA Fig. 3", choices=INTRA_NEGATIVES),
        "vca_fusion": HParam(True, "pseudo-labels from both modalities' distances summed (off: each modality "
                             "clusters alone)", "STCDA §3.2, Table 6b"),
        "pseudo_labels": HParam("iterative", "iterative: re-clustered every VCA epoch; fixed: the first clustering "
                                "kept", "STCDA §3.2, Table 6c", choices=("iterative", "fixed")),
        "kmeans_iterations": HParam(100, "most centre updates of one clustering (it stops when no label changes)",
                                    "ours (§3.2: 'till the convergence or the iteration ending')",
                                    interval="[0, inf)"),
        "vca_kernel_num": HParam(5, "Gaussian kernels of κ_m", "ours (DAN/JAN's code)", interval="[1, inf)"),
        "vca_kernel_mul": HParam(2.0, "ratio of successive bandwidths of κ_m", "ours (DAN/JAN's code)",
                                 interval="(0, inf)"),
    }

    def __init__(self, arch: Architecture, hparams: dict):
        super().__init__(arch, hparams)
        h = self.hparams
        # per modality its network (a plain dict: the modules are registered once, under self.arch)
        self.modalities = dict(arch.streams) if isinstance(arch, LateFusion) else {"x": arch}
        if len(self.modalities) > 2:
            raise HeadError(f"method 'stcda' contrasts two modalities (RGB and flow), got streams "
                            f"{sorted(self.modalities)}; train on one or two streams")
        if len(h["stage_lr_scale"]) != 3 or not h["stcl_levels"]:
            raise HeadError("method 'stcda': stage_lr_scale needs 3 values (one per stage) and stcl_levels at least "
                            "one of clip, video")
        if h["stcl_epochs"] + h["ce_epochs"] >= h["epochs"]:
            log.info("stcda: epochs=%d ends before stage 3 (stcl_epochs=%d + ce_epochs=%d): no VCA in this run",
                     h["epochs"], h["stcl_epochs"], h["ce_epochs"])
        self.bank = MemoryBank(h["memory_momentum"])
        self.pseudo: dict[str, Tensor] = {}      # "fused" or a modality -> ŷ per target training video (-1: none)
        self.noted: set[str] = set()

    def get_extra_state(self) -> dict:
        return {"bank": self.bank.state(), "pseudo": self.pseudo}

    def set_extra_state(self, state: dict) -> None:
        self.bank.load(state["bank"])
        self.pseudo = state["pseudo"]

    # --- stages and learning rates ----------------------------------------------------------------------

    def stage(self, progress: float) -> int:
        """1, 2 or 3 at training progress ``progress`` (the epoch is progress · epochs, §4.2's boundaries)."""
        h = self.hparams
        epoch = math.floor(progress * h["epochs"] + 1e-6)     # progress · epochs is the epoch up to rounding
        return 1 if epoch < h["stcl_epochs"] else 2 if epoch < h["stcl_epochs"] + h["ce_epochs"] else 3

    def stage_lr_factor(self, progress: float) -> float:
        """lr's multiplier: the stage's scale, times lr_schedule run within the stage (step: at stage_lr_steps)."""
        h = self.hparams
        stage = self.stage(progress)
        bounds = (0, h["stcl_epochs"], h["stcl_epochs"] + h["ce_epochs"], max(h["epochs"], 1))
        into = progress * h["epochs"] - bounds[stage - 1]
        if h["lr_schedule"] == "step":
            within = h["lr_decay"] ** sum(into + 1e-6 >= step for step in h["stage_lr_steps"])
        else:
            within = lr_factor(h, min(max(into / max(bounds[stage] - bounds[stage - 1], 1), 0.0), 1.0))
        return h["stage_lr_scale"][stage - 1] * within

    def setup_optimizers(self) -> None:
        super().setup_optimizers()
        self.lr_mults = [group["initial_lr"] / self.hparams["lr"] for group in self.optimizer.param_groups]

    def step(self, optimizer, loss: Tensor, progress: float) -> dict[str, float]:
        # the shared step sets lr = initial_lr · schedule: with the schedule held constant, initial_lr carries ours
        rate = self.hparams["lr"] * self.stage_lr_factor(progress)
        for group, mult in zip(optimizer.param_groups, self.lr_mults):
            group["initial_lr"] = rate * mult
        return optimizer_step(optimizer, loss, {**self.hparams, "lr_schedule": "constant"}, progress)

    # --- training ---------------------------------------------------------------------------------------

    def before_epoch(self, source, progress: float) -> dict[str, float]:
        if self.stage(progress) < 3 or self.hparams["beta"] == 0:
            return {}
        if self.hparams["pseudo_labels"] == "fixed" and self.pseudo:
            return {}
        return self.refresh_pseudo_labels()

    @torch.no_grad()
    def refresh_pseudo_labels(self) -> dict[str, float]:
        """§3.2 steps 1-2 on the memory bank: K-means of the target videos from the source class centres."""
        banks = self.bank.domains
        if not all(domain in banks for domain in DOMAINS):
            self._note("no-bank", "VCA waits for an epoch of memory-bank features before its first pseudo-labels")
            return {"pseudo_labelled": 0.0}
        source, target = banks["source"], banks["target"]
        seen_s, seen_t = source["filled"], target["filled"]
        centres, usable = {}, None      # usable: the classes the source bank has (the same in every modality)
        for m in self.modalities:
            centres[m], usable = class_centres(source["videos"][m][seen_s], source["labels"][seen_s],
                                               self.arch.num_classes)
        groups = {"fused": tuple(self.modalities)} if self.hparams["vca_fusion"] else {m: (m,) for m in self.modalities}
        updates = 0
        for key, members in groups.items():
            labels, done = cluster_target({m: target["videos"][m][seen_t] for m in members},
                                          {m: centres[m] for m in members}, usable, self.hparams["kmeans_iterations"])
            self.pseudo[key] = torch.full((len(seen_t),), -1, dtype=torch.long, device=seen_t.device)
            self.pseudo[key][seen_t] = labels
            updates = max(updates, done)
        return {"pseudo_labelled": seen_t.float().mean().item(), "kmeans_updates": float(updates)}

    def objective(self, src: LabelledBatch, tgt: UnlabelledBatch | None,
                  progress: float) -> tuple[dict[str, Tensor], dict[str, float]]:
        tgt = require_target(self, tgt)
        if src.index is None or tgt.index is None:
            raise HeadError("method 'stcda' keeps a memory bank of every training video: its batches must carry "
                            "the videos' positions (LabelledBatch.index / UnlabelledBatch.index), as vidshift "
                            "train's do")
        h, stage, n_src = self.hparams, self.stage(progress), len(src.y)
        x = cat_inputs([src.x, tgt.x])
        inputs = x if isinstance(x, dict) else {"x": x}
        clips = {m: net.encode(inputs[m], n_src).frames for m, net in self.modalities.items()}     # v, [B, n, D]
        videos = {m: self.modalities[m].aggregate(c) for m, c in clips.items()}                    # V, [B, D]
        logits = self.arch.classify(torch.cat([videos[m] for m in self.modalities], dim=-1))     # late fusion
        terms, logs = {}, {"stage": float(stage)}
        if stage >= 2:
            terms["loss_y"] = F.cross_entropy(logits[:n_src], src.y)
        weight = 1.0 if stage == 1 else h["alpha"]
        if weight > 0:
            terms["loss_stcl"] = weight * self.stcl(inputs, clips, videos, src, tgt)
        if stage == 3 and h["beta"] > 0:
            terms["loss_vca"], logs["pseudo_labelled_batch"] = self.vca_term(clips, videos, src, tgt)
            terms["loss_vca"] = h["beta"] * terms["loss_vca"]
        self.bank.update("source", src.index, {m: c[:n_src] for m, c in clips.items()},
                         {m: v[:n_src] for m, v in videos.items()}, src.y)
        self.bank.update("target", tgt.index, {m: c[n_src:] for m, c in clips.items()},
                         {m: v[n_src:] for m, v in videos.items()})
        return terms, logs

    # --- STCL -------------------------------------------------------------------------------------------

    def stcl(self, inputs: dict[str, Tensor], clips: dict[str, Tensor], videos: dict[str, Tensor],
             src: LabelledBatch, tgt: UnlabelledBatch) -> Tensor:
        """Eq. 4 over the videos of ``stcl_domains`` of the batch."""
        h, n_src = self.hparams, len(src.y)
        rows = torch.cat([torch.arange(n_src) if "source" in h["stcl_domains"] else torch.zeros(0, dtype=torch.long),
                          torch.arange(n_src, len(videos[next(iter(videos))])) if "target" in h["stcl_domains"]
                          else torch.zeros(0, dtype=torch.long)]).to(src.y.device)
        losses = {}
        for m, net in self.modalities.items():
            others = [o for o in self.modalities if o != m]
            if others:            # two streams: the other modality's clips and video now, its bank's clips
                partner_clips, partner_video = clips[others[0]][rows], videos[others[0]][rows]
                pool = self.bank.clip_pool(others[0], clips[m])
            else:                 # one stream: the video's own bank entry is the other view
                partner_clips = self._own_memory(m, "clips", clips[m], src, tgt)[rows]
                partner_video = self._own_memory(m, "videos", videos[m], src, tgt)[rows]
                pool = self.bank.clip_pool(m, clips[m])
            draws = min(h["memory_negatives"], len(pool))     # with replacement, as CMC's sampler
            memory = pool[torch.randint(len(pool), (draws,), device=pool.device)] if draws else pool
            anchor_clips, anchor_video = clips[m][rows], videos[m][rows]
            kinds = self._kinds(inputs[m], net)
            negative_clips = self._negative_clips(inputs[m][rows], net, kinds)         # [R, n, J, D] or None
            count = anchor_clips.shape[1]
            clip_terms = clip_loss(anchor_clips.flatten(0, 1), anchor_video.repeat_interleave(count, dim=0),
                                   partner_clips.flatten(0, 1), memory.to(anchor_clips.device),
                                   None if negative_clips is None else negative_clips.flatten(0, 1), h["stcl_tau"])
            video_terms = video_loss(anchor_video, partner_video,
                                     self._negative_videos(anchor_clips, negative_clips, net, kinds), h["stcl_tau"])
            losses[m] = {"clip": clip_terms.view(len(rows), count), "video": video_terms}
        return contrastive_loss(losses, h["stcl_levels"])

    def _own_memory(self, m: str, key: str, current: Tensor, src: LabelledBatch, tgt: UnlabelledBatch) -> Tensor:
        """The batch videos' own bank entries (one stream's second view); a video not yet in the bank: its current
        features, as constants."""
        parts = []
        for domain, index, now in (("source", src.index, current[:len(src.y)]), ("target", tgt.index,
                                                                                  current[len(src.y):])):
            stored, filled = self.bank.entries(domain, index, key, m)
            if stored is None:
                parts.append(now.detach())
                continue
            mask = filled.to(now.device).view(-1, *[1] * (now.dim() - 1))
            parts.append(torch.where(mask, stored.to(now.device), now.detach()))
        return torch.cat(parts)

    def _kinds(self, x: Tensor, net: Architecture) -> list[str]:
        """The chosen intra-negative kinds this modality has; the others are logged once and skipped."""
        wanted, h = self.hparams["intra_negatives"], net.hparams
        available = {"temporal": h["clip_steps"] > 1, "spatial": x.dim() == 5, "order": h["aggregation"] != "mean"}
        # a clip negative puts a temporal or spatial negative clip into the video: one of them must be made
        available["clip"] = any(available[k] and k in wanted for k in ("temporal", "spatial"))
        reasons = {"temporal": "one cached step per clip (clip_steps=1) has no step order to shuffle",
                   "spatial": "pooled vectors have no spatial layout to flip (stcda-maps on cached maps has)",
                   "order": "a mean over clips does not see their order (§4.4)",
                   "clip": "no temporal or spatial negative clip is made to put into a video"}
        for kind in wanted:
            if not available[kind]:
                self._note(kind, f"STCL skips {kind} negatives: {reasons[kind]}")
        return [kind for kind in wanted if available[kind]]

    def _negative_clips(self, x: Tensor, net: Architecture, kinds: list[str]) -> Tensor | None:
        """Features of each clip's intra-negatives (temporal, spatial), [R, n, J, D], or None when there are none."""
        built = {"temporal": lambda: temporal_negatives(x, net.hparams["clip_steps"]),
                 "spatial": lambda: spatial_negatives(x, net.hparams["clip_steps"])}
        features = [net.encode(built[kind]()).frames for kind in ("temporal", "spatial") if kind in kinds]
        return torch.stack(features, dim=2) if features else None

    def _negative_videos(self, clips: Tensor, negative_clips: Tensor | None, net: Architecture,
                         kinds: list[str]) -> Tensor | None:
        """Intra-negative videos [R, J, D] (clip-order and clip negatives), or None when there are none."""
        videos = []
        if "order" in kinds:
            videos.append(net.aggregate(order_negatives(clips)))
        if "clip" in kinds and negative_clips is not None:   # None: temporal and spatial both left out
            pick = torch.randint(negative_clips.shape[2], (1,)).item()      # one kind of negative clip per batch
            videos.append(net.aggregate(clip_negatives(clips, negative_clips[:, :, pick])))
        return torch.stack(videos, dim=1) if videos else None

    def _note(self, key: str, message: str) -> None:
        if key not in self.noted:
            self.noted.add(key)
            log.info(message)

    # --- VCA --------------------------------------------------------------------------------------------

    def vca_term(self, clips: dict[str, Tensor], videos: dict[str, Tensor], src: LabelledBatch,
                 tgt: UnlabelledBatch) -> tuple[Tensor, float]:
        """Σ_m D_VCA (eq. 8) of the batch, target videos with the pseudo-label of their position (-1: none yet);
        and the fraction of the target batch that has one."""
        n_src, total, labelled = len(src.y), 0.0, []
        for m in self.modalities:
            table = self.pseudo.get("fused" if self.hparams["vca_fusion"] else m)
            if table is None:
                labels = torch.full((len(tgt.index),), -1, dtype=torch.long, device=src.y.device)
            else:
                inside = tgt.index.to(table.device) < len(table)
                labels = torch.where(inside, table[tgt.index.to(table.device).clamp(max=len(table) - 1)], -1)
                labels = labels.to(src.y.device)
            labelled.append((labels >= 0).float().mean().item())
            total = total + vca((clips[m][:n_src], videos[m][:n_src]), (clips[m][n_src:], videos[m][n_src:]),
                                src.y, labels, self.arch.num_classes, self.hparams["vca_kernel_mul"],
                                self.hparams["vca_kernel_num"])
        return total, min(labelled)


# ----------------------------------------------------------------------------------------------------------
# presets: the paper's schedule scaled to small data, and the ablations of Tables 4-6

_ON_STCDA = {"methods": ("stcda",), "architectures": ("stcda", "stcda-maps")}
register_preset(Preset("small-data", "§4.2's three stages scaled 1/25 (12 + 12 + 16 epochs, lr steps at 4 and 8 "
                       "epochs into a stage)", {"epochs": 40, "stcl_epochs": 12, "ce_epochs": 12,
                                                "stage_lr_steps": [4, 8]}, **_ON_STCDA))
register_preset(Preset("demo", "vidshift demo's 20 epochs: 6 + 6 + 8, lr steps at 2 and 4 epochs into a stage",
                       {"stcl_epochs": 6, "ce_epochs": 6, "stage_lr_steps": [2, 4]}, **_ON_STCDA))
ABLATIONS = {
    "stcl-only": ("Table 4 'STCL' (α = 2, β = 0): no VCA", {"beta": 0.0}),
    "vca-only": ("Table 4 'VCA' (α = 0, β = 0.5): no STCL, so no stage 1", {"alpha": 0.0, "stcl_epochs": 0}),
    "stcl-clip": ("Table 5 'Clip+VCA': the clip-level STCL term only", {"stcl_levels": ["clip"]}),
    "stcl-video": ("Table 5 'Video+VCA': the video-level STCL term only", {"stcl_levels": ["video"]}),
    "stcl-on-source": ("Table 5: STCL on source videos only", {"stcl_domains": ["source"]}),
    "stcl-on-target": ("Table 5: STCL on target videos only", {"stcl_domains": ["target"]}),
    "aggregation-mean": ("Table 6a 'Mean' video aggregation (no clip-order negatives)", {"aggregation": "mean"}),
    "aggregation-concat-fc": ("Table 6a 'Concat + FC' video aggregation", {"aggregation": "concat-fc"}),
    "vca-no-fusion": ("Table 6b 'w/o spatio-temporal fusion': each modality clusters alone", {"vca_fusion": False}),
    "fixed-pseudo-labels": ("Table 6c 'w/ fixed pseudo-labels': the first clustering kept",
                            {"pseudo_labels": "fixed"}),
}
for _name, (_help, _hparams) in ABLATIONS.items():
    register_preset(Preset(_name, _help, _hparams, **_ON_STCDA))
