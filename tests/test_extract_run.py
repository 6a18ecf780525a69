"""`vidshift extract` end to end on real tiny videos, a tiny random ResNet-18, real zarr/HDF5 stores."""
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
import torchvision
from click.testing import CliRunner
from PIL import Image

from conftest import gradient_frames, write_video
from extract.backbones import Preprocess, build_backbone, state_dict_sha256
from extract.decode import open_source
from extract.run import ExtractConfig, run_extract
from extract.store import FeatureStore, StoreError
from pipelines.cli import main
from test_decode import corrupt_packet

TINY = dict(backbone="resnet18", weights="none", frame_size=64, resize=64, batch_size=4, workers=2)
TINIER = {**TINY, "frame_size": 32, "resize": 32}  # 1x1 maps, a quarter of the compute: for the longer videos


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


@pytest.mark.parametrize("backend", ["zarr", "hdf5"])
def test_provenance_records_the_weights_hash_preprocessing_and_creation_time(tmp_path, backend):
    root = tmp_path / "data"
    write_video(root / "v.mp4", gradient_frames(3))
    manifest = write_manifest(root, [row("v.mp4")])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        state_dict = torchvision.models.resnet18().state_dict()
    torch.save(state_dict, tmp_path / "weights.pth")
    config = ExtractConfig(manifest=manifest, root=root, out=tmp_path / "store", format=backend,
                           **{**TINY, "weights": str(tmp_path / "weights.pth")})
    before = time.time()
    assert run_extract(config, show_progress=False).exit_code == 0
    store = FeatureStore.open(tmp_path / "store")
    features, software = store.provenance()["features"], store.provenance()["software"]
    # the hash covers the tensors the backbone loaded: the file's, without the classifier it cuts away
    assert features["weights_sha256"] == state_dict_sha256({k: v for k, v in state_dict.items()
                                                            if not k.startswith("fc.")})
    assert features["weights"] == f"file:{(tmp_path / 'weights.pth').resolve()}"
    preprocess = features["preprocess"]
    assert (preprocess["mean"], preprocess["std"]) == ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    assert (preprocess["frame_size"], preprocess["resize"]) == (64, 64)
    created = time.mktime(time.strptime(store.meta["created"], "%Y-%m-%dT%H:%M:%SZ")) - time.timezone
    assert before - 2 <= created <= time.time() + 2
    assert software["vidshift"] and software["git_commit"] and software["torch"] == torch.__version__


@pytest.mark.parametrize("backend", ["zarr", "hdf5"])
def test_broken_inputs_are_recorded_and_the_run_goes_on(tmp_path, backend):
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
                                       "--batch-size", "4", "--format", backend])
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
                   dict(dtype="float32"), dict(sampling="uniform:3"), dict(keep_partial=True)):
        with pytest.raises(StoreError, match="extracted with different settings"):
            run_extract(replace(config, **change), show_progress=False)
    # Settings added later are recorded only when not at their default, so older stores still resume.
    assert "keep_partial" not in FeatureStore.open(tmp_path / "store").provenance()["features"]


def test_fps_is_the_rate_of_frame_directories_only_and_fixed_by_the_first_run(tmp_path):
    root = tmp_path / "data"
    write_video(root / "video.mp4", gradient_frames(10), fps=10)
    (root / "frames").mkdir()
    for t, frame in enumerate(gradient_frames(10, seed=1)):
        Image.fromarray(frame).save(root / "frames" / f"{t:03d}.png")
    manifest = write_manifest(root, [row("video.mp4"), row("frames")])
    config = ExtractConfig(manifest=manifest, root=root, out=tmp_path / "store", sampling="fps:5", fps=20.0, **TINY)
    assert run_extract(config, show_progress=False).exit_code == 0
    store = FeatureStore.open(tmp_path / "store")
    # fps:5 takes every 2nd frame of the 10 fps video, whatever --fps says, and every 4th of the 20 fps frames
    np.testing.assert_array_equal(store.read("video", "steps")[:, 0], [0, 2, 4, 6, 8])
    np.testing.assert_array_equal(store.read("frames", "steps")[:, 0], [0, 4, 8])
    assert store.provenance()["features"]["frame_dir_fps"] == 20.0
    with pytest.raises(StoreError, match=r"frame_dir_fps: store has 20.0, this run has 25.0"):
        run_extract(replace(config, fps=25.0), show_progress=False)
    assert run_extract(config, show_progress=False).skipped == 2
    with pytest.raises(ValueError, match="--fps 0"):
        run_extract(replace(config, fps=0.0), show_progress=False)


@pytest.fixture
def breaking_dataset(tmp_path):
    """Videos that open but stop decoding part-way, between good ones; returns (root, rows by name).

    "cut" is a frame directory of 30 frames whose 27th JPEG is truncated: in batches of 4 it always breaks
    after 24 good frames, which (after the 50 steps of "before") fill the part's first 64-step shard, so it
    is flushed before "cut" is rolled back. "corrupt" is an H.264 file with a damaged packet; decord decodes
    ahead in a thread of its own, so how many of its batches come before the error varies from run to run.
    """
    root = tmp_path / "data"
    write_video(root / "before.mp4", gradient_frames(50, seed=1))
    (root / "cut").mkdir()
    for t, frame in enumerate(gradient_frames(30, seed=3)):
        Image.fromarray(frame).save(root / "cut" / f"{t:03d}.jpg", quality=95)
    (root / "cut" / "026.jpg").write_bytes((root / "cut" / "026.jpg").read_bytes()[:-200])
    corrupt_packet(write_video(root / "corrupt.mp4", gradient_frames(40, seed=2)), 25)
    write_video(root / "after.mp4", gradient_frames(9, seed=4))
    return root, {name: row(name if name == "cut" else f"{name}.mp4") for name in ("before", "cut", "corrupt", "after")}


def assert_same_arrays(store: FeatureStore, reference: FeatureStore, video_ids) -> None:
    for video_id in video_ids:
        for array in ("maps", "pooled", "steps"):
            np.testing.assert_array_equal(store.read(video_id, array), reference.read(video_id, array))


@pytest.mark.parametrize("backend", ["zarr", "hdf5"])
def test_a_video_that_breaks_mid_decode_is_rolled_back(breaking_dataset, tmp_path, backend):
    root, rows = breaking_dataset
    manifest = write_manifest(root, list(rows.values()))
    summary = run_extract(ExtractConfig(manifest=manifest, root=root, out=tmp_path / "store", format=backend,
                                        **TINIER), show_progress=False)
    assert summary.exit_code == 2 and summary.partial == []
    failed = {f["video_id"]: f for f in summary.failures}
    assert sorted(failed) == ["corrupt", "cut"] and {f["stage"] for f in failed.values()} == {"decode"}
    assert "026.jpg: cannot decode the image" in failed["cut"]["reason"]
    assert "stopped at frame 24: 24 of 30 planned frames decoded" in failed["cut"]["reason"]
    assert "of 40 planned frames decoded" in failed["corrupt"]["reason"]
    # the rows the broken videos had appended are gone: the neighbours read back exactly as in a clean run
    reference_manifest = write_manifest(tmp_path, [rows["before"], rows["after"]])
    run_extract(ExtractConfig(manifest=reference_manifest, root=root, out=tmp_path / "reference", format=backend,
                              **TINIER), show_progress=False)
    store, reference = FeatureStore.open(tmp_path / "store"), FeatureStore.open(tmp_path / "reference")
    assert sorted(store.videos()) == ["after", "before"]
    assert store.video("after").offset == 50  # written where the broken videos' rows were
    assert_same_arrays(store, reference, ["before", "after"])
    assert store.verify() == [] and sorted(f["video_id"] for f in store.failures()) == ["corrupt", "cut"]


@pytest.mark.parametrize("backend", ["zarr", "hdf5"])
def test_keep_partial_stores_the_decoded_prefix_flagged(breaking_dataset, tmp_path, backend):
    root, rows = breaking_dataset
    manifest = write_manifest(root, [rows["before"], rows["cut"], rows["after"]])
    out = tmp_path / "store"
    result = CliRunner().invoke(main, ["extract", str(manifest), "--out", str(out), "--format", backend,
                                       "--backbone", "resnet18", "--weights", "none", "--frame-size", "32",
                                       "--resize", "32", "--batch-size", "4", "--keep-partial"])
    # kept as asked, so not a failure: exit 0, but named on screen
    assert result.exit_code == 0, result.output
    assert "3 extracted (1 partial)" in result.output
    assert "PARTIAL cut cut: kept 24 of 30 frames; " in result.output
    store = FeatureStore.open(out)
    assert sorted(store.videos()) == ["after", "before", "cut"] and store.failures() == []
    np.testing.assert_array_equal(store.read("cut", "steps"), [[t, t] for t in range(24)])
    (table,) = store.part_tables().values()
    cut = next(video for video in table["videos"] if video["video_id"] == "cut")
    assert cut["partial"] is True and (cut["decoded_frames"], cut["expected_frames"]) == (24, 30)
    assert "stopped at frame 24" in cut["partial_reason"]
    assert all(video["partial"] is False for video in table["videos"] if video["video_id"] != "cut")
    assert store.provenance()["features"]["keep_partial"] is True
    info = json.loads(CliRunner().invoke(main, ["store", "info", "--json", str(out)]).output)
    assert info["streams"]["rgb"]["partial"] == 1
    # the frames that did decode are the same features a clean 24-frame directory gives
    reference_root = tmp_path / "reference_data"
    (reference_root / "cut").mkdir(parents=True)
    for t in range(24):
        (reference_root / "cut" / f"{t:03d}.jpg").write_bytes((root / "cut" / f"{t:03d}.jpg").read_bytes())
    run_extract(ExtractConfig(manifest=write_manifest(reference_root, [rows["cut"]]), root=reference_root,
                              out=tmp_path / "reference", format=backend, keep_partial=True, **TINIER),
                show_progress=False)
    assert_same_arrays(store, FeatureStore.open(tmp_path / "reference"), ["cut"])


@pytest.mark.parametrize("backend", ["zarr", "hdf5"])
def test_float16_overflow_is_refused_and_float32_stores_it(tmp_path, backend):
    root = tmp_path / "data"
    write_video(root / "v.mp4", gradient_frames(2))
    manifest = write_manifest(root, [row("v.mp4")])
    # random-init ResNet-101 at 224 px: layer4 activations ~1e5, beyond float16's 65504
    config = ExtractConfig(manifest=manifest, root=root, out=tmp_path / "f16", format=backend, backbone="resnet101",
                           weights="none", frame_size=224, batch_size=2, workers=1)
    summary = run_extract(config, show_progress=False)
    assert summary.exit_code == 2 and "exceeds float16's range" in summary.failures[0]["reason"]
    assert "--dtype float32" in summary.failures[0]["reason"]
    assert FeatureStore.open(tmp_path / "f16").videos() == {}
    stored = run_extract(replace(config, out=tmp_path / "f32", dtype="float32"), show_progress=False)
    maps = FeatureStore.open(tmp_path / "f32").read("v", "maps")
    assert stored.exit_code == 0 and np.isfinite(maps).all() and np.abs(maps).max() > 65504


def extract_arguments(manifest: Path, out: Path, backend: str) -> list[str]:
    return ["extract", str(manifest), "--out", str(out), "--format", backend, "--backbone", "resnet18", "--weights",
            "none", "--frame-size", "64", "--resize", "64", "--batch-size", "4", "--videos-per-part", "1"]


@pytest.mark.parametrize("backend", ["zarr", "hdf5"])
def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path, backend):
    root = tmp_path / "data"
    for i in range(12):
        write_video(root / f"v{i:02d}.mp4", gradient_frames(16, seed=i))
    manifest = write_manifest(root, [row(f"v{i:02d}.mp4") for i in range(12)])
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "pipelines.cli", *extract_arguments(manifest, killed, backend)],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(list((killed / "parts").glob("part-*"))) < 2 and time.monotonic() < deadline:
        assert process.poll() is None, "the run finished before it could be killed"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    committed = len(list((killed / "parts").glob("part-*")))
    assert 2 <= committed < 12
    # the resume runs in this process: only the kill needs a process of its own
    resumed_run = CliRunner().invoke(main, extract_arguments(manifest, killed, backend))
    assert resumed_run.exit_code == 0, resumed_run.output
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


def test_batch_and_decoders_default_per_device_and_explicit_values_win():
    from extract.run import ExtractConfig, device_defaults
    config = ExtractConfig(manifest=Path("m.csv"), root=Path("."), out=Path("s"))
    assert device_defaults(config, torch.device("cpu")) == (4, 1, 1)
    assert device_defaults(config, torch.device("cuda")) == (64, 2, 4)
    assert device_defaults(replace(config, batch_size=3, workers=4, writer_threads=2), torch.device("cpu")) == (3, 4, 2)


def test_compile_wraps_the_network_and_decoder_and_compilation_are_recorded_not_compared(tmp_path):
    from extract.run import prepare_backbone, store_provenance
    manifest = write_manifest(tmp_path, [row("v.mp4")])
    config = ExtractConfig(manifest=manifest, root=tmp_path, out=tmp_path / "store", compile=True, **TINY)
    config, backbone = prepare_backbone(config)
    # torch.compile compiles at the first call (tens of seconds on this CPU, so not run here); the wrapper is in place
    assert isinstance(backbone.network, torch._dynamo.eval_frame.OptimizedModule)
    provenance = store_provenance(config, backbone)
    assert provenance["software"]["compiled"] is True
    assert provenance["software"]["decoder"].startswith("decord-0.")
    assert not {"compiled", "decoder"} & set(provenance["features"])  # a resume may change them
    for bad, message in ((dict(decoder="ffmpeg"), "--decoder 'ffmpeg': use one of decord, torchcodec"),
                         (dict(writer_threads=0), "--writer-threads 0: must be at least 1"),
                         (dict(cluster="local:0"), "--cluster 'local:0'")):
        with pytest.raises(ValueError, match=message):
            replace(config, **bad)
