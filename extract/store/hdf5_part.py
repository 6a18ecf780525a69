"""HDF5 backend for one store part (one ``.h5`` file written by exactly one process).

Same layout as the zarr backend: datasets ``<stream>/maps`` [T, H, W, C], ``<stream>/pooled`` [T, C],
``<stream>/steps`` [T, 2] and ``table`` (UTF-8 JSON bytes). One ``maps`` step per chunk (``pooled`` and
``steps``: a few), zstd level 1 for ``maps`` through hdf5plugin (readers need hdf5plugin too; importing this
module registers it) and a fletcher32 checksum per chunk, which makes a flipped byte an I/O
error instead of silently wrong numbers; the table is chunked and checksummed the same way.

The writer hands libhdf5 a Python file (``_DeferredErrorFile``) instead of a path. libhdf5 copes badly with a
write that fails (a full disk): it buffers chunks and retries its flush when the file is closed and again at
interpreter exit, and h5py segfaulted there. So a failed write is recorded, libhdf5 is told it succeeded, and
the recorded error is raised by us, at the next write or when the part is finished; the part is then
discarded, so what libhdf5 believed it wrote never matters.

h5py holds one lock per process around every libhdf5 call, compression included (research/store.md §2), so a
writer with ``threads`` > 1 compresses the chunks of a write itself, in a pool of threads outside that lock (numcodecs'
zstd releases the GIL), and hands libhdf5 the finished chunks with direct chunk writes
(``DatasetID.write_direct_chunk``). A finished chunk is what libhdf5's own pipeline makes of it: the zstd frame
(content size in its header, as the HDF5 zstd filter's decoder needs) followed by HDF5's fletcher32 checksum of it
(``fletcher32``, H5checksum.c's algorithm), so the existing reader reads it and checks it as before
(tests/test_store_writer_threads.py compares both paths).
"""
from __future__ import annotations

import io
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import hdf5plugin
import numcodecs
import numpy as np

ZSTD_LEVEL = 1

SUFFIX = ".h5"


class _DeferredErrorFile(io.FileIO):
    """A file whose first write error is kept in ``error`` instead of being raised to libhdf5 (see above)."""

    error: OSError | None = None
    _write_to_disk = io.FileIO.write  # where the part's bytes reach the OS (tests inject disk errors here)

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        written = 0
        while self.error is None and written < len(view):
            try:
                written += self._write_to_disk(view[written:])  # a regular file may take fewer bytes than offered
            except OSError as error:
                self.error = error
        return len(view)

    def truncate(self, size: int | None = None) -> int:
        if self.error is None:
            try:
                return super().truncate(size)
            except OSError as error:  # growing a file past a size limit fails here, not in write
                self.error = error
        return size or 0

    def raise_error(self) -> None:
        if self.error is not None:
            raise OSError(self.error.errno, self.error.strerror, str(self.name))


def fletcher32(data: bytes) -> bytes:
    """HDF5's fletcher32 checksum of ``data`` as its filter appends it (H5checksum.c), stored little-endian.

    H5checksum.c sums big-endian 16-bit words (an odd last byte is the high byte of one more word): sum1 += word,
    then sum2 += sum1, folding each sum (x & 0xffff) + (x >> 16) every 360 words and twice at the end. A fold keeps
    the value modulo 65535 (65536 = 1) and never turns a positive value into 0, so each result is the plain sum's
    residue modulo 65535 written in 1..65535, or 0 for a sum of zero: one cumulative sum in numpy (0.06 ms
    for a 7x7x2048 float16 chunk; a Python loop over the blocks cost as much as compressing it, with the GIL held)."""
    words = np.frombuffer(data, dtype=">u2", count=len(data) // 2).astype(np.int64)
    if len(data) % 2:
        words = np.append(words, data[-1] << 8)
    if not words.any():
        return bytes(4)  # both sums are zero
    running = np.cumsum(words)  # sum1 after each word; sum2 is their total (taken modulo 65535 so it cannot overflow)
    sum1, sum2 = int(running[-1]), int((running % 65535).sum())

    def residue(total: int) -> int:  # a positive sum's fold result: its residue written in 1..65535
        return (total - 1) % 65535 + 1

    return ((residue(sum2) << 16) | residue(sum1)).to_bytes(4, "little")


class Hdf5PartWriter:
    # pooled and steps: 16-step chunks, checksummed but not compressed. HDF5's per-chunk cost is small, so the
    # decoding is what a TSN read of 5 steps pays: 1.0 ms per video with zstd, 0.35 ms without (0.55 ms with
    # 64-step chunks), and pooled float32 rows compress only ~1.1x (the demo store's).
    small_chunk_steps = 16

    def __init__(self, path: Path, shard_steps: int, threads: int = 1) -> None:
        del shard_steps  # HDF5 packs chunks into one file by itself; no shard notion
        self.sink = _DeferredErrorFile(path, "w+")
        # libver v110: checksummed metadata (superblock, object headers, chunk indexes), so a damaged header is
        # an error instead of being parsed as garbage; readers need HDF5 >= 1.10 (2017), as h5py >= 2.10 ships.
        self.file = h5py.File(self.sink, "w", libver="v110")
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="vidshift-hdf5") if threads > 1 else None
        self.zstd = numcodecs.Zstd(level=ZSTD_LEVEL)

    def create(self, stream: str, name: str, row_shape: tuple[int, ...], dtype: str, chunk_steps: int) -> None:
        compression = hdf5plugin.Zstd(clevel=ZSTD_LEVEL) if name == "maps" else {}   # see small_chunk_steps
        self.file.create_dataset(
            f"{stream}/{name}", shape=(0, *row_shape), maxshape=(None, *row_shape), dtype=dtype,
            chunks=(chunk_steps, *row_shape), fletcher32=True, **compression)

    def write(self, stream: str, name: str, start: int, rows: np.ndarray) -> None:
        """Write ``rows`` at ``start``, which is chunk-aligned (the part writer flushes whole chunks)."""
        dataset = self.file[f"{stream}/{name}"]
        end = start + len(rows)
        if dataset.shape[0] < end:
            dataset.resize(end, axis=0)
        if self.pool is None or name != "maps":
            # libhdf5 compresses (maps), in this thread, under h5py's lock; pooled and steps are not compressed
            dataset[start:end] = rows
        else:
            chunk_steps = dataset.chunks[0]
            firsts = range(0, len(rows), chunk_steps)
            for first, chunk in zip(firsts, self.pool.map(lambda f: self._encode(rows, f, chunk_steps), firsts)):
                dataset.id.write_direct_chunk((start + first, *(0,) * (rows.ndim - 1)), chunk)
        self.sink.raise_error()  # stop at the first failed write, not after the whole part

    def _encode(self, rows: np.ndarray, first: int, chunk_steps: int) -> bytes:
        """One chunk as libhdf5 would store it; a short last chunk is padded with the fill value, 0."""
        chunk = rows[first:first + chunk_steps]
        if len(chunk) < chunk_steps:
            chunk = np.concatenate([chunk, np.zeros((chunk_steps - len(chunk), *chunk.shape[1:]), chunk.dtype)])
        compressed = self.zstd.encode(np.ascontiguousarray(chunk))  # bytes
        return compressed + fletcher32(compressed)

    def read_back(self, stream: str, name: str, start: int, stop: int) -> np.ndarray:
        return self.file[f"{stream}/{name}"][start:stop]

    def truncate(self, stream: str, name: str, length: int) -> None:
        self.file[f"{stream}/{name}"].resize(length, axis=0)

    def finish(self, table: dict) -> None:
        payload = np.frombuffer(json.dumps(table).encode(), dtype=np.uint8)
        self.file.create_dataset("table", data=payload, chunks=payload.shape, fletcher32=True)
        self.close()
        self.sink.raise_error()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()
        self.file.close()  # a no-op when finish() already closed it
        self.sink.close()


class Hdf5PartReader:
    def __init__(self, source) -> None:
        """``source``: the part's path, or a binary file (fsspec's, for a remote or packed part)."""
        # Read-only parts need no lock; locking fails on some network filesystems (research/store.md §6.2).
        self.source = source
        self.file = h5py.File(source, "r", locking=False)
        self.datasets: dict[str, h5py.Dataset] = {}  # opened once: a path lookup per read costs ~20 us

    def table(self) -> dict:
        return json.loads(self.file["table"][()].tobytes().decode())

    def has(self, stream: str, name: str) -> bool:
        key = f"{stream}/{name}"
        return key in self.datasets or key in self.file  # a lookup in the file costs ~0.1 ms per read

    def read(self, stream: str, name: str, start: int, stop: int) -> np.ndarray:
        # Slices only: list indexing of a chunked dataset is ~100x slower (research/store.md §0.3).
        return self._dataset(stream, name)[start:stop]

    def row_nbytes(self, stream: str, name: str) -> int:
        dataset = self._dataset(stream, name)
        return dataset.dtype.itemsize * int(np.prod(dataset.shape[1:]))

    def _dataset(self, stream: str, name: str) -> h5py.Dataset:
        key = f"{stream}/{name}"
        if key not in self.datasets:
            self.datasets[key] = self.file[key]
        return self.datasets[key]

    def close(self) -> None:
        self.file.close()
        if hasattr(self.source, "close"):
            self.source.close()  # h5py does not close a file object it was given
