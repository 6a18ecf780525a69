"""STDN on cached maps: eq. 1-8 on hand examples, tuples, diagnostics, the Table 3 variants, training."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import make_feature_store
from heads import HeadError, LabelledBatch, available, build
from heads.stdn import (COMPONENTS, SpatialGrouping, SpatialRelations, SqueezeExcite, TemporalRelations,
                        assign_to_anchors, group_weights, grouping_losses, pick_tuples, relation_labels, scale_nmse)
from pipelines.diagnose import diagnose_run, mean_over_videos

VARIANTS = ["tsn-maps", "stdn-sgm", "stdn-trm", "stdn-strm", "stdn-mixstyle", "stdn"]
MAP_SHAPE, NUM_SEGMENTS = (3, 3, 16), 3
SMALL = {"anchor_hidden": 16, "spatial_dim": 16, "temporal_dim": 32, "se_hidden": 8, "relation_hidden": 32,
         "num_groups": 3, "lr": 0.05, "lr_schedule": "constant"}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run fastest on one thread


def stdn(name: str = "stdn", num_classes: int = 3, **extra):
    return build(name, MAP_SHAPE, num_classes, NUM_SEGMENTS, {**SMALL, **extra})


def moving_blob_videos(num_videos: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Maps [B, 3, 3, 3, 16]: a blob crosses the middle row left->right (class 0), right->left (1) or stays (2).

    Every frame holds one blob on the same background, so each frame's spatial mean is the same in every class:
    only where the blob is, and in which order, tells the classes apart.
    """
    g = torch.Generator().manual_seed(seed)
    background, blob = torch.rand(2, 16, generator=torch.Generator().manual_seed(1234))
    blob = 3 * blob
    columns = torch.tensor([[0, 1, 2], [2, 1, 0], [1, 1, 1]])
    y = torch.randint(3, (num_videos,), generator=g)
    x = background.repeat(num_videos, NUM_SEGMENTS, 3, 3, 1)
    for video, label in enumerate(y.tolist()):
        for t, column in enumerate(columns[label].tolist()):
            x[video, t, 1, column] = blob
    return x + 0.2 * torch.randn(x.shape, generator=g), y


def prototype_videos(num_videos: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Maps whose every position is its class's prototype plus noise: any reasonable head separates them."""
    prototypes = torch.randn(3, 16, generator=torch.Generator().manual_seed(99))
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(3, (num_videos,), generator=g)
    x = prototypes[y][:, None, None, None, :] + torch.randn(num_videos, NUM_SEGMENTS, *MAP_SHAPE, generator=g)
    return x, y


def train(head, make_data, steps: int, batch: int = 32) -> list[float]:
    head.train()
    return [head.update(LabelledBatch(*make_data(batch, seed=i)), None, i / steps)["loss"] for i in range(steps)]


def accuracy(head, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (head.eval()(x).argmax(1) == y).float().mean().item()


# ---------------------------------------------------------------------------------------- SGM (eq. 1-4)

def test_eq1_assignments_sum_to_one_over_groups_and_follow_the_distances():
    positions = torch.tensor([[[0.0, 0.0], [3.0, 4.0], [1.0, 0.0]]])       # [1 frame, 3 positions, 2]
    anchors = torch.tensor([[[0.0, 0.0], [3.0, 4.0]]])                      # [1 frame, K=2, 2]
    p = assign_to_anchors(positions, anchors, tau=0.5).exp()[0]
    assert torch.allclose(p.sum(dim=1), torch.ones(3))
    assert p.argmax(dim=1).tolist() == [0, 1, 0]                          # each position joins its nearest anchor
    # p_k / p_j = exp(-(d_k - d_j) / tau): position 2 is 1 from anchor 0 and sqrt(4 + 16) from anchor 1
    assert (p[2, 0] / p[2, 1]).item() == pytest.approx(math.exp((math.sqrt(20) - 1) / 0.5), rel=1e-4)
    assert p[0, 1].item() == pytest.approx(1 / (1 + math.exp(10)), rel=1e-4)   # distances 0 and 5, tau 0.5


def test_eq2_group_features_are_the_normalised_weighted_sums():
    positions = torch.tensor([[[1.0], [3.0], [5.0]]])
    assign = torch.tensor([[[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]]])
    groups = group_weights(assign).transpose(1, 2) @ positions
    # group 0: (1*1 + 0.5*3) / 1.5; group 1: (0.5*3 + 1*5) / 1.5
    assert groups.flatten().tolist() == pytest.approx([2.5 / 1.5, 6.5 / 1.5], rel=1e-5)
    empty = group_weights(torch.tensor([[[1.0, 0.0], [1.0, 0.0]]]))      # nobody joins group 1: weights 0, not NaN
    assert empty[0, :, 1].tolist() == [0.0, 0.0]


def test_sgm_anchors_are_softmax_weighted_positions_and_groups_follow_eq1_and_eq2():
    grouping = SpatialGrouping(channels=2, num_groups=2, hidden=2, tau=0.5, variant="paper")
    first, second = grouping.anchor_weights[0], grouping.anchor_weights[2]
    with torch.no_grad():                      # the anchor network reads logit_k(z_i) = w_k . z_i at each position
        for conv in (first, second):
            conv.weight.zero_()
            conv.bias.zero_()
        first.weight[[0, 1], [0, 1], 1, 1] = 1.0                         # centre tap: identity (z >= 0, ReLU keeps it)
        second.weight[0, 0, 1, 1] = math.log(3) / 2                      # w_0 = (ln 3 / 2, 0); w_1 = 0
    maps = torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0]])[None, :, None, :]   # [1, C=2, 1, 3]
    z = [(2.0, 0.0), (0.0, 2.0), (0.0, 0.0)]
    # anchor 0: softmax(ln 3, 0, 0) = (3/5, 1/5, 1/5) -> (6/5, 2/5); anchor 1: uniform -> (2/3, 2/3)
    anchors = [(6 / 5, 2 / 5), (2 / 3, 2 / 3)]
    p = []
    for point in z:                                                      # eq. 1: softmax_k(-||z_i - a_k|| / tau)
        scores = [math.exp(-math.dist(point, a) / 0.5) for a in anchors]
        p.append([score / sum(scores) for score in scores])
    expected = [[sum(p[i][k] * z[i][c] for i in range(3)) / (sum(p[i][k] for i in range(3)) + 1e-6)
                 for c in range(2)] for k in range(2)]                   # eq. 2
    groups, log_assign = grouping(maps)
    assert log_assign.exp()[0].tolist() == [pytest.approx(row, rel=1e-5) for row in p]
    assert groups[0].tolist() == [pytest.approx(row, rel=1e-5) for row in expected]


def test_eq3_and_eq4_on_a_hand_example():
    p = torch.tensor([[[0.5, 0.5], [0.9, 0.1]]])                          # one frame, 2 positions, K=2
    emin, emax = grouping_losses(p.log(), "paper")
    h = lambda *q: -sum(v * math.log(v) for v in q)  # noqa: E731
    assert emin.item() == pytest.approx((h(0.5, 0.5) + h(0.9, 0.1)) / 2, rel=1e-5)
    assert emax.item() == pytest.approx(-h(0.7, 0.3), rel=1e-5)             # p̄ = (0.7, 0.3); eq. 4 = sum p̄ log p̄


def test_eq4_is_lowest_when_the_mean_assignment_is_uniform():
    torch.manual_seed(0)
    uniform_mean = torch.tensor([[[0.9, 0.05, 0.05], [0.05, 0.9, 0.05], [0.05, 0.05, 0.9]]])   # p̄ = 1/3 each
    _, best = grouping_losses(uniform_mean.log(), "paper")
    assert best.item() == pytest.approx(-math.log(3), rel=1e-5)
    for _ in range(20):
        other = torch.rand(1, 3, 3).softmax(dim=-1) ** 3
        _, emax = grouping_losses((other / other.sum(-1, keepdim=True)).log(), "paper")
        assert emax.item() >= best.item() - 1e-6
    collapsed = torch.tensor([[[1.0, 1e-30, 1e-30]] * 3])                 # all in one group: the worst value, 0
    _, worst = grouping_losses(collapsed.log(), "paper")
    assert worst.item() == pytest.approx(0.0, abs=1e-5)


def test_entropies_have_finite_gradients_when_assignments_underflow():
    logits = torch.tensor([[[0.0, -400.0, -400.0], [0.0, -400.0, -400.0]]], requires_grad=True)  # p = (1, 0, 0)
    emin, emax = grouping_losses(torch.log_softmax(logits, dim=-1), "paper")
    (emin + emax).backward()
    assert torch.isfinite(logits.grad).all()


def test_official_variant_has_the_same_group_features_and_a_constant_eq4_value():
    torch.manual_seed(0)
    maps = torch.randn(4, 16, 3, 3)
    paper = stdn(grouping_variant="paper").frame_encoders[0].grouping
    official = stdn(grouping_variant="official").frame_encoders[0].grouping
    official.load_state_dict(paper.state_dict())
    groups_paper, log_assign = paper(maps)
    groups_official, _ = official(maps)
    assert torch.allclose(groups_paper, groups_official)                  # only the gradient differs
    positions, k = 9, 3
    constant = -k / positions * math.log(1 / positions + 1e-5)
    for assignments in (log_assign, torch.randn(4, positions, k).log_softmax(-1)):
        _, emax = grouping_losses(assignments, "official")
        assert emax.item() == pytest.approx(-constant, rel=1e-3)


# ------------------------------------------------------------------------------------- STRM (eq. 5-7)

def test_relation_labels_follow_eq7():
    assert relation_labels(torch.tensor([0, 2]), num_segments=5).tolist() == [[0, 1, 2, 3], [8, 9, 10, 11]]


def test_spatial_tuples_are_distinct_and_temporal_tuples_time_ordered():
    spatial = SpatialRelations(channels=4, num_groups=4, dim=2, num_tuples=12)
    assert {size: len(tuples) for size, tuples in spatial.tuples.items()} == {2: 12, 3: 24, 4: 24}   # 4!/(4-l)!
    assert all(len(set(t)) == len(t) for tuples in spatial.tuples.values() for t in tuples)
    temporal = TemporalRelations(num_segments=5, frame_dim=2, dim=2, num_tuples=3, dropout=0.0)
    assert {size: len(tuples) for size, tuples in temporal.tuples.items()} == {2: 10, 3: 10, 4: 5, 5: 1}
    assert all(list(t) == sorted(set(t)) for tuples in temporal.tuples.values() for t in tuples)
    torch.manual_seed(0)
    drawn = pick_tuples(spatial.tuples[3], 12, draw=True, device=torch.device("cpu")).tolist()
    assert len({tuple(t) for t in drawn}) == 12 and {tuple(t) for t in drawn} <= set(spatial.tuples[3])
    assert len(pick_tuples(spatial.tuples[3], 12, draw=False, device=torch.device("cpu"))) == 24


def test_spatial_relation_is_the_mean_of_the_linear_map_over_the_drawn_tuples():
    torch.manual_seed(0)
    relations = SpatialRelations(channels=5, num_groups=4, dim=3, num_tuples=12)
    groups = torch.randn(2, 4, 5)
    torch.manual_seed(1)
    fast = relations(groups, draw=True)
    torch.manual_seed(1)                   # the same draws, concatenated and projected one tuple at a time
    explicit = []
    for size, project in zip(relations.scales, relations.projections):
        tuples = pick_tuples(relations.tuples[size], 12, True, groups.device)
        explicit.append(torch.stack([project(groups[:, t].flatten(1)) for t in tuples]).mean(dim=0))
    assert torch.allclose(fast, torch.cat(explicit, dim=1), atol=1e-6)


def test_eq6_temporal_relations_on_a_hand_example():
    temporal = TemporalRelations(num_segments=3, frame_dim=1, dim=1, num_tuples=3, dropout=0.0)
    with torch.no_grad():                                   # H^t_m = ReLU -> Linear -> ReLU, one unit per scale
        temporal.blocks[0][2].weight.copy_(torch.tensor([[2.0, 1.0]]))
        temporal.blocks[0][2].bias.zero_()
        temporal.blocks[1][2].weight.copy_(torch.tensor([[1.0, 1.0, 1.0]]))
        temporal.blocks[1][2].bias.fill_(-2.0)
    frames = torch.tensor([[[1.0], [-2.0], [4.0]]])                     # ReLU first: (1, 0, 4)
    relations = temporal([frames, frames], draw=False)
    # m = 2 over (0,1), (0,2), (1,2): 2*1 + 0, 2*1 + 4, 2*0 + 4 -> mean 4; m = 3 over (0,1,2): 1 + 0 + 4 - 2 = 3
    assert relations.tolist() == [[[4.0], [3.0]]]


def test_eq6_is_the_mean_of_the_block_over_the_drawn_time_ordered_tuples():
    torch.manual_seed(0)
    temporal = TemporalRelations(num_segments=5, frame_dim=3, dim=4, num_tuples=3, dropout=0.0)
    frames = [torch.randn(2, 5, 3) for _ in temporal.scales]
    torch.manual_seed(1)
    fast = temporal(frames, draw=True)
    torch.manual_seed(1)                   # the same draws, one concatenated tuple at a time
    explicit = []
    for size, block, scale_frames in zip(temporal.scales, temporal.blocks, frames):
        tuples = pick_tuples(temporal.tuples[size], 3, True, scale_frames.device)
        explicit.append(torch.stack([block(scale_frames[:, t].flatten(1)) for t in tuples]).mean(dim=0))
    assert torch.allclose(fast, torch.stack(explicit, dim=1), atol=1e-6)


def test_squeeze_excite_on_a_hand_example():
    se = SqueezeExcite(dim=2, hidden=1)
    with torch.no_grad():
        se.gate[0].weight.copy_(torch.tensor([[1.0, 1.0]]))
        se.gate[2].weight.copy_(torch.tensor([[1.0], [-1.0]]))
    sigmoid = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    # g = (1, 2): W1 g = 3, ReLU 3, W2 -> (3, -3); g * sigmoid(.) = (sigmoid(3), 2 sigmoid(-3))
    assert se(torch.tensor([[1.0, 2.0]]))[0].tolist() == pytest.approx([sigmoid(3), 2 * sigmoid(-3)], rel=1e-6)


def test_frame_feature_is_k_minus_1_spatial_relations_and_g_of_width_k_times_ds():
    head = build("stdn", (7, 7, 8), 3, NUM_SEGMENTS, {"anchor_hidden": 4})         # K = 4, Ds = 192 (defaults)
    encoder = head.frame_encoders[0]
    maps = torch.rand(2, 8, 7, 7)
    features, _ = encoder(maps, draw=False)
    assert encoder.dim == 4 * 192 == 768 and features.shape == (2, 768)
    assert encoder.global_conv(maps).shape == (2, 192, 1, 1)                   # G: a conv over the whole 7x7 map
    assert torch.equal(features[:, 576:], encoder.global_conv(maps).flatten(1))   # [R^s_2, R^s_3, R^s_4, G]


# ---------------------------------------------------------------------------------------- diagnostics

def test_diagnose_averages_each_measure_over_the_batches_where_it_is_defined():
    batches = [(2, {"group_db_index": 1.0, "groups_used": 2.0}), (3, {"group_db_index": math.nan, "groups_used": 1.0}),
               (1, {"group_db_index": 4.0, "groups_used": 3.0})]
    means = mean_over_videos(batches)
    assert means["group_db_index"] == pytest.approx((2 * 1.0 + 4.0) / 3)
    assert means["groups_used"] == pytest.approx((4.0 + 3.0 + 3.0) / 6)
    assert math.isnan(mean_over_videos([(2, {"group_db_index": math.nan})])["group_db_index"])


def test_scale_nmse_is_zero_for_parallel_and_two_for_orthogonal_features():
    relations = torch.tensor([[[1.0, 0.0], [3.0, 0.0]], [[1.0, 0.0], [0.0, 2.0]]])
    assert scale_nmse(relations).tolist() == pytest.approx([0.0, 2.0])


def test_diagnostics_and_video_features_of_each_variant():
    torch.manual_seed(0)
    x, _ = moving_blob_videos(6, seed=0)
    for name, keys in (("stdn", {"relation_nmse", "kmeans_db_index", "group_db_index", "groups_used"}),
                       ("stdn-sgm", {"kmeans_db_index", "group_db_index", "groups_used"}),
                       ("tsn-maps", {"kmeans_db_index"})):
        head = stdn(name).eval()
        results = head.diagnostics(x)
        assert set(results) == keys and all(math.isfinite(v) for v in results.values())
        assert 1 <= results.get("groups_used", 1) <= 3
        with torch.no_grad():
            assert torch.allclose(head.classifier(head.video_features(x)), head(x))


def test_diagnostics_on_1x1_maps_leave_the_undefined_indices_nan():
    x = torch.rand(2, NUM_SEGMENTS, 1, 1, 16)                              # one position per frame, K = 3 groups
    for name in ("stdn", "tsn-maps"):
        head = build(name, (1, 1, 16), 3, NUM_SEGMENTS, SMALL).eval()
        results = head.diagnostics(x)
        assert math.isnan(results["kmeans_db_index"])                    # K-means needs K points per frame
        if name == "stdn":
            assert math.isnan(results["group_db_index"])                 # one position: one non-empty group
            assert results["groups_used"] == 1.0 and math.isfinite(results["relation_nmse"])
        # the NaN batch is left out of the mean over videos; alone it stays NaN
        means = mean_over_videos([(2, results), (1, {**results, "kmeans_db_index": 0.5})])
        assert means["kmeans_db_index"] == 0.5


# --------------------------------------------------------------------------------- heads and training

def test_variants_switch_on_the_components_of_table3():
    on = {name: {c for c in COMPONENTS if available()[name].HPARAMS[c].default} for name in VARIANTS}
    assert on == {"tsn-maps": set(), "stdn-sgm": {"grouping"}, "stdn-trm": {"grouping", "temporal_relations"},
                  "stdn-strm": {"grouping", "spatial_relations", "temporal_relations"},
                  "stdn-mixstyle": {"mixstyle", "grouping", "spatial_relations", "temporal_relations"},
                  "stdn": set(COMPONENTS)}
    assert all(available()[name].settings == {"dg"} and available()[name].input == "maps" for name in VARIANTS)


def test_bad_component_combinations_and_shapes_are_clear_errors():
    with pytest.raises(HeadError, match="spatial_relations=true needs grouping"):
        stdn(grouping=False)
    with pytest.raises(HeadError, match="se_aggregation=true needs temporal_relations"):
        stdn(temporal_relations=False)
    with pytest.raises(HeadError, match="maps features with 3 dims"):
        build("stdn", (16,), 3, NUM_SEGMENTS, {})
    with pytest.raises(HeadError, match=r"\(N, H, W, C\) = \(3, 3, 3, 16\)"):
        stdn()(torch.zeros(2, 5, *MAP_SHAPE))


@pytest.mark.parametrize("override, message", [
    ({"num_groups": 1}, "num_groups=1 is out of range; it must be >= 2"),
    ({"spatial_tuples": 0}, "spatial_tuples=0 is out of range; it must be >= 1"),
    ({"temporal_tuples": 0}, "temporal_tuples=0 is out of range; it must be >= 1"),
    ({"tau": 0.0}, r"tau=0.0 is out of range; it must be > 0"),
    ({"anchor_hidden": 0}, "anchor_hidden=0 is out of range; it must be >= 1"),
    ({"spatial_dim": 0}, "spatial_dim=0 is out of range; it must be >= 1"),
    ({"temporal_dim": -1}, "temporal_dim=-1 is out of range; it must be >= 1"),
    ({"se_hidden": 0}, "se_hidden=0 is out of range; it must be >= 1"),
    ({"relation_hidden": 0}, "relation_hidden=0 is out of range; it must be >= 1"),
    ({"dropout": 1.0}, r"dropout=1.0 is out of range; it must be in \[0, 1\)"),
    ({"mixstyle_p": 1.5}, r"mixstyle_p=1.5 is out of range; it must be in \[0, 1\]"),
    ({"mixstyle_alpha": 0.0}, "mixstyle_alpha=0.0 is out of range; it must be > 0"),
    ({"lambda_ent": -0.1}, "lambda_ent=-0.1 is out of range; it must be >= 0"),
    ({"lambda_rel": -1.0}, "lambda_rel=-1.0 is out of range; it must be >= 0"),
])
def test_out_of_range_hparams_are_clear_errors(override, message):
    with pytest.raises(HeadError, match=f"head 'stdn': hyper-parameter {message}"):
        stdn(**override)
    stdn(**{name: 2 if isinstance(value, int) else 0.5 for name, value in override.items()})   # in range: builds


def test_per_scale_copies_multiply_the_spatial_modules():
    shared, per_scale = stdn(), stdn(spatial_modules="per_scale")
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    assert len(shared.frame_encoders) == 1 and len(per_scale.frame_encoders) == NUM_SEGMENTS - 1
    assert count(per_scale) == count(shared) + (NUM_SEGMENTS - 2) * count(shared.frame_encoders[0])


def test_update_minimises_eq8():
    torch.manual_seed(0)
    head = stdn(lambda_ent=0.1, lambda_rel=0.5)
    logs = head.train().update(LabelledBatch(*moving_blob_videos(8, seed=0)), None, 0.0)
    assert logs["loss"] == pytest.approx(logs["cls"] + 0.1 * (logs["entropy_min"] + logs["entropy_max"])
                                         + 0.5 * logs["relation"], rel=1e-5)
    assert logs["relation"] == pytest.approx(math.log((NUM_SEGMENTS - 1) * 3), rel=0.1)   # chance at the start


@pytest.mark.parametrize("name", ["stdn-strm", "stdn-mixstyle", "stdn"])
def test_spatial_temporal_relations_learn_where_and_when(name):
    torch.manual_seed(0)
    head = stdn(name)
    train(head, moving_blob_videos, steps=60)
    assert accuracy(head, *moving_blob_videos(300, seed=10_000)) > 0.95


def test_tsn_on_pooled_maps_cannot_see_where_and_when():
    torch.manual_seed(0)
    head = stdn("tsn-maps")
    train(head, moving_blob_videos, steps=60)
    assert accuracy(head, *moving_blob_videos(300, seed=10_000)) < 0.5      # every frame's spatial mean is alike


@pytest.mark.parametrize("name", ["tsn-maps", "stdn-sgm", "stdn-trm"])
def test_variants_without_spatial_relations_learn_a_separable_problem(name):
    torch.manual_seed(0)
    head = stdn(name)
    losses = train(head, prototype_videos, steps=30)
    assert accuracy(head, *prototype_videos(200, seed=10_000)) > 0.9
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5])


def test_evaluation_is_repeatable_and_independent_of_the_batch():
    torch.manual_seed(0)
    head = stdn(spatial_tuples=2, temporal_tuples=1)                     # training sees a few tuples per step
    train(head, moving_blob_videos, steps=3)
    x, _ = moving_blob_videos(8, seed=5)
    with torch.no_grad():
        first, second = head.eval()(x), head(x)
        assert torch.equal(first, second)
        assert torch.allclose(head(x[:3]), first[:3], atol=1e-5)
        redraw = stdn(spatial_tuples=2, temporal_tuples=1, eval_tuples="random").eval()
        redraw.load_state_dict(head.state_dict())
        assert not torch.allclose(redraw(x), redraw(x))                 # the official code's re-drawing


def test_same_seed_same_losses():
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        runs.append(train(stdn(mixstyle_p=1.0), moving_blob_videos, steps=4))
    assert runs[0] == runs[1]


def test_official_preset_trains_with_per_scale_copies():
    torch.manual_seed(0)
    head = stdn(**available()["stdn"].PRESETS["official"])
    assert len(head.frame_encoders) == NUM_SEGMENTS - 1 and head.hparams["lambda_ent"] == 0.15
    logs = train(head, moving_blob_videos, steps=2)
    assert all(math.isfinite(v) for v in logs)


def test_trm_no_sgm_preset_is_the_issues_trm_and_trains():
    torch.manual_seed(0)
    head = stdn("stdn-trm", **available()["stdn-trm"].PRESETS["no-sgm"])
    assert head.frame_encoders[0].grouping is None and head.frame_encoders[0].dim == MAP_SHAPE[2]
    logs = head.train().update(LabelledBatch(*moving_blob_videos(8, seed=0)), None, 0.0)
    assert {"cls", "relation"} <= set(logs) and "entropy_min" not in logs
    assert math.isfinite(logs["loss"])


@pytest.mark.parametrize("name", ["stdn", "tsn-maps"])
def test_trains_with_setting_dg_from_a_maps_store(tmp_path, name):
    from pipelines.train import TrainConfig, train as run_training

    store, manifest = make_feature_store(tmp_path, map_shape=(2, 2, 8), per_class=4, steps=6)
    report = run_training(TrainConfig(store=store, manifest=manifest, head=name, source="src", target="tgt",
                                      setting="dg", out=tmp_path / "run", num_segments=3,
                                      hparams={"epochs": 3, "batch_size": 6, "lr": 0.05, "anchor_hidden": 8,
                                               "spatial_dim": 8, "temporal_dim": 16}), show_progress=False)
    final = report["final"]
    assert final["epochs_run"] == 3 and 0.0 <= final["target_acc_selected"] <= 1.0
    assert report["epochs"][-1]["loss"] < report["epochs"][0]["loss"]
    assert torch.load(tmp_path / "run" / "best.pt", weights_only=True)["head"]
    measures = diagnose_run(tmp_path / "run", store, manifest, workers=0)["head_measures"]["target"]
    assert math.isfinite(measures["kmeans_db_index"])                   # Fig. 5's reference, for the baseline too
    assert ("group_db_index" in measures) == (name == "stdn")
