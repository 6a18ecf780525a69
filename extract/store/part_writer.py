"""Writing one store part: videos appended step batch by step batch, committed by one atomic rename.

A part is written under a temporary name and renamed only when complete, so a killed task leaves nothing
that looks complete. Just before the rename, the sha256 of every file of the part goes into a sidecar
``<part>.sha256.json``, so ``verify`` catches a changed byte anywhere, metadata and unused space included.
Values are checked finite, and within the stored dtype's range, *before* the down-cast: a backbone whose
activations overflow float16 (random-init ResNet-101 does) is an error naming the video, never silently
stored inf. The pooled vector is the float32 spatial mean of the un-rounded maps.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..heap import trim_heap
from ..manifest import file_sha256

ARRAY_NAMES = ("maps", "pooled", "steps")
DIGESTS_SUFFIX = ".sha256.json"  # parts/<part><suffix>: {file inside the part: sha256}, written at commit


class FeatureValueError(ValueError):
    """A video's features are not storable (NaN/inf, or beyond the dtype's range)."""


class VideoHasher:
    """Content hash of one video: sha256 over the stored bytes of each array, combined in a fixed order.

    Per-array digests let a verifier re-read each array in blocks of any size and reach the same hash.
    """

    def __init__(self) -> None:
        self.digests = {name: hashlib.sha256() for name in ARRAY_NAMES}

    def update(self, name: str, rows: np.ndarray) -> None:
        self.digests[name].update(np.ascontiguousarray(rows).tobytes())

    def hexdigest(self) -> str:
        return hashlib.sha256("".join(self.digests[name].hexdigest() for name in ARRAY_NAMES).encode()).hexdigest()


class PartWriter:
    """Appends videos to one part. Use ``video()`` per video, then ``commit()`` (or ``abort()``).

    Rows are buffered up to ``shard_steps`` and flushed as whole, aligned shards; a video that fails part-way
    is rolled back by moving the write cursor back to its first row, so its rows are overwritten by the next.
    Chunks of ``pooled`` and ``steps`` divide the shard, so every flush covers whole chunks and, but for a
    rollback into an already flushed shard, each compressed chunk is written once.
    """

    def __init__(self, backend_writer, tmp_path: Path, final_path: Path, stream: str,
                 map_shape: tuple[int, int, int] | None, channels: int, dtype: str, shard_steps: int,
                 part_info: dict) -> None:
        self.backend, self.tmp_path, self.final_path = backend_writer, tmp_path, final_path
        self.stream, self.map_shape, self.dtype, self.shard_steps = stream, map_shape, np.dtype(dtype), shard_steps
        self.names = ARRAY_NAMES if map_shape is not None else ("pooled", "steps")
        row_shapes = {"maps": map_shape, "pooled": (channels,), "steps": (2,)}
        dtypes = {"maps": self.dtype.name, "pooled": "float32", "steps": "int32"}
        # Maps keep one step per chunk (the read pattern is a few random steps per video); pooled and steps rows
        # are a few KB, so their chunks hold as many steps as the backend reads best (small_chunk_steps), a
        # divisor of the shard so that flushes stay aligned.
        small_chunk = math.gcd(backend_writer.small_chunk_steps or shard_steps, shard_steps)
        chunk_steps = {"maps": 1, "pooled": small_chunk, "steps": small_chunk}
        for name in self.names:
            self.backend.create(stream, name, row_shapes[name], dtypes[name], chunk_steps[name])
        self.flushed = 0                                  # rows [0, flushed) are in the backend
        self.pending = {name: [] for name in self.names}  # rows [flushed, cursor) wait here
        self.cursor = 0
        self.table = {"stream": stream, **part_info, "videos": [], "failures": []}

    def video(self, video_id: str, attrs: dict) -> "VideoWriter":
        return VideoWriter(self, video_id, attrs)

    def record_failure(self, video_id: str, path: str, stage: str, reason: str) -> None:
        self.table["failures"].append({"video_id": video_id, "path": path, "stage": stage, "reason": reason,
                                       "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})

    def _append(self, rows: dict[str, np.ndarray]) -> None:
        for name in self.names:
            self.pending[name].append(rows[name])
        self.cursor += len(rows["steps"])
        while self.cursor - self.flushed >= self.shard_steps:
            self._flush(self.shard_steps)

    def _flush(self, count: int) -> None:
        for name in self.names:
            rows = np.concatenate(self.pending[name])
            self.backend.write(self.stream, name, self.flushed, rows[:count])
            self.pending[name] = [rows[count:].copy()]  # a copy: a view would keep the whole shard's rows alive
        self.flushed += count
        # zarr encodes and assembles a shard in its own threads, whose heaps the network's allocations never reuse:
        # without a trim each shard of maps leaves ~30 MB resident (extract/heap.py). A pooled-only part (an import)
        # flushes 0.5 MB shards, where trimming each one cost more in page faults than it freed (2x the import time).
        if self.map_shape is not None:
            trim_heap()

    def _rewind(self, offset: int) -> None:
        """Forget rows from ``offset`` on (a failed video). Re-buffers the partial shard before it if needed."""
        if offset >= self.flushed:
            for name in self.names:
                rows = self.pending[name]
                self.pending[name] = [np.concatenate(rows)[: offset - self.flushed]] if rows else []
        else:
            # The failed video began inside an already flushed shard: re-buffer that shard's good rows.
            shard_start = offset - offset % self.shard_steps
            for name in self.names:
                self.pending[name] = [self.backend.read_back(self.stream, name, shard_start, offset)]
            self.flushed = shard_start
        self.cursor = offset

    def commit(self) -> Path:
        if self.cursor > self.flushed:
            self._flush(self.cursor - self.flushed)
        for name in self.names:
            self.backend.truncate(self.stream, name, self.cursor)
        self.backend.finish(self.table)
        write_digests(digests_path(self.final_path), file_digests(self.tmp_path))
        os.replace(self.tmp_path, self.final_path)  # the commit: atomic on a POSIX filesystem
        return self.final_path

    def abort(self) -> None:
        """Drop the part. Never raises: it runs while another error (often a full disk) is on its way up."""
        with contextlib.suppress(OSError):
            self.backend.close()  # an HDF5 file is closed before it is unlinked, so no handle outlives the part
        self.remove(self.tmp_path)

    @staticmethod
    def remove(path: Path) -> None:
        """Delete an uncommitted part (a zarr directory or an HDF5 file)."""
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):  # e.g. a read-only directory: the next lock() retries
                path.unlink(missing_ok=True)


def digests_path(part: Path) -> Path:
    return part.with_name(part.name + DIGESTS_SUFFIX)


def file_digests(part: Path) -> dict[str, str]:
    """sha256 of each file of a part, by its path inside the part ("." for an HDF5 part's single file)."""
    files = sorted(f for f in part.rglob("*") if f.is_file()) if part.is_dir() else [part]
    return {(f.relative_to(part).as_posix() if part.is_dir() else "."): file_sha256(f) for f in files}


def write_digests(path: Path, digests: dict[str, str]) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    try:
        tmp.write_text(json.dumps(digests, indent=1, sort_keys=True))
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)  # only left when writing failed (e.g. the disk is full)


class VideoWriter:
    """Streams one video's steps into its part; ``finish()`` adds it to the part's video table."""

    def __init__(self, part: PartWriter, video_id: str, attrs: dict) -> None:
        self.part, self.video_id, self.attrs = part, video_id, attrs
        self.offset, self.n_steps, self.hasher = part.cursor, 0, VideoHasher()

    def append(self, steps: np.ndarray, maps: np.ndarray | None = None, pooled: np.ndarray | None = None) -> None:
        """Add steps: float32 ``maps`` [n, h, w, C] (pooled is derived) or, for pooled-only streams, ``pooled``."""
        if maps is not None:
            maps = np.asarray(maps, dtype=np.float32)
            self._check_storable(maps)
            pooled = maps.mean(axis=(1, 2), dtype=np.float32)
        pooled = np.asarray(pooled, dtype=np.float32)
        self._check_finite(pooled)
        rows = {"pooled": pooled, "steps": np.asarray(steps, dtype=np.int32)}
        if rows["steps"].shape != (len(pooled), 2):
            raise ValueError(f"{self.video_id}: steps must be [{len(pooled)}, 2] to match the features, "
                             f"got {list(rows['steps'].shape)}")
        if self.part.map_shape is not None:
            if maps is None:
                raise ValueError(f"{self.video_id}: this stream stores maps; pass maps, not only pooled vectors")
            rows["maps"] = _cast(maps, self.part.dtype)
        for name, values in rows.items():
            self.hasher.update(name, values)
        self.part._append(rows)
        self.n_steps += len(rows["steps"])

    def append_stored(self, rows: dict[str, np.ndarray]) -> None:
        """Add steps exactly as a store holds them (maps in the stored dtype, pooled float32, steps int32), so a
        copy into another store (merge, subset) keeps the video's content hash."""
        for name in self.part.names:
            if name == "maps" and rows[name].dtype != self.part.dtype:
                raise ValueError(f"{self.video_id}: maps are {rows[name].dtype}, this part stores {self.part.dtype}")
            self.hasher.update(name, rows[name])
        self.part._append({name: rows[name] for name in self.part.names})
        self.n_steps += len(rows["steps"])

    def finish(self, **extra) -> str:
        """Add the video to the part's table; return its content hash."""
        if self.n_steps == 0:
            raise FeatureValueError(f"{self.video_id}: no time steps were decoded")
        digest = self.hasher.hexdigest()
        self.part.table["videos"].append({
            "video_id": self.video_id, "offset": self.offset, "n_steps": self.n_steps,
            "sha256": digest, "attrs": self.attrs, **extra})
        return digest

    def discard(self) -> None:
        self.part._rewind(self.offset)

    def _check_finite(self, values: np.ndarray) -> None:
        if not np.isfinite(values).all():
            raise FeatureValueError(f"{self.video_id}: the backbone produced NaN or inf values; nothing was "
                                    f"stored for this video (check the weights and the input frames)")

    def _check_storable(self, maps: np.ndarray) -> None:
        self._check_finite(maps)
        if self.part.dtype.kind == "f":
            limit = float(np.finfo(self.part.dtype).max)
            peak = float(np.abs(maps).max(initial=0.0))
            if peak > limit:
                raise FeatureValueError(
                    f"{self.video_id}: activation {peak:.4g} exceeds {self.part.dtype.name}'s range "
                    f"({limit:.4g}) and would be stored as inf; re-run with --dtype float32 (random-init "
                    f"deep ResNets do this; pretrained weights normally fit float16)")


class PartSequence:
    """Rotates parts during a run: each holds at most ``videos_per_part`` videos and is committed when full.

    On leaving the ``with`` block normally the open part is committed; on an exception (Ctrl-C's
    KeyboardInterrupt included) it is aborted. A process killed outright (SIGKILL, or SIGTERM, whose default
    action exits without unwinding) leaves its part under the temporary name, which never looks complete and
    is deleted by the next ``FeatureStore.lock`` of its tag. Either way only whole parts ever become visible.
    """

    def __init__(self, make_part: Callable[[], PartWriter], videos_per_part: int) -> None:
        self.make_part, self.videos_per_part = make_part, videos_per_part
        self.part: PartWriter | None = None
        self.in_part = 0

    def current(self) -> PartWriter:
        self.part = self.part or self.make_part()
        return self.part

    def video_done(self) -> None:
        """Count one video (stored or failed) into the current part; commit it when full."""
        self.in_part += 1
        if self.in_part >= self.videos_per_part:
            self.current().commit()
            self.part, self.in_part = None, 0

    def __enter__(self) -> "PartSequence":
        return self

    def __exit__(self, error_type, error, traceback) -> None:
        if self.part is None:
            return
        if error_type is not None:
            self.part.abort()
            return
        try:
            self.part.commit()
        except BaseException:  # e.g. the disk filled while the last part was being closed
            self.part.abort()
            raise


def _cast(maps: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """float32 maps in the stored dtype, already checked to fit it.

    torch's float16 conversion rounds to nearest-even like numpy's, bit for bit (tests/test_store.py), and is
    about 10x faster: ~0.1 ms instead of ~1 ms per 7x7x2048 step, much of a store write's time.
    """
    if dtype == np.float16:
        return torch.from_numpy(np.ascontiguousarray(maps)).half().numpy()
    return maps.astype(dtype)  # a copy: the caller may reuse its buffer before the rows are flushed
