"""`vidshift train` / `vidshift eval` on real stores: learning, determinism, resume, DA label hygiene, errors."""
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from conftest import make_feature_store
from data_manifests.epic_kitchens import UNLABELLED
from heads import method as heads_method
from heads.base import batch_size
from heads.erm import ERM
from heads.method import Preset
from pipelines.cli import main
from pipelines.data import centre_steps, random_steps, target_batch_size
from pipelines.evaluate import accuracy_report, evaluate_run
from pipelines.runs import RunError
import pipelines.train as train_module
from pipelines.train import RunMismatch, TrainConfig, memory_budget, train

FAST = {"epochs": 4, "batch_size": 8, "init_std": 0.0}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run fastest on one thread


@pytest.fixture(scope="module")
def feature_store(tmp_path_factory):
    return make_feature_store(tmp_path_factory.mktemp("features"), target_shift=0.6)


def config_for(feature_store, out: Path, **changes) -> TrainConfig:
    store, manifest = feature_store
    return replace(TrainConfig(store=store, manifest=manifest, head="trn", source="src", target="tgt", out=out,
                               hparams=dict(FAST)), **changes)


def edited_manifest(manifest: Path, out: Path, edit) -> Path:
    """A copy of ``manifest`` at ``out`` with ``edit(rows)`` applied to its rows (dicts of the CSV's columns)."""
    with open(manifest, newline="") as handle:
        rows = list(csv.DictReader(handle))
    rows = edit(rows)
    with open(out, "w", newline="") as handle:
        writer = csv.DictWriter(handle, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return out


def rows_of(rows: list[dict], domain: str, split: str) -> list[dict]:
    return [row for row in rows if row["domain"] == domain and row["split"] == split]


def check_final_report(report: dict) -> None:
    """The final numbers, recomputed from the per-epoch records: first best source-val epoch, last, oracle."""
    epochs, final = report["epochs"], report["final"]
    best_val = max(record["src_val_acc"] for record in epochs)
    selected = next(record for record in epochs if record["src_val_acc"] == best_val)  # ties keep the first
    best_target = max(record["tgt_acc"] for record in epochs)
    oracle = next(record for record in epochs if record["tgt_acc"] == best_target)
    assert final["epochs_run"] == len(epochs)
    assert final["selected_epoch"] == selected["epoch"] and final["src_val_acc_selected"] == best_val
    assert final["target_acc_selected"] == selected["tgt_acc"]
    assert final["target_mca_selected"] == selected["tgt_mca"]
    assert final["target_acc_last"] == epochs[-1]["tgt_acc"]
    assert final["oracle_target_acc"] == best_target and final["oracle_epoch"] == oracle["epoch"]


def test_segment_sampling_follows_tsn():
    assert centre_steps(10, 5).tolist() == [1, 3, 5, 7, 9]       # int(2/2 + 2*i)
    assert centre_steps(7, 5).tolist() == [0, 2, 3, 4, 6]        # int(0.7 + 1.4*i)
    assert centre_steps(3, 5).tolist() == [0, 1, 2, 2, 2]        # short videos repeat their last step
    generator = torch.Generator().manual_seed(0)
    draws = np.stack([random_steps(10, 5, generator) for _ in range(200)])
    assert all(set(draws[:, i]) == {2 * i, 2 * i + 1} for i in range(5))  # one step inside each segment
    assert target_batch_size(128, 1438, 840) == 74                # TA3N's UCF->HMDB batch sizes


@pytest.mark.parametrize("head", ["tempooling", "trn"])
def test_baselines_learn_the_synthetic_problem(feature_store, tmp_path, head):
    report = train(config_for(feature_store, tmp_path / head, head=head), show_progress=False)
    final = report["final"]
    assert final["src_val_acc_selected"] >= 0.9
    assert 1 <= final["selected_epoch"] <= 4 and final["oracle_target_acc"] >= final["target_acc_selected"]
    assert set(report["epochs"][0]) >= {"loss", "lr", "src_val_acc", "src_val_mca", "tgt_acc", "tgt_mca"}
    for name in ("config.yaml", "metrics.json", "checkpoint.pt", "best.pt", "train.log"):
        assert (tmp_path / head / name).is_file()
    check_final_report(report)
    state = torch.load(tmp_path / head / "best.pt", weights_only=True)
    assert state["epoch"] + 1 == final["selected_epoch"]
    last = torch.load(tmp_path / head / "checkpoint.pt", weights_only=True)
    assert last["epoch"] + 1 == 4 and len(last["cuda_rng"]) == torch.cuda.device_count()


def test_final_report_selection_ties_and_oracle(feature_store, tmp_path):
    # Large steps make the accuracies move between epochs, so selection, ties, last and oracle can differ.
    report = train(config_for(feature_store, tmp_path / "run", head="tempooling",
                              hparams={**FAST, "epochs": 6, "lr": 0.3, "batch_size": 4}), show_progress=False)
    check_final_report(report)
    final = report["final"]  # the run exercises the distinctions: source-val ties, and three different epochs
    assert len({final["selected_epoch"], final["oracle_epoch"], final["epochs_run"]}) == 3
    assert [record["src_val_acc"] for record in report["epochs"]].count(final["src_val_acc_selected"]) > 1


def test_same_seed_same_metrics_and_streaming_equals_memory(feature_store, tmp_path):
    first = train(config_for(feature_store, tmp_path / "a"), show_progress=False)
    second = train(config_for(feature_store, tmp_path / "b"), show_progress=False)
    assert (tmp_path / "a" / "metrics.json").read_text() == (tmp_path / "b" / "metrics.json").read_text()
    streamed = train(config_for(feature_store, tmp_path / "c", features="stream", workers=2, feature_cache=None),
                     show_progress=False)
    assert streamed["epochs"] == first["epochs"] == second["epochs"]
    over_budget = train(config_for(feature_store, tmp_path / "e", features="auto", memory_budget_gb=1e-6,
                                   feature_cache=tmp_path / "copies"), show_progress=False)
    assert "3 of 3 sets streamed from the store by workers" in (tmp_path / "c" / "train.log").read_text()
    assert "3 of 3 sets in mapped files" in (tmp_path / "e" / "train.log").read_text()
    assert "3 of 3 sets in memory on cpu" in (tmp_path / "a" / "train.log").read_text()
    assert over_budget["epochs"] == first["epochs"]
    other_seed = train(config_for(feature_store, tmp_path / "d", seed=1), show_progress=False)
    assert other_seed["epochs"] != first["epochs"]


@pytest.mark.parametrize("method", ["dann", "ta3n"])  # adapting methods: their updates use the target batch
def test_da_target_labels_never_reach_the_method(feature_store, tmp_path, method):
    def permute_target_train_labels(rows):
        target_train = rows_of(rows, "tgt", "train")
        shuffled = np.random.default_rng(0).permutation([row["label"] for row in target_train])
        for row, label in zip(target_train, shuffled):
            row["label"] = label
        return rows

    permuted = edited_manifest(feature_store[1], tmp_path / "permuted.csv", permute_target_train_labels)
    common = dict(setting="da", method=method, hparams={**FAST, "epochs": 2})
    original = train(config_for(feature_store, tmp_path / "orig", **common), show_progress=False)
    relabelled = train(config_for(feature_store, tmp_path / "perm", manifest=permuted, **common), show_progress=False)
    assert original["epochs"] == relabelled["epochs"]
    # The run is not blind to the target batch: another target train split changes the numbers.
    fewer = edited_manifest(feature_store[1], tmp_path / "fewer.csv",
                            lambda rows: [row for row in rows if row not in rows_of(rows, "tgt", "train")[::2]])
    other_target = train(config_for(feature_store, tmp_path / "fewer", manifest=fewer, **common), show_progress=False)
    assert other_target["epochs"] != original["epochs"]


class BatchRecorder(ERM):
    """ERM that records the (source, target) batch sizes the trainer feeds it (registered per test only)."""

    name = "batch_recorder"
    seen: list[tuple[int, int]] = []

    def update(self, src, tgt, progress):
        self.seen.append((len(src.y), batch_size(tgt.x) if tgt else 0))
        return super().update(src, tgt, progress)


def register_for_test(monkeypatch, method_cls) -> None:
    """Registered for one test only: the registry tests train every registered method."""
    monkeypatch.setitem(heads_method._METHODS, method_cls.name, method_cls)


def test_da_target_batches_follow_the_ratio_of_the_training_sets(feature_store, tmp_path, monkeypatch):
    register_for_test(monkeypatch, BatchRecorder)
    monkeypatch.setattr(BatchRecorder, "seen", [])
    half = edited_manifest(feature_store[1], tmp_path / "half.csv",
                           lambda rows: [row for row in rows if row not in rows_of(rows, "tgt", "train")[::2]])
    train(config_for(feature_store, tmp_path / "run", manifest=half, method=BatchRecorder.name, setting="da",
                     hparams={**FAST, "epochs": 2}), show_progress=False)
    # 24 source and 12 target train videos: 3 updates per epoch of 8 source and 8 * 12 / 24 = 4 target videos
    assert BatchRecorder.seen == [(8, 4)] * 6


def test_classes_come_from_labelled_source_rows_and_unlabelled_rows_are_not_evaluated(feature_store, tmp_path):
    def unlabel_target_train(rows):
        for i, row in enumerate(rows_of(rows, "tgt", "train")):
            row["label"] = UNLABELLED if i % 2 else "z"  # "z": a target-only label, never a class
        return rows

    adaptation = edited_manifest(feature_store[1], tmp_path / "adaptation.csv", unlabel_target_train)
    common = dict(setting="da", head="tempooling", hparams={**FAST, "epochs": 1})
    train(config_for(feature_store, tmp_path / "run", manifest=adaptation, **common), show_progress=False)
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["classes"] == ["a", "b", "c"]

    def unlabel_target_test(rows):
        for row in rows_of(rows, "tgt", "test"):
            row["label"] = UNLABELLED
        return rows

    unlabelled_test = edited_manifest(adaptation, tmp_path / "unlabelled_test.csv", unlabel_target_test)
    with pytest.raises(RunError, match="24 of 24 videos of domain 'tgt', split 'test' are 'unlabelled'"):
        train(config_for(feature_store, tmp_path / "run2", manifest=unlabelled_test, **common), show_progress=False)
    with pytest.raises(RunError, match="split 'test' are 'unlabelled'"):
        evaluate_run(tmp_path / "run", feature_store[0], unlabelled_test, "tgt", "test")

    def new_target_class(rows):
        rows_of(rows, "tgt", "test")[0]["label"] = "z"
        return rows

    open_set = edited_manifest(feature_store[1], tmp_path / "open_set.csv", new_target_class)
    with pytest.raises(RunError, match=r"labels \['z'\] of domain 'tgt', split 'test' are not among the source"):
        train(config_for(feature_store, tmp_path / "run3", manifest=open_set, **common), show_progress=False)


def test_resume_after_sigkill_equals_an_uninterrupted_run(feature_store, tmp_path):
    store, manifest = feature_store
    hparams = {**FAST, "epochs": 40}
    arguments = ["--store", str(store), "--manifest", str(manifest), "--head", "trn", "--source", "src",
                 "--target", "tgt", "--setting", "da", "--features", "memory"]
    arguments += [item for name, value in hparams.items() for item in ("--set", f"{name}={value}")]
    arguments += ["--out", str(tmp_path / "killed")]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "train", *arguments], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = tmp_path / "killed" / "metrics.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert process.poll() is None, "training finished before it could be killed"
        if metrics.is_file() and json.loads(metrics.read_text())["final"]["epochs_run"] >= 2:
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = json.loads(metrics.read_text())["final"]["epochs_run"]
    assert 2 <= done < 40
    resumed = CliRunner().invoke(main, ["train", *arguments, "--resume"])  # here: only the kill needs a process
    assert resumed.exit_code == 0, resumed.output
    uninterrupted = train(config_for(feature_store, tmp_path / "whole", setting="da", features="memory",
                                     hparams=hparams), show_progress=False)
    assert json.loads(metrics.read_text())["epochs"] == uninterrupted["epochs"]


def test_accuracy_report_on_a_hand_example():
    # Truth 0,0,0,1; predicted 0,1,2,1: top-1 2/4; class 0 1/3, class 1 1/1, class 2 absent -> mean (1/3 + 1) / 2
    logits = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 1]), 3).float()
    report = accuracy_report(logits, torch.tensor([0, 0, 0, 1]), 3)
    assert report["accuracy"] == 0.5
    assert report["mean_class_accuracy"] == pytest.approx(2 / 3)
    assert report["per_class_accuracy"] == pytest.approx([1 / 3, 1.0, 0.0])
    assert report["confusion"] == [[1, 1, 1], [0, 1, 0], [0, 0, 0]]


def test_eval_reports_accuracy_confusion_and_refuses_other_features(feature_store, tmp_path):
    report = train(config_for(feature_store, tmp_path / "run"), show_progress=False)
    store, manifest = feature_store
    result = CliRunner().invoke(main, ["eval", str(tmp_path / "run"), "--store", str(store), "--manifest",
                                       str(manifest), "--domain", "tgt", "--split", "test", "--workers", "0"])
    assert result.exit_code == 0 and "tgt/test: 24 videos, top-1" in result.output, result.output
    evaluation = json.loads((tmp_path / "run" / "eval-tgt-test.json").read_text())
    assert evaluation["accuracy"] == pytest.approx(report["final"]["target_acc_selected"])
    assert np.sum(evaluation["confusion"]) == evaluation["videos"] == 24
    with open(tmp_path / "run" / "eval-tgt-test-confusion.csv", newline="") as handle:
        header, *rows = list(csv.reader(handle))
    assert header == ["true \\ predicted", "a", "b", "c"] and [row[0] for row in rows] == ["a", "b", "c"]
    assert [[int(count) for count in row[1:]] for row in rows] == evaluation["confusion"]
    assert (tmp_path / "run" / "eval-tgt-test-confusion.png").stat().st_size > 0
    other_store, other_manifest = make_feature_store(tmp_path / "other", map_shape=(2, 2, 16))
    with pytest.raises(ValueError, match="holds different features than the run was trained on"):
        evaluate_run(tmp_path / "run", other_store, other_manifest, "tgt", "test")
    config_path = tmp_path / "run" / "config.yaml"
    config_path.write_text(config_path.read_text().replace("method: erm", "method: retired"))
    with pytest.raises(RunError, match="trained with 'retired' on 'trn': unknown method 'retired'"):
        evaluate_run(tmp_path / "run", store, manifest, "tgt", "test")


@pytest.mark.parametrize("arguments, message", [
    (["--head", "nope"], "unknown architecture 'nope'; available:"),
    (["--head", "trn", "--method", "nope"], "unknown method 'nope'; available:"),
    (["--head", "trn", "--method", "ta3n"], "method 'ta3n' runs in da, not --setting dg"),
    (["--head", "trn", "--set", "batch_size=0"], "batch_size=0 is out of range: it must be in [1, inf)"),
    (["--head", "trn", "--set", "dropout_video=1"], "dropout_video=1.0 is out of range: it must be in [0, 1)"),
    (["--head", "trn", "--preset", "official"], "no preset 'official' for method 'erm' on architecture 'trn'"),
    (["--head", "trn", "--stream", "rgb,rgb"], "name each stream once"),
    (["--head", "trn", "--stream", "rgb,audio"], "no stream 'audio'"),
    (["--head", "trn", "--set", "lrr=0.1"], "has no hyper-parameter 'lrr'; valid names:"),
    (["--head", "trn", "--set", "lr=fast"], "hyper-parameter lr='fast' is a str, expected float"),
    (["--head", "trn", "--source", "ucf"], "--source 'ucf' is not a domain of"),
    (["--head", "trn", "--setting", "da", "--target", ""], "--setting da needs --target"),
])
def test_bad_configs_give_clear_errors(feature_store, tmp_path, arguments, message):
    store, manifest = feature_store
    base = ["train", "--store", str(store), "--manifest", str(manifest), "--source", "src", "--out",
            str(tmp_path / "run")]
    result = CliRunner().invoke(main, base + arguments)
    assert result.exit_code == 1 and message in result.output, result.output


def test_manifest_videos_missing_from_the_store(feature_store, tmp_path):
    store, manifest = feature_store
    extended = tmp_path / "extended.csv"
    extended.write_text(manifest.read_text() + "new.mp4,a,src,train,src/train/a/new\n")
    result = CliRunner().invoke(main, ["train", "--store", str(store), "--manifest", str(extended), "--head", "trn",
                                       "--source", "src", "--out", str(tmp_path / "run"), "--set", "epochs=1"])
    assert result.exit_code == 1 and "1 video(s) of domain 'src', split 'train' are not in stream 'rgb' of the store" in result.output
    skipped = CliRunner().invoke(main, ["train", "--store", str(store), "--manifest", str(extended), "--head", "trn",
                                        "--source", "src", "--out", str(tmp_path / "run2"), "--set", "epochs=1",
                                        "--skip-missing"])
    assert skipped.exit_code == 0, skipped.output


def test_existing_run_dir_needs_resume(feature_store, tmp_path):
    train(config_for(feature_store, tmp_path / "run", hparams={**FAST, "epochs": 1}), show_progress=False)
    with pytest.raises(ValueError, match="already holds a run; pass --resume"):
        train(config_for(feature_store, tmp_path / "run", hparams={**FAST, "epochs": 1}), show_progress=False)
    with pytest.raises(RunMismatch, match="--resume: hparams differs"):
        train(config_for(feature_store, tmp_path / "run", hparams={**FAST, "epochs": 2}), resume=True,
              show_progress=False)


def test_resume_may_move_the_store_and_stream_but_refuses_other_features(feature_store, tmp_path):
    finished = train(config_for(feature_store, tmp_path / "run", hparams={**FAST, "epochs": 2}), show_progress=False)
    moved = shutil.copytree(feature_store[0], tmp_path / "moved" / "store")
    resumed = train(config_for(feature_store, tmp_path / "run", hparams={**FAST, "epochs": 2}, store=moved,
                               features="stream", workers=0), resume=True, show_progress=False)
    assert resumed["epochs"] == finished["epochs"]
    assert f"store: {moved}" in (tmp_path / "run" / "config.yaml").read_text()  # the latest invocation's paths
    other_store, _ = make_feature_store(tmp_path / "other", map_shape=(2, 2, 16))  # same videos, other features
    with pytest.raises(RunMismatch, match="--resume: features_sha256 differs"):
        train(config_for(feature_store, tmp_path / "run", hparams={**FAST, "epochs": 2}, store=other_store),
              resume=True, show_progress=False)


def test_memory_budget_counts_the_page_cache_as_available(monkeypatch):
    assert memory_budget(torch.device("cpu"), 0.5) == 2**29
    available = train_module.available_memory()
    if os.path.exists("/proc/meminfo"):   # MemAvailable: free memory plus what the kernel can reclaim
        assert available >= os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * 0.9
    assert memory_budget(torch.device("cpu"), None) == pytest.approx(available * 3 // 4, rel=0.05)  # it moves
    monkeypatch.setattr(train_module, "available_memory", lambda: None)  # as on an OS that reports neither
    assert memory_budget(torch.device("cpu"), None) == 2 * 2**30


