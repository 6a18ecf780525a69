"""heads/drl.py on hand-computable inputs: eq. 1's order invariance, eq. 3's KL, eq. 4 for a spatial and an
order-reading model, eq. 2 by distillation, eq. 8's FGSM direction, PGD's ball, eq. 12's gradient sign, the two
steps of Algorithms 1-2, and the composition with a base method."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import heads
from heads import HeadError, LabelledBatch, UnlabelledBatch
from heads.method import hparam_specs, lookup
from heads.drl import (SpatialModel, fgsm, fit_spatial_model, freeze_steps, kd_loss, pgd, shuffle_steps,
                       spatial_loss, take_steps)

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = {"frame_dim": 16, "relation_dim": 16, "init_std": 0.0, "dropout_frame": 0.0, "dropout_video": 0.0}


def build(arch: str, method: str, feat_shape=(8,), **overrides):
    """3 classes, 4 segments, narrow layers without dropout (the names of SMALL the pair has) plus ``overrides``."""
    specs = hparam_specs(*lookup(arch, method))
    return heads.build(arch, method, feat_shape, 3, 4, {**{k: v for k, v in SMALL.items() if k in specs},
                                                        **overrides})


class StepDifference(nn.Module):
    """An order-reading model on 2 steps of 1 channel: logits [x_2 - x_1, 0]."""

    def forward(self, x):
        return torch.stack([x[:, 1, 0] - x[:, 0, 0], torch.zeros(len(x))], dim=1)


def test_kd_loss_is_eq_3_the_kl_from_the_teacher_to_the_student():
    teacher = torch.tensor([[0.0, math.log(3.0)]])          # p = (1/4, 3/4)
    student = torch.zeros(1, 2)                             # q = (1/2, 1/2)
    expected = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert kd_loss(student, teacher).item() == pytest.approx(expected, rel=1e-6)
    assert kd_loss(teacher, teacher).item() == pytest.approx(0.0, abs=1e-7)


def test_spatial_model_of_eq_1_is_the_mean_of_per_step_logits_and_ignores_step_order():
    torch.manual_seed(0)
    model = SpatialModel(8, 3, hidden=16)
    x = torch.rand(5, 4, 8)
    per_step = torch.stack([model.g["x"](x[:, t]) for t in range(4)], dim=1)
    assert torch.allclose(model(x), per_step.mean(dim=1), atol=1e-6)
    reversed_steps = x.flip(1)
    assert torch.allclose(model(reversed_steps), model(x), atol=1e-6)
    assert torch.allclose(model(shuffle_steps(x, torch.Generator().manual_seed(1))), model(x), atol=1e-6)
    maps = torch.rand(5, 4, 2, 3, 8)                         # maps: each step averaged over its positions
    assert torch.allclose(model(maps), model(maps.mean(dim=(2, 3))), atol=1e-6)


def test_freeze_and_shuffle_remove_the_order_of_the_steps():
    x = torch.arange(2 * 3, dtype=torch.float32).view(2, 3, 1)
    assert freeze_steps(x, "first")[:, :, 0].tolist() == [[0, 0, 0], [3, 3, 3]]
    assert freeze_steps(x, "middle")[:, :, 0].tolist() == [[1, 1, 1], [4, 4, 4]]
    shuffled = shuffle_steps({"rgb": x, "flow": x + 10}, torch.Generator().manual_seed(0))
    assert torch.equal(shuffled["flow"], shuffled["rgb"] + 10)          # the same order in every stream
    assert sorted(shuffled["rgb"][0, :, 0].tolist()) == [0, 1, 2]      # a permutation of each video's steps


def test_input_modulation_of_eq_4_is_zero_for_a_spatial_model_and_positive_for_an_order_reading_one():
    torch.manual_seed(0)
    pooling = build("tempooling", "erm").eval()   # frame MLP + mean: purely spatial
    x = torch.rand(6, 4, 8)
    logits = pooling.predict(x)
    assert kd_loss(pooling.predict(shuffle_steps(x)), logits).abs().max() < 1e-6
    still = x[:, :1].expand(-1, 4, -1)                     # a still clip: freezing changes nothing either
    assert kd_loss(pooling.predict(freeze_steps(still)), pooling.predict(still)).abs().max() < 1e-6
    relations = build("trn", "erm").eval()
    assert kd_loss(relations.predict(shuffle_steps(x)), relations.predict(x)).mean() > 1e-6

    # by hand: x = (0, 1), f = softmax(1, 0) = (a, b); frozen at the first step, f = (1/2, 1/2); swapped, (b, a)
    difference = StepDifference()
    clip = torch.tensor([[[0.0], [1.0]]])
    a, b = math.e / (1 + math.e), 1 / (1 + math.e)
    frozen = kd_loss(difference(freeze_steps(clip)), difference(clip)).item()
    assert frozen == pytest.approx(a * math.log(2 * a) + b * math.log(2 * b), rel=1e-6)
    swapped = kd_loss(difference(take_steps(clip, torch.tensor([[1, 0]]))), difference(clip)).item()
    assert swapped == pytest.approx((a - b) * math.log(a / b), rel=1e-6)      # = tanh(1/2)


def test_distillation_score_of_eq_2_is_near_zero_for_a_spatial_teacher_and_not_for_an_order_reading_one():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 2, 1, generator=g)
    fit, held_out = slice(0, 300), slice(300, None)
    torch.manual_seed(1)
    spatial = SpatialModel(1, 2, hidden=8)
    with torch.no_grad():
        spatial.g["x"][3].weight.mul_(20)                   # confident predictions, a real signal to distil
    for teacher, bound in ((spatial, lambda gamma: gamma < 0.02), (StepDifference(), lambda gamma: gamma > 0.1)):
        with torch.no_grad():
            targets = teacher(x)
        student = fit_spatial_model(x[fit], targets[fit], 2, hidden=32, steps=300, lr=1e-2, weight_decay=0.0)
        with torch.no_grad():
            gamma = kd_loss(student.from_summaries(x[held_out]), targets[held_out]).mean().item()
        assert bound(gamma), gamma


def hand_set_student() -> SpatialModel:
    """f_s(x) = W · mean_t x_t on 2 channels (identity first layer, positive inputs pass the ReLU)."""
    student = SpatialModel(2, 2, hidden=2)
    first, last = student.g["x"][1], student.g["x"][3]
    with torch.no_grad():
        first.weight.copy_(torch.eye(2))
        first.bias.zero_()
        last.weight.copy_(torch.tensor([[1.0, -2.0], [0.0, 3.0]]))
        last.bias.zero_()
    return student


def test_one_fgsm_step_of_eq_8_moves_each_channel_by_epsilon_sigma_up_the_distillation_loss():
    student = hand_set_student()
    x = torch.tensor([[[1.0, 2.0], [3.0, 2.0]], [[2.0, 1.0], [2.0, 5.0]]])   # [B=2, T=2, C=2], all positive
    teacher = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    weight = student.g["x"][3].weight
    q = F.softmax(x.mean(dim=1) @ weight.T, dim=1)
    p = F.softmax(teacher, dim=1)
    direction = ((q - p) @ weight).sign()                  # ∂KL/∂x_t = (1/T) Wᵀ (q - p): the same sign at every t
    sigma = x.reshape(-1, 2).std(dim=0)
    perturbed = fgsm(student, x, teacher, epsilon=0.1)
    assert torch.allclose(perturbed - x, 0.1 * sigma * direction[:, None, :], atol=1e-6)
    assert (kd_loss(student(perturbed), teacher) > kd_loss(student(x), teacher)).all()
    assert all(p.grad is None for p in student.parameters())  # the attack leaves the student's gradients alone


def test_pgd_stays_in_the_epsilon_ball_and_raises_the_distillation_loss():
    student = hand_set_student()
    x = torch.rand(4, 3, 2, generator=torch.Generator().manual_seed(0)) + 1.0
    teacher = torch.randn(4, 2, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    perturbed = pgd(student, x, teacher, epsilon=0.2, steps=7, step_fraction=0.27)
    radius = 0.2 * x.reshape(-1, 2).std(dim=0)
    assert ((perturbed - x).abs() <= radius + 1e-6).all()
    assert kd_loss(student(perturbed), teacher).mean() > kd_loss(student(x), teacher).mean()


def test_the_dynamic_term_of_eq_12_has_the_gradient_that_maximises_the_kl():
    clean = torch.tensor([[1.0, 0.0, -1.0]], requires_grad=True)
    static = torch.tensor([[0.0, 0.5, 0.0]], requires_grad=True)
    lam = 0.5
    (-lam * kd_loss(static.detach(), clean).sum()).backward()
    p, log_q = F.softmax(clean, 1), F.log_softmax(static, 1)
    kl = (p * (p.log() - log_q)).sum()
    expected = -lam * p * (p.log() - log_q - kl)           # d/dz of -λ KL(softmax(z) ‖ q)
    assert torch.allclose(clean.grad, expected.detach(), atol=1e-6)
    assert static.grad is None
    with torch.no_grad():                                  # a descent step on the term raises the KL
        stepped = clean - 0.1 * clean.grad
    assert kd_loss(static, stepped).item() > kd_loss(static, clean).item()


def dynamic_kl(model, x) -> float:
    model.eval()
    with torch.no_grad():
        return kd_loss(model.predict(freeze_steps(x)), model.predict(x)).mean().item()


def test_a_drl_fast_update_pushes_the_model_away_from_its_frozen_prediction():
    g = torch.Generator().manual_seed(0)
    batch = LabelledBatch(torch.rand(8, 4, 8, generator=g), torch.randint(3, (8,), generator=g))
    after = {}
    for lam in (0.0, 20.0):
        torch.manual_seed(0)
        model = build("trn", "drl-fast", drl_lambda=lam, lr=0.05)
        before = dynamic_kl(model, batch.x)
        model.train()
        logs = model.update(batch, None, 0.0)
        assert logs["loss_dynamic"] == pytest.approx(-lam * logs["dynamic_kl"])
        after[lam] = dynamic_kl(model, batch.x)
    assert after[20.0] > after[0.0] and after[20.0] > before


@pytest.mark.parametrize("method", ["drl-aug", "drl-minmax"])
def test_the_spatial_model_takes_one_sgd_step_on_eq_6_10_before_the_video_model_moves(method):
    g = torch.Generator().manual_seed(0)
    batch = LabelledBatch(torch.rand(6, 4, 8, generator=g), torch.randint(3, (6,), generator=g))
    torch.manual_seed(0)
    model = build("tempooling", method, momentum=0.0, weight_decay=0.0, clip_grad=0.0, lr=0.1)
    model.train()
    expected = {}
    alpha = model.hparams["drl_alpha"]
    with torch.no_grad():
        teacher = model.predict(batch.x)                   # no dropout: the same f(x) as in the update
    loss = spatial_loss(model.spatial(batch.x), teacher, batch.y, alpha)
    grads = torch.autograd.grad(loss, list(model.spatial.parameters()))
    lr0 = model.optimizers[1].param_groups[0]["initial_lr"]
    for (name, param), grad in zip(model.spatial.named_parameters(), grads):
        expected[name] = param.detach() - lr0 * grad         # lr schedule factor is 1 at progress 0
    logs = model.update(batch, None, 0.0)
    for name, param in model.spatial.named_parameters():
        assert torch.allclose(param, expected[name], atol=1e-6), name
    assert logs["loss_spatial"] == pytest.approx(loss.item(), rel=1e-5)
    if method == "drl-aug":
        assert logs["loss_y"] + logs["loss_adv"] == pytest.approx(logs["loss"], rel=1e-5)   # β = 1 - β = 0.5
    else:
        assert logs["loss_dynamic"] == pytest.approx(-0.5 * logs["dynamic_kl"], rel=1e-5)


def test_drl_over_ta3n_adds_its_term_to_ta3n_objective_and_refuses_what_the_base_cannot_run():
    g = torch.Generator().manual_seed(0)
    src = LabelledBatch(torch.rand(6, 4, 8, generator=g), torch.randint(3, (6,), generator=g))
    tgt = UnlabelledBatch(torch.rand(4, 4, 8, generator=g) + 0.5)
    torch.manual_seed(0)
    model = build("trn", "drl-fast", drl_base="ta3n")
    logs = model.update(src, tgt, 0.1)
    assert {"loss_y", "loss_frame", "loss_relation", "loss_video", "loss_ae", "loss_dynamic"} <= set(logs)
    assert not any(key.startswith("arch.") for key in model.state_dict())        # the architecture once, in the base
    assert "base.discriminators.video.classifier.0.weight" in model.state_dict()
    with pytest.raises(HeadError, match="ta3n.*adapts to a target domain"):
        model.update(src, None, 0.1)
    with pytest.raises(HeadError, match="drl_base=ta3n needs trainable layers"):
        build("tsn-maps", "drl-fast", (2, 2, 8), drl_base="ta3n")
    with pytest.raises(HeadError, match="not one of"):
        build("trn", "drl-fast", drl_base="mcd")
