"""APN (heads/apn.py): the attention block, the pyramid's equations and video ADA's ascent on hand-computable inputs,
the presets, TRN-ATTN, the fall-back on pyramid-free architectures, the γ ensemble, and apn + erm / video-ada through
the CLI in the DG protocol."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

import heads
from conftest import make_feature_store
from heads import HeadError, LabelledBatch
from heads.apn import (AttentionBlock, MultiHeadAttention, attention_weights, consecutive_windows, hold_local_draws,
                       pyramid_levels, relative_shift, transport_cost)
from heads.common import ordered_tuples
from heads.ada import ascend
from heads.method import hparam_specs, lookup, resolve_hparams
from pipelines.cli import list_models, main
from pipelines.evaluate import ensemble_probabilities

pytestmark = pytest.mark.usefixtures("one_thread")

FEAT, CLASSES = 6, 3
EXACT = {"momentum": 0.0, "weight_decay": 0.0, "clip_grad": 0.0, "lr_schedule": "constant", "lr": 0.1}


def tiny(arch: str = "apn", method: str = "erm", segments: int = 4, **overrides):
    """``method`` on ``arch`` with 8-wide features, 2 heads, no dropout; overrides the pair lacks are dropped."""
    specs = hparam_specs(*lookup(arch, method))
    wanted = {"frame_dim": 8, "relation_dim": 8, "attention_heads": 2, "attention_ffn_ratio": 2, "init_std": 0.0,
              "dropout_frame": 0.0, "dropout_video": 0.0, "attention_dropout": 0.0, "batch_size": 4, **overrides}
    torch.manual_seed(0)
    return heads.build(arch, method, (FEAT,), CLASSES, segments, {k: v for k, v in wanted.items() if k in specs})


def plain_sgd_step(model, loss, lr: float) -> None:
    """θ -= lr ∇loss: what the model's optimiser does under EXACT (no momentum, decay, clipping or schedule)."""
    model.optimizer.zero_grad()
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= lr * p.grad


def videos(n: int = 4, segments: int = 4, seed: int = 0) -> LabelledBatch:
    g = torch.Generator().manual_seed(seed)
    return LabelledBatch(torch.rand(n, segments, FEAT, generator=g), torch.randint(CLASSES, (n,), generator=g))


def identity_attention(dim: int, **hparams) -> MultiHeadAttention:
    """One attention head whose Q, K, V and output projections are the identity, plain LayerNorm."""
    layer = MultiHeadAttention(dim, {"attention_heads": 1, "attention_masking": False, "attention_projection":
                                     "linear", "attention_dropout": 0.0, "attention_norm": "standard", **hparams})
    for linear in (layer.q, layer.k, layer.v, layer.out):
        nn.init.eye_(linear.weight)
        nn.init.zeros_(linear.bias)
    return layer


def layer_norm(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5)


def hand_attention(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """LN(q + softmax(q k^T / sqrt(d)) k) written out: one identity head."""
    scores = queries @ keys.T / math.sqrt(queries.shape[-1])
    return layer_norm(queries + scores.softmax(dim=-1) @ keys)


# ---------------------------------------------------------------------------------------- attention block

def test_attention_weight_of_a_2_token_input_by_hand():
    tokens = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
    weights = attention_weights(tokens, tokens, heads=1)
    own = 1 / (1 + math.exp(-1 / math.sqrt(3)))             # scores 1/sqrt(3) (itself) and 0 (the other token)
    assert torch.allclose(weights[0, 0], torch.tensor([[own, 1 - own], [1 - own, own]]), atol=1e-6)
    causal = attention_weights(tokens, tokens, heads=1, causal=True)
    assert causal[0, 0, 0].tolist() == pytest.approx([1.0, 0.0])                   # token 0 sees only itself
    masked = attention_weights(tokens, tokens, heads=1, key_valid=torch.tensor([[True, False]]))
    assert masked[0, 0, :, 1].tolist() == pytest.approx([0.0, 0.0])                # the code's key masking


def test_attention_layer_output_on_a_2_token_input_by_hand():
    tokens = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
    own = 1 / (1 + math.exp(-1 / math.sqrt(3)))
    mixed = torch.tensor([1 + own, 1 - own, 0.0])                                 # token 0 + its attended value
    expected = (mixed - mixed.mean()) / torch.sqrt(mixed.var(unbiased=False) + 1e-5)
    layer = identity_attention(3)
    assert torch.allclose(layer(tokens, tokens)[0, 0], expected, atol=1e-5)
    assert torch.allclose(layer(tokens, tokens)[0], hand_attention(tokens[0], tokens[0]), atol=1e-5)


def test_attention_block_encodes_the_keys_and_decodes_the_queries_by_hand():
    hparams = {"attention_heads": 1, "attention_masking": False, "attention_projection": "linear",
               "attention_dropout": 0.0, "attention_norm": "standard", "attention_causal": False,
               "attention_ffn_ratio": 2}
    block = AttentionBlock(3, hparams)
    for layer in (block.encoder_attention, block.decoder_attention, block.cross_attention):
        for linear in (layer.q, layer.k, layer.v, layer.out):
            nn.init.eye_(linear.weight)
            nn.init.zeros_(linear.bias)
    for ffn in (block.encoder_ffn, block.decoder_ffn):          # a zero feed-forward: LN(x + 0)
        for layer in ffn.layers:
            if isinstance(layer, nn.Linear):
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)
    query = torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, 3.0]])    # 2 tokens, as R^I_Global
    key = torch.tensor([[2.0, 0.0, 1.0], [1.0, 1.0, 0.0]])      # 2 tokens, as R^I_m

    memory = layer_norm(hand_attention(key, key))                        # encoder: self-attention, FFN
    decoded = layer_norm(hand_attention(hand_attention(query, query), memory))   # decoder: self, cross, FFN
    assert torch.allclose(block(query[None], key[None])[0], decoded, atol=1e-5)


def test_code_projections_and_norm():
    layer = MultiHeadAttention(4, {"attention_heads": 2, "attention_masking": True, "attention_projection": "relu",
                                   "attention_dropout": 0.0, "attention_norm": "official"})
    assert isinstance(layer.q[1], nn.ReLU) and isinstance(layer.out, nn.Identity)
    x = torch.tensor([[[1.0, 2.0, 3.0, 6.0]]])
    normed = layer.norm(x)                                        # (x - mean) / (unbiased std + 1e-8)
    assert torch.allclose(normed, (x - 3.0) / (x.std(-1, keepdim=True) + 1e-8))
    zero_query = torch.zeros(1, 1, 4)                             # the code gives it no attention output
    keys = torch.rand(1, 2, 4)
    assert torch.allclose(layer(zero_query, keys), layer.norm(zero_query))


# ---------------------------------------------------------------------------------------- the pyramid

def test_local_windows_are_consecutive_runs_or_the_codes_combinations():
    assert consecutive_windows(5, 3) == [(0, 1, 2), (1, 2, 3), (2, 3, 4)]
    assert consecutive_windows(5, 4) == [(0, 1, 2, 3), (1, 2, 3, 4)]
    model = tiny(segments=5, local_windows="combinations")
    assert model.arch.pyramid.windows[2] == ordered_tuples(5, 2) and len(model.arch.pyramid.windows[3]) == 10


def test_eq6_eq7_and_the_level_iii_residual_by_composition():
    model = tiny(segments=4).eval()
    arch, x = model.arch, videos().x
    pyramid = arch.pyramid
    frames = arch.frame_encoder(x)
    global_relation = pyramid.global_block(frames, frames)                       # R^I_Global
    cross = []
    for size, local_block, cross_block in zip(pyramid.scales, pyramid.local_blocks, pyramid.cross_blocks):
        per_window = [cross_block(global_relation, local_block(frames[:, list(w)], frames[:, list(w)]))
                      for w in consecutive_windows(4, size)]                   # eq. 6 for each window
        cross.append(torch.stack(per_window).mean(dim=0))                      # the expectation over windows
    level2 = (cross[0] + cross[1]).flatten(1)                                  # eq. 7: R^II_2 + R^II_3
    levels = pyramid_levels(arch, arch.encode(x).parts)
    assert torch.allclose(levels["level2"], level2, atol=1e-5)
    assert torch.allclose(levels["global"], global_relation.flatten(1), atol=1e-5)
    assert torch.allclose(levels["level3"], level2 + global_relation.flatten(1), atol=1e-5)   # R^III = R^II + R^I_G
    assert torch.allclose(arch.features(x), levels["level3"], atol=1e-6)
    assert torch.allclose(model.predict(x), arch.classifier[1](levels["level3"]), atol=1e-6)   # h is linear


def test_training_draws_one_window_per_scale_and_evaluation_is_deterministic():
    model = tiny(segments=5)
    pyramid = model.arch.pyramid
    pyramid.train()
    assert all(len(pyramid.windows_for(m)) == 1 and pyramid.windows_for(m)[0] in consecutive_windows(5, m)
               for m in (2, 3, 4))
    pyramid.eval()
    assert pyramid.windows_for(2) == consecutive_windows(5, 2)
    x = videos(segments=5).x
    model.eval()
    assert torch.equal(model.predict(x), model.predict(x))
    code = tiny(segments=5, eval_local="random").eval()
    torch.manual_seed(3)
    draws = {tuple(code.predict(x)[0].tolist()) for _ in range(8)}
    assert len(draws) > 1                                                       # the code re-draws at test time


def test_shared_block_and_classifier_relu_of_the_official_preset():
    official = heads.preset("official", "apn", "erm").hparams
    assert official["attention_shared"] and official["attention_projection"] == "relu"
    assert official["lr"] == 1e-3 and official["batch_size"] == 40 and official["weight_decay"] == 5e-4
    assert official["local_windows"] == "combinations" and official["eval_local"] == "random"
    overrides = {k: v for k, v in official.items() if k not in ("batch_size", "epochs")}
    shared, separate = tiny(**overrides), tiny()
    assert shared.arch.pyramid.global_block is shared.arch.pyramid.cross_blocks[1]
    count = lambda m: sum(p.numel() for p in m.parameters())                    # noqa: E731
    assert count(shared) < count(separate)
    assert isinstance(shared.arch.classifier[0], nn.ReLU) and isinstance(shared.arch.new_classifier()[0], nn.ReLU)
    assert shared.update(videos(), None, 0.0)["loss"] > 0
    assert heads.preset("official", "trn-attn", "erm").hparams["attention_causal"]
    ada = heads.preset("official", "apn", "video-ada").hparams
    assert ada["video_ada_update"] == "joint" and ada["video_ada_mode"] == "train"


def test_recipe_is_apn_section_5_1():
    hparams = resolve_hparams("apn", "erm", {})
    assert (hparams["lr"], hparams["batch_size"], hparams["epochs"], hparams["lr_schedule"]) == (1e-3, 40, 150, "step")
    assert hparams["lr_steps"] == (0.2, 0.4, 0.6, 0.8) and hparams["frame_dim"] == 256
    assert hparams["dropout_frame"] == 0.8


def test_bad_segments_and_heads_are_clear_errors():
    with pytest.raises(HeadError, match="needs M >= 3 segments"):
        tiny(segments=2)
    with pytest.raises(HeadError, match="attention_heads to divide 8"):
        tiny(attention_heads=3)
    with pytest.raises(HeadError, match="tuples"):
        tiny("trn-attn", tuples="random")


# ---------------------------------------------------------------------------------------- TRN-ATTN

def test_trn_attn_attends_each_scales_tuples_and_the_scales_before_their_sums():
    model = tiny("trn-attn", segments=4).eval()
    arch, x = model.arch, videos().x
    frames = arch.frame_mlp(x)
    relations = []
    for (tuple_features, _), block in zip(arch.temporal.tuple_features(frames), arch.temporal.blocks):
        relations.append(block(tuple_features, tuple_features).sum(dim=1))    # Att over g_theta, then the sum
    parts = torch.stack(relations, dim=1)
    assert torch.allclose(arch.encode(x).relations, parts, atol=1e-6)
    scale_block = arch.attention_blocks[-1]
    assert torch.allclose(arch.features(x), scale_block(parts, parts).sum(dim=1), atol=1e-6)
    assert len(arch.attention_blocks) == 4                                      # 3 scales + 1 over the scales
    assert len(tiny("trn-attn", attention_shared=True).arch.attention_blocks) == 1


# ---------------------------------------------------------------------------------------- video ADA

def test_transport_cost_is_the_mean_squared_difference_and_its_gradient():
    features = torch.tensor([[1.0, 3.0], [0.0, 2.0]], requires_grad=True)
    anchors = torch.tensor([[0.0, 0.0], [0.0, 1.0]])
    cost = transport_cost(features, anchors)
    assert cost.tolist() == [5.0, 0.5]                                          # (1 + 9) / 2, (0 + 1) / 2
    (gradient,) = torch.autograd.grad(cost.sum(), features)
    assert gradient.tolist() == [[1.0, 3.0], [0.0, 1.0]]                        # 2 (R - R_0) / n


def test_first_ascent_step_follows_the_gradient_of_eq8():
    model = tiny(segments=4, method="video-ada", video_ada_levels=["level2"], video_ada_gamma=1.0).eval()
    src = videos()
    arch = model.arch
    with torch.no_grad():
        anchor = pyramid_levels(arch, arch.encode(src.x).parts)["level2"]

    def eq8(x):
        level2 = pyramid_levels(arch, arch.encode(x).parts)["level2"]
        return (F.cross_entropy(arch.classify(level2), src.y, reduction="sum")
                - transport_cost(level2, anchor).sum())

    x = src.x.clone().requires_grad_()
    (ce_gradient,) = torch.autograd.grad(F.cross_entropy(arch.classify(pyramid_levels(arch, arch.encode(x).parts)[
        "level2"]), src.y, reduction="sum"), x)
    step = 0.05
    moved = ascend(src.x, lambda x_adv: model.ascent_objective(x_adv, anchor, src.y, ("level2",)), step)
    # at X' = X the transport cost's gradient vanishes: the first step is along the CE's gradient (eq. 5)
    assert torch.allclose(moved - src.x, step * ce_gradient, atol=1e-6)
    assert eq8(moved) > eq8(src.x)                                               # an ascent step
    second = ascend(moved, lambda x_adv: model.ascent_objective(x_adv, anchor, src.y, ("level2",)), step)
    x2 = moved.clone().requires_grad_()
    (full_gradient,) = torch.autograd.grad(eq8(x2), x2)                          # now -γ ∇c acts too
    assert torch.allclose(second - moved, step * full_gradient, atol=1e-6)


def test_copies_ascend_together_as_they_would_apart():
    model = tiny(segments=4, method="video-ada", video_ada_step=0.1)
    src = videos()
    torch.manual_seed(2)
    copies, logs = model.adversarial_copies(src)
    assert model.levels == ("level2", "level3") and len(copies) == 2
    for level, copy in zip(model.levels, copies):
        alone = tiny(segments=4, method="video-ada", video_ada_step=0.1, video_ada_levels=[level])
        torch.manual_seed(2)                                                     # the same held windows
        assert torch.allclose(alone.adversarial_copies(src)[0][0], copy, atol=1e-5)
        assert logs[f"video_ada_shift_{level}"] == pytest.approx(relative_shift(copy, src.x).mean().item(), rel=1e-5)
    assert model.arch.training                                                   # the ascent restores the mode


def test_the_ascent_holds_one_draw_of_local_windows_without_dropout():
    model = tiny(segments=5, method="video-ada", dropout_frame=0.5)
    pyramid = model.arch.pyramid
    with hold_local_draws(model.arch):
        held = {m: pyramid.windows_for(m) for m in pyramid.scales}
        assert all(len(windows) == 1 for windows in held.values())
        model.arch.eval()
        x = videos(segments=5).x
        assert torch.equal(model.arch(x), model.arch(x))                         # one sub-network throughout
        assert {m: pyramid.windows_for(m) for m in pyramid.scales} == held
    assert pyramid.held is None and len(pyramid.windows_for(2)) == 4             # back to the expectation
    src = videos(segments=5)
    with hold_local_draws(model.arch), torch.no_grad():
        anchor = pyramid_levels(model.arch, model.arch.encode(src.x).parts)["level2"]
        again = pyramid_levels(model.arch, model.arch.encode(src.x).parts)["level2"]
        assert transport_cost(again, anchor).max() == 0                          # c vanishes at X' = X
    model.arch.train()


def test_algorithm_1_steps_on_the_source_then_on_each_copy_at_its_level():
    model = tiny(segments=4, method="video-ada", video_ada_step=0.1, **EXACT)
    manual = tiny(segments=4, method="video-ada", video_ada_step=0.1, **EXACT)
    src = videos()
    torch.manual_seed(5)                               # the same local windows drawn in both
    logs = model.update(src, None, 0.0)
    torch.manual_seed(5)

    def sgd(loss):
        plain_sgd_step(manual, loss, lr=0.1)

    sgd(F.cross_entropy(manual.arch(src.x), src.y))                              # line 5
    copies, _ = manual.adversarial_copies(src)                                   # lines 6-12, at the new θ
    for level, copy in zip(manual.levels, copies):                               # lines 13-14
        sgd(F.cross_entropy(manual.arch.classify(pyramid_levels(manual.arch, manual.arch.encode(copy).parts)[level]),
                            src.y))
    for a, b in zip(model.parameters(), manual.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    assert logs["loss"] == pytest.approx(logs["loss_y"] + logs["loss_adv_level2"] + logs["loss_adv_level3"])


def test_joint_update_is_one_step_on_the_level_iii_ce_of_source_and_copies():
    model = tiny(segments=4, method="video-ada", video_ada_step=0.1, video_ada_update="joint", **EXACT)
    manual = tiny(segments=4, method="video-ada", video_ada_step=0.1, video_ada_update="joint", **EXACT)
    src = videos()
    torch.manual_seed(5)
    model.update(src, None, 0.0)
    torch.manual_seed(5)
    copies, _ = manual.adversarial_copies(src)
    plain_sgd_step(manual, F.cross_entropy(manual.arch(torch.cat([src.x, *copies])), src.y.repeat(3)), lr=0.1)
    for a, b in zip(model.parameters(), manual.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_pyramid_free_architectures_make_one_copy_on_the_video_representation():
    for arch in ("trn", "tempooling", "trn-attn"):
        model = tiny(arch, "video-ada", video_ada_step=0.1)
        assert model.levels == ("video",)
        logs = model.update(videos(), None, 0.0)
        assert "loss_adv_video" in logs and "loss_adv_level2" not in logs
    global_only = tiny(method="video-ada", video_ada_levels=["global"])
    assert global_only.levels == ("global",) and "loss_adv_global" in global_only.update(videos(), None, 0.0)
    matrix = list_models()
    column = list(heads.methods()).index("video-ada")
    rows = {line.split()[0]: line.split()[1:] for line in matrix.splitlines() if line.startswith("  ")
            and len(line.split()) == len(heads.methods()) + 1}
    assert rows["apn"][column] == "x" and rows["trn"][column] == "~" and rows["tempooling"][column] == "~"
    assert "video-ada" in matrix and "(uses pyramid)" in matrix


def test_train_mode_ascent_is_the_codes_and_runs():
    model = tiny(segments=4, method="video-ada", video_ada_mode="train", video_ada_step=0.1, dropout_frame=0.5)
    logs = model.update(videos(), None, 0.0)
    assert math.isfinite(logs["loss"]) and logs["video_ada_shift_level2"] > 0


# ---------------------------------------------------------------------------------------- the γ ensemble

def test_ensemble_averages_the_softmax_probabilities_by_hand():
    first = torch.log(torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]]))
    second = torch.log(torch.tensor([[0.1, 0.8, 0.1], [0.2, 0.2, 0.6]]))
    mean = ensemble_probabilities([first, second])
    assert torch.allclose(mean, torch.tensor([[0.4, 0.5, 0.1], [0.15, 0.25, 0.6]]))
    confident = ensemble_probabilities([first, second], "confident")          # 0.8 beats 0.7, 0.6 ties: first
    assert torch.allclose(confident, torch.tensor([[0.1, 0.8, 0.1], [0.1, 0.3, 0.6]]))


# ---------------------------------------------------------------------------------------- through the CLI

def test_apn_with_erm_and_video_ada_train_through_the_cli_and_ensemble(tmp_path):
    store, manifest = make_feature_store(tmp_path, target_shift=0.5)
    common = ["train", "--store", str(store), "--manifest", str(manifest), "--head", "apn", "--source", "src",
              "--target", "tgt", "--setting", "dg", "--set", "frame_dim=8", "--set", "attention_heads=2",
              "--set", "epochs=2", "--set", "batch_size=8", "--set", "init_std=0", "--set", "lr=0.01"]
    runs = []
    for method, extra in (("erm", []), ("video-ada", ["--set", "video_ada_step=1.0"]),
                          ("video-ada", ["--set", "video_ada_step=1.0", "--set", "video_ada_gamma=1.0"])):
        out = tmp_path / f"{method}-{len(runs)}"
        result = CliRunner().invoke(main, [*common, "--method", method, *extra, "--out", str(out)])
        assert result.exit_code == 0, result.output
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["method"] == method and metrics["final"]["epochs_run"] == 2
        assert metrics["final"]["selection"] == "source val accuracy"             # DG: selected on source val
        runs.append(out)
    assert "loss_adv_level2" in json.loads((runs[1] / "metrics.json").read_text())["epochs"][0]
    evaluate = ["eval", "--store", str(store), "--manifest", str(manifest), "--domain", "tgt"]
    ensemble = CliRunner().invoke(main, [*evaluate, "--ensemble", str(runs[1]), str(runs[2]), "--out",
                                         str(tmp_path / "ensemble")])
    assert ensemble.exit_code == 0, ensemble.output
    report = json.loads((tmp_path / "ensemble" / "ensemble-tgt-test.json").read_text())
    assert report["rule"] == "mean" and len(report["members"]) == 2 and report["videos"] == 24
    from pipelines.evaluate import load_run, run_logits
    logits = [run_logits(load_run(run, store), manifest, "tgt", "test", 0) for run in runs[1:]]
    labels = logits[0][1]
    expected = (ensemble_probabilities([lg for lg, _ in logits]).argmax(1) == labels).float().mean().item()
    assert report["accuracy"] == pytest.approx(expected)
    single = CliRunner().invoke(main, [*evaluate, str(runs[0]), str(runs[1])])
    assert single.exit_code != 0 and "combine several with --ensemble" in single.output
    no_out = CliRunner().invoke(main, [*evaluate, "--ensemble", str(runs[0]), str(runs[1])])
    assert no_out.exit_code != 0 and "--out" in no_out.output


def test_a_method_may_only_use_known_parts():
    from heads.method import Method, fallback_parts, register_method

    class UsesNothingKnown(Method):
        name, summary, uses = "uses-unknown", "-", frozenset({"wings"})

    with pytest.raises(HeadError, match="needs or uses unknown parts \\['wings'\\]"):
        register_method(UsesNothingKnown)
    assert fallback_parts(*lookup("trn", "video-ada")) == ["pyramid"] and not fallback_parts(*lookup("apn",
                                                                                                     "video-ada"))
