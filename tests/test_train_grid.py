"""What the trainer gives methods and architectures: several streams (late and early fusion), the target-only
upper bound, examples a method adds to the training data (checkpointed, resumed exactly), evaluation under a
forked RNG, presets that set trainer options, and `vidshift train --head help`."""
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from conftest import make_feature_store
from heads import method as heads_method
from heads.erm import ERM
from heads.fusion import LateFusion
from heads.method import Preset
from pipelines.cli import main
from pipelines.data import FeatureSet
from pipelines.evaluate import evaluate_run, load_run
from pipelines.runs import RunError, open_feature_set, select
from pipelines.train import TrainConfig, train
from extract.manifest import read_manifest
from extract.store import FeatureStore

FAST = {"epochs": 2, "batch_size": 8, "init_std": 0.0}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def two_streams(tmp_path_factory):
    """RGB maps (2, 2, 8) x 6 steps and flow maps (2, 2, 4) x 5 steps of the same videos."""
    return make_feature_store(tmp_path_factory.mktemp("streams"), target_shift=0.6, flow_channels=4)


def config_for(store_and_manifest, out: Path, **changes) -> TrainConfig:
    store, manifest = store_and_manifest
    return replace(TrainConfig(store=store, manifest=manifest, head="trn", source="src", target="tgt", out=out,
                               hparams=dict(FAST)), **changes)


def register_for_test(monkeypatch, method_cls) -> None:
    monkeypatch.setitem(heads_method._METHODS, method_cls.name, method_cls)


# ------------------------------------------------------------------------------------------ streams

def test_streams_share_one_plan_cut_to_the_common_step_range(two_streams):
    store = FeatureStore.open(two_streams[0])
    entries = select(read_manifest(two_streams[1]), "src", "train")[:3]
    late = open_feature_set(store, entries, "pooled", ["a", "b", "c"], ("rgb", "flow"), False)
    assert list(late.n_steps) == [5, 5, 5]                             # flow has one step fewer than rgb's 6
    plan = late.eval_plans(num_segments=5, batch_size=3)[0]
    late.load(torch.device("cpu"))
    x = late.gather(plan)
    assert set(x) == {"rgb", "flow"} and x["rgb"].shape == (3, 5, 8) and x["flow"].shape == (3, 5, 4)
    rgb_rows = store.read(entries[1].video_id, "pooled", stream="rgb")
    assert torch.equal(x["rgb"][1], torch.from_numpy(rgb_rows[plan.steps[1]]).float())   # same steps per stream
    early = FeatureSet(store, entries, "pooled", {"a": 0, "b": 1, "c": 2}, True, ("rgb", "flow"), "early")
    streamed = early.read(1, plan.steps[1])                            # the store path, as a DataLoader worker
    assert streamed.shape == (5, 12) and torch.equal(streamed, torch.cat([x["rgb"][1], x["flow"][1]], dim=-1))


@pytest.mark.parametrize("fusion", ["late", "early"])
def test_two_stream_run_trains_evaluates_and_records_both_streams(two_streams, tmp_path, fusion):
    config = config_for(two_streams, tmp_path / "run", streams=("rgb", "flow"), fusion=fusion)
    report = train(config, show_progress=False)
    assert report["streams"] == ["rgb", "flow"] and report["fusion"] == fusion
    record = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert record["store"]["streams"] == ["rgb", "flow"]
    run = load_run(tmp_path / "run", two_streams[0])
    assert isinstance(run.model.arch, LateFusion) == (fusion == "late")
    evaluation = evaluate_run(tmp_path / "run", *two_streams, "tgt", "test", workers=0)
    assert evaluation["accuracy"] == pytest.approx(report["final"]["target_acc_selected"])
    streamed = train(replace(config, out=tmp_path / "streamed", features="stream", workers=0), show_progress=False)
    assert streamed["epochs"] == report["epochs"]                      # streaming both streams changes nothing
    rgb_only = make_feature_store(tmp_path / "rgb_only", target_shift=0.6)
    with pytest.raises(RunError, match="no stream 'flow' that the run was trained on"):
        evaluate_run(tmp_path / "run", *rgb_only, "tgt", "test")


def test_late_fusion_averages_the_streams_logits(two_streams, tmp_path):
    import heads
    torch.manual_seed(0)
    model = heads.build("trn", "erm", {"rgb": (8,), "flow": (4,)}, 3, 5, {"init_std": 0.0, "frame_dim": 8,
                                                                        "relation_dim": 8}).eval()
    x = {"rgb": torch.randn(2, 5, 8), "flow": torch.randn(2, 5, 4)}
    per_stream = [arch(x[stream]) for stream, arch in model.arch.streams.items()]
    assert torch.allclose(model.predict(x), (per_stream[0] + per_stream[1]) / 2, atol=1e-6)
    encoding = model.arch.encode(x)
    assert encoding.frames.shape == (2, 5, 16) and encoding.relations.shape == (2, 4, 16)
    z = model.arch.aggregate(encoding.parts)
    assert torch.allclose(z, torch.cat([arch.features(x[s]) for s, arch in model.arch.streams.items()], -1),
                          atol=1e-6)


# ------------------------------------------------------------------------------------------ target-only

def test_target_only_trains_on_target_labels_and_selects_on_target_val(two_streams, tmp_path):
    report = train(config_for(two_streams, tmp_path / "run", head="tempooling", setting="target-only",
                              hparams={**FAST, "epochs": 4}), show_progress=False)
    final = report["final"]
    assert final["selection"] == "target val accuracy" and report["setting"] == "target-only"
    source_only = train(config_for(two_streams, tmp_path / "dg", head="tempooling", hparams={**FAST, "epochs": 4}),
                        show_progress=False)
    assert report["epochs"] != source_only["epochs"]
    # reported on the val split, the val split cannot also select: the last epoch is taken
    on_val = train(config_for(two_streams, tmp_path / "val", head="tempooling", setting="target-only",
                              eval_split="val"), show_progress=False)
    assert on_val["final"]["selection"].startswith("last epoch") and on_val["final"]["selected_epoch"] == 2
    with pytest.raises(RunError, match="--setting target-only needs --target"):
        train(config_for(two_streams, tmp_path / "x", setting="target-only", target=None), show_progress=False)


# ------------------------------------------------------------------------------------------ added examples

class AddsExamples(ERM):
    """At each epoch start, appends the first two source videos (negated) with their labels to the training data."""

    name = "adds_examples"
    seen: list[int] = []
    stop_before_epoch: int | None = None      # simulates a run killed between two epochs

    def __init__(self, arch, hparams):
        super().__init__(arch, hparams)
        self.added = None

    def before_epoch(self, source, progress):
        if self.stop_before_epoch is not None and progress * self.hparams["epochs"] >= self.stop_before_epoch:
            raise KeyboardInterrupt
        first = next(iter(source()))
        x, y = -first.x[:2], first.y[:2]
        self.added = (x, y) if self.added is None else (torch.cat([self.added[0], x]), torch.cat([self.added[1], y]))
        return {"added": float(len(self.added[1]))}

    def extra_examples(self):
        return self.added

    def update(self, src, tgt, progress):
        self.seen.append(len(src.y))
        return super().update(src, tgt, progress)

    def get_extra_state(self):
        return {"added": self.added}

    def set_extra_state(self, state):
        self.added = state["added"]


def test_added_examples_join_the_batches_and_resume_exactly(two_streams, tmp_path, monkeypatch):
    register_for_test(monkeypatch, AddsExamples)
    monkeypatch.setattr(AddsExamples, "seen", [])
    hparams = {**FAST, "epochs": 3, "batch_size": 10}
    straight = train(config_for(two_streams, tmp_path / "a", method="adds_examples", hparams=hparams),
                     show_progress=False)
    # 24 source videos + 2, 4, 6 added: ceil(26 / 10), ceil(28 / 10), ceil(30 / 10) full batches
    assert AddsExamples.seen == [10] * 9
    assert [r["added"] for r in straight["epochs"]] == [2.0, 4.0, 6.0]
    config = config_for(two_streams, tmp_path / "b", method="adds_examples", hparams=hparams)
    monkeypatch.setattr(AddsExamples, "stop_before_epoch", 2)
    with pytest.raises(KeyboardInterrupt):
        train(config, show_progress=False)
    monkeypatch.setattr(AddsExamples, "stop_before_epoch", None)
    resumed = train(config, resume=True, show_progress=False)
    assert resumed["epochs"] == straight["epochs"]                     # the added examples came back from the file


# ------------------------------------------------------------------------------------------ evaluation RNG

class DrawsInEvaluation(ERM):
    """ERM whose predictions draw from the global RNG (as STDN's random evaluation tuples)."""

    name = "draws_in_evaluation"

    def predict(self, x):
        torch.rand(len(self.arch(x)) * 1000)
        return super().predict(x)


def test_evaluation_draws_do_not_move_the_training_draws(two_streams, tmp_path, monkeypatch):
    register_for_test(monkeypatch, DrawsInEvaluation)
    manifest = two_streams[1]
    rows = manifest.read_text().splitlines()
    fewer_targets = tmp_path / "fewer.csv"
    fewer_targets.write_text("\n".join(r for i, r in enumerate(rows) if ",tgt,test," not in r or i % 2) + "\n")
    runs = [train(config_for(two_streams, tmp_path / name, manifest=m, method="draws_in_evaluation",
                             hparams={**FAST, "epochs": 3}), show_progress=False)
            for name, m in (("all", manifest), ("fewer", fewer_targets))]
    assert [r["loss"] for r in runs[0]["epochs"]] == [r["loss"] for r in runs[1]["epochs"]]
    assert [r["src_val_acc"] for r in runs[0]["epochs"]] == [r["src_val_acc"] for r in runs[1]["epochs"]]


# ------------------------------------------------------------------------------------------ presets, help

def test_a_preset_sets_trainer_options_unless_given(two_streams, tmp_path, monkeypatch):
    monkeypatch.setattr(heads_method, "_PRESETS", [*heads_method._PRESETS, Preset(
        "centre-test", "centre sampling and a small lr", {"lr": 0.01}, {"train_sampling": "centre"}, ("erm",))])
    train(config_for(two_streams, tmp_path / "a", preset="centre-test"), show_progress=False)
    record = yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())
    assert record["config"]["train_sampling"] == "centre" and record["hparams"]["lr"] == 0.01
    train(config_for(two_streams, tmp_path / "b", preset="centre-test", train_sampling="random"), show_progress=False)
    assert yaml.safe_load((tmp_path / "b" / "config.yaml").read_text())["config"]["train_sampling"] == "random"


def test_head_help_prints_architectures_methods_and_the_matrix():
    result = CliRunner().invoke(main, ["train", "--head", "help"])
    assert result.exit_code == 0
    out = result.output
    assert "architectures (--head" in out and "methods (--method" in out and "which method runs on" in out
    matrix = out.split("which method runs on which architecture")[1].split("presets")[0].splitlines()[1:]
    header = matrix[0].split()
    printed = {row.split()[0]: dict(zip(header, row.split()[1:])) for row in matrix[1:]}
    def cell(arch_cls, method_cls) -> str:
        if heads_method.missing_parts(arch_cls, method_cls):
            return "."
        return "~" if heads_method.fallback_parts(arch_cls, method_cls) else "x"

    expected = {arch: {method: cell(arch_cls, method_cls) for method, method_cls in heads_method.methods().items()}
                for arch, arch_cls in heads_method.architectures().items()}
    assert printed == expected
    assert printed["tempooling"]["erm"] == "x" and printed["tsn-maps"]["mcd"] == "."
    assert "ta3n-official-u2h" in out and "sets train_sampling=centre" in out


# ------------------------------------------------------------------------------------------ the papers' pairs

SMALL = {"epochs": 2, "batch_size": 8, "frame_dim": 16, "relation_dim": 16, "init_std": 0.0, "anchor_hidden": 8,
         "spatial_dim": 8, "temporal_dim": 8, "se_hidden": 4, "relation_hidden": 8,
         "ada_min_updates": 1, "ada_max_steps": 2, "mada_wae_epochs": 1}
# TA3N Tables 3-4 (the DA baselines on both temporal modules; ERM, TA2N, TA3N, DANN and MCD are in
# test_golden.py) and STDN Table 2 (the DG baselines on TSN, TRN and STDN)
TABLE_PAIRS = ([(arch, method, "da") for arch in ("tempooling", "trn") for method in ("jan", "adabn")]
               + [(arch, method, "dg") for arch in ("trn", "stdn") for method in ("mixup", "irm", "ada", "m-ada", "cop")]
               + [("tsn-maps", method, "dg") for method in ("mixup", "irm", "ada")])


@pytest.mark.parametrize("arch, method, setting", TABLE_PAIRS, ids=["-".join(p) for p in TABLE_PAIRS])
def test_the_papers_pairs_train_through_the_trainer(two_streams, tmp_path, arch, method, setting):
    specs = heads_method.hparam_specs(*heads_method.lookup(arch, method))
    hparams = {name: value for name, value in SMALL.items() if name in specs}
    report = train(config_for(two_streams, tmp_path / "run", head=arch, method=method, setting=setting,
                              hparams=hparams), show_progress=False)
    assert report["final"]["epochs_run"] == 2 and 0.0 <= report["final"]["target_acc_selected"] <= 1.0
    assert all(torch.isfinite(torch.tensor(record["loss"])) for record in report["epochs"])
    if method in ("ada", "m-ada"):    # a max phase ran at the second epoch's start, over the 24 source videos
        assert report["epochs"][1]["ada_phase"] == 1.0 and report["epochs"][1]["ada_new_examples"] == 24.0
