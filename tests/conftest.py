"""Shared fixtures: tiny real videos written with PyAV, tiny frame directories."""
from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
import torch


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


@pytest.fixture(autouse=True)
def feature_cache_of_the_session(tmp_path_factory, monkeypatch):
    """Disk copies of streamed features go to a folder of the test session, never to the user's cache."""
    monkeypatch.setenv("VIDSHIFT_FEATURE_CACHE", str(tmp_path_factory.getbasetemp() / "feature-cache"))


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread; two contend badly on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def make_video(tmp_path):
    """make_video(name, num_frames=12, height=32, width=64, fps=10, codec="libx264") -> Path.

    decord 0.6.0 misreads frames 16, 24, 48 or 72 px wide (row padding), so the default width avoids them.
    """

    def _make(name: str, num_frames: int = 12, height: int = 32, width: int = 64, fps: int = 10,
              codec: str = "libx264", seed: int = 0) -> Path:
        return write_video(tmp_path / name, gradient_frames(num_frames, height, width, seed), fps, codec)

    return _make


def make_feature_store(root: Path, map_shape=(2, 2, 8), classes=("a", "b", "c"), per_class=8, steps=6,
                       target_shift=0.0, backend="zarr", seed=0, noise=0.3, flow_channels=0) -> tuple[Path, Path]:
    """A real feature store + manifest with learnable features, written through the store API (no backbone).

    Domains ``src`` and ``tgt``, splits train/val/test, ``per_class`` videos per class, domain and split.
    Each class has a random prototype map; a video is its prototype plus noise, with a per-step ramp so the
    time order carries signal. The target adds ``target_shift`` to every value (a covariate shift).
    ``flow_channels`` > 0 adds a ``flow`` stream with that many channels and one step fewer per video (as
    optical flow between consecutive frames), its own prototypes, drawn after the RGB stream's.
    Returns (store_dir, manifest_path).
    """
    import csv

    from extract.store import FeatureStore

    rng = np.random.default_rng(seed)
    prototypes = rng.normal(size=(len(classes), *map_shape)).astype(np.float32)
    provenance = {"features": {"name": "synthetic", "map_shape": list(map_shape), "dtype": "float16"},
                  "software": {}}
    store = FeatureStore.create_or_open(root / "store", backend, "rgb", provenance)
    part = store.new_part("s0of1", "rgb", "float16", map_shape[-1], {})
    rows = []
    for domain, shift in (("src", 0.0), ("tgt", target_shift)):
        for split in ("train", "val", "test"):
            for c, label in enumerate(classes):
                for i in range(per_class):
                    video_id = f"{domain}/{split}/{label}/{i}"
                    ramp = np.linspace(-0.5, 0.5, steps, dtype=np.float32)[:, None, None, None]
                    maps = prototypes[c] * (1 + ramp) + noise * rng.normal(size=(steps, *map_shape)) + shift
                    video = part.video(video_id, {"label": label, "domain": domain, "split": split})
                    video.append(np.stack([np.arange(steps)] * 2, axis=1), np.maximum(maps, 0).astype(np.float32))
                    video.finish()
                    rows.append({"path": f"{video_id}.mp4", "label": label, "domain": domain, "split": split,
                                 "video_id": video_id})
    part.commit()
    if flow_channels:
        _add_flow_stream(root / "store", backend, rows, classes, (*map_shape[:-1], flow_channels), steps - 1,
                         target_shift, noise, np.random.default_rng(seed + 1))
    manifest = root / "manifest.csv"
    with open(manifest, "w", newline="") as handle:
        writer = csv.DictWriter(handle, ["path", "label", "domain", "split", "video_id"])
        writer.writeheader()
        writer.writerows(rows)
    return root / "store", manifest


def _add_flow_stream(store_dir: Path, backend: str, rows: list[dict], classes, map_shape, steps: int,
                     target_shift: float, noise: float, rng) -> None:
    from extract.store import FeatureStore

    prototypes = rng.normal(size=(len(classes), *map_shape)).astype(np.float32)
    provenance = {"features": {"name": "synthetic-flow", "map_shape": list(map_shape), "dtype": "float16"},
                  "software": {}}
    store = FeatureStore.create_or_open(store_dir, backend, "flow", provenance)
    part = store.new_part("s0of1", "flow", "float16", map_shape[-1], {})
    for row in rows:
        shift = target_shift if row["domain"] == "tgt" else 0.0
        maps = prototypes[classes.index(row["label"])] + noise * rng.normal(size=(steps, *map_shape)) + shift
        video = part.video(row["video_id"], {k: row[k] for k in ("label", "domain", "split")})
        video.append(np.stack([np.arange(steps)] * 2, axis=1), np.maximum(maps, 0).astype(np.float32))
        video.finish()
    part.commit()


def rows_by_id(path: Path) -> dict:
    """A manifest's rows as {video_id: VideoEntry} (the manifest builder tests)."""
    from extract.manifest import read_manifest

    return {entry.video_id: entry for entry in read_manifest(path)}
