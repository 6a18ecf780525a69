"""DANN, JAN, AdaBN, MCD: JMMD by hand and against numpy, AdaBN's per-domain statistics, MCD's three steps, every
DA method on TemPooling, TemRelation and a two-stream late fusion."""
from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch

from conftest import make_feature_store
from heads import HeadError, LabelledBatch, UnlabelledBatch, build, preset
from heads.da_baselines import JMMD_KERNELS, jmmd, mmd2, multi_gaussian_kernel

FEAT_DIM, NUM_CLASSES, NUM_SEGMENTS = 8, 3, 5
SMALL = {"tempooling": {"frame_dim": 16, "init_std": 0.0},
         "trn": {"frame_dim": 16, "relation_dim": 16, "init_std": 0.0}}
DA_METHODS = ["ta2n", "ta3n", "dann", "jan", "adabn", "mcd"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run fastest on one thread


def small_model(method: str, arch: str = "trn", feat_shape=(FEAT_DIM,), **extra):
    torch.manual_seed(0)
    return build(arch, method, feat_shape, NUM_CLASSES, NUM_SEGMENTS, {**SMALL[arch], **extra})


def batches(n_source: int = 6, n_target: int = 4, shift: float = 2.0, seed: int = 0,
            streams: dict | None = None) -> tuple[LabelledBatch, UnlabelledBatch]:
    """Source and (shifted) target videos; ``streams`` {name: feature width} gives dict inputs instead."""
    g = torch.Generator().manual_seed(seed)

    def draw(n: int, offset: float):
        if streams is None:
            return offset + torch.randn(n, NUM_SEGMENTS, FEAT_DIM, generator=g)
        return {name: offset + torch.randn(n, NUM_SEGMENTS, width, generator=g) for name, width in streams.items()}

    src = LabelledBatch(draw(n_source, 0.0), torch.arange(n_source) % NUM_CLASSES)
    return src, UnlabelledBatch(draw(n_target, shift))


def snapshot(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def changed(module: torch.nn.Module, before: list[torch.Tensor]) -> bool:
    return any(not torch.equal(p, b) for p, b in zip(module.parameters(), before))


# ---------------------------------------------------------------------------------------------- JMMD

# Two points: z = (0, 1) (squared distance 1) and predictions (1, 0), (0, 1) (squared distance 2).
FEATURE_OFF_DIAGONAL = sum(math.exp(-1 / b) for b in (0.25, 0.5, 1.0, 2.0, 4.0))   # mean distance 1 × 2^(-2..2)
PREDICTION_OFF_DIAGONAL = {"jan": math.exp(-2 / 1.68),                             # one kernel, bandwidth 1.68
                           "ta3n-code": math.exp(-2 / 1.0) + math.exp(-2 / 2.0)}   # mean distance 2 × 2^(-1..0)
PREDICTION_DIAGONAL = {"jan": 1.0, "ta3n-code": 2.0}


@pytest.mark.parametrize("choice", ["jan", "ta3n-code"])
def test_each_jmmd_kernel_choice_on_two_points_by_hand(choice):
    z = torch.tensor([[0.0], [1.0]], dtype=torch.float64)
    p = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    (feature_mul, feature_num, feature_bw), (pred_mul, pred_num, pred_bw) = JMMD_KERNELS[choice]
    feature = multi_gaussian_kernel(z, feature_mul, feature_num, feature_bw)
    prediction = multi_gaussian_kernel(p, pred_mul, pred_num, pred_bw)
    assert feature.flatten().tolist() == pytest.approx([5.0, FEATURE_OFF_DIAGONAL, FEATURE_OFF_DIAGONAL, 5.0])
    off, diagonal = PREDICTION_OFF_DIAGONAL[choice], PREDICTION_DIAGONAL[choice]
    assert prediction.flatten().tolist() == pytest.approx([diagonal, off, off, diagonal])
    # one source, one target video: MMD² = K_ss + K_tt - 2 K_st of the product kernel
    expected = 2 * 5.0 * diagonal - 2 * FEATURE_OFF_DIAGONAL * off
    assert jmmd([z, p], n_source=1, kernels=JMMD_KERNELS[choice]).item() == pytest.approx(expected)


def numpy_multi_kernel(z: np.ndarray, kernel_mul: float, kernel_num: int, fix_sigma: float | None) -> np.ndarray:
    """``guassian_kernel`` of JAN's and TA3N's code, in numpy."""
    distances = ((z[:, None, :] - z[None, :, :]) ** 2).sum(-1)
    n = len(z)
    base = (fix_sigma or distances.sum() / (n * n - n)) / kernel_mul ** (kernel_num // 2)
    return sum(np.exp(-distances / (base * kernel_mul ** i)) for i in range(kernel_num))


@pytest.mark.parametrize("choice", ["jan", "ta3n-code"])
def test_jmmd_matches_a_direct_numpy_computation(choice):
    rng = np.random.default_rng(0)
    features = rng.normal(size=(9, 6))                                   # 5 source + 4 target videos
    logits = rng.normal(size=(9, 3))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    (fm, fn, fs), (pm, pn, ps) = JMMD_KERNELS[choice]
    joint = numpy_multi_kernel(features, fm, fn, fs) * numpy_multi_kernel(probs, pm, pn, ps)
    s, t = slice(0, 5), slice(5, 9)
    expected = joint[s, s].mean() + joint[t, t].mean() - 2 * joint[s, t].mean()
    got = jmmd([torch.from_numpy(features), torch.from_numpy(probs)], n_source=5, kernels=JMMD_KERNELS[choice])
    assert got.item() == pytest.approx(expected, rel=1e-9)
    assert expected > 0


def test_jmmd_stays_finite_when_a_layer_has_identical_rows():
    """Identical predictions: bandwidth base 0 (NaN in the code); every kernel value is exp(0) = 1 at any bandwidth."""
    kernels = JMMD_KERNELS["ta3n-code"]
    rng = np.random.default_rng(1)
    features = rng.normal(size=(9, 6))
    uniform = np.full((9, 3), 1 / 3)                                     # e.g. an untrained classifier
    joint = numpy_multi_kernel(features, 2.0, 5, None) * 2.0             # the prediction kernel: 2 Gaussians, all 1
    s, t = slice(0, 5), slice(5, 9)
    expected = joint[s, s].mean() + joint[t, t].mean() - 2 * joint[s, t].mean()
    got = jmmd([torch.from_numpy(features), torch.from_numpy(uniform)], n_source=5, kernels=kernels)
    assert got.item() == pytest.approx(expected, rel=1e-9)
    # identical float32 rows of size ~1: ‖a‖² + ‖b‖² - 2 a·b uncentred leaves them ~1e-4 apart (JMMD 0.63, not 2.86)
    rows = (1.0 + torch.rand(1, 256, generator=torch.Generator().manual_seed(0))).expand(9, 256)
    video = torch.from_numpy(features).float().requires_grad_()
    value = jmmd([video, rows], n_source=5, kernels=kernels)
    value.backward()
    assert value.item() == pytest.approx(2.0 * jmmd([video], n_source=5, kernels=kernels[:1]).item(), rel=1e-5)
    assert torch.isfinite(video.grad).all()


def test_mmd2_is_zero_for_identical_samples_and_matches_the_definition():
    kernel = torch.tensor([[1.0, 0.5, 0.2], [0.5, 1.0, 0.1], [0.2, 0.1, 1.0]])   # sample: 2 source, 1 target
    assert mmd2(kernel, 2).item() == pytest.approx((1 + 0.5 + 0.5 + 1) / 4 + 1 - 2 * (0.2 + 0.1) / 2)
    z = torch.randn(4, 3, dtype=torch.float64)
    assert jmmd([torch.cat([z, z])], n_source=4, kernels=((2.0, 5, None),)).item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("choice", ["jan", "ta3n-code"])
def test_jan_objective_is_the_weighted_jmmd_of_z_and_the_softmax_with_the_chosen_kernels(choice):
    src, tgt = batches()
    model = small_model("jan", jmmd_weight=0.5, jmmd_kernels=choice, dropout_frame=0.0, dropout_video=0.0)
    terms, _ = model.objective(src, tgt, 0.0)
    with torch.no_grad():
        x = torch.cat([src.x, tgt.x])
        video = model.arch.features(x)
        expected = 0.5 * jmmd([video, model.arch.classify(video).softmax(1)], len(src.y), JMMD_KERNELS[choice])
    assert terms["loss_jmmd"].item() == pytest.approx(expected.item(), rel=1e-5)
    logs = model.update(src, tgt, 0.0)
    assert logs["loss"] == pytest.approx(logs["loss_y"] + logs["loss_jmmd"])


# --------------------------------------------------------------------------------------------- AdaBN

@pytest.mark.parametrize("arch", ["tempooling", "trn"])
def test_adabn_keeps_statistics_per_domain_and_uses_the_target_ones_for_target_batches(arch):
    model = small_model("adabn", arch).train()
    assert model.hparams["frame_norm"] == "batch"                    # ARCH_DEFAULTS turned the BN on
    src, tgt = batches(shift=3.0)
    linear, norm = model.arch.frame_mlp[0], model.arch.frame_mlp[1]
    target_mean = model.target_statistics.mean_0
    with torch.no_grad():   # pre-activations of every frame, before the update changes the weights
        source_batch_mean = linear(src.x).reshape(-1, SMALL[arch]["frame_dim"]).mean(0)
        target_batch_mean = linear(tgt.x).reshape(-1, SMALL[arch]["frame_dim"]).mean(0)
    model.update(src, tgt, 0.0)
    # one batch with momentum 0.1 from a zero start: running mean = 0.1 * batch mean; the module holds the source's
    assert torch.allclose(norm.running_mean, 0.1 * source_batch_mean, atol=1e-6)
    assert torch.allclose(target_mean, 0.1 * target_batch_mean, atol=1e-6)
    assert norm.num_batches_tracked.item() == model.target_statistics.batches_0.item() == 1

    model.eval()
    x = tgt.x
    statistics = {"source": (norm.running_mean.clone(), norm.running_var.clone()),
                  "target": (target_mean.clone(), model.target_statistics.var_0.clone())}

    def normalised(domain: str) -> torch.Tensor:
        mean, var = statistics[domain]
        return (linear(x) - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias

    with torch.no_grad():
        by_default = model.features(x)                                # DA evaluation is on the target
        expected = model.arch.aggregate(model.arch.temporal(torch.relu(normalised("target")))
                                        if arch == "trn" else torch.relu(normalised("target")))
        assert torch.allclose(by_default, expected, atol=1e-5)
        assert torch.allclose(model.predict(x), model.arch.classify(by_default), atol=1e-5)
        model.set_eval_domain("source")
        assert torch.allclose(model.features(x), model.arch.features(x))   # between calls: the source statistics
        assert not torch.allclose(model.features(x), by_default)
    assert torch.equal(norm.running_mean, statistics["source"][0])      # the swaps put everything back
    assert torch.equal(target_mean, statistics["target"][0])
    with pytest.raises(HeadError, match="source.*target"):
        model.set_eval_domain("test")


def test_adabn_state_dict_holds_both_domains_and_a_reload_predicts_the_same():
    model = small_model("adabn").train()
    for seed in range(2):
        model.update(*batches(seed=seed), 0.0)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    fresh = small_model("adabn")
    fresh.load_state_dict(torch.load(io.BytesIO(buffer.getvalue())))
    x = batches(seed=5)[1].x
    model.eval(), fresh.eval()
    for domain in ("target", "source"):
        model.set_eval_domain(domain), fresh.set_eval_domain(domain)
        assert torch.equal(model.predict(x), fresh.predict(x))


def test_adabn_swaps_the_target_statistics_in_once_even_when_nested():
    model = small_model("adabn").train()
    model.update(*batches(), 0.0)
    norm, target_mean = model.arch.frame_mlp[1], model.target_statistics.mean_0.clone()
    source_mean = norm.running_mean.clone()
    with model.domain_statistics("target"):
        with model.domain_statistics("target"):      # e.g. predict called inside a target block
            assert torch.equal(norm.running_mean, target_mean)
        assert torch.equal(norm.running_mean, target_mean)
    assert torch.equal(norm.running_mean, source_mean)


def test_adabn_needs_batch_norm_and_adapts_every_bn_layer_of_a_fusion():
    with pytest.raises(HeadError, match="batch-norm"):
        small_model("adabn", frame_norm="none")
    model = small_model("adabn", feat_shape={"rgb": (8,), "flow": (6,)}).train()
    assert len(model.norms) == 2                                      # one G_sf per stream
    src, tgt = batches(streams={"rgb": 8, "flow": 6})
    model.update(src, tgt, 0.0)
    for i, norm in enumerate(model.norms):
        assert not torch.allclose(norm.running_mean, getattr(model.target_statistics, f"mean_{i}"))


def test_methods_without_per_domain_state_ignore_the_eval_domain():
    model = small_model("ta3n").eval()
    x = batches()[0].x
    before = model.predict(x)
    model.set_eval_domain("source")
    assert torch.equal(model.predict(x), before)


# ----------------------------------------------------------------------------------------------- MCD

def test_mcd_three_steps_update_the_parameters_they_should_and_no_others():
    """No weight decay, momentum or dropout: a parameter moves only by its own gradient, and d is deterministic."""
    plain_sgd = {"weight_decay": 0.0, "momentum": 0.0, "dropout_frame": 0.0, "dropout_video": 0.0}
    model = small_model("mcd", generator_steps=2, **plain_sgd).train()
    generator = torch.nn.ModuleList([model.arch.frame_mlp, model.arch.temporal])
    classifiers = torch.nn.ModuleList([model.arch.classifier, model.classifier2])
    owned = [{id(p) for group in o.param_groups for p in group["params"]} for o in model.optimizers]
    assert owned == [{id(p) for p in generator.parameters()}, {id(p) for p in classifiers.parameters()}]
    src, tgt = batches()

    def measures() -> tuple[float, float]:
        """(source loss of F1 + F2, discrepancy d on target)."""
        with torch.no_grad():
            return (model.source_loss(model.arch.features(src.x), src.y).item(),
                    model.discrepancy(model.arch.features(tgt.x)).item())

    steps = {"A": lambda: model.step_a(src, 0.0), "B": lambda: model.step_b(src, tgt, 0.0),
             "C": lambda: model.step_c(tgt, 0.0)}
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


def test_mcd_discrepancy_is_the_mean_absolute_difference_of_the_two_softmaxes():
    model = small_model("mcd").eval()
    with torch.no_grad():
        for classifier, bias in ((model.arch.classifier, [0.0, 0.0, 0.0]), (model.classifier2, [math.log(2), 0, 0])):
            classifier[1].weight.zero_()
            classifier[1].bias.copy_(torch.tensor(bias))
    # softmaxes (1/3, 1/3, 1/3) and (1/2, 1/4, 1/4): |differences| 1/6, 1/12, 1/12, mean 1/9
    assert model.discrepancy(torch.randn(4, model.arch.video_dim)).item() == pytest.approx(1 / 9)


# ---------------------------------------------------------------------------------------------- DANN

@pytest.mark.parametrize("arch", ["tempooling", "trn"])
def test_dann_has_a_frame_and_a_video_discriminator_on_either_architecture(arch):
    assert set(small_model("dann", arch).discriminators) == {"frame", "video"}
    assert set(small_model("ta2n", arch).discriminators) == (
        {"frame", "video"} if arch == "tempooling" else {"frame", "relation", "video"})


# ------------------------------------------------------------------------------------------- presets

@pytest.mark.parametrize("arch", ["tempooling", "trn"])
def test_demo_presets_apply_to_their_method_on_any_architecture(arch):
    assert preset("demo", arch, "jan").hparams == {"jmmd_weight": 0.1}
    assert preset("demo", arch, "mcd").hparams == {"generator_steps": 1}
    assert small_model("mcd", arch, **preset("demo", arch, "mcd").hparams).hparams["generator_steps"] == 1


# ------------------------------------------------------------------------- every method, every model

@pytest.mark.parametrize("arch", ["tempooling", "trn"])
@pytest.mark.parametrize("method", DA_METHODS)
def test_every_da_method_trains_three_updates_and_reloads_on_either_architecture(method, arch):
    model = small_model(method, arch).train()
    before = snapshot(model.arch)
    for seed in range(3):
        logs = model.update(*batches(seed=seed), seed / 3)
        assert all(math.isfinite(value) for value in logs.values()), logs
    assert changed(model.arch, before)
    model.eval()
    x = batches(seed=9)[1].x
    logits = model.predict(x)
    assert logits.shape == (4, NUM_CLASSES) and torch.isfinite(logits).all()
    fresh = small_model(method, arch).eval()
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh.predict(x), logits)


@pytest.mark.parametrize("method", DA_METHODS)
def test_every_da_method_trains_on_a_two_stream_late_fusion(method):
    streams = {"rgb": 8, "flow": 6}
    model = small_model(method, feat_shape={name: (width,) for name, width in streams.items()}).train()
    before = snapshot(model.arch)
    for seed in range(3):
        logs = model.update(*batches(seed=seed, streams=streams), seed / 3)
        assert all(math.isfinite(value) for value in logs.values()), logs
    assert changed(model.arch, before)
    model.eval()
    x = batches(seed=9, streams=streams)[1].x
    assert model.predict(x).shape == (4, NUM_CLASSES)
    assert model.features(x).shape == (4, model.arch.video_dim)


# ------------------------------------------------------------------------------------ through the CLI

@pytest.fixture(scope="module")
def shifted_store(tmp_path_factory):
    return make_feature_store(tmp_path_factory.mktemp("shifted"), target_shift=1.0, per_class=4)


# trainer-level: the lead ports this
@pytest.mark.parametrize("method,arch", [(method, "trn") for method in DA_METHODS]
                         + [(method, "tempooling") for method in DA_METHODS if method != "ta2n"])  # ta2n there is dann
def test_every_da_method_trains_with_vidshift_train_and_its_checkpoint_evaluates_the_same(
        method, arch, shifted_store, tmp_path):
    from click.testing import CliRunner

    from pipelines.cli import main
    from pipelines.evaluate import evaluate_run

    store, manifest = shifted_store
    out = tmp_path / "run"
    settings = ["epochs=2", "batch_size=8", "frame_dim=16", "init_std=0"] + (["relation_dim=16"] if arch == "trn" else [])
    result = CliRunner().invoke(main, ["train", "--store", str(store), "--manifest", str(manifest), "--head", arch,
                                       "--method", method, "--source", "src", "--target", "tgt", "--setting", "da",
                                       "--out", str(out), "--workers", "0",
                                       *[arg for s in settings for arg in ("--set", s)]])
    assert result.exit_code == 0, result.output
    history = json.loads((out / "metrics.json").read_text())["epochs"]
    assert len(history) == 2 and all(np.isfinite(record["loss"]) for record in history)
    report = evaluate_run(out, store, manifest, "tgt", "test", checkpoint="checkpoint", workers=0)
    assert report["accuracy"] == pytest.approx(history[-1]["tgt_acc"])
