"""The image DA methods TA3N extends to videos (§7.3.3, Tables 3-4): DANN, JAN, AdaBN and MCD.

Each runs on TemPooling or TemRelation (``temporal=pooling|relation``, ``VideoModel`` in ``ta3n.py``), with
TA3N's video model, optimiser and defaults; only the adaptation differs:

- ``dann``: Ĝsd after the spatial module and Ĝtd after the temporal module, no relation discriminator (§7.3.3).
- ``jan``: JMMD (Long et al. 2017) between source and target on the joint (video feature, class prediction).
- ``adabn``: batch normalisation in the spatial module with per-domain statistics (Li et al. 2016).
- ``mcd``: a second classifier and MCD's three-step update (Saito et al. 2018).

Also the kernel two-sample statistics JAN trains with, which ``pipelines/diagnose.py`` reuses to measure MMD.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from heads.base import HeadError, HParam, LabelledBatch, UnlabelledBatch, register
from heads.common import init_normal_
from heads.ta3n import LEVELS, TA2N, VideoModel, require_target

DOMAINS = ("source", "target")


# ----------------------------------------------------------------------------------------------------------
# DANN


@register
class DANN(TA2N):
    """DANN (Ganin et al. 2016) as TA3N §7.3.3 integrates it: Ĝsd on frame features, Ĝtd on the video feature.

    It is TA2N without the relation discriminators ("for the fair comparison between TemPooling and
    TemRelation"), so on TemPooling it equals Table 6's "All Ĝd". λs and λt default to TA3N's §7.3 values with
    a constant GRL coefficient, as the official code runs its baselines (issue #23: ``adv_DA=RevGrad``, same
    script); DANN's own ramp is ``grl_schedule=dann``.
    """

    name = "dann"
    summary = "DANN on TemPooling/TemRelation: adversarial discriminators on frame and video features (TA3N §7.3.3)"
    HPARAMS = {
        **TA2N.HPARAMS,
        "discriminators": HParam(("frame", "video"), f"levels with an adversarial discriminator, among "
                                 f"{', '.join(LEVELS)}", "TA3N §7.3.3 (Ĝsd + Ĝtd)"),
    }


# ----------------------------------------------------------------------------------------------------------
# JAN


def squared_distances(z: Tensor) -> Tensor:
    """Pairwise squared Euclidean distances [n, n] of the rows of ``z`` [n, d] (clamped at 0 against rounding).

    The rows are centred first (distances do not change): without it, ‖a‖² + ‖b‖² - 2 a·b cancels badly and
    identical float32 rows of 256 values near 1 come out ~1e-4 apart; centred, they are exactly 0 apart.
    """
    z = z - z.mean(dim=0)
    norms = z.pow(2).sum(dim=1)
    return (norms[:, None] + norms[None, :] - 2.0 * z @ z.T).clamp(min=0.0)


def mmd2(kernel: Tensor, n_source: int) -> Tensor:
    """Biased MMD² from the kernel matrix of [source; target]: mean K_ss + mean K_tt - 2 mean K_st."""
    source, target = slice(None, n_source), slice(n_source, None)
    return kernel[source, source].mean() + kernel[target, target].mean() - 2.0 * kernel[source, target].mean()


def multi_gaussian_kernel(z: Tensor, kernel_mul: float, kernel_num: int) -> Tensor:
    """Σ_i exp(-‖z_a - z_b‖² / b_i) over ``kernel_num`` bandwidths b_i = m · kernel_mul^(i - kernel_num // 2).

    m is the mean squared distance between distinct rows, treated as a constant (TA3N code,
    ``loss.guassian_kernel``, as in DAN/JAN's multi-kernel MMD). When all rows are identical m = 0 (the code
    then returns NaN); m is clamped to the smallest positive normal float, so every kernel value is exp(0) = 1,
    the value at any positive bandwidth.
    """
    distances = squared_distances(z)
    n = len(z)
    mean = (distances.detach().sum() / (n * n - n)).clamp(min=torch.finfo(z.dtype).tiny)
    exponents = torch.arange(kernel_num, device=z.device) - kernel_num // 2
    bandwidths = mean * kernel_mul ** exponents.to(z.dtype)
    return torch.exp(-distances[None] / bandwidths[:, None, None]).sum(dim=0)


# (kernel_mul, kernel_num) per JMMD layer, as TA3N's code: (video feature, class prediction)
JMMD_KERNELS = ((2.0, 5), (2.0, 2))


def jmmd(layers: list[Tensor], n_source: int, kernels=JMMD_KERNELS) -> Tensor:
    """Joint MMD² (JAN eq. 9, biased estimate): the MMD² of the product of each layer's kernel matrix.

    ``layers`` hold [source; target] rows (the first ``n_source`` are source). Source and target may differ
    in size (the official code truncates both to the smaller batch; with equal sizes the two agree).
    """
    joint = None
    for z, (kernel_mul, kernel_num) in zip(layers, kernels, strict=True):
        kernel = multi_gaussian_kernel(z, kernel_mul, kernel_num)
        joint = kernel if joint is None else joint * kernel
    return mmd2(joint, n_source)


@register
class JAN(VideoModel):
    """JAN (Long et al. 2017) as TA3N §7.3.3: JMMD on the final video representation and the class prediction.

    Loss: L_y + jmmd_weight · JMMD²(source, target) over the joint (h, softmax(ŷ)), each with TA3N's code's
    multi-kernel Gaussians (bandwidths around the mean squared distance: 5 kernels for h, 2 for ŷ).
    Deviations: the official code feeds the logits to JMMD (``jmmd_prediction=logits``) where JAN uses the
    softmax; it truncates source and target to the smaller batch, here all videos count.
    """

    name = "jan"
    summary = "JAN on TemPooling/TemRelation: joint MMD of video features and class predictions (TA3N §7.3.3)"
    settings = frozenset({"da"})
    HPARAMS = {
        **VideoModel.HPARAMS,
        "jmmd_weight": HParam(1.0, "weight of the JMMD loss", "JAN; TLlib jan.py (--trade-off 1)"),
        "jmmd_prediction": HParam("softmax", "class prediction layer entering JMMD: softmax (JAN) or logits "
                                  "(official TA3N code)", "JAN §4; TA3N code main.py", choices=("softmax", "logits")),
    }
    # `vidshift demo` (72 source videos, batches of 8): at weight 1 JMMD swamps L_y, source val stays at chance
    PRESETS = {"demo": {"jmmd_weight": 0.1}}

    def update(self, src: LabelledBatch, tgt: UnlabelledBatch | None, progress: float) -> dict[str, float]:
        """One SGD step on L_y + weight · JMMD², source and target through the model together."""
        tgt = require_target(self, tgt)
        video = self.video_features(torch.cat([src.x, tgt.x]))
        logits = self.classifier(video)
        n_source = len(src.y)
        loss_y = F.cross_entropy(logits[:n_source], src.y)
        prediction = logits.softmax(dim=1) if self.hparams["jmmd_prediction"] == "softmax" else logits
        loss_jmmd = self.hparams["jmmd_weight"] * jmmd([video, prediction], n_source)
        loss = loss_y + loss_jmmd
        return {"loss": loss.item(), "loss_y": loss_y.item(), "loss_jmmd": loss_jmmd.item(),
                **self.optimizer_step(self.optimizer, loss, progress)}


# ----------------------------------------------------------------------------------------------------------
# AdaBN


class DomainBatchNorm(nn.Module):
    """Batch normalisation with running statistics per domain and one shared affine transform (AdaBN)."""

    def __init__(self, dim: int):
        super().__init__()
        self.statistics = nn.ModuleDict({domain: nn.BatchNorm1d(dim, affine=False) for domain in DOMAINS})
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor, domain: str) -> Tensor:
        """[..., dim]: every row (every frame of every video, as the official code) is one BN sample."""
        flat = x.reshape(-1, x.shape[-1])
        return (self.statistics[domain](flat) * self.weight + self.bias).view_as(x)


class AdaptiveFrameMLP(nn.Module):
    """G_sf with AdaBN: Linear -> DomainBatchNorm -> ReLU -> Dropout (the BN where TA3N's code puts it)."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float):
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim)
        self.norm = DomainBatchNorm(out_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, domain: str) -> Tensor:
        return self.dropout(F.relu(self.norm(self.linear(x), domain)))


@register
class AdaBN(VideoModel):
    """AdaBN (Li et al. 2016) as TA3N §7.3.3: an adaptive BN layer in G_sf, statistics kept per domain.

    Training: source batches are normalised with their own statistics and update the source running
    statistics; target batches pass through G_sf only, to update the target ones (AdaBN adds no loss; L_y on
    source only). Evaluation normalises with the statistics of the domain named by :meth:`set_eval_domain`:
    the target by default, since DA evaluation is on the target; the trainer names "source" for source val.
    Deviations: the statistics are running averages over training (momentum 0.1, as PyTorch and the code),
    not recomputed over the whole target set after training as in AdaBN; the affine transform is shared by
    both domains as in AdaBN, where TA3N's code keeps two BN layers whose target affine never gets a gradient.
    """

    name = "adabn"
    summary = "AdaBN on TemPooling/TemRelation: per-domain batch-norm statistics in the frame MLP (TA3N §7.3.3)"
    settings = frozenset({"da"})

    def __init__(self, feat_shape: tuple[int, ...], num_classes: int, num_segments: int, hparams: dict):
        super().__init__(feat_shape, num_classes, num_segments, hparams)
        h = self.hparams
        self.frame_mlp = AdaptiveFrameMLP(self.feat_shape[0], h["frame_dim"], h["dropout_frame"])  # replaces G_sf
        if h["init_std"] > 0:
            init_normal_(self.frame_mlp, h["init_std"])
        self.eval_domain = "target"
        (self.optimizer,) = self.replace_optimizers(self.parameters())

    def set_eval_domain(self, domain: str) -> None:
        if domain not in DOMAINS:
            raise HeadError(f"head '{self.name}': eval domain must be one of {DOMAINS}, got {domain!r}")
        self.eval_domain = domain

    def video_features(self, x: Tensor, domain: str | None = None) -> Tensor:
        """[B, N, C] -> [B, D], normalised with ``domain``'s statistics (default: the eval domain)."""
        return self.temporal(self.frame_mlp(x, domain or self.eval_domain))

    def update(self, src: LabelledBatch, tgt: UnlabelledBatch | None, progress: float) -> dict[str, float]:
        """Refresh the target statistics, then one SGD step on L_y (source statistics)."""
        tgt = require_target(self, tgt)
        with torch.no_grad():
            self.frame_mlp(tgt.x, "target")
        loss = F.cross_entropy(self.classifier(self.video_features(src.x, "source")), src.y)
        return {"loss": loss.item(), **self.optimizer_step(self.optimizer, loss, progress)}


# ----------------------------------------------------------------------------------------------------------
# MCD


@register
class MCD(VideoModel):
    """MCD (Saito et al. 2018) as TA3N §7.3.3: a second classifier G'_y, and MCD's three steps per update.

    Generator G = G_sf + G_tf, classifiers F1 = G_y and F2 = G'_y, discrepancy d = mean |softmax F1 - softmax F2|.
    A: G, F1, F2 minimise the source loss. B: with G fixed, F1, F2 minimise the source loss minus d on target.
    C: with F1, F2 fixed, G minimises d on target, ``generator_steps`` times. Prediction: F1 (as the code).
    G and the classifiers have their own SGD optimisers (MCD's code: one each). Deviation from TA3N's code,
    which replaces the three steps by one: a GRL (coefficient mu, 0 in its script) before the classifiers and
    -d added to the loss.
    """

    name = "mcd"
    summary = "MCD on TemPooling/TemRelation: two classifiers, maximum classifier discrepancy (TA3N §7.3.3)"
    settings = frozenset({"da"})
    HPARAMS = {
        **VideoModel.HPARAMS,
        "generator_steps": HParam(4, "n: generator updates (step C) per iteration", "MCD §4 (n = 4; code num_k)"),
    }
    # `vidshift demo` (72 source videos, batches of 8), seed 0: n = 4 leaves source val at 29 %, n = 1 reaches 62 %
    PRESETS = {"demo": {"generator_steps": 1}}

    def __init__(self, feat_shape: tuple[int, ...], num_classes: int, num_segments: int, hparams: dict):
        super().__init__(feat_shape, num_classes, num_segments, hparams)
        h = self.hparams
        self.classifier2 = nn.Sequential(nn.Dropout(h["dropout_video"]),                          # G'_y
                                         nn.Linear(self.classifier[1].in_features, num_classes))
        if h["init_std"] > 0:
            init_normal_(self.classifier2, h["init_std"])
        del self.optimizer   # two optimisers instead of TemPooling's one
        generator = [*self.frame_mlp.parameters(), *self.temporal.parameters()]
        classifiers = [*self.classifier.parameters(), *self.classifier2.parameters()]
        self.generator_optimizer, self.classifier_optimizer = self.replace_optimizers(generator, classifiers)

    def source_loss(self, video: Tensor, labels: Tensor) -> Tensor:
        return F.cross_entropy(self.classifier(video), labels) + F.cross_entropy(self.classifier2(video), labels)

    def discrepancy(self, video: Tensor) -> Tensor:
        return (self.classifier(video).softmax(dim=1) - self.classifier2(video).softmax(dim=1)).abs().mean()

    def step_a(self, src: LabelledBatch, progress: float) -> dict[str, float]:
        """A: G and both classifiers on the source loss, each stepped by its optimiser from the same batch."""
        video = self.video_features(src.x)
        self.optimizer_step(self.generator_optimizer, self.source_loss(video, src.y), progress)
        loss = self.source_loss(video.detach(), src.y)   # same features, now for the classifiers' gradient
        return {"loss_a": loss.item(), **self.optimizer_step(self.classifier_optimizer, loss, progress)}

    def step_b(self, src: LabelledBatch, tgt: UnlabelledBatch, progress: float) -> dict[str, float]:
        """B: G fixed; the classifiers keep the source loss low while maximising their discrepancy on target."""
        with torch.no_grad():
            source, target = self.video_features(src.x), self.video_features(tgt.x)
        discrepancy = self.discrepancy(target)
        loss = self.source_loss(source, src.y) - discrepancy
        self.optimizer_step(self.classifier_optimizer, loss, progress)
        return {"loss_b": loss.item(), "discrepancy_b": discrepancy.item()}

    def step_c(self, tgt: UnlabelledBatch, progress: float) -> dict[str, float]:
        """C: classifiers fixed; G minimises their discrepancy on target, ``generator_steps`` times."""
        for _ in range(self.hparams["generator_steps"]):
            discrepancy = self.discrepancy(self.video_features(tgt.x))
            logs = self.optimizer_step(self.generator_optimizer, discrepancy, progress)
        return {"discrepancy_c": discrepancy.item(), "grad_norm_c": logs["grad_norm"]}

    def update(self, src: LabelledBatch, tgt: UnlabelledBatch | None, progress: float) -> dict[str, float]:
        tgt = require_target(self, tgt)
        logs = {**self.step_a(src, progress), **self.step_b(src, tgt, progress), **self.step_c(tgt, progress)}
        return {"loss": logs["loss_a"], **logs}
