"""STCDA's memory bank (§4.2, as CMC) and its target pseudo-labels (§3.2 steps 1-2), both over every training video.

**Memory bank** (:class:`MemoryBank`): for each domain ("source", "target") and modality, the L2-normalised clip
features [n, clips, D] and video features [n, D] of every training video, keyed by the video's position in its
training set (``LabelledBatch.index``), plus the source labels. An entry is updated as CMC's code does,
m <- normalise(μ·m + (1 - μ)·v̂), v̂ = v/‖v‖, μ = 0.5; the first write stores v̂ (CMC starts from random
vectors).
STCL draws its clip negatives from it (eq. 1's k other clips of the other modality) and VCA clusters it, so neither
needs a pass over the data of its own: the bank holds each video's features from the last time a batch held it.

**Pseudo-labels** (:func:`cluster_target`): K-means over the target videos' bank features, started at the source
class centres C_m^S and iterated to convergence or ``iterations``: (1) ŷ = argmin_c Σ_m ‖V̂_m - C_m,c‖ (the sum
over modalities is the paper's spatio-temporal fusion; without fusion each modality clusters alone), (2) C_m,c =
the centre of the target videos labelled c. The paper writes a centre as the *sum* Σ 1[y=c] V/‖V‖; we take the
mean (the K-means centre): with Euclidean assignment a sum would favour the largest classes. A class with no
video keeps its previous centre (a source class absent from the bank is never assigned). Target labels are never
read: the bank has no place for them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

DOMAINS = ("source", "target")


class MemoryBank:
    """Normalised clip and video features of every training video, per domain and modality (module docstring)."""

    def __init__(self, momentum: float):
        self.momentum = momentum
        # domain -> {"clips": {m: [n, clips, D]}, "videos": {m: [n, D]}, "filled": [n] bool, "labels": [n] int64}
        self.domains: dict[str, dict] = {}

    def __len__(self) -> int:
        return sum(len(bank["filled"]) for bank in self.domains.values())

    def filled(self, domain: str) -> Tensor:
        """Which positions of ``domain`` hold features ([n] bool; empty before the first update)."""
        return self.domains[domain]["filled"] if domain in self.domains else torch.zeros(0, dtype=torch.bool)

    def _grow(self, domain: str, size: int, clips: dict[str, Tensor], videos: dict[str, Tensor]) -> dict:
        """The domain's bank with room for ``size`` positions (new ones empty), on the features' device."""
        device = next(iter(videos.values())).device
        bank = self.domains.setdefault(domain, {
            "clips": {m: c.new_zeros((0, *c.shape[1:])) for m, c in clips.items()},
            "videos": {m: v.new_zeros((0, v.shape[1])) for m, v in videos.items()},
            "filled": torch.zeros(0, dtype=torch.bool, device=device),
            "labels": torch.full((0,), -1, dtype=torch.long, device=device)})
        for key in ("clips", "videos"):
            bank[key] = {m: t.to(device) for m, t in bank[key].items()}
        bank["filled"], bank["labels"] = bank["filled"].to(device), bank["labels"].to(device)
        extra = size - len(bank["filled"])
        if extra > 0:
            for key in ("clips", "videos"):
                bank[key] = {m: torch.cat([t, t.new_zeros((extra, *t.shape[1:]))]) for m, t in bank[key].items()}
            bank["filled"] = torch.cat([bank["filled"], bank["filled"].new_zeros(extra)])
            bank["labels"] = torch.cat([bank["labels"], bank["labels"].new_full((extra,), -1)])
        return bank

    @torch.no_grad()
    def update(self, domain: str, index: Tensor, clips: dict[str, Tensor], videos: dict[str, Tensor],
               labels: Tensor | None = None) -> None:
        """Write a batch: ``index`` [B] positions, clip features {m: [B, clips, D]}, video features {m: [B, D]}."""
        bank = self._grow(domain, int(index.max()) + 1, clips, videos)
        index = index.to(bank["filled"].device)
        seen = bank["filled"][index]
        for key, new in (("clips", clips), ("videos", videos)):
            for m, features in new.items():
                fresh = F.normalize(features.detach(), dim=-1)
                old = bank[key][m][index]
                mixed = F.normalize(self.momentum * old + (1 - self.momentum) * fresh, dim=-1)
                seen_shape = seen.view(-1, *[1] * (fresh.dim() - 1))
                bank[key][m][index] = torch.where(seen_shape, mixed, fresh)
        bank["filled"][index] = True
        if labels is not None:
            bank["labels"][index] = labels.to(bank["labels"].device)

    def entries(self, domain: str, index: Tensor, key: str, modality: str) -> tuple[Tensor, Tensor]:
        """(features of the positions ``index`` [B, ...], whether each is filled [B]); unknown positions are empty."""
        bank = self.domains.get(domain)
        if bank is None:
            return None, torch.zeros(len(index), dtype=torch.bool, device=index.device)
        inside = index < len(bank["filled"])
        safe = torch.where(inside, index, torch.zeros_like(index)).to(bank["filled"].device)
        return bank[key][modality][safe], bank["filled"][safe] & inside.to(bank["filled"].device)

    def clip_pool(self, modality: str, like: Tensor) -> Tensor:
        """Every filled clip feature of ``modality`` over both domains, [M, D] (eq. 1's candidates for negatives);
        [0, D] on ``like``'s device while the bank is empty."""
        pools = [bank["clips"][modality][bank["filled"]].flatten(0, -2) for bank in self.domains.values()]
        return torch.cat(pools) if pools else like.new_zeros((0, like.shape[-1]))

    def state(self) -> dict:
        return {"momentum": self.momentum, "domains": self.domains}

    def load(self, state: dict) -> None:
        self.momentum, self.domains = state["momentum"], state["domains"]


# ----------------------------------------------------------------------------------------------------------
# pseudo-labels (§3.2)


def class_centres(features: Tensor, labels: Tensor, num_classes: int,
                  previous: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per class the mean of the L2-normalised ``features`` [n, D] labelled ``labels`` [n] (-1: none), and which
    classes have a member [C]; an empty class keeps ``previous``'s centre (or zeros)."""
    members = F.one_hot(labels.clamp(min=0), num_classes).to(features.dtype) * (labels >= 0)[:, None]
    counts = members.sum(dim=0)
    centres = members.T @ F.normalize(features, dim=-1) / counts.clamp(min=1)[:, None]
    present = counts > 0
    if previous is not None:
        centres = torch.where(present[:, None], centres, previous)
    return centres, present


def assign(features: dict[str, Tensor], centres: dict[str, Tensor], usable: Tensor) -> Tensor:
    """Step (1): ŷ = argmin_c Σ_m ‖V̂_m - C_m,c‖ over the modalities given, classes ``usable`` [C] only."""
    distance = sum(torch.cdist(F.normalize(features[m], dim=-1), centres[m]) for m in features)   # [n, C]
    return distance.masked_fill(~usable, torch.inf).argmin(dim=1)


def cluster_target(target: dict[str, Tensor], source_centres: dict[str, Tensor], usable: Tensor,
                   iterations: int) -> tuple[Tensor, int]:
    """K-means of the target video features {m: [n, D]} started at the source centres {m: [C, D]} (steps 1-2
    until no label changes, at most ``iterations`` updates of the centres); returns (ŷ [n], updates made)."""
    centres = dict(source_centres)
    labels = assign(target, centres, usable)
    for done in range(iterations):
        centres = {m: class_centres(target[m], labels, len(usable), centres[m])[0] for m in target}
        relabelled = assign(target, centres, usable)
        if torch.equal(relabelled, labels):
            return labels, done + 1
        labels = relabelled
    return labels, iterations
