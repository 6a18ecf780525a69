"""`vidshift demo` end to end on a tiny configuration: every registered head appears in the results table, and
re-runs reuse finished runs, resume killed ones and retrain those made with another --epochs."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from heads import base as heads
from pipelines.cli import main
from pipelines.demo import demo_runs

TINY = ["--videos-per-class", "3", "--frame-size", "64"]


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    result = CliRunner().invoke(main, ["demo", "--out", str(out), *TINY, "--epochs", "1"])
    assert result.exit_code == 0, result.output
    return out


def epochs_run(out: Path, run: str) -> int:
    return json.loads((out / "runs" / run / "metrics.json").read_text())["final"]["epochs_run"]


def test_demo_trains_every_registered_head_in_each_setting(demo_out):
    expected = demo_runs(())
    assert {setting for _, setting in expected} == {"dg", "da"}
    assert {name for name, _ in expected} == set(heads.available())
    table = (demo_out / "results.md").read_text()
    for name, setting in expected:
        assert f"| {name} | {setting} |" in table
        assert epochs_run(demo_out, f"{name}-{setting}") == 1
    rerun = CliRunner().invoke(main, ["demo", "--out", str(demo_out), *TINY, "--epochs", "1"])
    # reuses videos, store and finished runs
    assert rerun.exit_code == 0 and "240 extracted" not in rerun.output and "training" not in rerun.output


def test_demo_retrains_on_other_epochs_and_resumes_a_killed_run(demo_out, tmp_path):
    out = tmp_path / "out"  # a copy, so that this test's runs leave the fixture's alone
    for part in ("data", "store", "runs/tempooling-dg", "runs/tempooling-da"):
        shutil.copytree(demo_out / part, out / part)
    arguments = ["demo", "--out", str(out), *TINY, "--head", "tempooling"]
    longer = CliRunner().invoke(main, [*arguments, "--epochs", "2"])  # the copied runs have 1 epoch
    assert longer.exit_code == 0, longer.output
    assert "retraining tempooling (dg): its head_hparams changed" in longer.output
    replaced = list((out / "runs").glob("tempooling-dg.replaced-*"))
    assert len(replaced) == 1 and json.loads((replaced[0] / "metrics.json").read_text())["final"]["epochs_run"] == 1
    assert epochs_run(out, "tempooling-dg") == epochs_run(out, "tempooling-da") == 2

    command = [sys.executable, "-m", "pipelines.cli", *arguments, "--epochs", "30"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = out / "runs" / "tempooling-dg" / "metrics.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert process.poll() is None, "the demo finished before it could be killed"
        if metrics.is_file() and json.loads(metrics.read_text())["final"]["epochs_run"] >= 3:  # past the old run
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_after = epochs_run(out, "tempooling-dg")
    assert 3 <= killed_after < 30
    resumed = CliRunner().invoke(main, [*arguments, "--epochs", "30"])
    assert resumed.exit_code == 0, resumed.output
    assert f"resuming tempooling (dg) after epoch {killed_after}" in resumed.output
    assert epochs_run(out, "tempooling-dg") == 30
