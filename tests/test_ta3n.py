"""TA2N / TA3N: each equation on hand-computable inputs, the GRL coefficients, the options, and a synthetic shift."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import make_feature_store
from heads import HeadError, LabelledBatch, UnlabelledBatch, build, preset
from heads.method import presets_for
from heads.ta3n import attentive_entropy, domain_attention

FEAT_DIM, NUM_CLASSES, NUM_SEGMENTS = 8, 4, 5
SMALL = {"tempooling": {"frame_dim": 16, "init_std": 0.0},
         "trn": {"frame_dim": 16, "relation_dim": 16, "init_std": 0.0}}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run fastest on one thread


def small_model(method: str = "ta3n", arch: str = "trn", **extra):
    torch.manual_seed(0)
    return build(arch, method, (FEAT_DIM,), NUM_CLASSES, NUM_SEGMENTS, {**SMALL[arch], **extra})


def videos(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, NUM_SEGMENTS, FEAT_DIM, generator=torch.Generator().manual_seed(seed))


def pin_output(discriminator, second_logit: float) -> None:
    """Make a discriminator output the logits (0, second_logit) whatever its input."""
    last = discriminator.classifier[-1]
    torch.nn.init.zeros_(last.weight)
    with torch.no_grad():
        last.bias.copy_(torch.tensor([0.0, second_logit]))


# H of softmax(0, ln k) = p (1/(1+k), k/(1+k)), in bits; w = 1 - H
H_BITS = {1: 1.0, 3: 0.8112781244591328, 7: 0.5435644431995964}


# --------------------------------------------------------------------------------------- eq. 7-9

def test_domain_attention_is_one_minus_the_entropy():
    logits = torch.tensor([[0.0, 0.0], [0.0, math.log(3)], [0.0, math.log(7)], [50.0, -50.0]])
    assert domain_attention(logits, "bits").tolist() == pytest.approx([0.0, 1 - H_BITS[3], 1 - H_BITS[7], 1.0])
    assert domain_attention(logits[:1], "nats").item() == pytest.approx(1 - math.log(2))   # the code's 0.307


def test_ta3n_video_feature_is_the_attended_sum_of_relations_with_residual():
    model = small_model().eval()
    for discriminator, k in zip(model.discriminators["relation"], (1, 3, 7, 1)):    # scales 5, 4, 3, 2
        pin_output(discriminator, math.log(k))
    x = videos(3, seed=1)
    out = model.run(x)
    w = torch.tensor([1 - H_BITS[k] for k in (1, 3, 7, 1)])
    assert torch.allclose(out.attention, w.expand(3, 4))
    relations = model.arch.encode(x).relations                                      # R_n, [3, 4, 16]
    expected = ((1 + w)[None, :, None] * relations).sum(dim=1)                       # eq. 8
    assert torch.allclose(out.video, expected, atol=1e-6)
    assert torch.allclose(model.features(x), expected, atol=1e-6)
    assert torch.allclose(model.predict(x), model.arch.classify(expected), atol=1e-6)


def test_ta3n_on_pooling_attends_each_frame_with_the_frame_discriminator():       # §7.2, Fig. 7
    model = small_model(arch="tempooling").eval()
    assert set(model.discriminators) == {"frame", "video"}
    pin_output(model.discriminators["frame"], math.log(3))
    x = videos(2, seed=2)
    frames = model.arch.encode(x).frames
    assert torch.allclose(model.features(x), (2 - H_BITS[3]) * frames.mean(dim=1), atol=1e-6)
    assert model.run(x).attention.shape == (2, NUM_SEGMENTS)


def test_attentive_entropy_value_is_in_nats():
    class_logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0]])     # H(ŷ) = ln 4, 0
    domain_logits = torch.tensor([[0.0, math.log(3)], [0.0, 0.0]])                  # H(d̂) = 0.811 ln 2, ln 2
    expected = ((1 + H_BITS[3] * math.log(2)) * math.log(4) + (1 + math.log(2)) * 0.0) / 2
    assert attentive_entropy(class_logits, domain_logits).item() == pytest.approx(expected)


@pytest.mark.parametrize("unit", ["bits", "nats"])
def test_ta3n_loss_adds_gamma_times_the_attentive_entropy_in_nats_whatever_the_attention_unit(unit):
    model = small_model(gamma=0.3, entropy_unit=unit).eval()
    torch.nn.init.zeros_(model.arch.classifier[1].weight)     # ŷ uniform over 4 classes: H(ŷ) = ln 4
    torch.nn.init.zeros_(model.arch.classifier[1].bias)
    pin_output(model.discriminators["video"], math.log(3))   # H(d̂) = 0.811 bits = 0.562 nats for every video
    for discriminator in model.discriminators["relation"]:
        pin_output(discriminator, math.log(3))
    out = model.run(videos(6, seed=3))
    terms = model.loss_terms(out, torch.tensor([0, 1, 2]))    # 3 source + 3 target videos
    assert terms["loss_ae"].item() == pytest.approx(0.3 * (1 + H_BITS[3] * math.log(2)) * math.log(4))
    assert terms["loss_y"].item() == pytest.approx(math.log(4))
    assert terms["loss_video"].item() == pytest.approx(-(math.log(1 / 4) + math.log(3 / 4)) / 2)
    w = {"bits": 1 - H_BITS[3], "nats": 1 - H_BITS[3] * math.log(2)}[unit]  # the unit acts inside w only
    assert torch.allclose(out.attention, torch.full((6, 4), w))


# ------------------------------------------------------------------------------------ GRL coefficients

def test_dann_schedule_of_the_grl_coefficients():
    model = small_model("ta2n", grl_schedule="dann")
    ramp = {0.0: 0.0, 0.1: 2 / (1 + math.exp(-1)) - 1, 0.5: 2 / (1 + math.exp(-5)) - 1}   # 0, 0.4621, 0.9866
    src, tgt = LabelledBatch(videos(4, seed=4), torch.tensor([0, 1, 2, 3])), UnlabelledBatch(videos(3, seed=5))
    for progress, scale in ramp.items():
        expected = {"frame": 0.75 * scale, "relation": 0.5 * scale, "video": 0.75 * scale}  # λs, λr, λt (§7.3)
        assert model.grl_coefficients(progress) == pytest.approx(expected)
        logs = model.train().update(src, tgt, progress)
        assert [logs[f"grl_{level}"] for level in expected] == pytest.approx(list(expected.values()))
    assert small_model("ta2n").grl_coefficients(0.1) == pytest.approx({"frame": 0.75, "relation": 0.5, "video": 0.75})


@pytest.mark.parametrize("method,arch,levels", [("ta2n", "trn", {"frame", "relation", "video"}),
                                                ("ta2n", "tempooling", {"frame", "video"}),
                                                ("dann", "trn", {"frame", "video"})])
def test_each_discriminator_gradient_reaches_the_features_reversed_and_scaled_by_its_lambda(method, arch, levels):
    lambdas = {"frame": 0.3, "relation": 0.6, "video": 1.7}
    model = small_model(method, arch, lambda_s=0.3, lambda_r=0.6, lambda_t=1.7).eval()  # eval: no dropout
    assert set(model.discriminators) == levels
    x, n_source = videos(6, seed=6), 3
    is_target = torch.tensor([0, 0, 0, 1, 1, 1])
    feature_extractor = model.arch.frame_mlp[0].weight          # G_sf: every discriminator's gradient reaches it

    def plain_domain_loss(level: str) -> torch.Tensor:
        """The same domain loss with the discriminator's MLP applied to the features directly (no GRL)."""
        encoding = model.arch.encode(x)
        if level == "frame":
            logits = model.discriminators["frame"].classifier(encoding.frames)
            labels = is_target[:, None].expand(6, NUM_SEGMENTS)
        elif level == "relation":
            logits = torch.stack([d.classifier(encoding.relations[:, i])
                                  for i, d in enumerate(model.discriminators["relation"])], dim=1)
            labels = is_target[:, None].expand(6, NUM_SEGMENTS - 1)
        else:
            logits, labels = model.discriminators["video"].classifier(model.arch.aggregate(encoding.parts)), is_target
        return F.cross_entropy(logits.flatten(0, -2), labels.flatten())

    for level in model.discriminators:
        lam = lambdas[level]
        discriminator = model.discriminators[level]
        model.zero_grad()
        plain_domain_loss(level).backward()
        plain = feature_extractor.grad.clone(), [p.grad.clone() for p in discriminator.parameters()]
        model.zero_grad()
        terms = model.loss_terms(model.run(x, model.grl_coefficients(0.0)), torch.zeros(n_source, dtype=torch.long))
        terms[f"loss_{level}"].backward()
        assert plain[0].abs().sum() > 0
        assert torch.allclose(feature_extractor.grad, -lam * plain[0], atol=1e-7)
        for reversed_grad, plain_grad in zip((p.grad for p in discriminator.parameters()), plain[1]):
            assert torch.allclose(reversed_grad, plain_grad, atol=1e-7)   # the discriminator trains at full strength


def test_frame_and_video_discriminators_start_at_the_architecture_init_std():
    model = small_model("ta2n", init_std=0.001)
    for level in ("frame", "video"):
        weights = torch.cat([p.flatten() for name, p in model.discriminators[level].named_parameters()
                             if name.endswith("weight")])
        assert weights.std().item() == pytest.approx(0.001, rel=0.2)
        assert all(p.abs().sum() == 0 for name, p in model.discriminators[level].named_parameters()
                   if name.endswith("bias"))
    relation_bias = model.discriminators["relation"][0].classifier[0].bias
    assert relation_bias.abs().sum() > 0                          # PyTorch's default init, as the code


# ----------------------------------------------------------------------------------------- options

def test_detached_attention_keeps_the_class_loss_out_of_the_discriminators():
    x, labels = videos(4, seed=7), torch.tensor([0, 1, 2, 3])
    for detach, reaches in ((True, False), (False, True)):
        model = small_model(detach_attention=detach).eval()
        model.loss_terms(model.run(x, model.grl_coefficients(0.0)), labels)["loss_y"].backward()
        grad = model.discriminators["relation"][0].classifier[0].weight.grad
        assert (grad is not None and grad.abs().sum().item() > 0) == reaches


def test_video_discriminator_sees_h_unless_told_to_see_the_dropped_out_feature():
    x = videos(8, seed=8)
    for after_dropout in (False, True):
        model = small_model("ta2n", video_disc_after_dropout=after_dropout).train()
        out = model.run(x)
        on_h = model.discriminators["video"](out.video, 0.0)
        assert torch.allclose(out.domain["video"], on_h) != after_dropout


@pytest.mark.parametrize("arch", ["trn", "tempooling"])
def test_official_presets_switch_every_option_to_the_code(arch):
    u2h, h2u = preset("ta3n-official-u2h", arch, "ta3n"), preset("ta3n-official-h2u", arch, "ta3n")
    code = {"detach_attention": False, "entropy_unit": "nats", "video_disc_after_dropout": True, "nesterov": True}
    assert u2h.hparams == {**code, "lambda_s": 0.5, "lambda_r": 0.75, "lambda_t": 0.75, "gamma": 0.003}
    assert h2u.hparams == {**code, "lambda_s": 0.5, "lambda_r": 1.0, "lambda_t": 0.75, "gamma": 0.3}
    assert u2h.trainer == h2u.trainer == {"train_sampling": "centre"}      # the code's segment-centre sampling
    assert "ta3n-official-u2h" not in presets_for(arch, "ta2n")
    paper = small_model(arch=arch).hparams
    assert (paper["lambda_s"], paper["lambda_r"], paper["lambda_t"], paper["gamma"]) == (0.75, 0.5, 0.75, 0.3)
    options = (paper["detach_attention"], paper["entropy_unit"], paper["video_disc_after_dropout"], paper["nesterov"])
    assert options == (True, "bits", False, False)                     # §7.3: plain momentum SGD
    assert small_model(arch=arch, **u2h.hparams).optimizer.defaults["nesterov"]
    assert not small_model(arch=arch).optimizer.defaults["nesterov"]


def test_ta3n_refuses_to_attend_without_the_discriminator_it_reads():
    with pytest.raises(HeadError, match="attention needs the relation discriminator"):
        small_model(discriminators=["frame", "video"])
    with pytest.raises(HeadError, match="attention needs the frame discriminator"):
        small_model(arch="tempooling", discriminators=["video"])
    with pytest.raises(HeadError, match="asks for relation discriminators, but this architecture has no relation"):
        small_model(arch="tempooling", discriminators=["relation", "video"])
    with pytest.raises(HeadError, match="builds no discriminator"):
        small_model("ta2n", discriminators=[])
    with pytest.raises(HeadError, match="entropy_weight_from needs the frame discriminator"):
        small_model(discriminators=["relation", "video"], entropy_weight_from="frame")
    with pytest.raises(HeadError, match="'global'"):
        small_model("ta2n", discriminators=["global"])
    with pytest.raises(HeadError, match="--setting da"):
        small_model().update(LabelledBatch(videos(2, seed=9), torch.tensor([0, 1])), None, 0.0)


def test_diagnostics_report_each_discriminator_and_the_attention_per_part():
    measures = small_model().eval().diagnostics(videos(4, seed=10))
    assert set(measures) == {"p_target_frame", "p_target_relation", "p_target_video",
                             *(f"attention_relation_{i}" for i in range(NUM_SEGMENTS - 1))}
    assert all(0.0 <= value <= 1.0 for value in measures.values())
    pooled = small_model(arch="tempooling").eval().diagnostics(videos(4, seed=10))
    assert {f"attention_frame_{j}" for j in range(NUM_SEGMENTS)} <= set(pooled)


# ------------------------------------------------------------------------------------ synthetic shift

# trainer-level: the lead ports this
def test_ta3n_and_dann_recover_target_accuracy_that_source_only_trn_loses(tmp_path):
    """Target = source + 1.5 everywhere: source-only TRN confuses a class on target; adaptation aligns it back.

    Source val saturates within an epoch on this store, so source-val selection would pick an untrained epoch;
    the last epoch is compared.
    """
    from pipelines.train import TrainConfig, train

    store, manifest = make_feature_store(tmp_path, target_shift=1.5, per_class=24, seed=0)
    accuracy = {}
    for method in ("erm", "dann", "ta3n"):
        hparams = {"epochs": 25, "batch_size": 16, "frame_dim": 32, "relation_dim": 32, "init_std": 0.0}
        report = train(TrainConfig(store=store, manifest=manifest, head="trn", method=method, source="src",
                                   target="tgt", setting="da", out=tmp_path / method, hparams=hparams, workers=0),
                       show_progress=False)
        assert report["final"]["src_val_acc_selected"] == 1.0
        accuracy[method] = report["final"]["target_acc_last"]
    assert accuracy["erm"] < 0.8
    assert accuracy["dann"] >= accuracy["erm"] + 0.2
    assert accuracy["ta3n"] >= accuracy["erm"] + 0.2
