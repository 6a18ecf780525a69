"""Zarr v3 backend for one store part (a zarr group written by exactly one task).

Layout inside the group: ``<stream>/maps`` [T, H, W, C], ``<stream>/pooled`` [T, C] float32,
``<stream>/steps`` [T, 2] int32 and ``table`` (the part's video table as UTF-8 JSON bytes).
``maps`` has one time step per inner chunk (random reads of a few steps per video are the read pattern),
``pooled`` and ``steps`` a few steps per chunk (the writer chooses; their rows are tiny); every chunk is
compressed with zstd and checksummed with crc32c. Inner chunks are packed into shards of ``shard_steps``
steps so a store holds a few large objects instead of one file per frame; the writer buffers whole shards
and writes each one once, so no shard is ever shared by two writers (research/store.md §1.6: two writers in
one shard silently lose data).

A writer with ``threads`` > 1 lets zarr's codec pipeline compress the inner chunks of a shard concurrently:
``codec_pipeline.batch_size`` (default 1: one chunk at a time) becomes the shard's step count, and
``threading.max_workers`` sizes zarr's thread pool (numcodecs' zstd releases the GIL). zarr creates that pool once
per process, at its first use, so the first writer of a process sets its size (``vidshift extract`` is one process;
benchmarks/extract.py measures each count in a fresh one).
"""
from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

SUFFIX = ".zarr"
COMPRESSORS = (ZstdCodec(level=1), Crc32cCodec())  # zstd-1, no shuffle: best measured for post-ReLU fp16


class ZarrPartWriter:
    # pooled and steps: one chunk per shard (None), compressed. zarr pays ~1 ms per chunk whatever its size, so
    # whole shards read 5 TSN steps of a video 1.6x faster than 16-step chunks (decoding zstd costs ~20% on top
    # of that, and compression keeps the zero padding of a part's last, partial chunk small).
    small_chunk_steps = None

    def __init__(self, path: Path, shard_steps: int, threads: int = 1) -> None:
        self.group = zarr.open_group(store=str(path), mode="w", zarr_format=3)
        self.arrays: dict[str, zarr.Array] = {}  # kept: a lookup re-reads the array's zarr.json
        self.shard_steps = shard_steps
        self.codec_threads = ({"codec_pipeline.batch_size": shard_steps, "threading.max_workers": threads}
                              if threads > 1 else {})

    def create(self, stream: str, name: str, row_shape: tuple[int, ...], dtype: str, chunk_steps: int) -> None:
        """An empty array of rows ``row_shape``; ``chunk_steps`` must divide ``shard_steps``."""
        self.arrays[f"{stream}/{name}"] = self.group.create_array(
            f"{stream}/{name}", shape=(0, *row_shape), dtype=dtype, chunks=(chunk_steps, *row_shape),
            shards=(self.shard_steps, *row_shape), compressors=COMPRESSORS, fill_value=0,
            dimension_names=("step", *("y", "x", "channel")[-len(row_shape):]))

    def write(self, stream: str, name: str, start: int, rows: np.ndarray) -> None:
        """Write ``rows`` at ``start``; callers pass shard-aligned whole shards except for the last one."""
        array = self.arrays[f"{stream}/{name}"]
        end = start + len(rows)
        if array.shape[0] < end:
            # Grown by doubling, as each resize rewrites zarr.json (~1 ms); truncate() sets the length at commit.
            array.resize((max(end, 2 * array.shape[0]), *array.shape[1:]))
        with zarr.config.set(self.codec_threads):
            array[start:end] = rows

    def read_back(self, stream: str, name: str, start: int, stop: int) -> np.ndarray:
        return self.arrays[f"{stream}/{name}"][start:stop]

    def truncate(self, stream: str, name: str, length: int) -> None:
        array = self.arrays[f"{stream}/{name}"]
        array.resize((length, *array.shape[1:]))

    def finish(self, table: dict) -> None:
        payload = np.frombuffer(json.dumps(table).encode(), dtype=np.uint8)
        self.group.create_array("table", shape=payload.shape, dtype="uint8", chunks=payload.shape or (1,),
                                compressors=COMPRESSORS)[...] = payload
        with _quiet_consolidation():  # all of the part's metadata in its root zarr.json: one request to open it
            zarr.consolidate_metadata(self.group.store)

    def close(self) -> None:
        pass  # zarr keeps no file open between writes


class ZarrPartReader:
    def __init__(self, source) -> None:
        """``source``: a part directory's path, or a zarr store (an ``FsspecStore`` of a remote or packed part)."""
        with _quiet_consolidation():  # parts written before consolidation open without it
            self.group = zarr.open_group(store=source, mode="r", zarr_format=3, use_consolidated=None)
        self.arrays: dict[str, zarr.Array] = {}  # opened once: a lookup costs as much as reading a pooled row

    def table(self) -> dict:
        return json.loads(self.group["table"][...].tobytes().decode())

    def has(self, stream: str, name: str) -> bool:
        key = f"{stream}/{name}"
        return key in self.arrays or key in self.group

    def read(self, stream: str, name: str, start: int, stop: int) -> np.ndarray:
        # Slices only: oindex on sharded arrays is 3-7x slower in zarr <= 3.2 (research/store.md §0.3).
        return self._array(stream, name)[start:stop]

    def row_nbytes(self, stream: str, name: str) -> int:
        array = self._array(stream, name)
        return array.dtype.itemsize * int(np.prod(array.shape[1:]))

    def _array(self, stream: str, name: str) -> zarr.Array:
        key = f"{stream}/{name}"
        if key not in self.arrays:
            self.arrays[key] = self.group[key]
        return self.arrays[key]

    def close(self) -> None:
        pass


@contextlib.contextmanager
def _quiet_consolidation() -> Iterator[None]:
    """zarr warns that consolidated metadata is not yet in the v3 spec (zarr-specs#309). Readers that ignore
    it read the arrays' own zarr.json files, which are still written, so nothing depends on it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
        yield
