"""torchcodec as a second decoder: the same frames as decord on real tiny videos, the same store, clear errors.
Skipped, with the reason, only where torchcodec or its FFmpeg libraries cannot be loaded (`make install` sets both
up on Debian)."""
from dataclasses import replace

import numpy as np
import pytest

from conftest import gradient_frames, write_video
from extract import torchcodec_reader
from extract.decode import DecodeError, open_source
from extract.run import ExtractConfig, run_extract
from extract.store import FeatureStore
from test_decode import corrupt_packet
from test_extract_run import TINY, row, write_manifest

PROBLEM = torchcodec_reader.problem()
needs_torchcodec = pytest.mark.skipif(PROBLEM is not None, reason=f"torchcodec cannot run here: {PROBLEM}")

VIDEOS = [("h264.mp4", "libx264", 32, 64), ("mpeg4.avi", "mpeg4", 32, 64), ("odd.mp4", "libx264", 66, 94),
          ("qvga.mp4", "libx264", 240, 320)]


@needs_torchcodec
@pytest.mark.parametrize("name, codec, height, width", VIDEOS)
def test_torchcodec_returns_the_bytes_decord_returns(tmp_path, name, codec, height, width):
    path = write_video(tmp_path / name, gradient_frames(12, height, width, seed=3), codec=codec)
    decord_source, torchcodec_source = open_source(path), open_source(path, reader="torchcodec")
    assert torchcodec_source.backend == torchcodec_reader.version() and decord_source.backend.startswith("decord-")
    assert (torchcodec_source.num_frames, torchcodec_source.fps) == (decord_source.num_frames, decord_source.fps)
    for indices in (np.arange(12), np.array([0, 5, 6, 11]), np.array([7])):  # all, seeks forward, one frame
        np.testing.assert_array_equal(torchcodec_source.read(indices), decord_source.read(indices))


@needs_torchcodec
def test_torchcodec_errors_name_the_file(tmp_path):
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "text.mp4").write_text("not a video\n")
    with pytest.raises(DecodeError, match="empty.mp4: the file is empty"):
        open_source(tmp_path / "empty.mp4", reader="torchcodec")
    with pytest.raises(DecodeError, match="text.mp4: FFmpeg cannot open it"):
        open_source(tmp_path / "text.mp4", reader="torchcodec")
    corrupt = corrupt_packet(write_video(tmp_path / "corrupt.mp4", gradient_frames(40, seed=2)), 25)
    source = open_source(corrupt, reader="torchcodec")
    with pytest.raises(DecodeError, match="corrupt.mp4: decoding frames"):
        source.read(np.arange(40))


@needs_torchcodec
def test_extraction_with_torchcodec_stores_what_decord_stores_and_records_it(tmp_path, one_thread):
    root = tmp_path / "data"
    for i in range(2):
        write_video(root / f"v{i}.mp4", gradient_frames(6, seed=i))
    manifest = write_manifest(root, [row("v0.mp4"), row("v1.mp4")])
    config = ExtractConfig(manifest=manifest, root=root, out=tmp_path / "decord", **TINY)
    run_extract(config, show_progress=False)
    run_extract(replace(config, out=tmp_path / "torchcodec", decoder="torchcodec"), show_progress=False)
    decord_store, torchcodec_store = FeatureStore.open(tmp_path / "decord"), FeatureStore.open(tmp_path / "torchcodec")
    for video_id in ("v0", "v1"):
        np.testing.assert_array_equal(torchcodec_store.read(video_id, "maps"), decord_store.read(video_id, "maps"))
    assert torchcodec_store.provenance()["software"]["decoder"] == torchcodec_reader.version()
    (table,) = torchcodec_store.part_tables().values()
    assert {video["decoder"] for video in table["videos"]} == {torchcodec_reader.version()}
    # the decoder is recorded, not compared: decord resumes a store torchcodec began
    write_video(root / "v2.mp4", gradient_frames(6, seed=2))
    manifest = write_manifest(root, [row("v0.mp4"), row("v1.mp4"), row("v2.mp4")])
    resumed = run_extract(replace(config, manifest=manifest, out=tmp_path / "torchcodec"), show_progress=False)
    assert (resumed.skipped, resumed.extracted) == (2, 1)


def test_a_frame_directory_still_opens_with_pil_when_torchcodec_is_asked_for(tmp_path):
    from PIL import Image
    (tmp_path / "frames").mkdir()
    Image.fromarray(gradient_frames(1)[0]).save(tmp_path / "frames" / "0.png")
    assert open_source(tmp_path / "frames", reader="torchcodec").backend.startswith("images-pillow-")
