"""pipelines/diagnose.py: median-heuristic MMD against numpy, the post-hoc discriminator, a run end to end."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import make_feature_store
from pipelines.diagnose import diagnose, diagnose_run, median_heuristic_mmd2, post_hoc_discriminator
from pipelines.train import TrainConfig, train


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run fastest on one thread


def test_median_heuristic_mmd_matches_a_direct_numpy_computation():
    rng = np.random.default_rng(0)
    source, target = rng.normal(size=(7, 5)), rng.normal(loc=0.5, size=(4, 5))
    pooled = np.concatenate([source, target])
    distances = ((pooled[:, None] - pooled[None]) ** 2).sum(-1)
    off_diagonal = np.sort(distances[~np.eye(11, dtype=bool)])
    sigma2 = off_diagonal[(len(off_diagonal) - 1) // 2]             # the lower middle of 110 values
    k = np.exp(-distances / (2 * sigma2))
    expected = k[:7, :7].mean() + k[7:, 7:].mean() - 2 * k[:7, 7:].mean()
    got = median_heuristic_mmd2(torch.from_numpy(source), torch.from_numpy(target))
    assert got["sigma2"] == pytest.approx(sigma2, rel=1e-12)
    assert got["mmd2"] == pytest.approx(expected, rel=1e-9)


def test_post_hoc_discriminator_tells_shifted_domains_apart_and_not_identical_ones():
    g = torch.Generator().manual_seed(0)
    source = torch.randn(60, 8, generator=g)
    target = torch.randn(50, 8, generator=g)
    shifted = post_hoc_discriminator(source, target + 3.0)
    same = post_hoc_discriminator(source, target)
    assert shifted["accuracy"] > 0.95 and shifted["loss"] < 0.2
    assert 0.3 < same["accuracy"] < 0.7 and 0.65 < same["loss"] < 0.8     # chance: 0.5 and ln 2 = 0.693
    assert (shifted["train_videos"], shifted["held_out_videos"]) == (55, 55)      # half of each domain
    assert post_hoc_discriminator(source, target, seed=0) == same                  # seeded split and init
    assert post_hoc_discriminator(source, target, seed=1) != same


@pytest.fixture(scope="module")
def ta3n_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("diagnose")
    store, manifest = make_feature_store(root, target_shift=1.0, per_class=4)
    hparams = {"epochs": 2, "batch_size": 8, "frame_dim": 16, "relation_dim": 16, "init_std": 0.0}
    train(TrainConfig(store=store, manifest=manifest, head="trn", method="ta3n", source="src", target="tgt", setting="da",
                      out=root / "run", hparams=hparams, workers=0), show_progress=False)
    return root / "run", store, manifest


def test_diagnose_run_writes_mmd_discriminator_and_head_measures(ta3n_run):
    run, store, manifest = ta3n_run
    report = diagnose_run(run, store, manifest, workers=0)             # domains default to the run's src -> tgt
    assert json.loads((run / "diagnose.json").read_text()) == report
    assert (report["source"], report["target"], report["videos"]) == ("src", "tgt", {"source": 12, "target": 12})
    assert report["feature_dim"] == 16 and report["mmd"]["mmd2"] > 0 and report["mmd"]["sigma2"] > 0
    assert 0.0 <= report["domain_discriminator"]["accuracy"] <= 1.0
    measures = report["head_measures"]
    assert set(measures) == {"source", "target"}
    expected = {"p_target_frame", "p_target_relation", "p_target_video",
                *(f"attention_relation_{i}" for i in range(4))}
    assert set(measures["target"]) == expected
    assert all(0.0 <= measures["source"][f"p_target_{level}"] <= 1.0 for level in ("frame", "relation", "video"))
    same_domain = diagnose_run(run, store, manifest, source="src", target="src", workers=0)
    assert same_domain["mmd"]["mmd2"] == pytest.approx(0.0, abs=1e-12)


def test_diagnose_reports_the_dynamic_score_and_each_domains_static_bias(ta3n_run):
    run, store, manifest = ta3n_run
    dynamic = diagnose_run(run, store, manifest, workers=0)["dynamic_score"]
    for role in ("source", "target"):
        score = dynamic[role]
        assert score["videos"] == 12 and score["distill_fit_videos"] == 12
        assert min(score["freeze"], score["shuffle"], score["distill"]) > 0     # TRN reads the order of the steps
        bias = score["static_bias"]      # eq. 5; each class has its own prototype map: solvable from one step
        assert bias["accuracy"] > 0.9 and bias["ce"] < bias["chance_ce"] == pytest.approx(math.log(3))
    assert 0 <= dynamic["spatial_transfer"]["accuracy"] <= 1
    assert diagnose_run(run, store, manifest, workers=0)["dynamic_score"] == dynamic      # seeded


def test_diagnose_command_reports_and_fails_cleanly(ta3n_run):
    run, store, manifest = ta3n_run
    base = [str(run), "--store", str(store), "--manifest", str(manifest)]
    result = CliRunner().invoke(diagnose, base + ["--split", "val", "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert "src vs tgt (val, 12 + 12 videos): MMD²" in result.output
    assert "src dynamic score (nats): freeze" in result.output and "spatial model on labels: accuracy" in result.output
    assert json.loads((run / "diagnose.json").read_text())["split"] == "val"
    result = CliRunner().invoke(diagnose, base + ["--target", "elsewhere"])
    assert result.exit_code == 1 and "no videos of domain 'elsewhere' in split 'test'" in result.output
