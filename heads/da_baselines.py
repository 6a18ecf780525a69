"""The image DA methods TA3N extends to videos (§7.3.3, Tables 3-4): DANN, JAN, AdaBN and MCD, as methods.

Each runs on any architecture (the paper's: TemPooling ``tempooling`` and TemRelation ``trn``) with TA3N's
optimiser and defaults; only the adaptation differs:

- ``dann``: Ĝsd after the spatial module and Ĝtd after the temporal module, no relation discriminator (§7.3.3):
  ``ta2n`` of ``ta3n.py`` with those two levels.
- ``jan``: JMMD (Long et al. 2017, eq. 9 biased estimate: :func:`jmmd`, :func:`mmd2`, :func:`multi_gaussian_kernel`)
  between source and target on the joint (video feature, class prediction).
- ``adabn``: per-domain batch-norm statistics of every BN layer of the architecture (Li et al. 2016).
- ``mcd``: a second classifier and MCD's three-step update (Saito et al. 2018, §3.2 steps A-C).

The kernel two-sample statistics JAN trains with are also what ``pipelines/diagnose.py`` measures MMD with.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from heads.architecture import Architecture
from heads.base import HeadError, HParam, Inputs, LabelledBatch, UnlabelledBatch, cat_inputs
from heads.method import Method, Preset, register_method, register_preset, require_target
from heads.ta3n import LEVELS, TA2N

DOMAINS = ("source", "target")


# ----------------------------------------------------------------------------------------------------------
# DANN


@register_method
class DANN(TA2N):
    """DANN (Ganin et al. 2016) as TA3N §7.3.3 integrates it: Ĝsd on frame features, Ĝtd on the video feature.

    It is TA2N without the relation discriminators ("for the fair comparison between TemPooling and
    TemRelation"), so on TemPooling it equals Table 6's "All Ĝd". λs and λt default to TA3N's §7.3 values with
    a constant GRL coefficient, as the official code runs its baselines (issue #23: ``adv_DA=RevGrad``, same
    script); DANN's own ramp is ``grl_schedule=dann``.
    """

    name = "dann"
    summary = "DANN: adversarial discriminators on frame and video features (TA3N §7.3.3)"
    HPARAMS = {
        **TA2N.HPARAMS,
        "discriminators": HParam(("frame", "video"), f"levels with an adversarial discriminator, among "
                                 f"{', '.join(LEVELS)}", "TA3N §7.3.3 (Ĝsd + Ĝtd)", choices=LEVELS),
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


def multi_gaussian_kernel(z: Tensor, kernel_mul: float, kernel_num: int,
                          bandwidth: float | None = None) -> Tensor:
    """Σ_i exp(-‖z_a - z_b‖² / b_i) over ``kernel_num`` bandwidths b_i = m · kernel_mul^(i - kernel_num // 2).

    m is ``bandwidth`` when given (JAN's code: 1.68 for the softmax layer), else the mean squared distance
    between distinct rows, treated as a constant (``guassian_kernel`` of JAN's and TA3N's code, as in DAN's
    multi-kernel MMD). When all rows are identical that mean is 0 (the code then returns NaN); it is clamped to
    the smallest positive normal float, so every kernel value is exp(0) = 1, the value at any positive bandwidth.
    """
    distances = squared_distances(z)
    if bandwidth is None:
        n = len(z)
        base = (distances.detach().sum() / (n * n - n)).clamp(min=torch.finfo(z.dtype).tiny)
    else:
        base = torch.tensor(bandwidth, dtype=z.dtype, device=z.device)
    exponents = torch.arange(kernel_num, device=z.device) - kernel_num // 2
    bandwidths = base * kernel_mul ** exponents.to(z.dtype)
    return torch.exp(-distances[None] / bandwidths[:, None, None]).sum(dim=0)


# (kernel_mul, kernel_num, fixed bandwidth or None) per JMMD layer: (video feature, class prediction)
JMMD_KERNELS: dict[str, tuple[tuple[float, int, float | None], ...]] = {
    # JAN's official code (thuml/Xlearn, pytorch/src/loss.py JAN: kernel_nums [5, 1], fix_sigma [None, 1.68])
    "jan": ((2.0, 5, None), (2.0, 1, 1.68)),
    # TA3N's main.py: kernel_nums [2, 5] over feat_source[:-1], which is [prediction, video feature] (models.py
    # returns its feature list reversed), so 5 kernels on the feature and 2 on the prediction
    "ta3n-code": ((2.0, 5, None), (2.0, 2, None)),
}


def jmmd(layers: list[Tensor], n_source: int,
         kernels: tuple[tuple[float, int, float | None], ...] = JMMD_KERNELS["jan"]) -> Tensor:
    """Joint MMD² (JAN eq. 9, biased estimate): the MMD² of the product of each layer's kernel matrix.

    ``layers`` hold [source; target] rows (the first ``n_source`` are source). Source and target may differ
    in size (the official codes truncate both to the smaller batch; with equal sizes the two agree).
    """
    joint = None
    for z, (kernel_mul, kernel_num, bandwidth) in zip(layers, kernels, strict=True):
        kernel = multi_gaussian_kernel(z, kernel_mul, kernel_num, bandwidth)
        joint = kernel if joint is None else joint * kernel
    return mmd2(joint, n_source)


@register_method
class JAN(Method):
    """JAN (Long et al. 2017) as TA3N §7.3.3: JMMD on the video representation z and the class prediction.

    Loss: L_y (+ the architecture's terms) + jmmd_weight · JMMD²(source, target) over the joint (z, softmax(ŷ)).
    ``jmmd_kernels`` names the kernels: ``jan`` (default), JAN's official code: 5 Gaussians for z with
    bandwidths mean squared distance × 2^k, k ∈ -2..2, and one Gaussian of fixed bandwidth 1.68 for the
    softmax; ``ta3n-code``: TA3N's code, 5 such Gaussians for z and 2 (k ∈ -1..0) for the prediction.
    Deviations: JAN's code uses the linear-time estimator, TA3N's code and this one the biased quadratic
    estimate; TA3N's code feeds the logits to JMMD (``jmmd_prediction=logits``); both codes truncate source
    and target to the smaller batch, here all videos count.
    """

    name = "jan"
    needs = frozenset({"encoder"})    # aligning or shaping fixed features would change nothing
    summary = "JAN: joint MMD of video features and class predictions (TA3N §7.3.3)"
    settings = frozenset({"da"})
    HPARAMS = {
        "jmmd_weight": HParam(1.0, "weight of the JMMD loss", "JAN; TLlib jan.py (--trade-off 1)",
                              interval="[0, inf)"),
        "jmmd_prediction": HParam("softmax", "class prediction layer entering JMMD: softmax (JAN) or logits "
                                  "(official TA3N code)", "JAN §4; TA3N code main.py", choices=("softmax", "logits")),
        "jmmd_kernels": HParam("jan", "Gaussian kernels per JMMD layer: jan (JAN's code: 5 at the mean distance "
                               "for z, 1 of bandwidth 1.68 for ŷ) or ta3n-code (5 for z, 2 for ŷ)",
                               "JAN code, thuml/Xlearn loss.py; TA3N code main.py", choices=tuple(JMMD_KERNELS)),
    }

    def objective(self, src: LabelledBatch, tgt: UnlabelledBatch | None,
                  progress: float) -> tuple[dict[str, Tensor], dict[str, float]]:
        """L_y + weight · JMMD², source and target through the model together."""
        tgt = require_target(self, tgt)
        encoding = self.arch.encode(cat_inputs([src.x, tgt.x]), split=len(src.y))
        video = self.arch.aggregate(encoding.parts)
        logits = self.arch.classify(video)
        terms = self.supervised_terms(encoding, logits, src.y)
        h = self.hparams
        prediction = logits.softmax(dim=1) if h["jmmd_prediction"] == "softmax" else logits
        terms["loss_jmmd"] = h["jmmd_weight"] * jmmd([video, prediction], len(src.y), JMMD_KERNELS[h["jmmd_kernels"]])
        return terms, {}


# `vidshift demo` (72 source videos, batches of 8): at weight 1 JMMD swamps L_y, source val stays at chance
register_preset(Preset("demo", "small-data JAN: JMMD weight 0.1", {"jmmd_weight": 0.1}, methods=("jan",)))


# ----------------------------------------------------------------------------------------------------------
# AdaBN


@register_method
class AdaBN(Method):
    """AdaBN (Li et al. 2016) as TA3N §7.3.3: every BN layer of the architecture keeps statistics per domain.

    The source statistics live in the BN modules themselves; the target ones in this method's buffers
    (``target_statistics``), swapped into the modules for a target pass and back out after it. So between
    calls the architecture holds the source statistics, and ``state_dict`` holds both: save and resume are exact.
    On ``tempooling`` / ``trn`` the BN is G_sf's (``frame_norm=batch``, which this method turns on by default).

    Training: the target batch goes through ``arch.encode`` in train mode without gradients, normalised with its
    own batch statistics, which updates the target running statistics (AdaBN adds no loss); then L_y on the
    source batch with the source statistics. Evaluation normalises with the statistics of the domain named by
    :meth:`set_eval_domain`: the target by default, since DA evaluation is on the target; the trainer names
    "source" for source val.
    Deviations: the statistics are running averages over training (momentum 0.1, as PyTorch and TA3N's code),
    not recomputed over the whole target set after training as in AdaBN; the affine transform is shared by both
    domains as in AdaBN, where TA3N's code keeps two BN layers whose target affine never gets a gradient.
    """

    name = "adabn"
    summary = "AdaBN: per-domain batch-norm statistics in every BN layer of the architecture (TA3N §7.3.3)"
    settings = frozenset({"da"})
    needs = frozenset({"batchnorm"})
    ARCH_DEFAULTS = {"frame_norm": "batch"}

    def __init__(self, arch: Architecture, hparams: dict):
        super().__init__(arch, hparams)
        self.norms = [m for m in arch.modules() if isinstance(m, _BatchNorm)]
        if not self.norms or any(norm.running_mean is None for norm in self.norms):
            raise HeadError(f"method '{self.name}' needs batch-norm layers that track running statistics")
        self.target_statistics = nn.Module()   # a buffer holder: the target twin of every BN's running statistics
        for i, norm in enumerate(self.norms):
            for name, source in self._statistics(norm).items():
                self.target_statistics.register_buffer(f"{name}_{i}", source.detach().clone())
        self.held_domain = "source"     # whose statistics the BN modules hold now
        self.eval_domain = "target"

    @staticmethod
    def _statistics(norm: _BatchNorm) -> dict[str, Tensor]:
        return {"mean": norm.running_mean, "var": norm.running_var, "batches": norm.num_batches_tracked}

    @contextmanager
    def domain_statistics(self, domain: str) -> Iterator[None]:
        """Within the block every BN layer holds ``domain``'s running statistics (updates stay with it)."""
        if domain not in DOMAINS:
            raise HeadError(f"method '{self.name}': domain must be one of {DOMAINS}, got {domain!r}")
        if domain == self.held_domain:   # already in place (the source's, or a nested call)
            yield
            return
        self._swap()
        try:
            yield
        finally:
            self._swap()

    @torch.no_grad()
    def _swap(self) -> None:
        """Exchange the modules' statistics with the target buffers, in place."""
        self.held_domain = "target" if self.held_domain == "source" else "source"
        for i, norm in enumerate(self.norms):
            for name, inside in self._statistics(norm).items():
                outside = getattr(self.target_statistics, f"{name}_{i}")
                kept = inside.clone()
                inside.copy_(outside)
                outside.copy_(kept)

    def set_eval_domain(self, domain: str) -> None:
        if domain not in DOMAINS:
            raise HeadError(f"method '{self.name}': eval domain must be one of {DOMAINS}, got {domain!r}")
        self.eval_domain = domain

    def objective(self, src: LabelledBatch, tgt: UnlabelledBatch | None,
                  progress: float) -> tuple[dict[str, Tensor], dict[str, float]]:
        """Refresh the target statistics with the target batch, then L_y on the source batch (source statistics)."""
        tgt = require_target(self, tgt)
        with torch.no_grad(), self.domain_statistics("target"):
            self.arch.features(tgt.x)     # the whole way to z: every BN layer before the classifier sees the target
        encoding = self.arch.encode(src.x)
        logits = self.arch.classify(self.arch.aggregate(encoding.parts))
        return self.supervised_terms(encoding, logits, src.y), {}

    def predict(self, x: Inputs) -> Tensor:
        with self.domain_statistics(self.eval_domain):
            return self.arch(x)

    def features(self, x: Inputs) -> Tensor:
        with self.domain_statistics(self.eval_domain):
            return self.arch.features(x)

    def diagnostics(self, x: Inputs) -> dict[str, float]:
        with self.domain_statistics(self.eval_domain):
            return super().diagnostics(x)


# ----------------------------------------------------------------------------------------------------------
# MCD


@register_method
class MCD(Method):
    """MCD (Saito et al. 2018) as TA3N §7.3.3: a second classifier G'_y, and MCD's three steps per update.

    Generator G = every architecture parameter but the classifier's, classifiers F1 = G_y and
    F2 = G'_y (``arch.new_classifier()``), discrepancy d = mean |softmax F1 - softmax F2|.
    A: G, F1, F2 minimise the source loss. B: with G fixed, F1, F2 minimise the source loss minus d on target.
    C: with F1, F2 fixed, G minimises d on target, ``generator_steps`` times. Prediction: F1 (as the code).
    G and the classifiers have their own optimisers (MCD's code: one each). The architecture's own loss terms
    (STDN's) join step A's generator loss, the one step that trains G on source labels. Deviation from TA3N's code, which replaces the three
    steps by one: a GRL (coefficient mu, 0 in its script) before the classifiers and -d added to the loss.
    """

    name = "mcd"
    needs = frozenset({"encoder"})    # its generator: the layers before the classifier
    summary = "MCD: two classifiers, maximum classifier discrepancy (TA3N §7.3.3)"
    settings = frozenset({"da"})
    HPARAMS = {
        "generator_steps": HParam(4, "n: generator updates (step C) per iteration", "MCD §4 (n = 4; code num_k)",
                                  interval="[1, inf)"),
    }

    def __init__(self, arch: Architecture, hparams: dict):
        super().__init__(arch, hparams)
        self.classifier2 = arch.new_classifier()                                                    # G'_y

    def param_groups(self) -> list[list[nn.Parameter]]:
        """[generator G, classifiers F1 + F2]."""
        classifier = {id(p) for p in self.arch.classifier_parameters()}
        generator = [p for p in self.arch.parameters() if id(p) not in classifier]
        return [generator, [*self.arch.classifier_parameters(), *self.classifier2.parameters()]]

    def source_loss(self, video: Tensor, labels: Tensor) -> Tensor:
        return F.cross_entropy(self.arch.classify(video), labels) + F.cross_entropy(self.classifier2(video), labels)

    def discrepancy(self, video: Tensor) -> Tensor:
        return (self.arch.classify(video).softmax(dim=1) - self.classifier2(video).softmax(dim=1)).abs().mean()

    def step_a(self, src: LabelledBatch, progress: float) -> dict[str, float]:
        """A: G and both classifiers on the source loss, each stepped by its optimiser from the same batch."""
        generator, classifiers = self.optimizers
        encoding = self.arch.encode(src.x)
        video = self.arch.aggregate(encoding.parts)
        own_terms = self.arch.aux_losses(encoding, src.y)
        self.step(generator, self.source_loss(video, src.y) + sum(own_terms.values()), progress)
        loss = self.source_loss(video.detach(), src.y)   # same features, now for the classifiers' gradient
        return {"loss_a": loss.item(), **{name: term.item() for name, term in own_terms.items()},
                **self.step(classifiers, loss, progress)}

    def step_b(self, src: LabelledBatch, tgt: UnlabelledBatch, progress: float) -> dict[str, float]:
        """B: G fixed; the classifiers keep the source loss low while maximising their discrepancy on target."""
        with torch.no_grad():
            source, target = self.arch.features(src.x), self.arch.features(tgt.x)
        discrepancy = self.discrepancy(target)
        loss = self.source_loss(source, src.y) - discrepancy
        self.step(self.optimizers[1], loss, progress)
        return {"loss_b": loss.item(), "discrepancy_b": discrepancy.item()}

    def step_c(self, tgt: UnlabelledBatch, progress: float) -> dict[str, float]:
        """C: classifiers fixed; G minimises their discrepancy on target, ``generator_steps`` times."""
        for _ in range(self.hparams["generator_steps"]):
            discrepancy = self.discrepancy(self.arch.features(tgt.x))
            logs = self.step(self.optimizers[0], discrepancy, progress)
        return {"discrepancy_c": discrepancy.item(), "grad_norm_c": logs["grad_norm"]}

    def update(self, src: LabelledBatch, tgt: UnlabelledBatch | None, progress: float) -> dict[str, float]:
        """Steps A, B, C in turn; ``loss`` is step A's source loss."""
        tgt = require_target(self, tgt)
        logs = {**self.step_a(src, progress), **self.step_b(src, tgt, progress), **self.step_c(tgt, progress)}
        return {"loss": logs["loss_a"], **logs}


# `vidshift demo` (72 source videos, batches of 8), seed 0: n = 4 leaves source val at 29 %, n = 1 reaches 62 %
register_preset(Preset("demo", "small-data MCD: one generator step", {"generator_steps": 1}, methods=("mcd",)))
