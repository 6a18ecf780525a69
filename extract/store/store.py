"""The feature store: a directory of immutable parts plus provenance and a rebuildable index (DESIGN §4).

```
STORE/
  store.json            format, backend, per-stream provenance; written once, when the store is created
  parts/part-*.zarr|h5  committed parts (one writer each); parts/.tmp-* are parts being written
  index.json            video_id -> part, offset, n_steps, hash, attributes; rebuilt from the parts when stale
  .lock-<tag>           held by the extraction run writing parts tagged <tag>
```
The same API serves both backends; nothing outside ``extract/store`` knows which one a store uses.
"""
from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np

from . import hdf5_part, zarr_part
from .part_writer import PartWriter, VideoHasher

FORMAT = "vidshift-feature-store"
FORMAT_VERSION = 1
BACKENDS = {"zarr": (zarr_part.SUFFIX, zarr_part.ZarrPartWriter, zarr_part.ZarrPartReader),
            "hdf5": (hdf5_part.SUFFIX, hdf5_part.Hdf5PartWriter, hdf5_part.Hdf5PartReader)}
DEFAULT_STREAM = "rgb"
VERIFY_BLOCK_STEPS = 256  # bounded memory when re-reading long videos


class StoreError(RuntimeError):
    """A store is missing, malformed, locked or incompatible; the message says what to do."""


@dataclass(frozen=True)
class VideoRecord:
    video_id: str
    stream: str
    part: str
    offset: int
    n_steps: int
    sha256: str
    attrs: dict


def _write_json_atomic(path: Path, payload: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=1, sort_keys=True))
    os.replace(tmp, path)


class FeatureStore:
    """Open with ``FeatureStore.open(path)`` (read) or ``FeatureStore.create_or_open(...)`` (extraction)."""

    def __init__(self, root: Path, meta: dict) -> None:
        self.root, self.meta = Path(root), meta
        self.backend = meta["backend"]
        self.suffix, self._writer_cls, self._reader_cls = BACKENDS[self.backend]
        self._index: dict | None = None
        self._readers: dict[str, object] = {}

    # ---- opening -------------------------------------------------------------------------------------
    @classmethod
    def open(cls, root: Path) -> "FeatureStore":
        meta_path = Path(root) / "store.json"
        if not meta_path.is_file():
            raise StoreError(f"{root}: not a vidshift feature store (no store.json); create one with "
                             f"`vidshift extract` or `vidshift store import`")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
            raise StoreError(f"{meta_path}: format {meta.get('format')!r} version {meta.get('format_version')!r}"
                             f" is not {FORMAT!r} version {FORMAT_VERSION}; upgrade vidshift or re-extract")
        return cls(Path(root), meta)

    @classmethod
    def create_or_open(cls, root: Path, backend: str, stream: str, provenance: dict) -> "FeatureStore":
        """Create the store, or open it and check that ``provenance["features"]`` matches this stream's."""
        root = Path(root)
        (root / "parts").mkdir(parents=True, exist_ok=True)
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "backend": backend,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "streams": {stream: provenance}}
        tmp = root / f".store.json.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(meta, indent=1, sort_keys=True))
        try:
            os.link(tmp, root / "store.json")  # create-if-absent, atomic even between concurrent runs
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
        store = cls.open(root)
        if backend != store.backend:
            raise StoreError(f"{root} is a {store.backend} store; re-run with --format {store.backend} "
                             f"or choose a new --out directory")
        if stream not in store.meta["streams"]:
            store._add_stream(stream, provenance)
        store._check_compatible(stream, provenance)
        return store

    def _add_stream(self, stream: str, provenance: dict) -> None:
        """Add a stream (e.g. Flow next to RGB) to an existing store; store.json is replaced atomically."""
        with open(self.root / ".lock-store-json", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # writers adding streams at the same time queue up here
            meta = json.loads((self.root / "store.json").read_text())
            meta["streams"].setdefault(stream, provenance)
            _write_json_atomic(self.root / "store.json", meta)
        self.meta = meta

    def _check_compatible(self, stream: str, provenance: dict) -> None:
        existing = self.meta["streams"][stream]
        differences = {key for key in existing["features"].keys() | provenance["features"].keys()
                       if existing["features"].get(key) != provenance["features"].get(key)}
        if differences:
            lines = [f"  {key}: store has {existing['features'].get(key)!r}, this run has "
                     f"{provenance['features'].get(key)!r}" for key in sorted(differences)]
            raise StoreError(f"{self.root} was extracted with different settings, refusing to mix features:\n"
                             + "\n".join(lines) + "\nUse the store's settings to resume, or a new --out directory.")

    # ---- provenance and listing ----------------------------------------------------------------------
    @property
    def streams(self) -> list[str]:
        return list(self.meta["streams"])

    def provenance(self, stream: str = DEFAULT_STREAM) -> dict:
        self._require_stream(stream)
        return self.meta["streams"][stream]

    def map_shape(self, stream: str = DEFAULT_STREAM) -> tuple[int, ...] | None:
        shape = self.provenance(stream)["features"].get("map_shape")
        return tuple(shape) if shape else None

    def videos(self, stream: str = DEFAULT_STREAM) -> dict[str, VideoRecord]:
        self._require_stream(stream)
        return {vid: VideoRecord(vid, stream, **row) for vid, row in self.index()["videos"].get(stream, {}).items()}

    def video(self, video_id: str, stream: str = DEFAULT_STREAM) -> VideoRecord:
        row = self.index()["videos"].get(stream, {}).get(video_id)
        if row is None:
            raise KeyError(f"{self.root}: no video {video_id!r} in stream {stream!r}")
        return VideoRecord(video_id, stream, **row)

    def failures(self, stream: str = DEFAULT_STREAM) -> list[dict]:
        """The latest failure of each video that is still missing (a later successful retry clears it)."""
        return self.index()["failures"].get(stream, [])

    def part_names(self) -> list[str]:
        return sorted(path.name for path in (self.root / "parts").glob(f"part-*{self.suffix}"))

    def part_tables(self) -> dict[str, dict]:
        return {name: self._reader(name).table() for name in self.part_names()}

    # ---- index ---------------------------------------------------------------------------------------
    def index(self) -> dict:
        """The store index; rebuilt by scanning the parts whenever the set of committed parts changed."""
        parts = self.part_names()
        if self._index is None or self._index["parts"] != parts:
            path = self.root / "index.json"
            cached = json.loads(path.read_text()) if path.is_file() else None
            self._index = cached if cached and cached.get("parts") == parts else self.rebuild_index()
        return self._index

    def rebuild_index(self) -> dict:
        videos: dict[str, dict] = {}
        failures: dict[str, dict[str, dict]] = {}
        for part, table in self.part_tables().items():
            stream_videos = videos.setdefault(table["stream"], {})
            for row in table["videos"]:
                # Parts are scanned in commit-name order; the first copy of a video wins (verify flags repeats).
                stream_videos.setdefault(row["video_id"], {
                    "part": part, "offset": row["offset"], "n_steps": row["n_steps"],
                    "sha256": row["sha256"], "attrs": row["attrs"]})
            for failure in table["failures"]:
                failures.setdefault(table["stream"], {})[failure["video_id"]] = {**failure, "part": part}
        index = {"parts": self.part_names(), "videos": videos,
                 "failures": {stream: [f for vid, f in sorted(rows.items()) if vid not in videos.get(stream, {})]
                              for stream, rows in failures.items()}}
        try:
            _write_json_atomic(self.root / "index.json", index)
        except OSError:
            pass  # a read-only copy of a store still works; it just rebuilds the index in memory
        return index

    # ---- reading -------------------------------------------------------------------------------------
    def read(self, video_id: str, array: str = "pooled", steps: Sequence[int] | np.ndarray | None = None,
             stream: str = DEFAULT_STREAM) -> np.ndarray:
        """``maps`` [T, H, W, C], ``pooled`` [T, C] or ``steps`` [T, 2] of a video; ``steps`` selects time steps.

        Chosen steps are read as contiguous runs of slices (never fancy indexing, which is 10-100x slower on
        chunked zarr/HDF5 arrays) and returned in the order asked, repeats allowed.
        """
        record = self.video(video_id, stream)
        reader = self._reader(record.part)
        if not reader.has(stream, array):
            raise StoreError(f"{self.root}: stream {stream!r} has no {array!r} array (features imported from a "
                             f"pooled-only release have no maps); use a head that reads 'pooled' or re-extract")
        start = record.offset
        if steps is None:
            return reader.read(stream, array, start, start + record.n_steps)
        wanted = np.asarray(steps, dtype=np.int64).reshape(-1)
        if wanted.size and (wanted.min() < 0 or wanted.max() >= record.n_steps):
            raise IndexError(f"{video_id}: steps {wanted.tolist()} outside [0, {record.n_steps})")
        unique = np.unique(wanted)
        runs = np.split(unique, np.flatnonzero(np.diff(unique) != 1) + 1) if unique.size else []
        blocks = [reader.read(stream, array, start + run[0], start + run[-1] + 1) for run in runs]
        if not blocks:
            return reader.read(stream, array, start, start)
        return np.concatenate(blocks)[np.searchsorted(unique, wanted)]

    def _reader(self, part: str):
        if part not in self._readers:
            self._readers[part] = self._reader_cls(self.root / "parts" / part)
        return self._readers[part]

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()

    def __enter__(self) -> "FeatureStore":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __getstate__(self) -> dict:
        # DataLoader workers get a copy without open handles and open their own after the fork.
        return {**self.__dict__, "_readers": {}}

    def _require_stream(self, stream: str) -> None:
        if stream not in self.meta["streams"]:
            raise StoreError(f"{self.root}: no stream {stream!r}; this store has {', '.join(self.streams)}")

    # ---- writing -------------------------------------------------------------------------------------
    def lock(self, tag: str) -> TextIO:
        """Exclusive lock for writers of parts tagged ``tag``, held until the returned file is closed (use it
        as a context manager); stale temporary parts of that tag are removed."""
        handle = open(self.root / f".lock-{tag}", "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise StoreError(f"{self.root}: another extraction is writing shard {tag} of this store; wait for it "
                             f"or give this run another --shard") from None
        for stale in (self.root / "parts").glob(f".tmp-part-{tag}-*"):
            PartWriter.remove(stale)
        return handle

    def new_part(self, tag: str, stream: str, dtype: str, channels: int, part_info: dict,
                 shard_steps: int = 64) -> PartWriter:
        """A writer for the next part tagged ``tag`` (hold ``lock(tag)`` while writing)."""
        taken = [int(p.name[len(f"part-{tag}-"):][:6]) for p in (self.root / "parts").glob(f"part-{tag}-*")]
        name = f"part-{tag}-{max(taken, default=-1) + 1:06d}{self.suffix}"
        tmp = self.root / "parts" / f".tmp-{name}"
        return PartWriter(self._writer_cls(tmp, shard_steps), tmp, self.root / "parts" / name, stream,
                          self.map_shape(stream), channels, dtype, shard_steps, part_info)

    # ---- integrity -----------------------------------------------------------------------------------
    def verify(self, progress: Callable[[], None] | None = None) -> list[str]:
        """Re-read every chunk (checksummed) and recompute every video's hash; return one line per problem.
        ``progress()`` is called after each video (e.g. a tqdm bar's update)."""
        problems, seen = [], {}
        for part in self.part_names():
            try:
                table = self._reader(part).table()
            except Exception as error:  # a damaged part must not hide the others' problems
                problems.append(f"part {part}: unreadable ({type(error).__name__}: {error})")
                continue
            for row in table["videos"]:
                key = (table["stream"], row["video_id"])
                if key in seen:
                    problems.append(f"video {row['video_id']}: stored twice ({seen[key]} and {part})")
                seen[key] = part
                problems += self._verify_video(part, table["stream"], row)
                if progress:
                    progress()
        return problems

    def _verify_video(self, part: str, stream: str, row: dict) -> list[str]:
        reader, hasher = self._reader(part), VideoHasher()
        try:
            for name in ("maps", "pooled", "steps"):
                if not reader.has(stream, name):
                    continue
                for start in range(0, row["n_steps"], VERIFY_BLOCK_STEPS):
                    stop = min(start + VERIFY_BLOCK_STEPS, row["n_steps"])
                    hasher.update(name, reader.read(stream, name, row["offset"] + start, row["offset"] + stop))
        except Exception as error:
            return [f"video {row['video_id']} ({part}): checksum or read error: {type(error).__name__}: {error}"]
        if hasher.hexdigest() != row["sha256"]:
            return [f"video {row['video_id']} ({part}): content hash mismatch (data changed since it was written)"]
        return []

    def disk_bytes(self) -> int:
        """Bytes on disk of the committed parts."""
        total = 0
        for name in self.part_names():
            path = self.root / "parts" / name
            files = path.rglob("*") if path.is_dir() else [path]
            total += sum(file.stat().st_size for file in files if file.is_file())
        return total
