"""STCDA (heads/stcda*.py) on hand-computable inputs: Θ (eq. 3), eq. 1, eq. 2 and eq. 4, the intra-negatives of
Fig. 3, VCA's normalised weighting (eq. 5) and its sign (eq. 7-8), pseudo-labels started at the source centres, the
memory bank's update, §4.2's stages and learning rates, an exact resume across the stages, and runs through the
trainer and the CLI on a two-stream store in the DA protocol (target labels never reach the method)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

import heads
from conftest import make_feature_store
from heads import LabelledBatch, UnlabelledBatch
from heads.stcda import (class_relation, clip_loss, clip_negatives, contrastive_loss, map_transforms,
                         order_negatives, spatial_negatives, temporal_negatives, theta, vca, vca_discrepancy,
                         video_loss)
from heads.stcda_memory import MemoryBank, assign, class_centres, cluster_target
from pipelines.cli import main
from pipelines.train import TrainConfig, train
from test_train import edited_manifest, rows_of

pytestmark = pytest.mark.usefixtures("one_thread")
E = math.e
TINY = {"frame_dim": 8, "gru_hidden": 8, "batch_size": 8, "memory_negatives": 32, "init_std": 0.0}
STAGED = {**TINY, "epochs": 3, "stcl_epochs": 1, "ce_epochs": 1}     # one epoch per stage


@pytest.fixture(scope="module")
def two_streams(tmp_path_factory):
    """RGB maps (2, 2, 8) x 6 steps and flow maps (2, 2, 4) x 5 steps of the same videos, target shifted."""
    return make_feature_store(tmp_path_factory.mktemp("stcda"), target_shift=0.6, flow_channels=4)


# ------------------------------------------------------------------------------------------ STCL

def test_theta_is_the_exponentiated_cosine_over_tau():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([2.0, 2.0])              # cos = 1/√2, lengths do not matter
    assert theta(a, b, 0.5).item() == pytest.approx(math.exp(math.sqrt(2)))
    assert theta(a, -a, 1.0).item() == pytest.approx(1 / E)


def test_clip_loss_is_eq_1_by_hand():
    clip, video = torch.tensor([[1.0, 0.0]]), torch.tensor([[3.0, 0.0]])  # Θ(v, V) = e (τ = 1)
    partner = torch.tensor([[0.0, 1.0]])                                  # Θ(v, v_i²) = e^0
    memory = torch.tensor([[-1.0, 0.0], [0.0, -2.0]])                     # other clips of modality 2: e^-1, e^0
    intra = torch.tensor([[[1.0, 1.0]]])                                  # an intra-negative: e^(1/√2)
    loss = clip_loss(clip, video, partner, memory, intra, tau=1.0)
    numerator = E + 1
    denominator = E + (1 + 1 / E + 1) + math.exp(1 / math.sqrt(2))   # Θ(v,V) + Σ_j Θ(v, v_j²) + Σ Θ(v, v^neg)
    assert loss.item() == pytest.approx(-math.log(numerator / denominator), rel=1e-6)
    no_intra = clip_loss(clip, video, partner, memory, None, tau=1.0)
    assert no_intra.item() == pytest.approx(-math.log(numerator / (E + 2 + 1 / E)), rel=1e-6)


def test_video_loss_is_eq_2_by_hand():
    video, partner = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    negatives = torch.tensor([[[1.0, 0.0]], [[1.0, 0.0]]])
    loss = video_loss(video, partner, negatives, tau=0.5)                  # cos/τ: positive 0 / 2, negative 2 / 0
    assert loss[0].item() == pytest.approx(-math.log(1 / (1 + E ** 2)), rel=1e-6)
    assert loss[1].item() == pytest.approx(-math.log(E ** 2 / (E ** 2 + 1)), rel=1e-6)
    assert video_loss(video, partner, None, tau=0.5).tolist() == [0.0, 0.0]


def test_contrastive_loss_sums_modalities_and_averages_clips_and_videos():
    losses = {"rgb": {"clip": torch.tensor([[1.0, 3.0], [0.0, 0.0]]), "video": torch.tensor([1.0, 2.0])},
              "flow": {"clip": torch.tensor([[2.0, 2.0], [4.0, 0.0]]), "video": torch.tensor([0.0, 1.0])}}
    # video 1: (2 + 1) + (2 + 0) = 5; video 2: (0 + 2) + (2 + 1) = 5
    assert contrastive_loss(losses, ("clip", "video")).item() == pytest.approx(5.0)
    assert contrastive_loss(losses, ("clip",)).item() == pytest.approx((4 + 2) / 2)
    assert contrastive_loss(losses, ("video",)).item() == pytest.approx((1 + 3) / 2)


# ------------------------------------------------------------------------------------------ intra-negatives

def test_temporal_negative_is_a_non_identity_permutation_of_each_clips_steps():
    torch.manual_seed(0)
    x = torch.arange(6.0).repeat(50, 1)[..., None]                 # 50 videos, 3 clips of 2 steps; value = step
    shuffled = temporal_negatives(x, clip_steps=2)[..., 0]
    for clip in range(3):
        steps = shuffled[:, 2 * clip:2 * clip + 2]
        assert (steps.sort(dim=1).values == torch.tensor([2.0 * clip, 2.0 * clip + 1])).all()   # its own steps
        assert (steps != x[:, 2 * clip:2 * clip + 2, 0]).any(dim=1).all()                       # never in order
    three = temporal_negatives(torch.arange(3.0).repeat(200, 1)[..., None], clip_steps=3)[..., 0]
    assert not (three == torch.arange(3.0)).all(dim=1).any()
    assert len({tuple(row) for row in three.tolist()}) == 5        # every one of the 3! - 1 wrong orders occurs


def test_spatial_negative_flips_or_rotates_at_least_one_step_of_every_clip():
    torch.manual_seed(0)
    x = torch.randn(20, 4, 3, 3, 2)                                 # 2 clips of 2 steps, square 3x3 maps
    negative = spatial_negatives(x, clip_steps=2)
    changed = (negative != x).flatten(2).any(dim=2)                  # [20, 4]
    assert changed.view(20, 2, 2).any(dim=2).all()                  # every clip has a wrong-pose step
    versions = map_transforms(x)
    assert len(versions) == 5                                       # flips, 180° and ±90° on square maps
    for b, t in changed.nonzero().tolist():
        assert any(torch.equal(negative[b, t], v[b, t]) for v in versions)
    assert len(map_transforms(torch.randn(1, 1, 2, 3, 1))) == 3     # no 90° rotation of a non-square map


def test_order_and_clip_negatives():
    torch.manual_seed(0)
    clips = torch.arange(3.0)[None, :, None].repeat(30, 1, 2)      # 30 videos, 3 clips, features = clip index
    ordered = order_negatives(clips)[..., 0]
    assert (ordered.sort(dim=1).values == torch.arange(3.0)).all() and not (ordered == torch.arange(3.0)).all(1).any()
    replaced = clip_negatives(clips, -torch.ones_like(clips))[..., 0]
    assert ((replaced == -1).sum(dim=1) >= 1).all()                 # at least one negative clip per video
    assert ((replaced == -1) | (replaced == torch.arange(3.0))).all()


# ------------------------------------------------------------------------------------------ VCA

def test_class_relation_is_eq_5s_normalised_weighting():
    kernel = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    r = class_relation(kernel, torch.tensor([0, 1]), torch.tensor([1, 1, -1]), num_classes=2)
    # r(0, 1): pairs (0,0), (0,1) -> (1 + 2) / 2; r(1, 1): (4 + 5) / 2; class 0 has no column: 0; -1 never counts
    assert r.tolist() == [[0.0, 1.5], [0.0, 4.5]]


def test_vca_discrepancy_is_eq_7_and_8_by_hand():
    r_ss, r_tt = torch.tensor([[1.0, 0.0], [0.0, 0.8]]), torch.tensor([[0.9, 0.0], [0.0, 0.7]])
    r_st = torch.tensor([[0.6, 0.1], [0.2, 0.5]])
    d = lambda c1, c2: r_ss[c1, c1] + r_tt[c2, c2] - 2 * r_st[c1, c2]   # noqa: E731
    expected = (d(0, 0) + d(1, 1)) / 2 - (d(0, 1) + d(1, 0)) / 2
    assert vca_discrepancy(r_ss, r_tt, r_st, torch.tensor([True, True])).item() == pytest.approx(expected.item())
    assert vca_discrepancy(r_ss, r_tt, r_st, torch.tensor([True, False])).item() == pytest.approx(d(0, 0).item())


def test_vca_minimises_same_class_and_maximises_cross_class_discrepancy():
    e1, e2 = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    source = torch.stack([e1, e1, e2, e2])
    labels = torch.tensor([0, 0, 1, 1])

    def discrepancy(target: torch.Tensor) -> torch.Tensor:
        # one clip per video, equal to its video feature
        return vca((source[:, None], source), (target[:, None], target), labels, labels, 2, 2.0, 5)

    aligned = discrepancy(source.clone())
    swapped = discrepancy(source.flip(0))                         # the target's class 0 sits on source class 1
    assert aligned < 0 < swapped                                  # eq. 8: intra-class small, inter-class large
    leaf = (0.9 * source.flip(0) + 0.1 * source).requires_grad_(True)
    discrepancy(leaf).backward()                                  # a gradient step moves each target video ...
    moved = leaf.detach() - 0.5 * leaf.grad
    same_class = lambda t: F.cosine_similarity(t, source).mean()  # noqa: E731  ... towards its source class
    assert same_class(moved) > same_class(leaf.detach())
    unlabelled = vca((source[:, None], source), (source[:, None], source), labels, torch.full((4,), -1), 2, 2.0, 5)
    assert unlabelled.item() == 0.0                               # no pseudo-label yet: no class to align


# ------------------------------------------------------------------------------------------ pseudo-labels, bank

def test_pseudo_labels_start_at_the_normalised_source_centres_and_fuse_the_modalities():
    features = torch.tensor([[2.0, 0.0], [0.0, 5.0], [0.0, 1.0]])
    centres, present = class_centres(features, torch.tensor([0, 1, 1]), num_classes=3)
    assert centres.tolist() == [[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]] and present.tolist() == [True, True, False]
    target = {"rgb": torch.tensor([[1.0, 0.9]]), "flow": torch.tensor([[0.0, 1.0]])}
    flow_centres = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    both = {"rgb": centres, "flow": flow_centres}
    assert assign({"rgb": target["rgb"]}, both, present).item() == 0      # RGB alone: class 0, barely
    assert assign(target, both, present).item() == 1                      # the distances summed: class 1
    labels, updates = cluster_target(target, both, present, iterations=0)
    assert labels.tolist() == [1] and updates == 0                        # step (1) from C^S, no refinement


def test_kmeans_refines_the_target_centres_from_the_source_ones():
    source = torch.tensor([[1.0, 0.0], [0.0, 1.0]])                # class 0 at 0°, class 1 at 90°
    angles = torch.tensor([30.0, 35.0, 40.0, 44.0, 46.0, 88.0, 89.0, 90.0]) * math.pi / 180
    target = torch.stack([angles.cos(), angles.sin()], dim=1)
    usable = torch.tensor([True, True])
    first = assign({"x": target}, {"x": source}, usable)           # step (1) from C^S: 46° is nearer 90°
    labels, updates = cluster_target({"x": target}, {"x": source}, usable, iterations=10)
    assert first.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    # step (2) moves class 0's centre to ~37° and class 1's to ~78°: 46° changes class, then nothing does
    assert labels.tolist() == [0, 0, 0, 0, 0, 1, 1, 1] and updates == 2
    capped, updates = cluster_target({"x": target}, {"x": source}, usable, iterations=1)
    assert torch.equal(capped, labels) and updates == 1                # one update, the iteration ending


def test_memory_bank_writes_first_then_mixes_with_momentum():
    bank = MemoryBank(momentum=0.5)
    clips, video = torch.tensor([[[3.0, 4.0]]]), torch.tensor([[0.0, 2.0]])
    bank.update("source", torch.tensor([2]), {"rgb": clips}, {"rgb": video}, torch.tensor([1]))
    stored, filled = bank.entries("source", torch.tensor([0, 2, 5]), "clips", "rgb")
    assert filled.tolist() == [False, True, False]
    assert torch.allclose(stored[1], torch.tensor([[0.6, 0.8]]))            # the first write: v / ‖v‖
    assert bank.domains["source"]["labels"].tolist() == [-1, -1, 1]
    bank.update("source", torch.tensor([2]), {"rgb": torch.tensor([[[1.0, 0.0]]])}, {"rgb": video})
    mixed = torch.tensor([0.5 * 0.6 + 0.5, 0.5 * 0.8])                      # normalise(μ m + (1 - μ) v̂)
    assert torch.allclose(bank.entries("source", torch.tensor([2]), "clips", "rgb")[0][0, 0], mixed / mixed.norm())
    assert bank.clip_pool("rgb", clips).shape == (1, 2)


# ------------------------------------------------------------------------------------------ the method

def small_batches(streams: dict, count: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    videos = lambda n, shift: {s: torch.rand(n, 4, *shape, generator=g) + shift for s, shape in streams.items()}  # noqa
    return [(LabelledBatch(videos(6, 0.0), torch.randint(3, (6,), generator=g), index=torch.arange(6) + 6 * i),
             UnlabelledBatch(videos(4, 0.5), index=torch.arange(4) + 4 * i)) for i in range(count)]


def test_stages_and_per_stage_learning_rates_follow_section_4_2():
    model = heads.build("stcda", "stcda", (8,), 3, 3, {**TINY, "epochs": 10, "stcl_epochs": 3, "ce_epochs": 3,
                                                      "stage_lr_steps": [1, 2]})
    stages = [model.stage(epoch / 10) for epoch in range(10)]
    assert stages == [1, 1, 1, 2, 2, 2, 3, 3, 3, 3]
    factors = [model.stage_lr_factor(epoch / 10) for epoch in range(10)]
    assert factors == pytest.approx([1, 0.1, 0.01, 1, 0.1, 0.01, 0.1, 0.01, 0.001, 0.001])
    defaults = heads.build("stcda", "stcda", (8,), 3, 3, {})
    assert defaults.hparams["epochs"] == 1000 and defaults.hparams["lr"] == 0.01
    assert [defaults.stage(e / 1000) for e in (299, 300, 599, 600)] == [1, 2, 2, 3]
    assert defaults.stage_lr_factor(600 / 1000) == pytest.approx(0.1)       # stage 3 starts at 0.001


def run_epochs(model, data, epochs: range, total: int) -> list[dict]:
    logs = []
    for epoch in epochs:
        model.train()
        logs.append(model.before_epoch(None, epoch / total))
        for step, (src, tgt) in enumerate(data):
            logs.append(model.update(src, tgt, (epoch * len(data) + step) / (total * len(data))))
    return logs


def test_training_through_the_three_stages_resumes_exactly(tmp_path):
    streams = {"rgb": (2, 2, 6), "flow": (2, 2, 3)}
    hparams = {**TINY, "epochs": 4, "stcl_epochs": 1, "ce_epochs": 1, "clip_steps": 2}
    data = small_batches(streams, 2, seed=0)
    torch.manual_seed(0)
    straight = heads.build("stcda-maps", "stcda", streams, 3, 4, hparams)
    torch.manual_seed(1)
    expected = run_epochs(straight, data, range(4), 4)
    assert [log.get("stage") for log in expected[1::3]] == [1.0, 2.0, 3.0, 3.0]
    assert "loss_y" not in expected[1] and "loss_vca" in expected[-1] and expected[6]["pseudo_labelled"] == 1.0

    torch.manual_seed(0)
    interrupted = heads.build("stcda-maps", "stcda", streams, 3, 4, hparams)
    torch.manual_seed(1)
    run_epochs(interrupted, data, range(3), 4)
    torch.save({"model": interrupted.state_dict(), "optimizer": interrupted.optimizer.state_dict(),
                "rng": torch.get_rng_state()}, tmp_path / "checkpoint.pt")
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    resumed = heads.build("stcda-maps", "stcda", streams, 3, 4, hparams)
    resumed.load_state_dict(state["model"])
    resumed.optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    assert run_epochs(resumed, data, range(3, 4), 4) == expected[9:]
    assert torch.equal(resumed.pseudo["fused"], straight.pseudo["fused"])


def test_fixed_pseudo_labels_are_clustered_once():
    streams = {"rgb": (6,), "flow": (3,)}
    data = small_batches(streams, 2, seed=1)
    model = heads.build("stcda", "stcda", streams, 3, 4, {**TINY, "epochs": 6, "stcl_epochs": 1, "ce_epochs": 1,
                                                          "pseudo_labels": "fixed", "vca_fusion": False})
    run_epochs(model, data, range(3), 6)
    first = {m: labels.clone() for m, labels in model.pseudo.items()}
    assert set(first) == {"rgb", "flow"}                                     # without fusion: one per modality
    logs = run_epochs(model, data, range(3, 6), 6)
    assert logs[0] == {} and all(torch.equal(model.pseudo[m], first[m]) for m in first)


def test_batches_without_video_positions_are_refused():
    model = heads.build("stcda", "stcda", (6,), 3, 4, TINY)
    src, tgt = small_batches({"x": (6,)}, 1, seed=0)[0]
    with pytest.raises(heads.HeadError, match="positions"):
        model.update(LabelledBatch(src.x["x"], src.y), UnlabelledBatch(tgt.x["x"]), 0.0)


# ------------------------------------------------------------------------------------------ trainer and CLI

def test_cli_trains_stcda_on_two_streams_in_the_da_protocol(two_streams, tmp_path):
    store, manifest = two_streams
    sets = [arg for name, value in STAGED.items() for arg in ("--set", f"{name}={json.dumps(value)}")]
    result = CliRunner().invoke(main, ["train", "--store", str(store), "--manifest", str(manifest), "--head", "stcda",
                                       "--method", "stcda", "--source", "src", "--target", "tgt", "--setting", "da",
                                       "--stream", "rgb,flow", "--segments", "3", *sets, "--out",
                                       str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "run" / "metrics.json").read_text())
    epochs = report["epochs"]
    assert [e["stage"] for e in epochs] == [1.0, 2.0, 3.0] and "loss_y" not in epochs[0]
    assert epochs[2]["pseudo_labelled"] == 1.0 and math.isfinite(epochs[2]["loss_vca"])
    assert report["streams"] == ["rgb", "flow"] and 0.0 <= report["final"]["target_acc_selected"] <= 1.0
    log = (tmp_path / "run" / "train.log").read_text()
    assert "STCL skips spatial negatives" in log and "STCL skips temporal negatives" in log


def test_target_labels_never_reach_stcda(two_streams, tmp_path):
    def permute_target_train_labels(rows):
        target_train = rows_of(rows, "tgt", "train")
        for row, label in zip(target_train, np.random.default_rng(0).permutation([r["label"] for r in target_train])):
            row["label"] = label
        return rows

    store, manifest = two_streams
    permuted = edited_manifest(manifest, tmp_path / "permuted.csv", permute_target_train_labels)
    common = dict(store=store, head="stcda", method="stcda", source="src", target="tgt", setting="da",
                  streams=("rgb", "flow"), num_segments=3, hparams=STAGED)
    original = train(TrainConfig(manifest=manifest, out=tmp_path / "a", **common), show_progress=False)
    relabelled = train(TrainConfig(manifest=permuted, out=tmp_path / "b", **common), show_progress=False)
    assert original["epochs"] == relabelled["epochs"] and original["epochs"][2]["loss_vca"] != 0.0


def test_one_stream_on_maps_with_every_intra_negative(two_streams, tmp_path):
    store, manifest = two_streams
    report = train(TrainConfig(store=store, manifest=manifest, head="stcda-maps", method="stcda", source="src",
                               target="tgt", setting="da", num_segments=4, out=tmp_path / "rgb",
                               hparams={**STAGED, "clip_steps": 2}), show_progress=False)
    assert [e["stage"] for e in report["epochs"]] == [1.0, 2.0, 3.0]
    assert all(math.isfinite(e["loss_stcl"]) for e in report["epochs"])
    assert "skips" not in (tmp_path / "rgb" / "train.log").read_text()    # temporal, spatial, order, clip: all
