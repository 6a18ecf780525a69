"""`vidshift sweep` on a tiny real store: stable config hashes, seeded draws, a failing run recorded while the sweep
goes on, a sweep killed mid-way that skips and resumes, features shared by the runs of one process without changing
a number, the dask launcher, and the report's figures of real runs."""
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from PIL import Image

from conftest import make_feature_store
from pipelines.cli import main
from extract.cluster import ClusterError, parse_cluster, slurm_cluster
from pipelines.feature_cache import FeatureCache
from pipelines.sweep_spec import SpecError, config_hash, draw, load_spec, parse_spec, plan, seed_hash
from pipelines.train import train

REPO = Path(__file__).resolve().parent.parent
BASE = {"store": "store", "manifest": "manifest.csv", "set": {"epochs": 2, "batch_size": 8, "lr": 0.01},
        "train": {"workers": 0}}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweepdata")
    make_feature_store(root, per_class=3)
    lines = (root / "manifest.csv").read_text().splitlines()
    # a manifest naming a video the store lacks: runs on it fail when they load their features, not when planned
    (root / "broken.csv").write_text("\n".join(lines + ["src/val/a/gone.mp4,a,src,val,src/val/a/gone"]) + "\n")
    return root


def write_spec(root: Path, **entries) -> Path:
    path = root / f"spec-{len(list(root.glob('spec-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump({**BASE, **entries}))
    return path


def test_config_hash_is_stable_and_counts_only_what_decides_the_numbers(data, tmp_path):
    assert config_hash({"b": 1, "a": [1, 2.5]}) == config_hash({"a": [1, 2.5], "b": 1}) == "12dd02522b415065"
    spec = dict(directions=["src->tgt"], runs=[{"head": "tempooling", "method": "erm"}])
    first = plan(load_spec(write_spec(data, **spec)), tmp_path)
    again = plan(load_spec(write_spec(data, **spec)), tmp_path / "elsewhere")
    other_device = plan(load_spec(write_spec(data, **spec, train={"device": "cpu", "workers": 1})), tmp_path)
    longer = plan(load_spec(write_spec(data, **{**spec, "set": {"epochs": 3}})), tmp_path)
    assert first[0].name == again[0].name == other_device[0].name != longer[0].name
    assert first[0].identity["hparams"]["epochs"] == 2 and len(first[0].identity["features_sha256"]) == 64


def test_random_draws_are_seeded_per_trial_and_name_and_recorded(data, tmp_path):
    assert seed_hash(0, 0, "lr") == 230451966    # DomainBed's misc.seed_hash: md5 of the arguments' repr
    assert draw({"log_uniform": [1e-4, 1e-2]}, 0, 0, "lr") == pytest.approx(1.5634358350101558e-4)
    search = {"trials": 3, "seed": 5, "hparams": {"lr": {"log_uniform": [1e-3, 1e-1]}}}
    wider = {**search, "hparams": {**search["hparams"], "batch_size": {"choice": [4, 8]}}}
    runs = [plan(load_spec(write_spec(data, directions=["src->tgt"], seeds=[0, 1],
                                      runs=[{"head": "tempooling", "random": r}])), tmp_path) for r in (search, wider)]
    lrs = [[run.swept["lr"] for run in group] for group in runs]
    assert lrs[0] == lrs[1]                                  # adding a name moves no other draw
    assert lrs[0][0] == lrs[0][1] and len(set(lrs[0])) == 3  # seeds share a trial's draw; trials differ
    assert all(1e-3 <= lr <= 1e-1 for lr in lrs[0]) and {r.swept["batch_size"] for r in runs[1]} <= {4, 8}
    assert runs[0][0].config.hparams["lr"] == runs[0][0].swept["lr"] and runs[0][2].trial == 1


@pytest.mark.parametrize("entries, message", [
    ({"directions": ["src=>tgt"], "runs": [{"head": "tempooling"}]}, "directions[0]: 'src=>tgt': write SOURCE->TARGET"),
    ({"directions": ["src->tgt"], "runs": [{"head": "tempooling", "method": "tan3"}]}, "unknown method 'tan3'"),
    ({"directions": ["src->tgt"], "runs": [{"head": "tempooling", "colour": 1}]}, "runs[0]: unknown key(s) ['colour']"),
    ({"directions": ["src->tgt"], "set": {"lrr": 1}, "runs": [{"head": "tempooling"}]}, "set: ['lrr'] is declared by"),
    ({"directions": ["src->tgt"], "runs": [{"head": "tempooling", "method": "dann", "setting": "dg"}]},
     "runs in da, not --setting dg"),
])
def test_bad_specs_are_refused_before_anything_trains(data, tmp_path, entries, message):
    with pytest.raises(SpecError, match=r"spec-\d+\.yaml") as error:
        plan(load_spec(write_spec(data, **entries)), tmp_path / "never")
    assert message in str(error.value) and not (tmp_path / "never").exists()
    with pytest.raises(SpecError, match="expected a mapping"):
        parse_spec(["not", "a", "mapping"], data)


@pytest.fixture(scope="module")
def swept(data, tmp_path_factory):
    """A real sweep: erm (dg) and dann (da) on one good and one broken direction; the broken runs fail."""
    out = tmp_path_factory.mktemp("sweep") / "out"
    spec = write_spec(data, directions=["src->tgt", {"name": "broken", "source": "src", "target": "tgt",
                                                      "manifest": "broken.csv"}],
                      runs=[{"head": "tempooling", "method": "erm"},
                            {"head": "tempooling", "method": "dann", "setting": "da"}])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)      # tiny models: one thread is fastest on a busy 2-core machine (conftest.one_thread)
    try:
        result = CliRunner().invoke(main, ["sweep", str(spec), "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    return spec, out, result


def test_a_failing_run_is_recorded_and_the_sweep_goes_on(swept):
    spec, out, result = swept
    assert result.exit_code == 2, result.output
    assert "2 trained, 0 skipped, 2 failed" in result.output
    plan_record = json.loads((out / "sweep.json").read_text())
    broken = [r for r in plan_record["runs"] if r["direction"]["name"] == "broken"]
    for record in broken:
        failure = json.loads((out / "runs" / record["name"] / "failed.json").read_text())
        assert "src/val/a/gone" in failure["error"] and "Traceback" in failure["traceback"]
        assert not (out / "runs" / record["name"] / "done").exists()
    rerun = CliRunner().invoke(main, ["sweep", str(spec), "--out", str(out)])
    assert rerun.exit_code == 2 and "2 of 4 runs already finished (skipped)" in rerun.output
    assert rerun.output.count("retrying") == 2 and "it failed before" in rerun.output
    report = CliRunner().invoke(main, ["report", str(out), "--selection", "source-val", "--no-plots"])
    assert report.exit_code == 0 and "2 finished, 2 failed" in report.output


def test_runs_of_one_process_share_features_without_changing_a_number(swept, tmp_path, one_thread):
    _, out, result = swept
    assert "feature sets shared with earlier runs of its process" in result.output
    dann = next(r for r in json.loads((out / "sweep.json").read_text())["runs"]
                if r["row"]["method"] == "dann" and r["direction"]["name"] == "src->tgt")
    config = plan(load_spec(Path(json.loads((out / "sweep.json").read_text())["spec"])), out)
    config = next(run.config for run in config if run.name == dann["name"])
    alone = train(replace(config, out=tmp_path / "alone"), show_progress=False)     # no cache: its own reads
    shared = json.loads((out / "runs" / dann["name"] / "metrics.json").read_text())
    assert alone["epochs"] == shared["epochs"]
    cache = FeatureCache()
    store = cache.open_store(config.store)
    assert cache.open_store(config.store) is store


def test_report_figures_of_real_runs(swept, one_thread):
    _, out, _ = swept
    dann = next(r for r in json.loads((out / "sweep.json").read_text())["runs"]
                if r["row"]["method"] == "dann" and r["direction"]["name"] == "src->tgt")
    result = CliRunner().invoke(main, ["report", str(out), "--run", dann["name"][:6]])
    assert result.exit_code == 0, result.output
    plots = out / "report" / "plots"
    for name, size in ((f"tsne-{dann['name']}.png", (1000, 450)), ("curves-dann-tempooling-da-src_to_tgt.png",
                                                                   (1200, 350))):
        assert (plots / name).stat().st_size > 5000 and Image.open(plots / name).size == size
    assert Image.open(plots / f"confusion-{dann['name']}.png").format == "PNG"


def test_a_sweep_killed_mid_way_skips_finished_runs_and_resumes_the_killed_one(data, tmp_path, one_thread):
    spec = write_spec(data, directions=["src->tgt"],
                      runs=[{"head": "tempooling", "method": "erm"},
                            {"head": "tempooling", "method": "erm", "setting": "target-only", "set": {"epochs": 12}}])
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "sweep", str(spec), "--out", str(out)],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first, second = (run.name for run in plan(load_spec(spec), out))
    metrics = out / "runs" / second / "metrics.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert process.poll() is None, "the sweep finished before it could be killed"
        if metrics.is_file() and json.loads(metrics.read_text())["final"]["epochs_run"] >= 2:
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_after = json.loads(metrics.read_text())["final"]["epochs_run"]
    finished_at = (out / "runs" / first / "metrics.json").stat().st_mtime_ns
    dry = CliRunner().invoke(main, ["sweep", str(spec), "--out", str(out), "--dry-run"])
    assert f"{first}  done" in dry.output and f"{second}  resume after epoch {killed_after}" in dry.output
    resumed = CliRunner().invoke(main, ["sweep", str(spec), "--out", str(out)])
    assert resumed.exit_code == 0, resumed.output
    assert "1 of 2 runs already finished (skipped)" in resumed.output
    assert f"resuming erm on tempooling (target-only) after epoch {killed_after} [src->tgt, seed 0]" in resumed.output
    assert json.loads(metrics.read_text())["final"]["epochs_run"] == 12
    assert (out / "runs" / first / "metrics.json").stat().st_mtime_ns == finished_at


def test_the_dask_launcher_runs_a_sweep_in_a_long_lived_worker(data, tmp_path):
    spec = write_spec(data, directions=["src->tgt"], seeds=[0, 1], runs=[{"head": "tempooling", "method": "erm"}])
    result = CliRunner().invoke(main, ["sweep", str(spec), "--out", str(tmp_path / "out"), "--launcher", "dask",
                                       "--cluster", "local:1"])
    assert result.exit_code == 0, result.output
    assert "dashboard" in result.output and "2 trained" in result.output
    assert "feature sets shared with earlier runs of its process" in result.output   # the second run, same worker


def test_cluster_addresses_and_a_slurm_job_script(tmp_path):
    assert parse_cluster("local").workers is None and parse_cluster("local:3").workers == 3
    assert parse_cluster("tcp://10.0.0.1:8786").address == "tcp://10.0.0.1:8786"
    assert parse_cluster("slurm:cfg.yaml").config == Path("cfg.yaml")
    for bad in ("local:0", "tcp://nohost", "kubernetes"):
        with pytest.raises(ClusterError, match="--cluster"):
            parse_cluster(bad)
    config = tmp_path / "slurm.yaml"
    config.write_text(yaml.safe_dump({"queue": "gpu", "cores": 4, "memory": "16GB", "walltime": "01:00:00",
                                      "job_extra_directives": ["--gres=gpu:1"], "jobs": 2}))
    cluster, scaling = slurm_cluster(config)     # builds the job script; submits nothing
    try:
        script = cluster.job_script()
        assert "#SBATCH -p gpu" in script and "#SBATCH --gres=gpu:1" in script and scaling == {"jobs": 2}
    finally:
        cluster.close()
