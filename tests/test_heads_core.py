"""Architecture/method interface, registry, hyper-parameter ranges, shared blocks (GRL, schedules, entropy, TRN
tuples) and ERM on the two TA3N baselines."""
from __future__ import annotations

import math

import pytest
import torch

import heads
from heads import HeadError, HParam, LabelledBatch, UnlabelledBatch, architectures, methods, register_architecture
from heads.base import lr_factor
from heads.method import hparam_specs, lookup
from heads.common import (dann_ramp, entropy, entropy_of_probs, even_tuples, grad_reverse, grl_coefficient, mlp,
                          ordered_tuples, random_tuples)
from heads.pooling import TemPooling

BASELINES = ["tempooling", "trn"]
FEAT_DIM, NUM_CLASSES, NUM_SEGMENTS = 16, 4, 5


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run fastest on one thread


def small(name: str, **extra) -> dict:
    """Narrow layers and PyTorch's default init, so the models train in a second on 16-d toy features."""
    hparams = {"frame_dim": 32, "relation_dim": 32, "init_std": 0.0, **extra}
    return {k: v for k, v in hparams.items() if k in hparam_specs(*lookup(name, "erm"))}


def build(arch: str, feat_shape, num_classes: int, num_segments: int, overrides: dict, method: str = "erm"):
    return heads.build(arch, method, feat_shape, num_classes, num_segments, overrides)


def resolve_hparams(arch: str, overrides: dict) -> dict:
    return heads.resolve_hparams(arch, "erm", overrides)


def prototype_videos(num_videos: int, seed: int, noise: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Separable toy data [B, 5, 16]: every segment is its class prototype plus Gaussian noise."""
    prototypes = torch.randn(NUM_CLASSES, FEAT_DIM, generator=torch.Generator().manual_seed(1234))
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(NUM_CLASSES, (num_videos,), generator=g)
    x = prototypes[y][:, None, :] + noise * torch.randn(num_videos, NUM_SEGMENTS, FEAT_DIM, generator=g)
    return x, y


def ordered_videos(num_videos: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class = direction of motion: frames slide from A to B (class 0) or from B to A (class 1), plus noise.

    Both classes hold the same frames, only their order differs, so a mean over segments cannot tell them apart.
    """
    a, b = torch.randn(2, FEAT_DIM, generator=torch.Generator().manual_seed(1234))
    path = a + torch.linspace(0, 1, NUM_SEGMENTS)[:, None] * (b - a)                 # [5, 16]
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(2, (num_videos,), generator=g)
    x = torch.where(y[:, None, None] == 0, path, path.flip(0))
    return x + 0.3 * torch.randn(num_videos, NUM_SEGMENTS, FEAT_DIM, generator=g), y


def train(head, make_data, steps: int = 100, batch: int = 32) -> list[float]:
    head.train()
    return [head.update(LabelledBatch(*make_data(batch, seed=i)), None, i / steps)["loss"] for i in range(steps)]


def accuracy(head, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (head.eval()(x).argmax(1) == y).float().mean().item()


def parameters(head) -> list[torch.Tensor]:
    return [p.detach().clone() for p in head.parameters()]


# ---------------------------------------------------------------------------------------------- tuples

def test_even_tuples_reproduce_the_official_ta3n_choice_for_five_segments():
    assert even_tuples(5, 5, 3) == [(0, 1, 2, 3, 4)]
    assert even_tuples(5, 4, 3) == [(0, 1, 2, 3), (0, 1, 3, 4), (1, 2, 3, 4)]
    assert even_tuples(5, 3, 3) == [(0, 1, 2), (0, 2, 4), (1, 2, 4)]
    assert even_tuples(5, 2, 3) == [(0, 1), (1, 2), (2, 3)]
    assert even_tuples(3, 2, 5) == [(0, 1), (0, 2), (1, 2)]          # fewer tuples than asked: all of them


def test_random_tuples_are_distinct_time_ordered_and_follow_the_generator():
    draws = [random_tuples(8, 3, 4, torch.Generator().manual_seed(s)) for s in (7, 7, 8)]
    assert draws[0] == draws[1] and draws[0] != draws[2]
    for tuples in draws:
        assert len(set(tuples)) == 4 and set(tuples) <= set(ordered_tuples(8, 3))
        assert all(list(t) == sorted(t) for t in tuples)


# ------------------------------------------------------------------------ GRL, schedules, entropy, MLP

def test_grad_reverse_is_identity_forward_and_scaled_negation_backward():
    x = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    weights = torch.tensor([2.0, 3.0, 5.0])
    y = grad_reverse(x, 0.5)
    assert torch.equal(y, x)
    (y * weights).sum().backward()
    assert torch.equal(x.grad, torch.tensor([-1.0, -1.5, -2.5]))


def test_dann_ramp_and_grl_coefficient_follow_the_formula():
    assert dann_ramp(0.0) == 0.0
    assert dann_ramp(0.5) == pytest.approx(2 / (1 + math.exp(-5)) - 1)        # 0.98661
    assert dann_ramp(1.0) == pytest.approx(2 / (1 + math.exp(-10)) - 1)       # 0.99991
    assert dann_ramp(1.0, gamma=1.0) == pytest.approx(0.4621, abs=1e-4)       # EPIC-100 TA3N's gentler ramp
    assert grl_coefficient(0.75, "constant", 0.3) == 0.75
    assert grl_coefficient(0.75, "dann", 0.5) == pytest.approx(0.75 * dann_ramp(0.5))
    with pytest.raises(ValueError, match="constant.*dann"):
        grl_coefficient(1.0, "linear", 0.5)


def test_entropy_in_nats():
    assert entropy_of_probs(torch.tensor([0.5, 0.5])).item() == pytest.approx(math.log(2))
    assert entropy_of_probs(torch.tensor([[0.0, 1.0, 0.0]])).tolist() == [0.0]
    logits = torch.tensor([[0.0, 0.0, 0.0], [100.0, -100.0, 0.0]])
    assert entropy(logits).tolist() == pytest.approx([math.log(3), 0.0], abs=1e-6)


def test_mlp_layers():
    assert [type(m).__name__ for m in mlp(4, 8, 2)] == ["Linear", "ReLU", "Linear"]
    assert [type(m).__name__ for m in mlp(4, 8, dropout=0.5, activate_last=True)] == ["Linear", "ReLU", "Dropout"]


# -------------------------------------------------------------------------------- hparams and registry

def test_unknown_hparam_names_the_valid_ones():
    with pytest.raises(HeadError, match=r"'lrate'.*valid names:.*batch_size.*\blr\b"):
        resolve_hparams("tempooling", {"lrate": 0.1})


def test_hparam_types_are_checked_against_the_default():
    resolved = resolve_hparams("tempooling", {"lr": 1, "lr_steps": [0.5, 1], "epochs": 3})
    assert resolved["lr"] == 1.0 and isinstance(resolved["lr"], float)      # int is fine for a float
    assert resolved["lr_steps"] == (0.5, 1.0)                                 # a YAML list is fine for a tuple
    assert resolved["batch_size"] == 128 and resolved["nesterov"] is False    # untouched defaults
    for bad in ({"lr": "fast"}, {"epochs": 2.5}, {"epochs": True}, {"nesterov": 1}):
        with pytest.raises(HeadError, match=f"{next(iter(bad))}="):
            resolve_hparams("tempooling", bad)
    with pytest.raises(HeadError, match="dann.*step.*constant"):
        resolve_hparams("tempooling", {"lr_schedule": "cosine"})


def test_hparam_ranges_are_checked_where_they_are_declared():
    for bad, allowed in (({"batch_size": 0}, r"\[1, inf\)"), ({"epochs": -1}, r"\[1, inf\)"),
                         ({"lr": 0.0}, r"\(0, inf\)"), ({"dropout_video": 1.0}, r"\[0, 1\)"),
                         ({"momentum": -0.1}, r"\[0, 1\)"), ({"lr_steps": [0.5, 1.5]}, r"\[0, 1\]"),
                         ({"optimizer": "adam"}, "sgd.*adamw")):
        with pytest.raises(HeadError, match=f"{next(iter(bad))}=.*{allowed}"):
            resolve_hparams("tempooling", bad)
    assert resolve_hparams("tempooling", {"dropout_video": 0.0, "lr_steps": [0.0, 1.0]})["lr_steps"] == (0.0, 1.0)
    with pytest.raises(ValueError, match="bad interval"):
        HParam(1, "x", "y", interval="0 to 1")


def test_adamw_is_the_optimiser_beside_sgd():
    model = build("tempooling", (FEAT_DIM,), NUM_CLASSES, NUM_SEGMENTS, small("tempooling", optimizer="adamw"))
    assert isinstance(model.optimizer, torch.optim.AdamW) and model.optimizer.defaults["weight_decay"] == 1e-4
    logs = model.update(LabelledBatch(*prototype_videos(8, seed=0)), None, 0.0)
    assert logs["lr"] == pytest.approx(0.03) and math.isfinite(logs["loss"])
    assert isinstance(build("tempooling", (FEAT_DIM,), NUM_CLASSES, NUM_SEGMENTS, {}).optimizer, torch.optim.SGD)


def test_unknown_architecture_or_method_lists_the_available_ones():
    with pytest.raises(HeadError, match="'ta4n'.*tempooling.*trn"):
        build("ta4n", (FEAT_DIM,), NUM_CLASSES, NUM_SEGMENTS, {})
    with pytest.raises(HeadError, match="unknown method 'sgdx'.*erm"):
        build("trn", (FEAT_DIM,), NUM_CLASSES, NUM_SEGMENTS, {}, method="sgdx")


def test_registry_rejects_duplicates_and_wrong_feature_shapes():
    with pytest.raises(HeadError, match="already registered"):
        register_architecture(type("Again", (TemPooling,), {"name": "tempooling"}))
    with pytest.raises(HeadError, match="pooled features"):
        build("trn", (7, 7, FEAT_DIM), NUM_CLASSES, NUM_SEGMENTS, {})
    with pytest.raises(HeadError, match="one class id per video"):
        LabelledBatch(torch.zeros(3, NUM_SEGMENTS, FEAT_DIM), torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize("name", sorted(architectures()))
def test_every_architecture_documents_its_hparams(name):
    cls = architectures()[name]
    assert cls.summary and "\n" not in cls.summary and cls.input in ("pooled", "maps")
    specs = hparam_specs(cls, methods()["erm"])
    assert {"epochs", "batch_size", "lr", "optimizer"} <= set(specs)          # the trainer reads the first two
    for hparam in {**cls.HPARAMS, **cls.RECIPE}.values():
        assert hparam.help and hparam.source
    assert heads.resolve_hparams(name, "erm", {}) == {k: v.default for k, v in specs.items()}   # defaults in range


@pytest.mark.parametrize("name", sorted(methods()))
def test_every_method_documents_its_hparams(name):
    cls = methods()[name]
    assert cls.summary and "\n" not in cls.summary and cls.settings <= {"dg", "da"}
    for hparam in cls.HPARAMS.values():
        assert hparam.help and hparam.source


# ------------------------------------------------------------------------------------------- baselines

@pytest.mark.parametrize("name", BASELINES)
def test_baseline_learns_a_separable_problem(name):
    torch.manual_seed(0)
    head = build(name, (FEAT_DIM,), NUM_CLASSES, NUM_SEGMENTS, small(name))
    losses = train(head, prototype_videos)
    assert accuracy(head, *prototype_videos(400, seed=10_000)) > 0.9
    assert sum(losses[-10:]) < 0.3 * sum(losses[:10])


def test_trn_sees_temporal_order_and_tempooling_cannot():
    torch.manual_seed(0)
    pooling = build("tempooling", (FEAT_DIM,), 2, NUM_SEGMENTS, small("tempooling"))
    relation = build("trn", (FEAT_DIM,), 2, NUM_SEGMENTS, small("trn"))
    train(relation, ordered_videos, steps=60)
    x, y = ordered_videos(400, seed=10_000)
    assert accuracy(relation, x, y) > 0.9
    with torch.no_grad():   # a mean over segments is blind to their order: reversed videos score identically
        assert torch.allclose(pooling.eval()(x), pooling(x.flip(1)), atol=1e-6)


@pytest.mark.parametrize("name", BASELINES)
def test_same_seed_same_losses(name):
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        runs.append(train(build(name, (FEAT_DIM,), NUM_CLASSES, NUM_SEGMENTS, small(name)), prototype_videos, 5))
    assert runs[0] == runs[1]


@pytest.mark.parametrize("name", BASELINES)
def test_source_only_baselines_ignore_the_target_batch(name):
    src = LabelledBatch(*prototype_videos(16, seed=0))
    target_batches = [None, UnlabelledBatch(torch.randn(8, NUM_SEGMENTS, FEAT_DIM)),
                      UnlabelledBatch(100 * torch.randn(24, NUM_SEGMENTS, FEAT_DIM))]
    results = []
    for tgt in target_batches:
        torch.manual_seed(0)
        head = build(name, (FEAT_DIM,), NUM_CLASSES, NUM_SEGMENTS, small(name)).train()
        head.update(src, tgt, 0.0)
        results.append(parameters(head))
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def test_trn_random_tuples_vary_in_training_and_evaluate_their_expectation():
    torch.manual_seed(0)
    no_dropout = small("trn", dropout_frame=0.0, dropout_video=0.0)
    rand = build("trn", (FEAT_DIM,), NUM_CLASSES, 8, {**no_dropout, "tuples": "random"}).arch
    x = torch.randn(4, 8, FEAT_DIM)
    with torch.no_grad():
        rand.train()
        assert not torch.equal(rand(x), rand(x))                 # C(8, n) >> 3: two draws differ
        rand.eval()
        frames = rand.frame_mlp(x)
        relations = rand.encode(x).relations                      # [4, 7, R], scales 8..2
        for i, size in enumerate(rand.temporal.scales):
            every = ordered_tuples(8, size)                       # the draw takes 3 of these M at random
            expected = sum(rand.temporal.fusion[i](frames[:, list(t)].flatten(1)) for t in every)
            assert torch.allclose(relations[:, i], min(3, len(every)) / len(every) * expected, atol=1e-5)
        assert torch.equal(rand(x), rand(x))                      # and it is repeatable
    with pytest.raises(HeadError, match="8 segments"):
        rand(torch.randn(4, 5, FEAT_DIM))


# ------------------------------------------------------------------------------------------- optimiser

def test_dann_lr_schedule_after_an_update_at_progress_p():
    head = build("tempooling", (FEAT_DIM,), NUM_CLASSES, NUM_SEGMENTS, small("tempooling"))
    for p in (0.0, 0.5, 1.0):
        logs = head.update(LabelledBatch(*prototype_videos(8, seed=0)), None, p)
        assert head.optimizer.param_groups[0]["lr"] == pytest.approx(0.03 / (1 + 10 * p) ** 0.75)
        assert logs["lr"] == head.optimizer.param_groups[0]["lr"]
    with pytest.raises(ValueError, match="progress"):
        head.update(LabelledBatch(*prototype_videos(8, seed=0)), None, 1.03)


def test_step_and_constant_lr_schedules():
    hparams = resolve_hparams("tempooling", {"lr_schedule": "step", "lr_steps": [0.5, 0.75], "lr_decay": 0.1})
    assert [lr_factor(hparams, p) for p in (0.0, 0.49, 0.5, 0.8)] == pytest.approx([1.0, 1.0, 0.1, 0.01])
    assert lr_factor(resolve_hparams("tempooling", {"lr_schedule": "constant"}), 0.9) == 1.0


@pytest.mark.parametrize("clip", [1e-3, 0.0])
def test_gradient_clipping_caps_the_step(clip):
    # plain SGD: the step is exactly -lr * clipped gradient, so its norm is lr * min(grad_norm, clip)
    sgd = {"momentum": 0.0, "nesterov": False, "weight_decay": 0.0, "lr_schedule": "constant", "lr": 0.5}
    torch.manual_seed(0)
    head = build("trn", (FEAT_DIM,), NUM_CLASSES, NUM_SEGMENTS, small("trn", clip_grad=clip, **sgd))
    before = parameters(head)
    logs = head.update(LabelledBatch(*prototype_videos(8, seed=0)), None, 0.0)
    step = torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(parameters(head), before)))
    assert logs["grad_norm"] > 1e-2
    expected = 0.5 * (clip if clip else logs["grad_norm"])
    assert step.item() == pytest.approx(expected, rel=1e-3)


def test_head_and_optimizer_state_round_trip_through_a_checkpoint_file(tmp_path):
    no_dropout = small("trn", dropout_frame=0.0, dropout_video=0.0)
    torch.manual_seed(0)
    head = build("trn", (FEAT_DIM,), NUM_CLASSES, NUM_SEGMENTS, no_dropout)
    train(head, prototype_videos, steps=3)
    torch.save({"model": head.state_dict(), "optimizers": [o.state_dict() for o in head.optimizers]},
               tmp_path / "checkpoint.pt")
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    resumed = build("trn", (FEAT_DIM,), NUM_CLASSES, NUM_SEGMENTS, no_dropout)
    resumed.load_state_dict(checkpoint["model"])
    for optimizer, state in zip(resumed.optimizers, checkpoint["optimizers"]):
        optimizer.load_state_dict(state)
    batch = LabelledBatch(*prototype_videos(8, seed=99))
    head.update(batch, None, 0.5)
    resumed.update(batch, None, 0.5)     # momentum buffers and initial_lr came back: the same step
    assert all(torch.equal(a, b) for a, b in zip(parameters(head), parameters(resumed)))
