"""`vidshift extract` end to end on real tiny videos, a tiny random ResNet-18, real zarr/HDF5 stores."""
import csv
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import gradient_frames, write_video
from extract.backbones import Preprocess, build_backbone
from extract.decode import open_source
from extract.run import ExtractConfig, run_extract
from extract.store import FeatureStore, StoreError
from pipelines.cli import main

TINY = dict(backbone="resnet18", weights="none", frame_size=64, resize=64, batch_size=4, workers=2)


def write_manifest(root: Path, rows: list[dict]) -> Path:
    columns = ["path", "label", "domain", "split", "video_id", "start_frame", "end_frame"]
    path = root / "manifest.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def row(path: str, **extra) -> dict:
    return {"path": path, "label": "a", "domain": "d", "split": "train", **extra}


@pytest.fixture
def good_dataset(tmp_path):
    root = tmp_path / "data"
    for i in range(3):
        write_video(root / f"v{i}.mp4", gradient_frames(9 + i, seed=i))
    write_video(root / "clip.avi", gradient_frames(7, seed=5), codec="mpeg4")
    rows = [row(f"v{i}.mp4") for i in range(3)] + [row("clip.avi"), row("v2.mp4", video_id="seg", start_frame=2, end_frame=6)]
    return root, write_manifest(root, rows)


@pytest.mark.parametrize("backend", ["zarr", "hdf5"])
def test_extracted_features_match_the_backbone(good_dataset, tmp_path, backend):
    root, manifest = good_dataset
    config = ExtractConfig(manifest=manifest, root=root, out=tmp_path / "store", format=backend, **TINY)
    summary = run_extract(config, show_progress=False)
    assert (summary.extracted, summary.failures, summary.exit_code) == (5, [], 0)
    store = FeatureStore.open(tmp_path / "store")
    assert sorted(store.videos()) == ["clip", "seg", "v0", "v1", "v2"]
    backbone = build_backbone("resnet18", "none", Preprocess(64, 64))
    source = open_source(root / "v1.mp4")
    expected = backbone(source.read(np.arange(10))).numpy()
    maps = store.read("v1", "maps")
    assert maps.dtype == np.float16 and maps.shape == (10, 2, 2, 512)
    # one float16 rounding step apart at most (the reference ran the frames in one batch, the run in batches of 4)
    np.testing.assert_allclose(maps.astype(np.float32), expected, rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(store.read("v1", "pooled"), expected.mean(axis=(1, 2)), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(store.read("seg", "steps"), [[f, f] for f in range(2, 7)])
    segment, whole = store.read("seg", "maps").astype(np.float32), store.read("v2", "maps")[2:7].astype(np.float32)
    np.testing.assert_allclose(segment, whole, rtol=2e-3, atol=2e-3)
    features = store.provenance()["features"]
    assert features["name"] == "resnet18" and features["map_shape"] == [2, 2, 512]
    assert features["weights"] == "none:seed=0" and features["sampling"] == "all"
    assert store.provenance()["software"]["zarr"]
    video = store.video("v0")
    assert video.attrs["label"] == "a" and store.verify() == []
    table = next(iter(store.part_tables().values()))
    assert table["manifest_sha256"] and table["videos"][0]["expected_frames"] == table["videos"][0]["decoded_frames"]


def test_broken_inputs_are_recorded_and_the_run_goes_on(tmp_path):
    root = tmp_path / "data dir"
    write_video(root / "good.mp4", gradient_frames(6))
    write_video(root / "ünï cödé" / "clip with space.mp4", gradient_frames(5, seed=1))
    write_video(root / "one.mp4", gradient_frames(1, seed=2))
    (root / "zero.mp4").write_bytes(b"")
    (root / "text.mp4").write_text("this is not a video\n")
    full = write_video(tmp_path / "full.mp4", gradient_frames(30, seed=3)).read_bytes()
    (root / "truncated.mp4").write_bytes(full[: len(full) // 2])
    odd = root / "odd_frames"
    odd.mkdir()
    for t, frame in enumerate(gradient_frames(4, height=33, width=47)):
        Image.fromarray(frame).save(odd / f"img_{t:05d}.png")
    names = ["good.mp4", "ünï cödé/clip with space.mp4", "one.mp4", "zero.mp4", "text.mp4", "truncated.mp4",
             "missing.mp4", "odd_frames"]
    manifest = write_manifest(root, [row(name) for name in names])
    result = CliRunner().invoke(main, ["extract", str(manifest), "--out", str(tmp_path / "store"),
                                       "--backbone", "resnet18", "--weights", "none", "--frame-size", "64",
                                       "--batch-size", "4", "--format", "hdf5"])
    assert result.exit_code == 2, result.output
    store = FeatureStore.open(tmp_path / "store")
    assert sorted(store.videos()) == ["good", "odd_frames", "one", "ünï cödé/clip with space"]
    assert store.read("one", "maps").shape[0] == 1 and store.read("odd_frames", "maps").shape[0] == 4
    failed = {f["video_id"]: f for f in store.failures()}
    assert sorted(failed) == ["missing", "text", "truncated", "zero"]
    for video_id, failure in failed.items():
        assert failure["stage"] == "decode" and video_id in failure["path"] and failure["reason"]
        assert f"FAILED {video_id}" in result.output
    info = CliRunner().invoke(main, ["store", "info", str(tmp_path / "store")])
    assert "4 failed" in info.output and "FAILED truncated" in info.output


def test_resume_skips_done_videos_and_refuses_changed_settings(good_dataset, tmp_path):
    root, manifest = good_dataset
    config = ExtractConfig(manifest=manifest, root=root, out=tmp_path / "store", **TINY)
    run_extract(config, show_progress=False)
    again = run_extract(config, show_progress=False)
    assert (again.skipped, again.extracted) == (5, 0)
    for change in (dict(backbone="resnet34"), dict(weights="none", seed=1), dict(frame_size=96, resize=96),
                   dict(dtype="float32"), dict(sampling="uniform:3")):
        with pytest.raises(StoreError, match="extracted with different settings"):
            run_extract(replace(config, **change), show_progress=False)


def test_float16_overflow_is_refused_and_float32_stores_it(tmp_path):
    root = tmp_path / "data"
    write_video(root / "v.mp4", gradient_frames(2))
    manifest = write_manifest(root, [row("v.mp4")])
    # random-init ResNet-101 at 224 px: layer4 activations ~1e5, beyond float16's 65504
    config = ExtractConfig(manifest=manifest, root=root, out=tmp_path / "f16", backbone="resnet101",
                           weights="none", frame_size=224, batch_size=2, workers=1)
    summary = run_extract(config, show_progress=False)
    assert summary.exit_code == 2 and "exceeds float16's range" in summary.failures[0]["reason"]
    assert "--dtype float32" in summary.failures[0]["reason"]
    assert FeatureStore.open(tmp_path / "f16").videos() == {}
    stored = run_extract(replace(config, out=tmp_path / "f32", dtype="float32"), show_progress=False)
    maps = FeatureStore.open(tmp_path / "f32").read("v", "maps")
    assert stored.exit_code == 0 and np.isfinite(maps).all() and np.abs(maps).max() > 65504


def extract_command(manifest: Path, out: Path, backend: str) -> list[str]:
    return [sys.executable, "-m", "pipelines.cli", "extract", str(manifest), "--out", str(out), "--format", backend,
            "--backbone", "resnet18", "--weights", "none", "--frame-size", "64", "--resize", "64", "--batch-size", "4",
            "--videos-per-part", "1"]


@pytest.mark.parametrize("backend", ["zarr", "hdf5"])
def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path, backend):
    root = tmp_path / "data"
    for i in range(12):
        write_video(root / f"v{i:02d}.mp4", gradient_frames(16, seed=i))
    manifest = write_manifest(root, [row(f"v{i:02d}.mp4") for i in range(12)])
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    killed = tmp_path / "killed"
    process = subprocess.Popen(extract_command(manifest, killed, backend), env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(list((killed / "parts").glob("part-*"))) < 2 and time.monotonic() < deadline:
        assert process.poll() is None, "the run finished before it could be killed"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    committed = len(list((killed / "parts").glob("part-*")))
    assert 2 <= committed < 12
    assert subprocess.run(extract_command(manifest, killed, backend), env=env, capture_output=True).returncode == 0
    reference = tmp_path / "reference"
    run_extract(ExtractConfig(manifest=manifest, root=root, out=reference, format=backend, videos_per_part=1,
                              **TINY), show_progress=False)
    resumed, uninterrupted = FeatureStore.open(killed), FeatureStore.open(reference)
    assert sorted(resumed.videos()) == sorted(uninterrupted.videos()) == [f"v{i:02d}" for i in range(12)]
    assert resumed.verify() == []  # includes the check that no video is stored twice
    assert not list((killed / "parts").glob(".tmp-*"))
    for video_id in uninterrupted.videos():
        for array in ("maps", "pooled", "steps"):
            np.testing.assert_array_equal(resumed.read(video_id, array), uninterrupted.read(video_id, array))
