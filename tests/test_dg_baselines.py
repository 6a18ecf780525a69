"""The DG baselines of STDN Table 2 / APN Table 1 (heads/mixup.py, irm.py, ada.py, mada.py, cop.py): equations on
hand-computable inputs, then every method on TemPooling, TemRelation and a two-stream late fusion, with exact
save/resume."""
from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad

from heads import HeadError, LabelledBatch, build
from heads.cop import clip_features, clip_orders, shuffle_clips
from heads.irm import irm_penalty
from heads.mada import WAE, imq_mmd2, pooled_inputs, relaxation
from heads.mixup import mix_inputs
from heads.method import hparam_specs, lookup

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run fastest on one thread

FEAT, CLASSES, SEGMENTS = 6, 3, 4
METHODS = ["mixup", "irm", "ada", "m-ada", "cop"]
# small schedules, so 3 updates reach IRM's anneal, ADA's phases and M-ADA's meta-update
FAST = {"irm_anneal_updates": 2, "irm_lambda": 10.0, "ada_min_updates": 1, "ada_max_steps": 2,
        "ada_step": 0.1, "mada_wae_epochs": 2, "mada_wae_hidden": 8, "mada_wae_latent": 2, "cop_hidden": 8}
EXACT = {"dropout_frame": 0.0, "dropout_video": 0.0, "momentum": 0.0, "weight_decay": 0.0, "clip_grad": 0.0,
         "lr_schedule": "constant", "lr": 0.1}


def tiny(arch: str, method: str, feat_shape=(FEAT,), **overrides):
    """``method`` on ``arch`` with 8-wide layers and PyTorch's default init; overrides it lacks are dropped."""
    arch_cls, method_cls = lookup(arch, method)
    specs = hparam_specs(arch_cls, method_cls)
    wanted = {"frame_dim": 8, "relation_dim": 8, "init_std": 0.0, "batch_size": 4, **FAST, **overrides}
    return build(arch, method, feat_shape, CLASSES, SEGMENTS, {k: v for k, v in wanted.items() if k in specs})


def videos(n: int, seed: int, streams: dict | None = None) -> LabelledBatch:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(CLASSES, (n,), generator=g)
    if streams is None:
        return LabelledBatch(torch.randn(n, SEGMENTS, FEAT, generator=g), y)
    return LabelledBatch({s: torch.randn(n, SEGMENTS, *shape, generator=g) for s, shape in streams.items()}, y)


# ---------------------------------------------------------------------------------------------- Mixup

def test_mix_inputs_on_a_hand_computed_pair():
    x = torch.tensor([[[1.0, 2.0]], [[3.0, 4.0]]])                       # 2 videos, 1 step, 2 channels
    partner = torch.tensor([1, 0])
    expected = torch.tensor([[[2.5, 3.5]], [[1.5, 2.5]]])                # 0.25 x_i + 0.75 x_j
    assert torch.equal(mix_inputs(x, 0.25, partner), expected)
    mixed = mix_inputs({"rgb": x, "flow": 2 * x}, 0.25, partner)
    assert torch.equal(mixed["rgb"], expected) and torch.equal(mixed["flow"], 2 * expected)


@pytest.mark.parametrize("mixup_on", ["inputs", "video"])
def test_mixup_loss_is_the_lambda_weighted_ce_of_the_mixed_video(mixup_on):
    method = tiny("tempooling", "mixup", mixup_on=mixup_on, **EXACT)
    batch = videos(3, seed=0)
    partner, lam = torch.tensor([2, 0, 1]), 0.3
    terms = method.mixed_terms(batch, lam, partner)
    arch = method.arch
    if mixup_on == "inputs":
        logits = arch(0.3 * batch.x + 0.7 * batch.x[partner])
    else:
        z = arch.features(batch.x)
        logits = arch.classify(0.3 * z + 0.7 * z[partner])
    expected = 0.3 * F.cross_entropy(logits, batch.y) + 0.7 * F.cross_entropy(logits, batch.y[partner])
    assert torch.allclose(terms["loss_y"], expected)


def test_mixup_draws_lambda_from_beta_and_logs_it():
    method = tiny("tempooling", "mixup")
    torch.manual_seed(0)
    logs = method.update(videos(4, seed=0), None, 0.0)
    torch.manual_seed(0)
    assert logs["mixup_lambda"] == pytest.approx(torch.distributions.Beta(0.2, 0.2).sample().item())


# ---------------------------------------------------------------------------------------------- IRM

def test_irm_penalty_is_the_product_of_the_split_half_scale_gradients():
    logits = torch.tensor([[1.0, 2.0, 0.0], [0.5, -1.0, 2.0]])
    y = torch.tensor([1, 2])

    def scale_gradient(row: torch.Tensor, label: int) -> float:
        # d/dw CE(w l, y) at w = 1 is -l_y + Σ_k softmax(l)_k l_k
        return (-row[label] + (row.softmax(0) * row).sum()).item()

    expected = scale_gradient(logits[0], 1) * scale_gradient(logits[1], 2)
    assert irm_penalty(logits, y).item() == pytest.approx(expected, rel=1e-6)
    leaf = logits.clone().requires_grad_()
    irm_penalty(leaf, y).backward()                        # differentiable: the penalty trains the model
    assert leaf.grad.abs().sum() > 0


def test_irm_environments_are_the_batch_env_ids_or_random_equal_chunks():
    method = tiny("tempooling", "irm", irm_envs=3, batch_size=6)
    batch = videos(6, seed=0)
    chunks = method.environments(batch)
    assert [len(c) for c in chunks] == [2, 2, 2] and sorted(torch.cat(chunks).tolist()) == list(range(6))
    with_env = LabelledBatch(batch.x, batch.y, env=torch.tensor([1, 0, 1, 1, 0, 0]))
    assert [c.tolist() for c in method.environments(with_env)] == [[1, 4, 5], [0, 2, 3]]


def test_irm_refuses_environments_too_small_for_a_penalty():
    with pytest.raises(HeadError, match="environments of fewer than 2 videos with irm_envs=3"):
        tiny("tempooling", "irm", irm_envs=3, batch_size=5)


def test_irm_anneals_lambda_and_resets_the_optimizer_when_it_switches():
    method = tiny("tempooling", "irm", irm_anneal_updates=2, irm_lambda=10.0)
    weights, optimizers = [], []
    for i in range(3):
        weights.append(method.update(videos(4, seed=i), None, 0.0)["irm_weight"])
        optimizers.append(method.optimizer)
    assert weights == [1.0, 1.0, 10.0] and method.updates.item() == 3
    assert optimizers[0] is optimizers[1] and optimizers[2] is not optimizers[1]   # replaced at the switch


# ---------------------------------------------------------------------------------------------- ADA

def test_ada_ascent_steps_follow_the_gradient_of_ce_minus_the_transport_cost():
    method = tiny("tempooling", "ada", ada_max_steps=2, ada_step=0.3, ada_gamma=0.5, **EXACT)
    batch = videos(3, seed=0)
    arch = method.arch
    z = arch.features(batch.x).detach()

    def surrogate(x_adv):                                     # Volpi eq. 2-3, per example, summed
        z_adv = arch.features(x_adv)
        cost = 0.5 * (z_adv - z).pow(2).sum(dim=1)
        return (F.cross_entropy(arch.classify(z_adv), batch.y, reduction="none") - 0.5 * cost).sum()

    x = batch.x
    for _ in range(2):
        x = x + 0.3 * torch.func.grad(surrogate)(x)
    assert torch.allclose(method.perturb(batch.x, batch.y), x, atol=1e-6)
    # at x' = x the cost is 0: the objective is the summed CE
    assert torch.allclose(method.ascent_objective(batch.x, z, batch.y),
                          F.cross_entropy(arch(batch.x), batch.y, reduction="sum"))


def source_of(*batches: LabelledBatch):
    return lambda: iter(batches)


def test_ada_phases_fall_every_t_min_updates_and_append_the_perturbed_source():
    method = tiny("tempooling", "ada", ada_min_updates=2, ada_phases=2)
    source = source_of(videos(4, seed=0), videos(3, seed=1))
    assert method.before_epoch(source, 0.0) == {} and method.extra_examples() is None
    for i in range(2):
        method.update(videos(4, seed=10 + i), None, 0.0)
    logs = method.before_epoch(source, 0.1)
    assert logs == {"ada_phase": 1.0, "ada_new_examples": 7.0, "ada_examples": 7.0}
    x, y = method.extra_examples()
    assert x.shape == (7, SEGMENTS, FEAT)
    assert torch.equal(y, torch.cat([b.y for b in source()]))
    assert not torch.allclose(x, torch.cat([b.x for b in source()]))
    method.update(videos(4, seed=20), None, 0.0)
    assert method.before_epoch(source, 0.2) == {}                # one update since the last phase
    method.update(videos(4, seed=21), None, 0.0)
    assert method.before_epoch(source, 0.3)["ada_examples"] == 14.0
    for i in range(2):
        method.update(videos(4, seed=30 + i), None, 0.0)
    assert method.before_epoch(source, 0.4) == {}                # K = 2 phases done


def test_ada_max_videos_caps_each_phase():
    method = tiny("tempooling", "ada", ada_max_videos=5)
    method.update(videos(4, seed=0), None, 0.0)
    method.before_epoch(source_of(videos(4, seed=1), videos(4, seed=2)), 0.0)
    assert len(method.extra_examples()[1]) == 5


def test_ada_examples_survive_state_dict_into_a_fresh_build():
    method = tiny("trn", "ada")
    method.update(videos(4, seed=0), None, 0.0)
    method.before_epoch(source_of(videos(4, seed=1)), 0.0)
    fresh = tiny("trn", "ada")
    fresh.load_state_dict(copy.deepcopy(method.state_dict()))
    (x, y), (x2, y2) = method.extra_examples(), fresh.extra_examples()
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert fresh.ada_phases_done.item() == 1 and fresh.updates.item() == 1


# ---------------------------------------------------------------------------------------------- M-ADA

def zero_decoder_wae(dim: int) -> WAE:
    """A WAE whose reconstruction is 0 everywhere, so L_relax is ‖x̄‖²."""
    wae = WAE(dim, 4, 2)
    last = wae.decoder[-1]
    torch.nn.init.zeros_(last.weight), torch.nn.init.zeros_(last.bias)
    return wae


def test_relaxation_is_the_squared_reconstruction_error_of_the_pooled_input():
    x = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])                        # 1 video, 2 steps -> x̄ = (2, 3)
    assert relaxation(zero_decoder_wae(2), x).tolist() == [13.0]
    streams = {"rgb": x, "flow": torch.tensor([[[1.0], [0.0]]])}        # x̄ = (2, 3 | 0.5)
    assert pooled_inputs(streams).tolist() == [[2.0, 3.0, 0.5]]
    assert relaxation(zero_decoder_wae(3), streams).tolist() == [13.25]


def test_imq_mmd2_unbiased_estimate_by_hand():
    a = torch.tensor([[0.0], [1.0]])
    # C = 2: k(0, 1) = 2/3. Within: (2/3 + 2/3) / 2 for each sample set; across: mean of (1, 2/3, 2/3, 1) = 5/6
    assert imq_mmd2(a, a.clone()).item() == pytest.approx(2 / 3 + 2 / 3 - 2 * 5 / 6)


def test_mada_update_is_one_outer_step_on_the_second_order_meta_objective():
    method = tiny("tempooling", "m-ada", mada_inner_lr=0.05, **EXACT)
    src, aug = videos(3, seed=0), videos(3, seed=1)
    method.augmented = (aug.x, aug.y, torch.zeros(3, dtype=torch.long))    # one augmented domain, as large as a batch
    arch = method.arch
    theta = {name: p.detach().clone() for name, p in arch.named_parameters()}

    def loss(params, batch):
        return F.cross_entropy(functional_call(arch, params, (batch.x,)), batch.y)

    def meta_objective(params):                       # L(θ; S) + L(θ - α ∇L(θ; S); S+)
        inner = grad(loss)(params, src)
        return loss(params, src) + loss({k: params[k] - 0.05 * inner[k] for k in params}, aug)

    outer = grad(meta_objective)(theta)
    logs = method.update(src, None, 0.0)
    assert logs["mada_inner_lr"] == 0.05 and "loss_meta_test" in logs
    for name, p in arch.named_parameters():
        assert torch.allclose(p, theta[name] - 0.1 * outer[name], atol=1e-6), name


def test_mada_phase_fits_the_wae_and_keeps_the_domains_for_meta_test_only():
    method = tiny("tempooling", "m-ada")
    wae_before = [p.detach().clone() for p in method.wae.parameters()]
    arch_before = [p.detach().clone() for p in method.arch.parameters()]
    method.update(videos(4, seed=0), None, 0.0)
    logs = method.before_epoch(source_of(videos(4, seed=1), videos(4, seed=2)), 0.0)
    assert logs["ada_examples"] == 8.0 and method.extra_examples() is None
    assert method.augmented[0].shape == (8, SEGMENTS, FEAT)
    assert any(not torch.equal(a, b) for a, b in zip(wae_before, method.wae.parameters()))
    assert all(p is not q for p in method.wae.parameters() for q in method.optimizer.param_groups[0]["params"])
    assert any(not torch.equal(a, b) for a, b in zip(arch_before, method.arch.parameters()))


# ---------------------------------------------------------------------------------------------- COP

def test_clip_order_labels_are_indices_in_itertools_permutations():
    orders = clip_orders(3)
    assert orders == list(itertools.permutations(range(3)))
    assert orders.index((0, 1, 2)) == 0 and orders.index((2, 1, 0)) == 5 and len(orders) == 6


def test_shuffled_clips_are_the_permuted_means_of_consecutive_segments():
    frames = torch.arange(5.0)[None, :, None].repeat(2, 1, 2)            # segment t has feature (t, t)
    clips = clip_features(frames, 3)                                      # runs {0,1} {2,3} {4}
    assert clips[0, :, 0].tolist() == [0.5, 2.5, 4.0]
    orders = torch.tensor(clip_orders(3))
    shuffled = shuffle_clips(clips, orders, torch.tensor([5, 1]))         # (2, 1, 0) and (0, 2, 1)
    assert shuffled[0, :, 0].tolist() == [4.0, 2.5, 0.5]
    assert shuffled[1, :, 1].tolist() == [0.5, 4.0, 2.5]


def test_cop_needs_as_many_segments_as_clips():
    with pytest.raises(HeadError, match="cop_clips=5"):
        tiny("tempooling", "cop", cop_clips=5)


def test_cop_adds_the_weighted_order_loss():
    method = tiny("tempooling", "cop", cop_weight=0.5)
    logs = method.update(videos(4, seed=0), None, 0.0)
    assert logs["loss"] == pytest.approx(logs["loss_y"] + logs["loss_cop"])
    assert 0.0 <= logs["cop_accuracy"] <= 1.0


# ---------------------------------------------------------------------------------------------- every method

def train_steps(method, make_batch, updates: int = 3) -> list[dict]:
    """``updates`` updates, with an epoch start (ADA's max phase hook) before the last."""
    logs = []
    for i in range(updates):
        if i == updates - 1:
            method.before_epoch(source_of(make_batch(100), make_batch(101)), i / 10)
        logs.append(method.update(make_batch(i), None, i / 10))
    return logs


def check_runs_and_resumes_exactly(make, make_batch):
    torch.manual_seed(0)
    method = make()
    method.train()
    logs = train_steps(method, make_batch)
    assert all(torch.isfinite(torch.tensor(log["loss"])) for log in logs)
    saved = copy.deepcopy({"model": method.state_dict(), "optimizers": [o.state_dict() for o in method.optimizers]})
    torch.manual_seed(1)
    resumed = make()                                       # different init, then the checkpoint
    resumed.load_state_dict(saved["model"])
    for optimizer, state in zip(resumed.optimizers, saved["optimizers"]):
        optimizer.load_state_dict(state)
    test = make_batch(200)
    method.eval(), resumed.eval()
    with torch.no_grad():
        predictions = method.predict(test.x)
        assert predictions.shape == (len(test.y), CLASSES)
        assert torch.equal(predictions, resumed.predict(test.x))
    method.train(), resumed.train()
    torch.manual_seed(7)
    before_epoch = method.before_epoch(source_of(make_batch(300)), 0.5)
    expected = method.update(make_batch(301), None, 0.5)
    torch.manual_seed(7)
    assert resumed.before_epoch(source_of(make_batch(300)), 0.5) == before_epoch
    assert resumed.update(make_batch(301), None, 0.5) == expected


@pytest.mark.parametrize("arch", ["tempooling", "trn"])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_predicts_and_resumes_exactly(method, arch):
    check_runs_and_resumes_exactly(lambda: tiny(arch, method), lambda seed: videos(4, seed))


@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_on_two_stream_late_fusion(method):
    streams = {"rgb": (8,), "flow": (6,)}
    check_runs_and_resumes_exactly(lambda: tiny("trn", method, streams), lambda seed: videos(4, seed, streams))


@pytest.mark.parametrize("method", METHODS)
def test_every_method_ignores_the_target_batch(method):
    from heads import UnlabelledBatch

    results = []
    for target in (None, UnlabelledBatch(torch.randn(4, SEGMENTS, FEAT))):
        torch.manual_seed(0)
        model = tiny("tempooling", method)
        torch.manual_seed(1)
        results.append(model.update(videos(4, seed=0), target, 0.0))
    assert results[0] == results[1]
