"""M-ADA (Qiao et al., CVPR 2020, §3 and Algorithm 1; official code ``joffery/M-ADA`` ``main_Digits.py``).

ADA's surrogate (``heads/ada.py``) plus β L_relax, the reconstruction error of a Wasserstein auto-encoder:
:func:`relaxation`, the WAE :class:`WAE` (WAE-MMD, Tolstikhin et al. ICLR 2018, Algorithm 2: :func:`wae_loss`,
:func:`imq_mmd2`); the meta-learning update (meta-train on the source, one inner SGD step, meta-test on the
augmented domains, the outer loss their sum): :meth:`MADA.objective`. STDN Table 1 (from VideoDG/APN) reports it.

Forced by the cache: the perturbations act on cached features and the WAE models the segment-mean input feature,
not the image.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from heads.ada import ADA, take
from heads.architecture import Architecture
from heads.base import HParam, Inputs, LabelledBatch, UnlabelledBatch, batch_size, lr_factor, map_inputs
from heads.common import mlp
from heads.fusion import LateFusion
from heads.method import register_method


def pooled_inputs(x: Inputs) -> Tensor:
    """[B, C_total]: each video's input features averaged over segments (and positions), streams side by side."""
    tensors = list(x.values()) if isinstance(x, dict) else [x]
    return torch.cat([t.flatten(1, -2).mean(dim=1) for t in tensors], dim=-1)


def input_width(arch: Architecture) -> int:
    """The width of :func:`pooled_inputs` for ``arch``'s inputs: the channels of each stream, summed."""
    archs = arch.streams.values() if isinstance(arch, LateFusion) else [arch]
    return sum(a.feat_shape[-1] for a in archs)


class WAE(nn.Module):
    """A Wasserstein auto-encoder V = decoder ∘ encoder over pooled input features (M-ADA code: 400-20-400 MLPs;
    its decoder ends in a sigmoid for pixels in [0, 1], here linear for unbounded features)."""

    def __init__(self, dim: int, hidden: int, latent: int):
        super().__init__()
        self.encoder = mlp(dim, hidden, latent)
        self.decoder = mlp(latent, hidden, dim)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The reconstruction V(x) [B, dim] and the code [B, latent]."""
        code = self.encoder(x)
        return self.decoder(code), code

    def reset_parameters(self) -> None:
        for layer in self.modules():
            if isinstance(layer, nn.Linear):
                layer.reset_parameters()


def imq_mmd2(a: Tensor, b: Tensor) -> Tensor:
    """Unbiased MMD² between samples a [n, d] and b [n, d] with the inverse multiquadratics kernel
    k(u, v) = C / (C + ‖u - v‖²), C = 2 d (WAE-MMD, Tolstikhin et al. Algorithm 2 and §4, prior N(0, I))."""
    n, dim = a.shape
    scale = 2.0 * dim

    def kernel(u: Tensor, v: Tensor) -> Tensor:
        return scale / (scale + torch.cdist(u, v).pow(2))

    off_diagonal = 1.0 - torch.eye(n, device=a.device, dtype=a.dtype)
    within = ((kernel(a, a) + kernel(b, b)) * off_diagonal).sum() / (n * (n - 1))
    return within - 2.0 * kernel(a, b).mean()


def wae_loss(wae: WAE, x: Tensor, mmd_weight: float) -> Tensor:
    """WAE-MMD's objective on a batch: mean ‖x - V(x)‖² + λ MMD²(codes, N(0, I) samples) (Tolstikhin Algorithm 2)."""
    reconstruction, code = wae(x)
    return (x - reconstruction).pow(2).sum(dim=1).mean() + mmd_weight * imq_mmd2(code, torch.randn_like(code))


def relaxation(wae: WAE, x: Inputs) -> Tensor:
    """M-ADA's L_relax per video [B]: ‖x̄ - V(x̄)‖², the WAE's squared reconstruction error of the pooled input."""
    pooled = pooled_inputs(x)
    return (pooled - wae(pooled)[0]).pow(2).sum(dim=1)


@register_method
class MADA(ADA):
    """M-ADA (Qiao et al. 2020, Algorithm 1; official code ``joffery/M-ADA``, ``main_Digits.py``). The paper's text
    was not at hand for this port, so no equation numbers are cited: the structure and values follow the code.

    Domain augmentation: ADA's max phase (:class:`ADA`) with the ascent objective
    ℓ(θ; x', y) - γ ½‖z' - z‖² + β L_relax(x'), where L_relax is the squared reconstruction error of a WAE fitted
    to the previous domain (the source for the first phase, then the latest augmented domain: the code re-trains
    it so each new domain moves away from the last), so maximising it pushes x' out of that domain.

    Meta-learning (once an augmented domain exists; plain ERM before): meta-train L_src(θ) on the source batch
    (the architecture's own losses included), one inner SGD step θ' = θ - α ∇θ L_src(θ) kept in the graph
    (second order, as the code's ``create_graph=True``), meta-test L_aug(θ') on a batch as large drawn from all
    augmented domains, and an outer step on L_src(θ) + L_aug(θ'). The augmented examples are therefore not handed to
    the trainer (:meth:`extra_examples` is None): they are the meta-test domains.

    Deviations: as ADA's, plus: the WAE is over the segment-mean input feature, not the image; it is a WAE-MMD
    (IMQ kernel, N(0, I) prior) where the code trains a WAE-GAN; L_relax is the reconstruction error of x' as the
    paper writes it, where the code takes ‖V(x') - V(x)‖²; the max phases perturb the source set only (the code
    mixes in earlier augmented examples); the outer loss is the sum (the code halves it, the same as halving the lr).
    β is converted from the code's units: 2000 on an element mean over 3072 pixel values, i.e. 2000/3072 ≈ 0.65 on
    the summed squared error.
    """

    name = "m-ada"
    summary = "M-ADA (Qiao et al. 2020): WAE-relaxed adversarial domains and a meta-learning update"
    HPARAMS = {
        **ADA.HPARAMS,
        "ada_max_steps": replace(ADA.HPARAMS["ada_max_steps"], source="M-ADA code, main_Digits.py (--T_adv 25)",
                                 default=25),
        "mada_beta": HParam(2000 / 3072, "β: weight of the WAE relaxation L_relax in the ascent objective",
                            "M-ADA code, main_Digits.py (--beta 2000 on a mean over 3072 values)",
                            interval="[0, inf)"),
        "mada_inner_lr": HParam(0.0, "α: step of the inner (meta-train) SGD update; 0 = the optimiser's current lr",
                                "M-ADA code, main_Digits.py (the inner step uses --lr)", interval="[0, inf)"),
        "mada_wae_hidden": HParam(400, "hidden width of the WAE's encoder and decoder",
                                  "M-ADA code, models/ada_conv.py (400)", interval="[1, inf)"),
        "mada_wae_latent": HParam(20, "latent width of the WAE", "M-ADA code, models/ada_conv.py (20)",
                                  interval="[1, inf)"),
        "mada_wae_epochs": HParam(20, "epochs of WAE training before each max phase",
                                  "M-ADA code, main_Digits.py (20 epochs)", interval="[1, inf)"),
        "mada_wae_lr": HParam(1e-3, "Adam learning rate of the WAE", "M-ADA code, main_Digits.py (Adam, lr 1e-3)",
                              interval="(0, inf)"),
        "mada_wae_mmd": HParam(10.0, "λ: weight of the latent MMD penalty of WAE-MMD",
                               "Tolstikhin et al. 2018 §4 (λ = 10 on MNIST)", interval="[0, inf)"),
    }

    def __init__(self, arch: Architecture, hparams: dict):
        super().__init__(arch, hparams)
        h = self.hparams
        self.wae = WAE(input_width(arch), h["mada_wae_hidden"], h["mada_wae_latent"])

    def param_groups(self) -> list[list[nn.Parameter]]:
        """The architecture only: the WAE trains on its own objective in :meth:`fit_wae`."""
        return [list(self.arch.parameters())]

    def extra_examples(self) -> tuple[Inputs, Tensor] | None:
        return None

    # --- domain augmentation ----------------------------------------------------------------------------

    def max_phase(self, source: Callable[[], Iterable[LabelledBatch]]) -> tuple[Inputs, Tensor]:
        if self.augmented is None:
            previous = torch.cat([pooled_inputs(batch.x).cpu() for batch in self.source_batches(source)])
        else:
            x, _, phase = self.augmented
            previous = pooled_inputs(take(x, phase == phase.max()))
        device = next(self.wae.parameters()).device
        self.fit_wae(previous.to(device))
        return super().max_phase(source)

    def fit_wae(self, pooled: Tensor) -> None:
        """A fresh WAE trained on ``pooled`` [E, C] for ``mada_wae_epochs`` epochs of ``batch_size`` minibatches."""
        h = self.hparams
        self.wae.reset_parameters()
        optimizer = torch.optim.Adam(self.wae.parameters(), lr=h["mada_wae_lr"])
        for _ in range(h["mada_wae_epochs"]):
            for index in torch.randperm(len(pooled), device=pooled.device).split(h["batch_size"]):
                if len(index) < 2:        # the unbiased MMD needs two codes
                    continue
                loss = wae_loss(self.wae, pooled[index], h["mada_wae_mmd"])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()

    def ascent_objective(self, x_adv: Inputs, z: Tensor, y: Tensor) -> Tensor:
        """ADA's objective plus β Σ_b L_relax(x'_b)."""
        return super().ascent_objective(x_adv, z, y) + self.hparams["mada_beta"] * relaxation(self.wae, x_adv).sum()

    # --- meta-learning ----------------------------------------------------------------------------------

    def meta_test_batch(self, size: int, device: torch.device) -> tuple[Inputs, Tensor]:
        """``size`` augmented examples drawn without replacement from all augmented domains."""
        x, y, _ = self.augmented
        index = torch.randperm(len(y))[:size]
        return map_inputs(lambda t: t[index].to(device), x), y[index].to(device)

    def objective(self, src: LabelledBatch, tgt: UnlabelledBatch | None,
                  progress: float) -> tuple[dict[str, Tensor], dict[str, float]]:
        terms, logs = super().objective(src, tgt, progress)        # meta-train: L_src(θ) on the source batch
        if self.augmented is None:
            return terms, logs
        h = self.hparams
        inner_lr = h["mada_inner_lr"] or h["lr"] * lr_factor(h, progress)
        params = {name: p for name, p in self.arch.named_parameters() if p.requires_grad}
        grads = torch.autograd.grad(sum(terms.values()), list(params.values()), create_graph=True, allow_unused=True)
        adapted = {name: p if g is None else p - inner_lr * g for (name, p), g in zip(params.items(), grads)}
        x_aug, y_aug = self.meta_test_batch(len(src.y), src.y.device)
        terms["loss_meta_test"] = F.cross_entropy(functional_call(self.arch, adapted, (x_aug,)), y_aug)
        return terms, {**logs, "mada_inner_lr": inner_lr}
