"""Tests for extract/decode.py on real files: tiny videos written with PyAV, frame directories with PIL."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from conftest import gradient_frames, write_video
from extract import decode
from extract.decode import (DECORD_UNREADABLE_WIDTHS, DecodeError, DecodeJob, DecordSource, Sampling, iter_batches,
                            open_source, prefetch, register_reader)

# decord 0.6.0 cannot return frames of the widths in DECORD_UNREADABLE_WIDTHS (16, 24, 48, 72 px...), so these
# tests use 64 px (a multiple of 16) and 46 px (not a multiple of 16).
HEIGHT, WIDTH = 32, 64


def bar_columns(frames: np.ndarray) -> list[int]:
    """Left edge of the bright bar that gradient_frames draws at column (3 t) % W, robust to lossy codecs."""
    profile = frames.astype(float).mean(axis=(1, 3))  # [T, W]: the bar is ~255, the noise below 60
    return [int(np.argmax(row > 150)) for row in profile]


def expected_columns(indices, width: int = WIDTH) -> list[int]:
    return [(3 * int(t)) % width for t in indices]


def pyav_frames(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def write_frame_dir(directory: Path, frames: np.ndarray, names: list[str]) -> Path:
    directory.mkdir(parents=True)
    for frame, name in zip(frames, names):
        Image.fromarray(frame).save(directory / name, quality=95)
    return directory


def corrupt_packet(path: Path, packet_number: int) -> Path:
    """Overwrite the NAL length prefix of one H.264 packet (decode order): FFmpeg then refuses that packet."""
    with av.open(str(path)) as container:
        offsets = [packet.pos for packet in container.demux(video=0) if packet.size]
    data = bytearray(path.read_bytes())
    data[offsets[packet_number]:offsets[packet_number] + 4] = b"\xff\xff\xff\xff"
    path.write_bytes(bytes(data))
    return path


@pytest.fixture
def isolated_readers(monkeypatch):
    """Lets a test register readers without leaking them into other tests."""
    monkeypatch.setattr(decode, "_READERS", dict(decode._READERS))


# ------------------------------------------------------------------------------------------------ sampling

@pytest.mark.parametrize("spec", ["all", "fps:2", "fps:2.5", "fps:29.97", "uniform:1", "uniform:8"])
def test_sampling_spec_round_trips(spec):
    sampling = Sampling.parse(spec)
    assert str(sampling) == spec
    assert Sampling.parse(str(sampling)) == sampling


@pytest.mark.parametrize("spec", ["", "every", "ALL", "all:3", "fps", "fps:", "fps:0", "fps:-1", "fps:nan",
                                  "fps:inf", "fps:fast", "uniform", "uniform:0", "uniform:-3", "uniform:2.5"])
def test_sampling_rejects_bad_specs(spec):
    with pytest.raises(ValueError, match=r"expected 'all', 'fps:F'.*'uniform:N'"):
        Sampling.parse(spec)


@pytest.mark.parametrize("spec, num_frames, fps, start, end, expected", [
    ("all", 5, 10.0, 0, None, [0, 1, 2, 3, 4]),
    ("all", 10, 10.0, 2, 4, [2, 3, 4]),
    ("fps:3", 30, 30.0, 0, None, [0, 10, 20]),
    ("fps:5", 10, 10.0, 0, None, [0, 2, 4, 6, 8]),
    ("fps:3", 10, 10.0, 0, None, [0, 3, 6]),  # ticks at 0, 1/3, 2/3 s -> frames floor(0, 3.33, 6.67)
    ("fps:10", 10, 25.0, 0, None, [0, 2, 5, 7]),  # 0.4 s of video, ticks every 0.1 s
    ("fps:20", 3, 10.0, 0, None, [0, 0, 1, 1, 2, 2]),  # faster than the video: frames repeat
    ("fps:5", 30, 10.0, 10, 19, [10, 12, 14, 16, 18]),  # ticks start at the segment start
    ("fps:1", 300, 30000 / 1001, 0, None, [0, 29, 59, 89, 119, 149, 179, 209, 239, 269, 299]),  # 10.01 s
    ("uniform:5", 10, 10.0, 0, None, [1, 3, 5, 7, 9]),
    ("uniform:4", 10, 10.0, 0, None, [1, 3, 6, 8]),  # floor(1.25, 3.75, 6.25, 8.75)
    ("uniform:6", 3, 10.0, 0, None, [0, 0, 1, 1, 2, 2]),  # more samples than frames: repeats
    ("uniform:3", 20, 10.0, 5, 7, [5, 6, 7]),
    ("uniform:1", 1, 10.0, 0, None, [0]),
])
def test_plan_hand_computed(spec, num_frames, fps, start, end, expected):
    indices = Sampling.parse(spec).plan(num_frames, fps, start, end)
    assert indices.dtype == np.int64
    assert indices.tolist() == expected


def test_plan_at_the_video_rate_takes_every_frame_despite_rounding():
    assert Sampling.parse("fps:29.97").plan(1000, 29.97).tolist() == list(range(1000))


@pytest.mark.parametrize("num_frames, start, end",
                         [(10, 5, 4), (10, 0, 10), (10, -1, 3), (10, 12, None), (0, 0, None)])
def test_plan_rejects_empty_or_outside_segments(num_frames, start, end):
    with pytest.raises(ValueError, match="empty or outside"):
        Sampling.parse("all").plan(num_frames, 10.0, start, end)


def test_fps_plan_needs_a_frame_rate():
    with pytest.raises(ValueError, match="frame rate"):
        Sampling.parse("fps:2").plan(10, 0.0)


# -------------------------------------------------------------------------------------------- video files

@pytest.mark.parametrize("name, height, width, codec", [
    ("h264.mp4", HEIGHT, WIDTH, "libx264"),
    ("odd_width.mp4", 34, 46, "libx264"),  # width not a multiple of 16
    ("mpeg4.avi", HEIGHT, WIDTH, "mpeg4"),
])
def test_video_frames_match_what_was_encoded(tmp_path, name, height, width, codec):
    path = write_video(tmp_path / name, gradient_frames(12, height, width), fps=10, codec=codec)
    source = open_source(path)
    assert (source.num_frames, source.fps, source.path) == (12, 10.0, path)
    assert source.backend.startswith("decord-")
    frames = source.read(np.arange(12))
    source.close()
    assert frames.dtype == np.uint8 and frames.shape == (12, height, width, 3)
    assert bar_columns(frames) == expected_columns(range(12), width)
    # decord and PyAV wrap the same FFmpeg decoders, so they agree up to colour-conversion rounding.
    assert np.abs(frames.astype(int) - pyav_frames(path)).mean() < 1.0


@pytest.mark.parametrize("codec", ["libx264", "mpeg4"])
def test_a_width_decord_cannot_read_is_explained(tmp_path, codec):
    path = write_video(tmp_path / "narrow.mp4", gradient_frames(3, HEIGHT, 24), fps=10, codec=codec)
    assert 24 in DECORD_UNREADABLE_WIDTHS
    with pytest.raises(DecodeError) as caught:
        open_source(path).read(np.arange(3))
    message = str(caught.value)
    assert str(path) in message and "from_size == to_size" in message
    assert "known decord 0.6.0 bug: it cannot return frames 24 px wide" in message and "scale=26:-2" in message


def test_a_readable_width_gets_no_decord_bug_note(tmp_path):
    # decord's size check can fail for other reasons too; the bug note is only for the widths it misreads.
    path = write_video(tmp_path / "wide.mp4", gradient_frames(2, HEIGHT, WIDTH), fps=10)
    assert decode._explain_decord_width_bug(path, "Check failed: from_size == to_size") == \
        "Check failed: from_size == to_size"


def test_a_video_keeps_its_own_frame_rate_whatever_fps_is_given(make_video):
    # --fps is the frame rate of frame directories; a video's container says its own.
    assert open_source(make_video("ten.mp4", fps=10), fps=25.0).fps == 10.0


def test_sparse_and_repeated_indices(make_video):
    source = open_source(make_video("clip.mp4", num_frames=20, width=WIDTH))
    frames = source.read(np.array([0, 0, 7, 19, 19]))
    assert bar_columns(frames) == expected_columns([0, 0, 7, 19, 19])


def test_one_frame_video(make_video):
    source = open_source(make_video("one.mp4", num_frames=1, width=WIDTH))
    indices = Sampling.parse("uniform:4").plan(source.num_frames, source.fps)
    frames = source.read(indices)
    assert source.num_frames == 1 and indices.tolist() == [0, 0, 0, 0]
    assert bar_columns(frames) == [0, 0, 0, 0]


def test_non_ascii_and_space_paths(tmp_path):
    folder = tmp_path / "vidéo 動画 dir"
    video = write_video(folder / "clip one é.mp4", gradient_frames(6, HEIGHT, WIDTH), fps=10)
    frame_dir = write_frame_dir(folder / "frames ü 1", gradient_frames(3, HEIGHT, WIDTH),
                                ["a.png", "b.png", "c.png"])
    assert bar_columns(open_source(video).read(np.arange(6))) == expected_columns(range(6))
    assert bar_columns(open_source(frame_dir).read(np.arange(3))) == expected_columns(range(3))


def broken_input(tmp_path: Path, kind: str) -> Path:
    if kind == "missing":
        return tmp_path / "no such.mp4"
    if kind == "zero_bytes":
        (tmp_path / "zero.mp4").write_bytes(b"")
        return tmp_path / "zero.mp4"
    if kind == "text_named_mp4":
        (tmp_path / "notes.mp4").write_text("these are my notes, not a video\n")
        return tmp_path / "notes.mp4"
    if kind == "truncated":
        path = write_video(tmp_path / "cut.mp4", gradient_frames(30, HEIGHT, WIDTH), fps=10)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        return path
    (tmp_path / "empty dir").mkdir()
    (tmp_path / "empty dir" / "readme.txt").write_text("no frames here")
    return tmp_path / "empty dir"


@pytest.mark.parametrize("kind, reason", [
    ("missing", "no such file"),
    ("zero_bytes", "empty"),
    ("text_named_mp4", "cannot open it as a video"),
    ("truncated", "cannot open it as a video"),
    ("empty_dir", "no .jpg/.jpeg/.png frames"),
])
def test_unreadable_inputs_raise_decode_error_naming_the_path(tmp_path, kind, reason):
    path = broken_input(tmp_path, kind)
    with pytest.raises(DecodeError, match=reason) as caught:
        open_source(path)
    assert str(path) in str(caught.value)


def test_corrupt_packet_stops_after_the_good_batches(tmp_path):
    path = corrupt_packet(write_video(tmp_path / "bad.mp4", gradient_frames(40, HEIGHT, WIDTH), fps=10), 25)
    source = open_source(path)
    good = []
    with pytest.raises(DecodeError) as caught:
        for indices, frames in iter_batches(source, np.arange(source.num_frames), batch_size=10):
            good.append(frames)
    # decord's decoder thread runs ahead of the reader, so the error surfaces in the batch holding frame 25
    # or in an earlier one; whatever came before it is correct and complete.
    decoded = sum(len(frames) for frames in good)
    assert decoded in (0, 10, 20)
    assert [column for frames in good for column in bar_columns(frames)] == expected_columns(range(decoded))
    assert str(path) in str(caught.value)
    assert f"stopped at frame {decoded}: {decoded} of 40 planned frames decoded" in str(caught.value)


# ---------------------------------------------------------------------------------------- frame directories

def test_frame_dir_reads_frames_in_file_name_order_at_odd_sizes(tmp_path):
    frames = gradient_frames(5, 33, 47)
    names = ["f_003.JPEG", "f_000.png", "f_004.PNG", "f_001.jpg", "f_002.png"]  # written out of order
    directory = write_frame_dir(tmp_path / "frames", frames[[3, 0, 4, 1, 2]], names)
    (directory / "f_001.txt").write_text("ignored: not an image suffix")
    source = open_source(directory, fps=12.5)
    assert (source.num_frames, source.fps) == (5, 12.5)
    assert source.backend.startswith("images-pillow-")
    got = source.read(np.array([0, 1, 2, 3, 4]))
    assert got.dtype == np.uint8 and got.shape == (5, 33, 47, 3)
    np.testing.assert_array_equal(got[[0, 2, 4]], frames[[0, 2, 4]])  # PNG is lossless
    assert bar_columns(got) == expected_columns(range(5), 47)  # JPEG is not, but its bar is where it was
    assert open_source(directory).fps == 30.0


def test_frame_dir_with_an_odd_sized_frame_names_it(tmp_path):
    directory = write_frame_dir(tmp_path / "frames", gradient_frames(3, 32, 48), ["0.png", "1.png", "2.png"])
    Image.fromarray(gradient_frames(1, 30, 48)[0]).save(directory / "1.png")
    with pytest.raises(DecodeError, match=r"1\.png: frame is 48x30 but 0\.png is 48x32"):
        open_source(directory).read(np.arange(3))


def test_frame_dir_with_a_truncated_jpeg_names_it(tmp_path):
    directory = write_frame_dir(tmp_path / "frames", gradient_frames(2, 32, 48), ["0.jpg", "1.jpg"])
    (directory / "1.jpg").write_bytes((directory / "1.jpg").read_bytes()[:-200])  # pixel data cut short
    with pytest.raises(DecodeError, match=r"1\.jpg: cannot decode the image"):
        open_source(directory).read(np.arange(2))


def test_bad_fps_is_refused(tmp_path):
    directory = write_frame_dir(tmp_path / "frames", gradient_frames(1), ["0.png"])
    with pytest.raises(DecodeError, match="fps must be a number > 0"):
        open_source(directory, fps=0)


# ------------------------------------------------------------------------------------------- iter_batches

def test_iter_batches_bounds_batch_size_and_covers_every_index_in_order(tmp_path):
    frames = gradient_frames(7, 32, 48)
    directory = write_frame_dir(tmp_path / "frames", frames, [f"{i}.png" for i in range(7)])
    plan = Sampling.parse("uniform:10").plan(7, 30.0)  # repeats some frames
    batches = list(iter_batches(open_source(directory), plan, batch_size=3))
    assert [len(indices) for indices, _ in batches] == [3, 3, 3, 1]
    assert np.concatenate([indices for indices, _ in batches]).tolist() == plan.tolist()
    np.testing.assert_array_equal(np.concatenate([f for _, f in batches]), frames[plan])


def test_iter_batches_refuses_bad_arguments(make_video):
    source = open_source(make_video("clip.mp4", width=WIDTH))
    with pytest.raises(ValueError, match="sorted"):
        list(iter_batches(source, np.array([3, 1]), 2))
    with pytest.raises(ValueError, match="batch_size"):
        list(iter_batches(source, np.arange(3), 0))


class ShortReads(DecordSource):
    """A real decord reader that loses the last frame of any batch from frame 4 on, like a faulty decoder."""

    def read(self, indices):
        frames = super().read(indices)
        return frames[:-1] if indices[0] >= 4 else frames


def test_a_reader_added_by_one_register_call_is_used_and_checked(isolated_readers, make_video):
    register_reader("video", Path.is_file, ShortReads)
    source = open_source(make_video("clip.mp4", width=WIDTH))
    assert isinstance(source, ShortReads)
    good = []
    with pytest.raises(DecodeError, match=r"returned 3 frames for the 4 requested from frame 4 "
                                          r"\[stopped at frame 4: 4 of 12"):
        for indices, _ in iter_batches(source, np.arange(12), batch_size=4):
            good.append(indices.tolist())
    assert good == [[0, 1, 2, 3]]


# ----------------------------------------------------------------------------------------------- prefetch

def decode_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name.startswith("vidshift-decode")]


def test_prefetch_yields_in_job_order_and_isolates_failures(tmp_path, make_video):
    clip = make_video("clip.mp4", num_frames=12, width=WIDTH)
    directory = write_frame_dir(tmp_path / "frames", gradient_frames(6, 32, 48),
                                [f"{i}.png" for i in range(6)])
    corrupt = corrupt_packet(make_video("corrupt.mp4", num_frames=40, width=WIDTH), 25)
    (tmp_path / "notes.mp4").write_text("not a video")
    jobs = [
        DecodeJob("clip", clip, Sampling.parse("all")),
        DecodeJob("missing", tmp_path / "missing.mp4", Sampling.parse("all")),
        DecodeJob("frames", directory, Sampling.parse("fps:5"), fps=10.0),
        DecodeJob("text", tmp_path / "notes.mp4", Sampling.parse("all")),
        DecodeJob("past_the_end", clip, Sampling.parse("all"), start_frame=5, end_frame=50),
        DecodeJob("corrupt", corrupt, Sampling.parse("all")),
        DecodeJob("segment", clip, Sampling.parse("uniform:3"), start_frame=3, end_frame=8),
    ]
    seen = {}
    for video in prefetch(jobs, batch_size=4, workers=2, queue_batches=2):
        frames, error = [], video.error
        try:
            for indices, batch in video.batches():
                assert len(indices) <= 4
                frames.append(batch)
        except DecodeError as stopped:
            error = stopped
        seen[video.job.key] = (video, error, np.concatenate(frames) if frames else None)
    assert list(seen) == [job.key for job in jobs]

    for key in ("missing", "text", "past_the_end"):
        video, error, frames = seen[key]
        assert video.error is not None and frames is None
        assert (video.num_frames, video.indices.size) == (0, 0)
        assert str(video.job.path) in str(video.error)
    assert "empty or outside" in str(seen["past_the_end"][0].error)

    video, error, frames = seen["clip"]
    assert error is None and video.indices.tolist() == list(range(12))
    assert (video.num_frames, video.fps) == (12, 10.0) and video.backend.startswith("decord-")
    assert bar_columns(frames) == expected_columns(range(12))

    video, error, frames = seen["frames"]
    assert error is None and video.indices.tolist() == [0, 2, 4]
    np.testing.assert_array_equal(frames, gradient_frames(6, 32, 48)[[0, 2, 4]])

    video, error, frames = seen["corrupt"]  # opened fine, failed while decoding; the prefix is good
    decoded = 0 if frames is None else len(frames)
    assert video.error is None and f"stopped at frame {decoded}:" in str(error)
    assert decoded < 25 and (frames is None or bar_columns(frames) == expected_columns(range(decoded)))

    video, error, frames = seen["segment"]
    assert error is None and bar_columns(frames) == expected_columns([4, 6, 8])  # L = 6: offsets 1, 3, 5


def test_prefetch_unexpected_worker_exception_becomes_decode_error(isolated_readers, make_video):
    class Exploding(DecordSource):
        def read(self, indices):
            raise ZeroDivisionError("boom")

    register_reader("video", Path.is_file, Exploding)
    jobs = [DecodeJob("a", make_video("a.mp4", width=WIDTH), Sampling.parse("all"))]
    for video in prefetch(jobs, batch_size=4):
        with pytest.raises(DecodeError, match=r"a\.mp4.*ZeroDivisionError: boom"):
            list(video.batches())


def test_prefetch_moves_on_when_a_video_is_left_unread(make_video):
    clip = make_video("clip.mp4", num_frames=30, width=WIDTH)
    jobs = [DecodeJob(str(i), clip, Sampling.parse("all")) for i in range(4)]
    videos = []
    for video in prefetch(jobs, batch_size=1, workers=2, queue_batches=1):  # workers block on full queues
        videos.append(video)
    assert [video.job.key for video in videos] == ["0", "1", "2", "3"]
    with pytest.raises(RuntimeError, match="moved on"):
        next(videos[0].batches())


def consume_first_batch_then_break(jobs):
    for video in prefetch(jobs, batch_size=1, workers=2, queue_batches=1):
        next(video.batches())
        break


def consume_first_batch_then_fail(jobs):
    for video in prefetch(jobs, batch_size=1, workers=2, queue_batches=1):
        next(video.batches())
        raise KeyError("the consumer failed")


def consume_first_batch_then_close(jobs):
    videos = prefetch(jobs, batch_size=1, workers=2, queue_batches=1)
    next(next(videos).batches())
    videos.close()


@pytest.mark.parametrize("consume", [consume_first_batch_then_break, consume_first_batch_then_fail,
                                     consume_first_batch_then_close])
def test_prefetch_stops_its_threads_when_the_consumer_stops_early(make_video, consume):
    clip = make_video("clip.mp4", num_frames=30, width=WIDTH)
    jobs = [DecodeJob(str(i), clip, Sampling.parse("all")) for i in range(20)]
    try:
        consume(jobs)
    except KeyError:
        pass
    deadline = time.monotonic() + 5
    while decode_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert decode_threads() == []
