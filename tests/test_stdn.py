"""STDN on cached maps: eq. 1-8 on hand examples, tuples and their reductions, diagnostics, the Table 3
architectures trained by ERM (eq. 8), presets."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from conftest import make_feature_store
from heads import HeadError, LabelledBatch, architectures, build, preset, resolve_hparams
from heads.stdn import (COMPONENTS, SpatialGrouping, SpatialRelations, SqueezeExcite, TemporalRelations,
                        assign_to_anchors, group_weights, grouping_losses, pick_tuples, relation_labels, scale_nmse)

VARIANTS = ["tsn-maps", "stdn-sgm", "stdn-trm", "stdn-strm", "stdn-mixstyle", "stdn"]
MAP_SHAPE, NUM_SEGMENTS = (3, 3, 16), 3
SMALL = {"anchor_hidden": 16, "spatial_dim": 16, "temporal_dim": 32, "se_hidden": 8, "relation_hidden": 32,
         "num_groups": 3, "lr": 0.05, "lr_schedule": "constant"}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run fastest on one thread


def stdn(name: str = "stdn", num_classes: int = 3, **extra):
    """Architecture ``name`` trained by ERM (eq. 8: ERM's L_y = L_cls, plus the architecture's own terms)."""
    return build(name, "erm", MAP_SHAPE, num_classes, NUM_SEGMENTS, {**SMALL, **extra})


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
    """Maps whose every position is its class's prototype plus noise: any reasonable model separates them."""
    prototypes = torch.randn(3, 16, generator=torch.Generator().manual_seed(99))
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(3, (num_videos,), generator=g)
    x = prototypes[y][:, None, None, None, :] + torch.randn(num_videos, NUM_SEGMENTS, *MAP_SHAPE, generator=g)
    return x, y


def train(model, make_data, steps: int, batch: int = 32) -> list[float]:
    model.train()
    return [model.update(LabelledBatch(*make_data(batch, seed=i)), None, i / steps)["loss"] for i in range(steps)]


def accuracy(model, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model.eval().predict(x).argmax(1) == y).float().mean().item()


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
    paper = stdn(grouping_variant="paper").arch.frame_encoders[0].grouping
    official = stdn(grouping_variant="official").arch.frame_encoders[0].grouping
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


def sigmoid(v: float) -> float:
    return 1 / (1 + math.exp(-v))


def hand_squeeze_excite() -> SqueezeExcite:
    """SE with W1 = (1, 1) and W2 = (1, -1)^T: SE(g) = g * sigmoid((g1 + g2) * (1, -1)) for g >= 0."""
    se = SqueezeExcite(dim=2, hidden=1)
    with torch.no_grad():
        se.gate[0].weight.copy_(torch.tensor([[1.0, 1.0]]))
        se.gate[2].weight.copy_(torch.tensor([[1.0], [-1.0]]))
    return se


def test_squeeze_excite_on_a_hand_example():
    se = hand_squeeze_excite()
    # g = (1, 2): W1 g = 3, ReLU 3, W2 -> (3, -3); g * sigmoid(.) = (sigmoid(3), 2 sigmoid(-3))
    assert se(torch.tensor([[1.0, 2.0]]))[0].tolist() == pytest.approx([sigmoid(3), 2 * sigmoid(-3)], rel=1e-6)


# ------------------------------------------------------------ the official reduction (ops/STDNmodule.py)

def hand_temporal(num_tuples: int) -> TemporalRelations:
    """The hand example of eq. 6 above, with the official reduction."""
    temporal = TemporalRelations(num_segments=3, frame_dim=1, dim=1, num_tuples=num_tuples, dropout=0.0,
                                 reduction="official")
    with torch.no_grad():
        temporal.blocks[0][2].weight.copy_(torch.tensor([[2.0, 1.0]]))
        temporal.blocks[0][2].bias.zero_()
        temporal.blocks[1][2].weight.copy_(torch.tensor([[1.0, 1.0, 1.0]]))
        temporal.blocks[1][2].bias.fill_(-2.0)
    return temporal


def test_official_reduction_sums_the_tuples_and_counts_the_one_n_frame_tuple_num_tuples_times():
    frames = torch.tensor([[[1.0], [-2.0], [4.0]]])                     # ReLU first: (1, 0, 4)
    # block outputs: m = 2: (0,1) -> 2, (0,2) -> 6, (1,2) -> 4; m = 3: (0,1,2) -> 3
    assert hand_temporal(3)([frames, frames], draw=False).tolist() == [[[2.0 + 6.0 + 4.0], [3 * 3.0]]]
    # 2 of the 3 pairs: every tuple -> the expected sum of a draw, (8 + 6 + 10) / 3 = 8; the 3-frame tuple x 2
    assert hand_temporal(2)([frames, frames], draw=False).tolist() == [[[8.0], [2 * 3.0]]]
    for seed in range(3):                  # drawn: exactly the sum of the drawn pairs' outputs
        torch.manual_seed(seed)
        drawn = pick_tuples(hand_temporal(2).tuples[2], 2, True, frames.device).tolist()
        torch.manual_seed(seed)
        pair_sum = sum({(0, 1): 2.0, (0, 2): 6.0, (1, 2): 4.0}[tuple(t)] for t in drawn)
        assert hand_temporal(2)([frames, frames], draw=True).tolist() == [[[pair_sum], [2 * 3.0]]]


def test_official_reduction_is_not_a_factor_of_num_tuples_through_the_se_gate():
    se = hand_squeeze_excite()
    g = torch.tensor([[1.0, 2.0]])          # the mean of 3 tuples; the code's sum is 3 g
    # SE(3g) = 3g * sigmoid(W2 ReLU(W1 3g)) = (3 sigmoid(9), 6 sigmoid(-9)), not 3 SE(g) = (3 sigmoid(3), 6 sigmoid(-3))
    assert se(3 * g)[0].tolist() == pytest.approx([3 * sigmoid(9), 6 * sigmoid(-9)], rel=1e-6)
    assert (3 * se(g))[0].tolist() == pytest.approx([3 * sigmoid(3), 6 * sigmoid(-3)], rel=1e-6)


@pytest.mark.parametrize("name", ["stdn-strm", "stdn"])
def test_official_reduction_reproduces_the_official_forward_pass(name):
    torch.manual_seed(0)
    mean, official = stdn(name).arch.eval(), stdn(name, tuple_reduction="official").arch.eval()
    official.load_state_dict(mean.state_dict())
    x, _ = moving_blob_videos(4, seed=0)
    with torch.no_grad():
        relations_mean, relations = mean.encode(x).relations, official.encode(x).relations
        # N = 3, 3 tuples per scale: 3 of the 3 pairs summed, the one triple x 3
        assert torch.allclose(relations, 3 * relations_mean, atol=1e-6)
        weight, bias = official.classifier[1].weight, official.classifier[1].bias

        def f(z):                                                            # the code's F: one Linear
            return z @ weight.T + bias

        modulate = official.modulators or [nn.Identity()] * official.num_scales
        code = sum(f(modulate[i](relations[:, i])) for i in range(official.num_scales))        # Σ_s F(H^a_s(g_s))
        logits = official.classify(official.aggregate(relations))
        assert torch.allclose(logits, code, atol=1e-5)
        extra_bias = (official.num_scales - 1) * bias                        # F's bias once per scale
        assert torch.allclose(logits - f(official.aggregate(relations)), extra_bias.expand_as(logits), atol=1e-6)
        second = official.new_classifier()                                   # MCD's F2: the same form
        second.load_state_dict(official.classifier.state_dict())
        assert torch.allclose(second(official.aggregate(relations)), logits, atol=1e-6)
        assert not torch.allclose(logits, 3 * mean.classify(mean.aggregate(relations_mean)), atol=1e-3)


# ---------------------------------------------------------------------------- encode, aggregate, eq. 8

def test_frame_feature_is_k_minus_1_spatial_relations_and_g_of_width_k_times_ds():
    arch = build("stdn", "erm", (7, 7, 8), 3, NUM_SEGMENTS, {"anchor_hidden": 4}).arch    # K = 4, Ds = 192
    encoder = arch.frame_encoders[0]
    maps = torch.rand(2, 8, 7, 7)
    features, _ = encoder(maps, draw=False)
    assert encoder.dim == arch.frame_dim == 4 * 192 == 768 and features.shape == (2, 768)
    assert encoder.global_conv(maps).shape == (2, 192, 1, 1)                   # G: a conv over the whole 7x7 map
    assert torch.equal(features[:, 576:], encoder.global_conv(maps).flatten(1))   # [R^s_2, R^s_3, R^s_4, G]


def test_encoding_parts_and_dims_of_each_variant():
    x, _ = moving_blob_videos(2, seed=0)
    for name in VARIANTS:
        arch = stdn(name).arch.eval()
        encoding = arch.encode(x)
        assert encoding.frames.shape == (2, NUM_SEGMENTS, arch.frame_dim)
        temporal = arch.hparams["temporal_relations"]
        assert arch.provides(arch.hparams) == ({"encoder"} if name != "tsn-maps" else set()) | (
            {"relations"} if temporal else set())
        if temporal:
            assert encoding.relations.shape == (2, NUM_SEGMENTS - 1, arch.relation_dim) and arch.relation_dim == 32
            assert arch.num_scales == NUM_SEGMENTS - 1 and arch.video_dim == 32
            assert isinstance(arch.classifier[0], nn.Identity)             # the code's F has no dropout
        else:
            assert encoding.relations is None and arch.video_dim == arch.frame_dim
            assert isinstance(arch.classifier[0], nn.Dropout) and arch.classifier[0].p == 0.3
        assert len(encoding.extras["log_assignments"]) == int(arch.hparams["grouping"])
        assert arch.features(x).shape == (2, arch.video_dim)
        assert arch.new_classifier()(arch.features(x)).shape == (2, 3)


def test_tsn_aggregates_the_mean_over_segments_of_the_spatial_means():
    arch = stdn("tsn-maps").arch.eval()
    x, _ = moving_blob_videos(3, seed=0)
    assert torch.allclose(arch.encode(x).frames, x.mean(dim=(2, 3)))
    assert torch.allclose(arch.features(x), x.mean(dim=(1, 2, 3)), atol=1e-6)


def test_se_aggregation_sums_the_modulated_scales_and_plain_sum_without_it():
    x, _ = moving_blob_videos(3, seed=0)
    full, plain = stdn("stdn").arch.eval(), stdn("stdn-mixstyle").arch.eval()
    with torch.no_grad():
        relations = full.encode(x).relations
        assert torch.allclose(full.aggregate(relations), full.modulators[0](relations[:, 0])
                              + full.modulators[1](relations[:, 1]))
        assert torch.equal(plain.aggregate(relations), relations.sum(dim=1))


def test_per_scale_copies_give_each_scale_its_own_frames_and_average_them_as_frames():
    torch.manual_seed(0)
    arch = stdn(spatial_modules="per_scale").arch.eval()
    x, _ = moving_blob_videos(2, seed=0)
    maps = x.flatten(0, 1).permute(0, 3, 1, 2)
    per_copy = [encoder(maps, False)[0].view(2, NUM_SEGMENTS, -1) for encoder in arch.frame_encoders]
    with torch.no_grad():
        encoding = arch.encode(x)
        assert torch.allclose(encoding.frames, torch.stack(per_copy).mean(dim=0))
        assert torch.allclose(encoding.relations, arch.temporal(per_copy, draw=False))
        assert len(encoding.extras["log_assignments"]) == NUM_SEGMENTS - 1


def test_aux_losses_are_eq3_4_and_eq7_weighted():
    torch.manual_seed(0)
    arch = stdn(lambda_ent=0.1, lambda_rel=0.5).arch.eval()
    x, y = moving_blob_videos(4, seed=0)
    with torch.no_grad():
        encoding = arch.encode(x)
        terms = arch.aux_losses(encoding, y)
        emin, emax = grouping_losses(encoding.extras["log_assignments"][0], "paper")
        assert terms["loss_grouping"].item() == pytest.approx(0.1 * (emin + emax).item(), rel=1e-6)
        log_p = arch.relation_classifier(encoding.relations).log_softmax(dim=-1)       # [B, N-1, (N-1)C]
        # eq. 7: mean over videos and scales of -log p(ỹ_m), ỹ_m = y (N-1) + (m-2)
        picked = [-log_p[b, m, y[b] * (NUM_SEGMENTS - 1) + m] for b in range(4) for m in range(NUM_SEGMENTS - 1)]
        assert terms["loss_relation"].item() == pytest.approx(0.5 * torch.stack(picked).mean().item(), rel=1e-6)


def test_grouping_loss_covers_every_video_and_relation_loss_the_labelled_ones():
    torch.manual_seed(0)
    arch = stdn().arch.eval()
    (x, y), (x_tgt, _) = moving_blob_videos(4, seed=0), moving_blob_videos(4, seed=1)
    with torch.no_grad():                  # a method passes [source; target] through one encode
        both = arch.aux_losses(arch.encode(torch.cat([x, x_tgt])), y)
        source = arch.aux_losses(arch.encode(x), y)
        target = arch.aux_losses(arch.encode(x_tgt), y)
    assert both["loss_relation"].item() == pytest.approx(source["loss_relation"].item(), rel=1e-5)
    grouping = (source["loss_grouping"] + target["loss_grouping"]) / 2     # equal halves: the mean over frames
    assert both["loss_grouping"].item() == pytest.approx(grouping.item(), rel=1e-5)


def test_erm_update_minimises_eq8():
    torch.manual_seed(0)
    model = stdn(lambda_ent=0.1, lambda_rel=0.5)
    logs = model.train().update(LabelledBatch(*moving_blob_videos(8, seed=0)), None, 0.0)
    assert logs["loss"] == pytest.approx(logs["loss_y"] + logs["loss_grouping"] + logs["loss_relation"], rel=1e-6)
    assert logs["loss_relation"] / 0.5 == pytest.approx(math.log((NUM_SEGMENTS - 1) * 3), rel=0.1)   # chance
    assert set(stdn("tsn-maps").train().update(LabelledBatch(*moving_blob_videos(8, seed=0)), None, 0.0)) == {
        "loss", "loss_y", "lr", "grad_norm"}                                # TSN: L_cls only


# ---------------------------------------------------------------------------------------- diagnostics

def test_diagnose_averages_each_measure_over_the_batches_where_it_is_defined():
    # trainer-level: the lead ports this (pipelines/diagnose.py)
    from pipelines.diagnose import mean_over_videos

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
        model = stdn(name).eval()
        results = model.diagnostics(x)
        assert set(results) == keys and all(math.isfinite(v) for v in results.values())
        assert 1 <= results.get("groups_used", 1) <= 3
        with torch.no_grad():
            assert torch.allclose(model.arch.classify(model.arch.features(x)), model.predict(x))


def test_diagnostics_on_1x1_maps_leave_the_undefined_indices_nan():
    x = torch.rand(2, NUM_SEGMENTS, 1, 1, 16)                              # one position per frame, K = 3 groups
    for name in ("stdn", "tsn-maps"):
        results = build(name, "erm", (1, 1, 16), 3, NUM_SEGMENTS, SMALL).eval().diagnostics(x)
        assert math.isnan(results["kmeans_db_index"])                    # K-means needs K points per frame
        if name == "stdn":
            assert math.isnan(results["group_db_index"])                 # one position: one non-empty group
            assert results["groups_used"] == 1.0 and math.isfinite(results["relation_nmse"])


# ----------------------------------------------------------------- architectures, hyper-parameters, presets

def test_variants_switch_on_the_components_of_table3():
    on = {name: {c for c in COMPONENTS if architectures()[name].HPARAMS[c].default} for name in VARIANTS}
    assert on == {"tsn-maps": set(), "stdn-sgm": {"grouping"}, "stdn-trm": {"grouping", "temporal_relations"},
                  "stdn-strm": {"grouping", "spatial_relations", "temporal_relations"},
                  "stdn-mixstyle": {"mixstyle", "grouping", "spatial_relations", "temporal_relations"},
                  "stdn": set(COMPONENTS)}
    assert all(architectures()[name].input == "maps" for name in VARIANTS)


def test_recipe_sets_stdns_optimiser_and_leaves_the_shared_defaults():
    recipe = {"epochs": 25, "batch_size": 32, "lr": 1e-3, "lr_schedule": "step", "lr_steps": (0.4, 0.8),
              "lr_decay": 0.1, "momentum": 0.9, "nesterov": False, "weight_decay": 5e-4, "clip_grad": 20.0}
    for name in VARIANTS:
        hparams = resolve_hparams(name, "erm", {})
        assert {key: hparams[key] for key in recipe} == recipe
        assert all(architectures()[name].RECIPE[key].source.startswith("STDN") for key in recipe)
    assert resolve_hparams("trn", "erm", {})["lr"] == 0.03                   # the shared default is untouched


def test_every_hparam_has_a_source_and_a_range():
    for name, spec in {**architectures()["stdn"].RECIPE, **architectures()["stdn"].HPARAMS}.items():
        assert spec.help and spec.source, name
        if not isinstance(spec.default, bool):
            assert spec.choices or spec.interval, name


def test_bad_component_combinations_and_shapes_are_clear_errors():
    with pytest.raises(HeadError, match="architecture 'stdn': spatial_relations=true needs grouping"):
        stdn(grouping=False)
    with pytest.raises(HeadError, match="architecture 'stdn': se_aggregation=true needs temporal_relations"):
        stdn(temporal_relations=False)
    with pytest.raises(HeadError, match="temporal relations need at least 2 segments, got num_segments=1"):
        build("stdn-trm", "erm", MAP_SHAPE, 3, 1, SMALL)
    build("tsn-maps", "erm", MAP_SHAPE, 3, 1, SMALL)                        # one segment is fine without them
    with pytest.raises(HeadError, match=r"tuple_reduction='sum': 'sum' is not one of \('mean', 'official'\)"):
        stdn(tuple_reduction="sum")
    with pytest.raises(HeadError, match="maps features with 3 dims"):
        build("stdn", "erm", (16,), 3, NUM_SEGMENTS, {})
    with pytest.raises(HeadError, match=r"\(N, H, W, C\) = \(3, 3, 3, 16\)"):
        stdn().predict(torch.zeros(2, 5, *MAP_SHAPE))


@pytest.mark.parametrize("override, interval", [
    ({"num_groups": 1}, "[2, inf)"), ({"spatial_tuples": 0}, "[1, inf)"), ({"temporal_tuples": 0}, "[1, inf)"),
    ({"tau": 0.0}, "(0, inf)"), ({"anchor_hidden": 0}, "[1, inf)"), ({"spatial_dim": 0}, "[1, inf)"),
    ({"temporal_dim": -1}, "[1, inf)"), ({"se_hidden": 0}, "[1, inf)"), ({"relation_hidden": 0}, "[1, inf)"),
    ({"dropout": 1.0}, "[0, 1)"), ({"mixstyle_p": 1.5}, "[0, 1]"), ({"mixstyle_alpha": 0.0}, "(0, inf)"),
    ({"lambda_ent": -0.1}, "[0, inf)"), ({"lambda_rel": -1.0}, "[0, inf)"), ({"lr": 0.0}, "(0, inf)"),
])
def test_out_of_range_hparams_are_clear_errors(override, interval):
    ((name, value),) = override.items()
    with pytest.raises(HeadError, match=f"architecture 'stdn': hyper-parameter {name}={value} is out of range: "
                                        f"it must be in {interval}".replace("[", r"\[").replace("(", r"\(")
                                        .replace(")", r"\)")):
        stdn(**override)
    stdn(**{name: 2 if isinstance(value, int) else 0.5})                 # in range: builds


def test_per_scale_copies_multiply_the_spatial_modules():
    shared, per_scale = stdn().arch, stdn(spatial_modules="per_scale").arch
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    assert len(shared.frame_encoders) == 1 and len(per_scale.frame_encoders) == NUM_SEGMENTS - 1
    assert count(per_scale) == count(shared) + (NUM_SEGMENTS - 2) * count(shared.frame_encoders[0])


def test_official_preset_for_every_stdn_architecture_and_no_sgm_for_stdn_trm_only():
    for name in VARIANTS:
        assert preset("official", name, "erm").hparams == {
            "lambda_ent": 0.15, "grouping_variant": "official", "spatial_modules": "per_scale",
            "eval_tuples": "random", "mixstyle_pairing": "crosshalf", "tuple_reduction": "official"}
    assert preset("no-sgm", "stdn-trm", "erm").hparams == {"grouping": False}
    with pytest.raises(HeadError, match="no preset 'no-sgm' for method 'erm' on architecture 'stdn'"):
        preset("no-sgm", "stdn", "erm")
    with pytest.raises(HeadError, match="no preset 'official'"):
        preset("official", "trn", "erm")


def test_official_preset_trains_with_per_scale_copies_and_summed_tuples():
    torch.manual_seed(0)
    model = stdn(**preset("official", "stdn", "erm").hparams)
    assert len(model.arch.frame_encoders) == NUM_SEGMENTS - 1 and model.hparams["lambda_ent"] == 0.15
    assert model.arch.temporal.tuple_weights == [3.0, 3.0]
    logs = train(model, moving_blob_videos, steps=2)
    assert all(math.isfinite(v) for v in logs)


def test_trm_no_sgm_preset_is_the_issues_trm_and_trains():
    torch.manual_seed(0)
    model = stdn("stdn-trm", **preset("no-sgm", "stdn-trm", "erm").hparams)
    assert model.arch.frame_encoders[0].grouping is None and model.arch.frame_dim == MAP_SHAPE[2]
    logs = model.train().update(LabelledBatch(*moving_blob_videos(8, seed=0)), None, 0.0)
    assert {"loss_y", "loss_relation"} <= set(logs) and "loss_grouping" not in logs
    assert math.isfinite(logs["loss"])


# --------------------------------------------------------------------------------------------- training

@pytest.mark.parametrize("name", ["stdn-strm", "stdn-mixstyle", "stdn"])
def test_spatial_temporal_relations_learn_where_and_when(name):
    torch.manual_seed(0)
    model = stdn(name)
    train(model, moving_blob_videos, steps=60)
    assert accuracy(model, *moving_blob_videos(300, seed=10_000)) > 0.95


def test_tsn_on_pooled_maps_cannot_see_where_and_when():
    torch.manual_seed(0)
    model = stdn("tsn-maps")
    train(model, moving_blob_videos, steps=60)
    assert accuracy(model, *moving_blob_videos(300, seed=10_000)) < 0.5      # every frame's spatial mean is alike


@pytest.mark.parametrize("name", ["tsn-maps", "stdn-sgm", "stdn-trm"])
def test_variants_without_spatial_relations_learn_a_separable_problem(name):
    torch.manual_seed(0)
    model = stdn(name)
    losses = train(model, prototype_videos, steps=30)
    assert accuracy(model, *prototype_videos(200, seed=10_000)) > 0.9
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5])


def test_evaluation_is_repeatable_and_independent_of_the_batch():
    torch.manual_seed(0)
    model = stdn(spatial_tuples=2, temporal_tuples=1)                    # training sees a few tuples per step
    train(model, moving_blob_videos, steps=3)
    x, _ = moving_blob_videos(8, seed=5)
    with torch.no_grad():
        first, second = model.eval().predict(x), model.predict(x)
        assert torch.equal(first, second)
        assert torch.allclose(model.predict(x[:3]), first[:3], atol=1e-5)
        redraw = stdn(spatial_tuples=2, temporal_tuples=1, eval_tuples="random").eval()
        redraw.load_state_dict(model.state_dict())
        assert not torch.allclose(redraw.predict(x), redraw.predict(x))   # the official code's re-drawing


def test_same_seed_same_losses_and_a_state_dict_round_trip(tmp_path):
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        model = stdn(mixstyle_p=1.0)
        runs.append(train(model, moving_blob_videos, steps=4))
    assert runs[0] == runs[1]
    torch.save({"model": model.state_dict(), "optimizer": model.optimizer.state_dict()}, tmp_path / "ckpt.pt")
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    resumed = stdn(mixstyle_p=1.0)
    resumed.load_state_dict(saved["model"])
    resumed.optimizer.load_state_dict(saved["optimizer"])
    x, _ = moving_blob_videos(4, seed=9)
    with torch.no_grad():
        assert torch.equal(resumed.eval().predict(x), model.eval().predict(x))
    torch.manual_seed(5)
    after = model.train().update(LabelledBatch(*moving_blob_videos(8, seed=7)), None, 0.5)
    torch.manual_seed(5)
    assert resumed.train().update(LabelledBatch(*moving_blob_videos(8, seed=7)), None, 0.5) == after


@pytest.mark.parametrize("name", ["stdn", "tsn-maps"])
def test_trains_with_setting_dg_from_a_maps_store(tmp_path, name):
    # trainer-level: the lead ports this
    import json

    from click.testing import CliRunner

    from pipelines.cli import main
    from pipelines.diagnose import diagnose_run

    store, manifest = make_feature_store(tmp_path, map_shape=(2, 2, 8), per_class=4, steps=6)
    settings = ["epochs=3", "batch_size=6", "lr=0.05", "anchor_hidden=8", "spatial_dim=8", "temporal_dim=16"]
    result = CliRunner().invoke(main, ["train", "--store", str(store), "--manifest", str(manifest), "--head", name,
                                       "--method", "erm", "--source", "src", "--target", "tgt", "--setting", "dg",
                                       "--segments", "3", "--out", str(tmp_path / "run"),
                                       *[arg for setting in settings for arg in ("--set", setting)]])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "run" / "metrics.json").read_text())
    final = report["final"]
    assert final["epochs_run"] == 3 and 0.0 <= final["target_acc_selected"] <= 1.0
    assert report["epochs"][-1]["loss"] < report["epochs"][0]["loss"]
    assert torch.load(tmp_path / "run" / "best.pt", weights_only=True)["model"]
    measures = diagnose_run(tmp_path / "run", store, manifest, workers=0)["head_measures"]["target"]
    assert math.isfinite(measures["kmeans_db_index"])                   # Fig. 5's reference, for the baseline too
    assert ("group_db_index" in measures) == (name == "stdn")


@pytest.mark.parametrize("pairing", ["random", "crosshalf"])
def test_mixstyle_keeps_the_domains_of_a_da_batch_apart(pairing):
    """A DA method passes [source; target] with split=len(source): source videos are never restyled by target ones."""
    model = stdn("stdn-mixstyle", mixstyle_p=1.0, mixstyle_pairing=pairing).arch.train()
    source, _ = prototype_videos(4, seed=0)
    outputs = []
    for target_seed in (1, 2):
        target, _ = prototype_videos(4, seed=target_seed)
        torch.manual_seed(0)
        outputs.append(model.encode(torch.cat([source, 10 * target]), split=4).frames[:4])
    assert torch.equal(outputs[0], outputs[1])          # another target batch leaves the source features alone
    torch.manual_seed(0)
    joint = model.encode(torch.cat([source, 10 * target]), split=None).frames[:4]
    assert not torch.allclose(joint, outputs[1])       # without the split, the target's styles leak in
