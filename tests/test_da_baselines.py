"""DANN, JAN, AdaBN, MCD: JMMD against numpy, AdaBN's per-domain statistics, MCD's three steps, CLI training."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import make_feature_store
from heads import HeadError, LabelledBatch, UnlabelledBatch, build
from heads.da_baselines import jmmd, mmd2
from pipelines.cli import main
from pipelines.evaluate import evaluate_run

FEAT_DIM, NUM_CLASSES, NUM_SEGMENTS = 8, 3, 5
SMALL = {"frame_dim": 16, "relation_dim": 16, "init_std": 0.0}
DA_HEADS = ["ta2n", "ta3n", "dann", "jan", "adabn", "mcd"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run fastest on one thread


def small_head(name: str, **extra):
    torch.manual_seed(0)
    return build(name, (FEAT_DIM,), NUM_CLASSES, NUM_SEGMENTS, {**SMALL, **extra})


def batches(n_source: int = 6, n_target: int = 4, shift: float = 2.0) -> tuple[LabelledBatch, UnlabelledBatch]:
    g = torch.Generator().manual_seed(0)
    src = LabelledBatch(torch.randn(n_source, NUM_SEGMENTS, FEAT_DIM, generator=g),
                        torch.arange(n_source) % NUM_CLASSES)
    return src, UnlabelledBatch(shift + torch.randn(n_target, NUM_SEGMENTS, FEAT_DIM, generator=g))


def snapshot(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def changed(module: torch.nn.Module, before: list[torch.Tensor]) -> bool:
    return any(not torch.equal(p, b) for p, b in zip(module.parameters(), before))


# ---------------------------------------------------------------------------------------------- JMMD

def numpy_multi_kernel(z: np.ndarray, kernel_mul: float, kernel_num: int) -> np.ndarray:
    distances = ((z[:, None, :] - z[None, :, :]) ** 2).sum(-1)
    n = len(z)
    base = distances.sum() / (n * n - n) / kernel_mul ** (kernel_num // 2)      # TA3N loss.guassian_kernel
    return sum(np.exp(-distances / (base * kernel_mul ** i)) for i in range(kernel_num))


def test_jmmd_matches_a_direct_numpy_computation():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(9, 6))                                   # 5 source + 4 target videos
    logits = rng.normal(size=(9, 3))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    joint = numpy_multi_kernel(features, 2.0, 5) * numpy_multi_kernel(probs, 2.0, 2)
    s, t = slice(0, 5), slice(5, 9)
    expected = joint[s, s].mean() + joint[t, t].mean() - 2 * joint[s, t].mean()
    got = jmmd([torch.from_numpy(features), torch.from_numpy(probs)], n_source=5)
    assert got.item() == pytest.approx(expected, rel=1e-9)
    assert expected > 0


def test_jmmd_stays_finite_when_a_layer_has_identical_rows():
    """Identical predictions: bandwidth base 0 (NaN in the code); every kernel value is exp(0) = 1 at any bandwidth."""
    rng = np.random.default_rng(1)
    features = rng.normal(size=(9, 6))
    uniform = np.full((9, 3), 1 / 3)                                     # e.g. an untrained classifier
    joint = numpy_multi_kernel(features, 2.0, 5) * 2.0                   # the prediction kernel: 2 Gaussians, all 1
    s, t = slice(0, 5), slice(5, 9)
    expected = joint[s, s].mean() + joint[t, t].mean() - 2 * joint[s, t].mean()
    got = jmmd([torch.from_numpy(features), torch.from_numpy(uniform)], n_source=5)
    assert got.item() == pytest.approx(expected, rel=1e-9)
    # identical float32 rows of size ~1: ‖a‖² + ‖b‖² - 2 a·b uncentred leaves them ~1e-4 apart (JMMD 0.63, not 2.86)
    rows = (1.0 + torch.rand(1, 256, generator=torch.Generator().manual_seed(0))).expand(9, 256)
    video = torch.from_numpy(features).float().requires_grad_()
    value = jmmd([video, rows], n_source=5)
    value.backward()
    assert value.item() == pytest.approx(2.0 * jmmd([video], n_source=5, kernels=((2.0, 5),)).item(), rel=1e-5)
    assert torch.isfinite(video.grad).all()


def test_mmd2_is_zero_for_identical_samples_and_matches_the_definition():
    kernel = torch.tensor([[1.0, 0.5, 0.2], [0.5, 1.0, 0.1], [0.2, 0.1, 1.0]])   # sample: 2 source, 1 target
    assert mmd2(kernel, 2).item() == pytest.approx((1 + 0.5 + 0.5 + 1) / 4 + 1 - 2 * (0.2 + 0.1) / 2)
    z = torch.randn(4, 3, dtype=torch.float64)
    assert jmmd([torch.cat([z, z])], n_source=4, kernels=((2.0, 5),)).item() == pytest.approx(0.0, abs=1e-12)


def test_jan_update_logs_the_weighted_jmmd():
    src, tgt = batches()
    logs = small_head("jan", jmmd_weight=0.5).train().update(src, tgt, 0.0)
    assert logs["loss"] == pytest.approx(logs["loss_y"] + logs["loss_jmmd"])
    unweighted = small_head("jan", jmmd_weight=1.0).train().update(src, tgt, 0.0)["loss_jmmd"]
    assert logs["loss_jmmd"] == pytest.approx(0.5 * unweighted, rel=1e-5)


# --------------------------------------------------------------------------------------------- AdaBN

def test_adabn_keeps_statistics_per_domain_and_uses_the_target_ones_for_target_batches():
    head = small_head("adabn", temporal="pooling").train()
    src, tgt = batches(shift=3.0)
    linear, statistics = head.frame_mlp.linear, head.frame_mlp.norm.statistics
    with torch.no_grad():   # pre-activations of every frame, before the update changes the weights
        source_mean = linear(src.x).reshape(-1, SMALL["frame_dim"]).mean(0)
        target_mean = linear(tgt.x).reshape(-1, SMALL["frame_dim"]).mean(0)
    head.update(src, tgt, 0.0)
    # one batch with momentum 0.1 from a zero start: running mean = 0.1 * batch mean
    assert torch.allclose(statistics["source"].running_mean, 0.1 * source_mean, atol=1e-6)
    assert torch.allclose(statistics["target"].running_mean, 0.1 * target_mean, atol=1e-6)

    head.eval()
    x = tgt.x
    with torch.no_grad():
        norm = head.frame_mlp.norm

        def normalised(domain: str) -> torch.Tensor:
            stats = statistics[domain]
            standardised = (linear(x) - stats.running_mean) / torch.sqrt(stats.running_var + stats.eps)
            return standardised * norm.weight + norm.bias

        by_default = head.video_features(x)                       # DA evaluation is on the target
        assert torch.allclose(by_default, torch.relu(normalised("target")).mean(dim=1), atol=1e-5)
        head.set_eval_domain("source")
        assert torch.allclose(head.video_features(x), torch.relu(normalised("source")).mean(dim=1), atol=1e-5)
        assert not torch.allclose(head.video_features(x), by_default)
    with pytest.raises(HeadError, match="source.*target"):
        head.set_eval_domain("test")


def test_heads_without_per_domain_state_ignore_the_eval_domain():
    head = small_head("trn").eval()
    x = batches()[0].x
    before = head(x)
    head.set_eval_domain("source")
    assert torch.equal(head(x), before)


# ----------------------------------------------------------------------------------------------- MCD

def test_mcd_three_steps_update_the_parameters_they_should_and_no_others():
    """No weight decay, momentum or dropout: a parameter moves only by its own gradient, and d is deterministic."""
    plain_sgd = {"weight_decay": 0.0, "momentum": 0.0, "dropout_frame": 0.0, "dropout_video": 0.0}
    head = small_head("mcd", generator_steps=2, **plain_sgd).train()
    generator = torch.nn.ModuleList([head.frame_mlp, head.temporal])
    classifiers = torch.nn.ModuleList([head.classifier, head.classifier2])
    owned = [{id(p) for group in o.param_groups for p in group["params"]} for o in head.optimizers]
    assert owned == [{id(p) for p in generator.parameters()}, {id(p) for p in classifiers.parameters()}]
    src, tgt = batches()

    def measures() -> tuple[float, float]:
        """(source loss of F1 + F2, discrepancy d on target)."""
        with torch.no_grad():
            return (head.source_loss(head.video_features(src.x), src.y).item(),
                    head.discrepancy(head.video_features(tgt.x)).item())

    steps = {"A": lambda: head.step_a(src, 0.0), "B": lambda: head.step_b(src, tgt, 0.0),
             "C": lambda: head.step_c(tgt, 0.0)}
    updated = {"A": (True, True), "B": (False, True), "C": (True, False)}     # (generator, classifiers)
    for step, run in steps.items():
        before = snapshot(generator), snapshot(classifiers)
        loss_before, d_before = measures()
        run()
        # unchanged means bit-identical: changed() compares with torch.equal
        assert (changed(generator, before[0]), changed(classifiers, before[1])) == updated[step], step
        loss_after, d_after = measures()
        if step == "A":
            assert loss_after < loss_before
        elif step == "B":                                  # the classifiers pull apart on target
            assert d_after > d_before
        else:                                              # the generator brings the target where they agree
            assert d_after < d_before


# ---------------------------------------------------------------------------------------------- DANN

@pytest.mark.parametrize("temporal", ["pooling", "relation"])
def test_dann_has_a_frame_and_a_video_discriminator_on_either_temporal_module(temporal):
    head = small_head("dann", temporal=temporal)
    assert set(head.discriminators) == {"frame", "video"}
    assert type(head.temporal).__name__ == {"pooling": "TemporalMean", "relation": "MultiScaleRelation"}[temporal]
    assert set(small_head("ta2n", temporal=temporal).discriminators) == (
        {"frame", "video"} if temporal == "pooling" else {"frame", "relation", "video"})


# ------------------------------------------------------------------------------------ through the CLI

@pytest.fixture(scope="module")
def shifted_store(tmp_path_factory):
    return make_feature_store(tmp_path_factory.mktemp("shifted"), target_shift=1.0, per_class=4)


@pytest.mark.parametrize("name,temporal", [(name, "relation") for name in DA_HEADS]
                         + [(name, "pooling") for name in DA_HEADS if name != "ta2n"])   # ta2n on pooling is dann
def test_every_da_head_trains_with_vidshift_train_and_its_checkpoint_evaluates_the_same(
        name, temporal, shifted_store, tmp_path):
    store, manifest = shifted_store
    out = tmp_path / "run"
    settings = ["epochs=2", "batch_size=8", "frame_dim=16", "relation_dim=16", "init_std=0", f"temporal={temporal}"]
    result = CliRunner().invoke(main, ["train", "--store", str(store), "--manifest", str(manifest), "--head", name,
                                       "--source", "src", "--target", "tgt", "--setting", "da", "--out", str(out),
                                       "--workers", "0", *[arg for s in settings for arg in ("--set", s)]])
    assert result.exit_code == 0, result.output
    history = json.loads((out / "metrics.json").read_text())["epochs"]
    assert len(history) == 2 and all(np.isfinite(record["loss"]) for record in history)
    report = evaluate_run(out, store, manifest, "tgt", "test", checkpoint="checkpoint", workers=0)
    assert report["accuracy"] == pytest.approx(history[-1]["tgt_acc"])
