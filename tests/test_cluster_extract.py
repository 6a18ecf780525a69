"""`vidshift extract --cluster` on a real dask LocalCluster of 2 CPU worker processes: the store equals a
single-process run's, also when a worker process is SIGKILLed mid-run; a second run on the same store is refused."""
import os
import signal
from pathlib import Path
from types import SimpleNamespace
import threading
import time
from dataclasses import replace

import numpy as np
import pytest
from distributed import Client, LocalCluster

from conftest import gradient_frames, write_video
from extract.cluster import slurm_cluster
from extract.cluster_plugins import OneGpuEach
from extract.cluster_run import plan_tasks
from extract.manifest import read_manifest
from extract.run import ExtractConfig, run_extract
from extract.store import FeatureStore, StoreError
from test_extract_run import TINY, row, write_manifest


@pytest.fixture(scope="module")
def cluster():
    """A scheduler with 2 single-threaded worker processes (what `--cluster local:2` starts), shared by the tests:
    they join it by address, as `--cluster tcp://HOST:PORT` does."""
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as local:
        with Client(local) as client:
            yield local.scheduler_address, client


def dataset(root, videos: int, frames: int):
    for i in range(videos):
        write_video(root / f"v{i}.mp4", gradient_frames(frames, seed=i))
    (root / "broken.mp4").write_text("not a video\n")
    rows = [row(f"v{i}.mp4") for i in range(videos)]
    return write_manifest(root, rows[:2] + [row("broken.mp4")] + rows[2:])


def assert_same_store(store: FeatureStore, reference: FeatureStore) -> None:
    """The same videos with the same arrays and attributes, grouped into parts the same way, the same failures."""
    assert sorted(store.videos()) == sorted(reference.videos())
    for video_id, record in reference.videos().items():
        assert store.video(video_id).attrs == record.attrs and store.video(video_id).sha256 == record.sha256
        for array in ("maps", "pooled", "steps"):
            np.testing.assert_array_equal(store.read(video_id, array), reference.read(video_id, array))
    def grouping(s):
        return [[v["video_id"] for v in table["videos"]] + [f["video_id"] for f in table["failures"]]
                for table in s.part_tables().values()]
    assert grouping(store) == grouping(reference)
    assert [f["video_id"] for f in store.failures()] == [f["video_id"] for f in reference.failures()]
    assert store.verify() == [] and not list((store.root / "parts").glob(".tmp-*"))


def reference_run(manifest, root, out, videos_per_part):
    return run_extract(ExtractConfig(manifest=manifest, root=root, out=out, videos_per_part=videos_per_part, **TINY),
                       show_progress=False)


def test_cluster_store_equals_a_single_process_run_and_a_second_run_is_refused(cluster, tmp_path, one_thread):
    address, _ = cluster
    root = tmp_path / "data"
    manifest = dataset(root, videos=5, frames=6)
    config = ExtractConfig(manifest=manifest, root=root, out=tmp_path / "store", videos_per_part=2, cluster=address,
                           **TINY)
    summary = run_extract(config, show_progress=False)
    assert (summary.extracted, summary.skipped, summary.exit_code) == (5, 0, 2)
    assert [f["video_id"] for f in summary.failures] == ["broken"] and summary.failures[0]["stage"] == "decode"
    reference_run(manifest, root, tmp_path / "reference", 2)
    store = FeatureStore.open(tmp_path / "store")
    assert_same_store(store, FeatureStore.open(tmp_path / "reference"))
    assert store.part_names()[0] == "part-c000000of000003-000000.zarr"
    assert store.provenance()["software"]["decoder"].startswith("decord-")
    # a rerun extracts nothing again; only the failed video is retried (into its chunk's next part, k = 1)
    again = run_extract(config, show_progress=False)
    assert (again.extracted, again.skipped, len(again.failures)) == (0, 5, 1)
    assert "part-c000001of000003-000001.zarr" in FeatureStore.open(tmp_path / "store").part_names()
    # while another extraction holds the store, a --cluster run is refused before it plans anything
    held = FeatureStore.open(tmp_path / "store").lock("s0of1")
    try:
        with pytest.raises(StoreError, match="another extraction .* this --cluster run is refused"):
            run_extract(config, show_progress=False)
    finally:
        held.close()
    with pytest.raises(ValueError, match="--cluster with --shard 0/2"):
        replace(config, shard="0/2")


def test_a_worker_killed_mid_run_still_gives_the_single_process_store(cluster, tmp_path, one_thread):
    address, client = cluster
    root = tmp_path / "data"
    manifest = dataset(root, videos=8, frames=16)
    out = tmp_path / "store"
    config = ExtractConfig(manifest=manifest, root=root, out=out, videos_per_part=1, cluster=address, **TINY)
    outcome = {}
    runner = threading.Thread(target=lambda: outcome.update(summary=run_extract(config, show_progress=False)))
    runner.start()
    pids = client.run(os.getpid)  # worker address -> pid
    victim = None
    deadline = time.monotonic() + 120
    while victim is None and time.monotonic() < deadline:
        busy = [worker for worker, keys in client.processing().items() if keys]
        if busy and list((out / "parts").glob(".tmp-part-c*")):  # a task is writing its part
            victim = pids[busy[0]]
        time.sleep(0.005)
    assert victim is not None, "no task was seen running"
    os.kill(victim, signal.SIGKILL)
    runner.join(timeout=240)
    assert not runner.is_alive() and outcome["summary"].extracted == 8
    assert victim not in client.run(os.getpid).values()  # the nanny started a new worker process
    reference_run(manifest, root, tmp_path / "reference", 1)
    assert_same_store(FeatureStore.open(out), FeatureStore.open(tmp_path / "reference"))


def test_tasks_are_fixed_chunks_minus_stored_videos_and_name_their_next_part(tmp_path):
    manifest = write_manifest(tmp_path, [row(f"v{i}.mp4") for i in range(5)])
    entries = read_manifest(manifest)
    tasks = plan_tasks(entries, 2, present={"v0", "v1", "v3"}, committed=["part-c000001of000003-000000.zarr"],
                       suffix=".zarr")
    assert [(t.tag, t.part, [e.video_id for e in t.entries]) for t in tasks] == [
        ("c000001of000003", "part-c000001of000003-000001.zarr", ["v2"]),
        ("c000002of000003", "part-c000002of000003-000000.zarr", ["v4"])]


def test_the_sample_slurm_config_makes_one_single_task_gpu_worker_per_job():
    cluster, scaling = slurm_cluster(Path(__file__).resolve().parents[1] / "docs" / "slurm-extract.yaml")
    try:
        script = cluster.job_script()  # builds the job script; submits nothing
    finally:
        cluster.close()
    for expected in ("--gres=gpu:1", "--cpus-per-task=8", "--nthreads 1", "--lifetime 55m", "-t 01:00:00"):
        assert expected in script
    assert scaling == {"adapt": {"minimum_jobs": 0, "maximum_jobs": 32}}


def test_local_workers_get_one_gpu_each_by_name(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    plugin = OneGpuEach(gpus=2)
    for name, device in ((0, "0"), (1, "1"), (2, "0")):  # a third worker shares GPU 0
        plugin.setup(SimpleNamespace(name=name))
        assert os.environ["CUDA_VISIBLE_DEVICES"] == device
