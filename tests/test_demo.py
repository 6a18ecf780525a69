"""`vidshift demo` end to end on a tiny configuration: every method and every architecture appears in the results
table, with the source-only and target-only rows, and re-runs reuse finished runs, resume killed ones and retrain
those made with another --epochs."""
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

import heads
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


def test_demo_trains_every_method_and_architecture_with_the_bounds(demo_out):
    expected = demo_runs()
    assert {setting for _, _, setting in expected} == {"dg", "da", "target-only"}
    assert {arch for arch, _, _ in expected} == set(heads.architectures())
    assert {method for _, method, _ in expected} == set(heads.methods())
    assert ("tempooling", "erm", "dg") in expected and ("tempooling", "erm", "target-only") in expected
    table = (demo_out / "results.md").read_text()
    for arch, method, setting in expected:
        assert f"| {method} | {arch} | {setting} |" in table
        assert epochs_run(demo_out, f"{method}-{arch}-{setting}") == 1
    rerun = CliRunner().invoke(main, ["demo", "--out", str(demo_out), *TINY, "--epochs", "1"])
    # reuses videos, store and finished runs
    assert rerun.exit_code == 0 and "240 extracted" not in rerun.output and "\nfinished " not in rerun.output
    assert f"{len(expected)} of {len(expected)} runs already finished (skipped)" in rerun.output


def test_demo_retrains_on_other_epochs_and_resumes_a_killed_run(demo_out, tmp_path):
    out = tmp_path / "out"  # a copy, so that this test's runs leave the fixture's alone
    for part in ("data", "store", "runs/erm-tempooling-dg", "runs/erm-tempooling-target-only"):
        shutil.copytree(demo_out / part, out / part)
    arguments = ["demo", "--out", str(out), *TINY, "--head", "tempooling", "--method", "erm"]
    longer = CliRunner().invoke(main, [*arguments, "--epochs", "2"])  # the copied runs have 1 epoch
    assert longer.exit_code == 0, longer.output
    assert "retraining erm on tempooling (dg): its hparams changed" in longer.output
    replaced = list((out / "runs").glob("erm-tempooling-dg.replaced-*"))
    assert len(replaced) == 1 and json.loads((replaced[0] / "metrics.json").read_text())["final"]["epochs_run"] == 1
    assert epochs_run(out, "erm-tempooling-dg") == epochs_run(out, "erm-tempooling-target-only") == 2

    command = [sys.executable, "-m", "pipelines.cli", *arguments, "--epochs", "30"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = out / "runs" / "erm-tempooling-dg" / "metrics.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert process.poll() is None, "the demo finished before it could be killed"
        if metrics.is_file() and json.loads(metrics.read_text())["final"]["epochs_run"] >= 3:  # past the old run
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_after = epochs_run(out, "erm-tempooling-dg")
    assert 3 <= killed_after < 30
    resumed = CliRunner().invoke(main, [*arguments, "--epochs", "30"])
    assert resumed.exit_code == 0, resumed.output
    assert f"resuming erm on tempooling (dg) after epoch {killed_after}" in resumed.output
    assert epochs_run(out, "erm-tempooling-dg") == 30
