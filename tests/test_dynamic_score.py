"""pipelines/dynamic_score.py: the dynamic score in every run's metrics.json and in diagnose.json, on real tiny
stores; it leaves the training RNG alone; DRL over TA3N trains through the trainer in da."""
from __future__ import annotations

import json

import pytest
import torch

import heads
from conftest import make_feature_store
from pipelines.dynamic_score import run_dynamic_score
from pipelines.runs import load_run_inputs, resolve_device
from pipelines.train import TrainConfig, resolve_config, train

pytestmark = pytest.mark.usefixtures("one_thread")
HPARAMS = {"epochs": 2, "batch_size": 8, "frame_dim": 16, "init_std": 0.0, "lr": 0.01}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("dynamic")
    return (root, *make_feature_store(root, per_class=4, target_shift=0.5))


def run(store, head: str, method: str = "erm", setting: str = "dg", **hparams) -> tuple[TrainConfig, dict]:
    root, store_dir, manifest = store
    overrides = {**HPARAMS, **({"relation_dim": 16} if head == "trn" else {}), **hparams}
    config = TrainConfig(store=store_dir, manifest=manifest, head=head, method=method, source="src", target="tgt",
                         setting=setting, hparams=overrides, out=root / f"run-{len(list(root.glob('run-*')))}", workers=0)
    return config, train(config, show_progress=False)


def test_every_run_reports_the_dynamic_score_zero_for_a_spatial_model_positive_for_relations(store):
    _, pooling = run(store, "tempooling")
    _, relations = run(store, "trn")
    for report in (pooling, relations):
        for role in ("source", "target"):
            score = report["dynamic_score"][role]
            assert score["videos"] == 12 and score["distill_fit_videos"] == 12
            assert score["distill"] >= 0 and 0 <= score["distill_agreement"] <= 1
    # TemPooling (frame MLP, mean over steps) is purely spatial: a shuffled clip gives the same prediction
    assert abs(pooling["dynamic_score"]["source"]["shuffle"]) < 1e-6
    assert pooling["dynamic_score"]["source"]["freeze"] > 1e-6        # a frozen clip is not the mean of its steps
    assert relations["dynamic_score"]["source"]["shuffle"] > 1e-6     # TRN reads the order of the steps


def test_the_score_is_deterministic_and_leaves_the_training_rng_alone(store):
    config, report = run(store, "trn", epochs=1)
    config, overrides = resolve_config(config)
    inputs = load_run_inputs(config, "pooled")
    model = heads.build("trn", "erm", inputs.feat_shape, len(inputs.classes), config.num_segments, overrides)
    model.load_state_dict(torch.load(config.out / "best.pt", weights_only=True)["model"])
    torch.manual_seed(123)
    state = torch.get_rng_state()
    again = run_dynamic_score(model, inputs, config, resolve_device("cpu"))
    assert torch.equal(torch.get_rng_state(), state)
    assert json.loads(json.dumps(again)) == report["dynamic_score"]


def test_drl_fast_over_ta3n_trains_in_da_through_the_trainer(store):
    _, report = run(store, "trn", "drl-fast", "da", drl_base="ta3n", epochs=1)
    epoch = report["epochs"][0]
    assert {"loss_y", "loss_ae", "loss_relation", "loss_dynamic", "dynamic_kl", "tgt_acc"} <= set(epoch)
    assert epoch["loss_dynamic"] == pytest.approx(-0.5 * epoch["dynamic_kl"])
    assert "target" in report["dynamic_score"]
