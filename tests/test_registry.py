"""Every (method, architecture) pair the matrix allows trains 3 updates on CPU, on one stream and as a late fusion of
two, evaluates, saves and resumes exactly; every pair it refuses fails with an error naming what is missing."""
from __future__ import annotations

import pytest
import torch

import heads
from heads import HeadError, LabelledBatch, UnlabelledBatch
from heads.method import hparam_specs, lookup, missing_parts

NUM_CLASSES, NUM_SEGMENTS = 3, 4
FEAT_SHAPE = {"pooled": (8,), "maps": (2, 2, 8)}
# narrow layers for every architecture family, and schedules short enough that 3 updates reach every code path
# (ADA's and M-ADA's max phases and meta-updates, IRM's switch to its full penalty); each pair takes its names
SMALL = {"frame_dim": 16, "gru_hidden": 16, "relation_dim": 16, "init_std": 0.0, "anchor_hidden": 8, "spatial_dim": 8,
         "temporal_dim": 8, "se_hidden": 4, "relation_hidden": 8, "batch_size": 6,
         "ada_min_updates": 1, "ada_max_steps": 1, "mada_wae_epochs": 1, "irm_anneal_updates": 1}

PAIRS = [(arch, method) for arch, arch_cls in heads.architectures().items()
         for method, method_cls in heads.methods().items()]
ALLOWED = [pair for pair in PAIRS if not missing_parts(*lookup(*pair))]
REFUSED = [pair for pair in PAIRS if missing_parts(*lookup(*pair))]

pytestmark = pytest.mark.usefixtures("one_thread")


def small(arch: str, method: str) -> dict:
    specs = hparam_specs(*lookup(arch, method))
    return {name: value for name, value in SMALL.items() if name in specs}


def shapes(arch: str, streams: int) -> tuple | dict:
    """One stream's step shape, or {stream: shape} for a late fusion of two streams (the second narrower)."""
    shape = FEAT_SHAPE[heads.architectures()[arch].input]
    return shape if streams == 1 else {"rgb": shape, "flow": (*shape[:-1], shape[-1] // 2)}


def build(arch: str, method: str, streams: int = 1):
    torch.manual_seed(0)
    return heads.build(arch, method, shapes(arch, streams), NUM_CLASSES, NUM_SEGMENTS, small(arch, method))


def batches(arch: str, count: int, streams: int = 1, seed: int = 0):
    """``count`` (source, target) batches of 6 labelled and 4 unlabelled videos."""
    g = torch.Generator().manual_seed(seed)

    def videos(n: int, shift: float):
        per_stream = shapes(arch, streams)
        if streams == 1:
            return torch.rand(n, NUM_SEGMENTS, *per_stream, generator=g) + shift
        return {s: torch.rand(n, NUM_SEGMENTS, *shape, generator=g) + shift for s, shape in per_stream.items()}

    return [(LabelledBatch(videos(6, 0.0), torch.randint(NUM_CLASSES, (6,), generator=g), index=torch.arange(6)),
             UnlabelledBatch(videos(4, 0.5), index=torch.arange(4))) for _ in range(count)]


def run_updates(model, data, start: int, total: int) -> list[dict]:
    model.train()
    logs = []
    for step, (src, tgt) in enumerate(data):
        progress = (start + step) / total
        model.before_epoch(lambda: iter([src]), progress)
        logs.append(model.update(src, tgt if "da" in model.settings else None, progress))
    return logs


def assert_same_state(a, b, where: str = "") -> None:
    """Equal state dicts, extra state (a method's added examples, counters) included."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same_state(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_the_matrix_allows_the_pairs_of_the_papers_tables():
    allowed = set(ALLOWED)
    for arch in ("tempooling", "trn"):                    # TA3N Tables 3-4, 6-7
        for method in ("erm", "dann", "jan", "mcd", "ta2n", "ta3n"):
            assert (arch, method) in allowed
    assert ("tempooling", "adabn") in allowed             # AdaBN adapts the frame MLP's batch norm
    for arch in ("tsn-maps", "stdn"):                     # STDN Table 2: DG methods on TSN and STDN
        for method in ("erm", "mixup", "irm", "ada", "m-ada"):
            assert (arch, method) in allowed
    # on cached maps TSN is a linear classifier: nothing for COP's auxiliary task or an alignment to shape
    assert ("stdn", "cop") in allowed and ("tsn-maps", "cop") not in allowed and ("tsn-maps", "dann") not in allowed


@pytest.mark.parametrize("streams", [1, 2], ids=["one-stream", "late-fusion"])
@pytest.mark.parametrize("pair", ALLOWED, ids=["-".join(p) for p in ALLOWED])
def test_pair_trains_evaluates_saves_and_resumes_exactly(pair, streams, tmp_path):
    arch, method = pair
    data = batches(arch, 3, streams)
    straight = build(arch, method, streams)
    torch.manual_seed(1)
    expected = run_updates(straight, data, 0, 3)
    assert all(torch.isfinite(torch.tensor(log["loss"])) for log in expected)

    interrupted = build(arch, method, streams)
    torch.manual_seed(1)
    run_updates(interrupted, data[:2], 0, 3)
    torch.save({"model": interrupted.state_dict(), "optimizers": [o.state_dict() for o in interrupted.optimizers],
                "rng": torch.get_rng_state()}, tmp_path / "checkpoint.pt")
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    resumed = build(arch, method, streams)
    resumed.load_state_dict(state["model"])
    for optimizer, saved in zip(resumed.optimizers, state["optimizers"]):
        optimizer.load_state_dict(saved)
    torch.set_rng_state(state["rng"])
    assert run_updates(resumed, data[2:], 2, 3) == expected[2:]
    assert_same_state(straight.state_dict(), resumed.state_dict())

    resumed.eval()
    for domain in ("source", "target"):
        resumed.set_eval_domain(domain)
        x = data[0][0].x
        logits = resumed.predict(x)
        assert logits.shape == (6, NUM_CLASSES) and torch.isfinite(logits).all()
        assert torch.equal(logits, resumed.predict(x))             # evaluation is repeatable by default
        assert resumed.features(x).shape == (6, resumed.arch.video_dim)


@pytest.mark.parametrize("pair", REFUSED, ids=["-".join(p) for p in REFUSED])
def test_refused_pair_names_the_missing_part(pair):
    with pytest.raises(HeadError, match="needs .* which architecture"):
        build(*pair)
