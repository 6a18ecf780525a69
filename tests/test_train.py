"""`vidshift train` / `vidshift eval` on real stores: learning, determinism, resume, DA label hygiene, errors."""
import csv
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import make_feature_store
from pipelines.cli import main
from pipelines.data import centre_steps, random_steps, target_batch_size
from pipelines.evaluate import evaluate_run
from pipelines.train import TrainConfig, train

FAST = {"epochs": 4, "batch_size": 8, "init_std": 0.0}


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models on a 2-core machine: extra threads only add contention.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def feature_store(tmp_path_factory):
    return make_feature_store(tmp_path_factory.mktemp("features"), target_shift=0.6)


def config_for(feature_store, out: Path, **changes) -> TrainConfig:
    store, manifest = feature_store
    return replace(TrainConfig(store=store, manifest=manifest, head="trn", source="src", target="tgt", out=out,
                               hparams=dict(FAST)), **changes)


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
    state = torch.load(tmp_path / head / "best.pt", weights_only=True)
    assert state["epoch"] + 1 == final["selected_epoch"]


def test_same_seed_same_metrics_and_streaming_equals_memory(feature_store, tmp_path):
    first = train(config_for(feature_store, tmp_path / "a"), show_progress=False)
    second = train(config_for(feature_store, tmp_path / "b"), show_progress=False)
    assert (tmp_path / "a" / "metrics.json").read_text() == (tmp_path / "b" / "metrics.json").read_text()
    streamed = train(config_for(feature_store, tmp_path / "c", features="stream", workers=2), show_progress=False)
    assert streamed["epochs"] == first["epochs"] == second["epochs"]
    other_seed = train(config_for(feature_store, tmp_path / "d", seed=1), show_progress=False)
    assert other_seed["epochs"] != first["epochs"]


def test_da_target_labels_never_reach_the_head(feature_store, tmp_path):
    store, manifest = feature_store
    with open(manifest, newline="") as handle:
        rows = list(csv.DictReader(handle))
    target_train = [r for r in rows if r["domain"] == "tgt" and r["split"] == "train"]
    shuffled = np.random.default_rng(0).permutation([r["label"] for r in target_train])
    for row, label in zip(target_train, shuffled):
        row["label"] = label
    permuted = tmp_path / "permuted.csv"
    with open(permuted, "w", newline="") as handle:
        writer = csv.DictWriter(handle, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    common = dict(setting="da", head="tempooling")
    original = train(config_for(feature_store, tmp_path / "orig", **common), show_progress=False)
    relabelled = train(config_for(feature_store, tmp_path / "perm", manifest=permuted, **common), show_progress=False)
    assert original["epochs"] == relabelled["epochs"]


def test_resume_after_sigkill_equals_an_uninterrupted_run(feature_store, tmp_path):
    store, manifest = feature_store
    hparams = {**FAST, "epochs": 40}
    arguments = ["--store", str(store), "--manifest", str(manifest), "--head", "trn", "--source", "src",
                 "--target", "tgt", "--setting", "da", "--features", "memory"]
    arguments += [item for name, value in hparams.items() for item in ("--set", f"{name}={value}")]
    command = [sys.executable, "-m", "pipelines.cli", "train", *arguments, "--out", str(tmp_path / "killed")]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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
    resumed = subprocess.run([*command, "--resume"], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    uninterrupted = train(config_for(feature_store, tmp_path / "whole", setting="da", features="memory",
                                     hparams=hparams), show_progress=False)
    assert json.loads(metrics.read_text())["epochs"] == uninterrupted["epochs"]


def test_eval_reports_accuracy_confusion_and_refuses_other_features(feature_store, tmp_path):
    report = train(config_for(feature_store, tmp_path / "run"), show_progress=False)
    store, manifest = feature_store
    result = evaluate_run(tmp_path / "run", store, manifest, "tgt", "test")
    assert result["accuracy"] == pytest.approx(report["final"]["target_acc_selected"])
    assert np.sum(result["confusion"]) == result["videos"] == 24
    for suffix in (".json", "-confusion.csv", "-confusion.png"):
        assert (tmp_path / "run" / f"eval-tgt-test{suffix}").stat().st_size > 0
    other_store, other_manifest = make_feature_store(tmp_path / "other", map_shape=(2, 2, 16))
    with pytest.raises(ValueError, match="holds different features than the run was trained on"):
        evaluate_run(tmp_path / "run", other_store, other_manifest, "tgt", "test")


@pytest.mark.parametrize("arguments, message", [
    (["--head", "nope"], "unknown head 'nope'; available:"),
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
    assert result.exit_code == 1 and "1 video(s) of domain 'src', split 'train' are not in the store" in result.output
    skipped = CliRunner().invoke(main, ["train", "--store", str(store), "--manifest", str(extended), "--head", "trn",
                                        "--source", "src", "--out", str(tmp_path / "run2"), "--set", "epochs=1",
                                        "--skip-missing"])
    assert skipped.exit_code == 0, skipped.output


def test_existing_run_dir_needs_resume(feature_store, tmp_path):
    train(config_for(feature_store, tmp_path / "run", hparams={**FAST, "epochs": 1}), show_progress=False)
    with pytest.raises(ValueError, match="already holds a run; pass --resume"):
        train(config_for(feature_store, tmp_path / "run", hparams={**FAST, "epochs": 1}), show_progress=False)
    with pytest.raises(ValueError, match="--resume: config differs"):
        train(config_for(feature_store, tmp_path / "run", hparams={**FAST, "epochs": 2}), resume=True,
              show_progress=False)
