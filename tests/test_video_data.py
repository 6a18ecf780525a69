"""End-to-end mode's data: TSN's multi-scale crop by hand, plans, decoded clips, corrupt videos skipped and listed."""
from pathlib import Path

import numpy as np
import pytest
import torch

from extract.manifest import VideoEntry
from pipelines.data import centre_steps
from pipelines.video_data import (CROP_PAIRS, FIXED_OFFSETS, VideoSet, augment_clip, crop_box, iterate_clips,
                                  probe_videos, shard, eval_preprocess)

pytestmark = pytest.mark.usefixtures("one_thread")


def entry(video_id: str, path: str, label: str = "a", start=None, end=None) -> VideoEntry:
    return VideoEntry(path=path, label=label, domain="d", split="train", video_id=video_id, start_frame=start,
                      end_frame=end, attrs={})


def test_multi_scale_crop_sizes_and_offsets_by_hand():
    # TSN order: heights outer, widths inner, at most one scale apart -> 10 pairs; 13 fixed offsets
    assert CROP_PAIRS == ((0, 0), (1, 0), (0, 1), (1, 1), (2, 1), (1, 2), (2, 2), (3, 2), (2, 3), (3, 3))
    assert len(FIXED_OFFSETS) == 13
    # 80 x 60 frame, input 48: base 60 -> sides 60, int(52.5) = 52, int(45.0) = 45, int(39.6) = 39
    assert crop_box(80, 60, 48, pair=0, offset=1) == (20, 0, 60, 60)          # upper right: 4 * (80-60)//4
    assert crop_box(80, 60, 48, pair=7, offset=4) == (2 * 10, 2 * 3, 39, 45)  # (w 39, h 45), centre
    # a side within 3 px of the input size is snapped to it: 45 -> 46
    assert crop_box(80, 60, 46, pair=6, offset=0) == (0, 0, 46, 46)


def test_flip_mirrors_the_crop():
    frames = torch.arange(2 * 3 * 12 * 16, dtype=torch.float32).reshape(2, 3, 12, 16).to(torch.uint8)
    plain = augment_clip(frames, 8, pair=3, offset=9, flip=False)
    assert plain.shape == (2, 3, 8, 8)
    assert torch.equal(augment_clip(frames, 8, pair=3, offset=9, flip=True), plain.flip(-1))


def test_clips_decode_the_planned_frames_of_a_segment(make_video, tmp_path):
    # the bright bar of frame t starts at column 3t: the decoded frames say which frames were read
    make_video("v.mp4", num_frames=20, height=32, width=64)
    videos = VideoSet([entry("v", "v.mp4", start=4, end=15)], tmp_path, {"v": 12}, {"a": 0})
    preprocess = eval_preprocess(32)         # resize the shorter side to 37, centre crop 32
    (plan, clips), = iterate_clips(videos, videos.centre_plans(3, 4), preprocess, workers=0)
    assert plan.steps.tolist() == [centre_steps(12, 3).tolist()] == [[2, 6, 10]]
    assert clips.frames.shape == (1, 3, 32, 32, 3) and clips.frames.dtype == torch.uint8
    scale = 37 / 32                          # 64 x 32 -> 74 x 37, then columns 21..52 are kept
    bars = [int(clips.frames[0, i, :, :, 0].float().mean(0).argmax()) for i in range(3)]
    expected = [round((3 * (4 + step) + 1.5) * scale - 21) for step in (2, 6, 10)]
    assert all(abs(bar - want) <= 2 for bar, want in zip(bars, expected)), (bars, expected)


def test_training_plans_draw_the_augmentation_with_the_plan():
    videos = VideoSet([entry(f"v{i}", f"v{i}.mp4") for i in range(6)], Path("."), {f"v{i}": 10 for i in range(6)},
                      {"a": 0})
    first = videos.training_plans(3, 4, 2, "random", torch.Generator().manual_seed(1))
    again = videos.training_plans(3, 4, 2, "random", torch.Generator().manual_seed(1))
    for a, b in zip(first, again):
        assert np.array_equal(a.videos, b.videos) and np.array_equal(a.augment, b.augment)
    augment = np.concatenate([plan.augment for plan in first])
    assert augment[:, 0].max() < len(CROP_PAIRS) and augment[:, 1].max() < len(FIXED_OFFSETS)
    assert set(augment[:, 2]) <= {0, 1}
    halves = [shard(first[0], rank, 2) for rank in range(2)]       # contiguous shares of a global batch
    assert np.array_equal(np.concatenate([h.videos for h in halves]), first[0].videos)
    assert np.array_equal(np.concatenate([h.augment for h in halves]), first[0].augment)


def test_corrupt_and_vanished_videos_are_skipped_and_listed(make_video, tmp_path):
    make_video("good.mp4", num_frames=10)
    make_video("gone.mp4", num_frames=10)
    (tmp_path / "bad.mp4").write_bytes(b"not a video at all" * 10)
    rows = [entry("good", "good.mp4"), entry("gone", "gone.mp4"), entry("bad", "bad.mp4"),
            entry("short", "good.mp4", start=5, end=30)]
    frames, failures = probe_videos(rows, tmp_path, workers=1)          # in a worker process
    assert frames == {"good": 10, "gone": 10}
    assert set(failures) == {"bad", "short"}
    assert "cannot open it as a video" in failures["bad"] and "[5, 30]" in failures["short"]
    videos = VideoSet(rows, tmp_path, frames, {"a": 0})
    assert videos.video_ids == ["good", "gone"]
    (tmp_path / "gone.mp4").unlink()                                    # fails once training reads it
    (plan, clips), = iterate_clips(videos, videos.centre_plans(2, 4), eval_preprocess(32), workers=0)
    assert clips.kept.tolist() == [0] and list(clips.failures) == ["gone"]
    assert videos.without(set(clips.failures)).video_ids == ["good"]
