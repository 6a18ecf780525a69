"""Shared fixtures: tiny real videos written with PyAV, tiny frame directories."""
from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest


def write_video(path: Path, frames: np.ndarray, fps: int = 10, codec: str = "libx264") -> Path:
    """Encode uint8 frames [T, H, W, 3] into a real video file (H and W must be even for yuv420p)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def gradient_frames(num_frames: int, height: int = 32, width: int = 64, seed: int = 0) -> np.ndarray:
    """Frames whose content changes with time (a moving bright bar over noise), so frames are distinguishable."""
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 60, size=(num_frames, height, width, 3), dtype=np.uint8)
    for t in range(num_frames):
        column = (t * 3) % width
        frames[t, :, column : column + 4] = 255
    return frames


@pytest.fixture
def make_video(tmp_path):
    """make_video(name, num_frames=12, height=32, width=64, fps=10, codec="libx264") -> Path.

    decord 0.6.0 misreads frames 16, 24, 48 or 72 px wide (row padding), so the default width avoids them.
    """

    def _make(name: str, num_frames: int = 12, height: int = 32, width: int = 64, fps: int = 10,
              codec: str = "libx264", seed: int = 0) -> Path:
        return write_video(tmp_path / name, gradient_frames(num_frames, height, width, seed), fps, codec)

    return _make
