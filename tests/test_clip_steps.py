"""Clip time steps: the window plan by hand, streaming across decode batches equals each window computed alone (RGB
and flow, padding included), and `vidshift extract --clip-length/--clip-stride` into a real store (steps, padding
recorded, sampling first, resume refusing other clips, option errors)."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import gradient_frames, write_video
from extract.backbones import Preprocess, build_backbone
from extract.clips import ClipWindows
from extract.run import ExtractConfig, run_extract
from extract.store import FeatureStore, StoreError
from pipelines.cli import main
from test_extract_run import row, write_manifest

TINY_I3D = dict(backbone="i3d", weights="none", frame_size=32, resize=32, batch_size=8, workers=1, clip_length=4)


@pytest.mark.parametrize("length, stride, items, windows", [
    (16, 16, 32, [(0, 16), (16, 32)]),                  # STCDA's 16/16, an exact fit
    (16, 16, 40, [(0, 16), (16, 32), (24, 40)]),        # frames 32..39 would be left out: a last window ends at 39
    (16, 16, 10, [(0, 16)]),                            # shorter than a clip: one window, padded
    (4, 2, 7, [(0, 4), (2, 6), (3, 7)]),                # overlapping windows, then the tail
    (4, 8, 14, [(0, 4), (8, 12)]),                      # gaps by design: the next hop (16) is past the end
    (4, 8, 18, [(0, 4), (8, 12), (14, 18)]),            # ... but here it would start inside the video
])
def test_window_plan_by_hand(length, stride, items, windows):
    assert ClipWindows(length, stride).plan(items) == windows


def test_window_plan_refuses_empty_clips():
    with pytest.raises(ValueError, match="--clip-length 0 --clip-stride 1: both must be at least 1"):
        ClipWindows(0, 1)


def decode_batches(frames: np.ndarray, indices: np.ndarray, size: int):
    return ((indices[i:i + size], frames[i:i + size]) for i in range(0, len(frames), size))


def streamed(backbone, frames, indices, decode_batch, batch_size):
    batches = list(backbone.video_steps(decode_batches(frames, indices, decode_batch), indices, batch_size))
    return (np.concatenate([b.steps for b in batches]), torch.cat([b.maps for b in batches]),
            sum(b.padded for b in batches), len(batches))


def test_streamed_rgb_windows_equal_each_window_alone(one_thread):
    backbone = build_backbone("i3d", weights="none", preprocess=Preprocess(32, 32), device="cpu", clip_length=4,
                              clip_stride=3)
    frames, indices = gradient_frames(11, 24, 40, seed=4), np.arange(0, 22, 2)  # e.g. fps sampling: every 2nd
    steps, maps, padded, calls = streamed(backbone, frames, indices, decode_batch=3, batch_size=8)
    windows = [(0, 4), (3, 7), (6, 10), (7, 11)]                                 # the plan for 11 items
    np.testing.assert_array_equal(steps, [[indices[a], indices[b - 1]] for a, b in windows])
    expected = backbone(np.stack([frames[a:b] for a, b in windows]))
    torch.testing.assert_close(maps, expected, rtol=1e-4, atol=1e-5)
    assert padded == 0 and calls >= 3   # windows go through as their frames arrive, <= 8 // 4 per call

    short, short_indices = frames[:3], indices[:3]
    steps, maps, padded, _ = streamed(backbone, short, short_indices, decode_batch=2, batch_size=8)
    np.testing.assert_array_equal(steps, [[0, 4]])                               # the frames it really has
    torch.testing.assert_close(maps, backbone(short[[0, 1, 2, 2]][None]), rtol=1e-4, atol=1e-5)
    assert padded == 1                                                           # the last frame, once more


def test_streamed_flow_windows_span_one_frame_more(one_thread):
    backbone = build_backbone("i3d", weights="none", preprocess=Preprocess(32, 32), device="cpu", clip_length=4,
                              flow="tvl1")
    assert backbone.frames_per_step == 5                                         # 4 flow fields need 5 frames
    frames, indices = gradient_frames(7, 32, 32, seed=2), np.arange(7)
    steps, maps, padded, _ = streamed(backbone, frames, indices, decode_batch=3, batch_size=8)
    np.testing.assert_array_equal(steps, [[0, 4], [2, 6]])                       # 6 fields: windows (0, 4), (2, 6)
    torch.testing.assert_close(maps, backbone(np.stack([frames[0:5], frames[2:7]])), rtol=1e-4, atol=1e-5)
    # One frame has no flow field: its one window is all padding, the zero flow of a repeated frame.
    steps, maps, padded, _ = streamed(backbone, frames[:1], indices[:1], decode_batch=3, batch_size=8)
    np.testing.assert_array_equal(steps, [[0, 0]])
    assert padded == 4
    torch.testing.assert_close(maps, backbone(np.repeat(frames[:1], 5, axis=0)[None]), rtol=1e-4, atol=1e-5)


@pytest.fixture
def clip_dataset(tmp_path):
    root = tmp_path / "data"
    for name, count in (("long", 13), ("short", 3)):
        write_video(root / f"{name}.mp4", gradient_frames(count, seed=count), fps=10)
    return root, write_manifest(root, [row("long.mp4"), row("short.mp4")])


def test_extract_stores_one_step_per_clip_and_records_padding(clip_dataset, tmp_path, one_thread):
    root, manifest = clip_dataset
    result = CliRunner().invoke(main, ["extract", str(manifest), "--out", str(tmp_path / "store"), "--backbone",
                                       "i3d", "--weights", "none", "--frame-size", "32", "--resize", "32",
                                       "--clip-length", "4", "--clip-stride", "4", "--sampling", "fps:5",
                                       "--workers", "1"])
    assert result.exit_code == 0, result.output
    store = FeatureStore.open(tmp_path / "store")
    # fps:5 of a 10 fps video first keeps frames 0, 2, ..., 12 (7 frames); then 4-frame clips: (0, 4), tail (3, 7)
    np.testing.assert_array_equal(store.read("long", "steps"), [[0, 6], [6, 12]])
    np.testing.assert_array_equal(store.read("short", "steps"), [[0, 2]])       # frames 0, 2 padded to 4
    assert store.read("long", "maps").shape == (2, 1, 1, 1024)
    rows = {r["video_id"]: r for table in store.part_tables().values() for r in table["videos"]}
    assert (rows["long"]["padded_frames"], rows["short"]["padded_frames"]) == (0, 2)
    features = store.provenance()["features"]
    assert features["clip"]["length"] == features["clip"]["stride"] == 4 and features["layer"] == "Mixed_5c"
    info = CliRunner().invoke(main, ["store", "info", str(tmp_path / "store")])
    assert "'length': 4" in info.output and "i3d" in info.output


def test_a_resume_with_other_clips_is_refused(clip_dataset, tmp_path):
    root, manifest = clip_dataset
    config = ExtractConfig(manifest=manifest, root=root, out=tmp_path / "store", **TINY_I3D)
    assert run_extract(config, show_progress=False).exit_code == 0
    for change in (dict(clip_length=8), dict(clip_stride=2)):
        with pytest.raises(StoreError, match=r"(?s)extracted with different settings.*clip: store has \{'length': 4"):
            run_extract(replace(config, **change), show_progress=False)
    assert run_extract(config, show_progress=False).skipped == 2


def test_clip_and_flow_options_are_checked_before_any_work(tmp_path):
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("path,label,domain,split\nv.mp4,a,d,train\n")
    base = ["extract", str(manifest), "--out", str(tmp_path / "store"), "--weights", "none", "--device", "cpu"]
    for options, message in (
            (["--backbone", "resnet18", "--clip-length", "8"], "resnet18 on RGB frames is a per-frame backbone"),
            (["--backbone", "i3d", "--clip-length", "0"], "--clip-length 0: must be at least 1"),
            (["--backbone", "i3d", "--stream", "flow"], "--stream flow: name the optical-flow method"),
            (["--backbone", "i3d", "--flow", "tvl1"], "store them under their own stream, e.g. --stream flow"),
            (["--backbone", "i3d", "--flow-weights", "none"], "--flow-weights 'none': only with --flow"),
            (["--backbone", "i3d", "--flow", "tvl1", "--stream", "flow", "--flow-weights", "none"],
             "TV-L1 is an optimisation method, it has no weights"),
            (["--backbone", "i3d", "--flow", "raft-small", "--stream", "flow", "--flow-weights", "none",
              "--frame-size", "64", "--resize", "64"], "raft-small needs frames of at least 128 px")):
        result = CliRunner().invoke(main, [*base, *options])
        assert result.exit_code == 1 and message in result.output, (options, result.output)
        assert "Traceback" not in result.output
    assert not (tmp_path / "store").exists()
