"""The feature store: a directory of immutable parts plus provenance and a rebuildable index (DESIGN §4).

```
STORE/
  store.json            format, backend, shard layout, per-stream provenance, and the sha256 of all of it
  parts/part-*.zarr|h5  committed parts (one writer each); parts/.tmp-* are parts being written
  parts/part-*.sha256.json  the sha256 of every file of a part, written when it is committed
  index.json            video_id -> part, offset, n_steps, hash, attributes, and its own sha256; rebuilt from
                        the parts when stale, missing or damaged
  README.md             the store card, if written (card.py)
  .lock-<tag>           held by the extraction run writing parts tagged <tag>
```
The same API serves both backends; nothing outside ``extract/store`` knows which one a store uses. A store is
read where it is (a directory) or through fsspec (a URL, a packed ``.zip``/``.tar``; ``location.py``); only
directories are written.
"""
from __future__ import annotations

import fcntl
import importlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np

from .checked_json import NO_CHECKSUM, checked_json_text, parse_checked_json, write_checked_json
from .location import FsspecFiles, LocalFiles, open_location
from .part_writer import DIGESTS_SUFFIX, PartWriter

log = logging.getLogger(__name__)

FORMAT = "vidshift-feature-store"
FORMAT_VERSION = 2          # 2: store.json and index.json carry their sha256, parts a sidecar of file digests
READABLE_VERSIONS = (1, 2)  # version 1 stores read as before, without those checks
# backend -> (module, writer class, reader class); the module is imported on first use (backend()), so a process
# that only uses one backend does not load the other's libraries (zarr, or h5py and hdf5plugin: 8 and 16 MB).
BACKENDS = {"zarr": ("zarr_part", "ZarrPartWriter", "ZarrPartReader"),
            "hdf5": ("hdf5_part", "Hdf5PartWriter", "Hdf5PartReader")}
DEFAULT_STREAM = "rgb"
VERIFY_BLOCK_STEPS = 256  # bounded memory when re-reading long videos
COALESCE_BYTES = 256 * 2**10  # read the rows between two wanted steps when they are fewer bytes than this
BULK_READ_BYTES = 64 * 2**20  # one backend call of read_videos: few calls (zarr pays ~1 ms each), small temporaries
# What zarr, numcodecs and h5py raise on damaged files, by the kind of damage (a failed checksum, a broken
# metadata document, a truncated file...); read errors of these types are reported as a damaged store.
BACKEND_READ_ERRORS = (OSError, ValueError, RuntimeError, KeyError, TypeError)
REEXTRACT = (f"delete the part and its {DIGESTS_SUFFIX} file, then rerun the extraction, which extracts its videos "
             f"again")


class StoreError(RuntimeError):
    """A store is missing, malformed, locked or incompatible; the message says what to do."""


def backend(name: str) -> tuple[str, type, type]:
    """(part suffix, writer class, reader class) of the backend ``name`` (a key of BACKENDS), imported here."""
    module_name, writer, reader = BACKENDS[name]
    module = importlib.import_module(f".{module_name}", __package__)
    return module.SUFFIX, getattr(module, writer), getattr(module, reader)


@dataclass(frozen=True)
class VideoRecord:
    video_id: str
    stream: str
    part: str
    offset: int
    n_steps: int
    sha256: str
    attrs: dict


def _read_meta(text: bytes) -> tuple[dict | None, str | None]:
    """store.json as ``_parse_checked_json`` reads it; version 1 stores were written without a checksum."""
    meta, problem = parse_checked_json(text)
    if meta is not None and meta.get("format_version") == 1 and problem == NO_CHECKSUM:
        return meta, None
    return meta, problem


def feature_differences(ours: dict, theirs: dict, our_name: str, their_name: str) -> list[str]:
    """One line per feature setting (backbone, weights, preprocessing, sampling, dtype...) on which two streams'
    provenance differs; ``software`` is recorded, never compared."""
    keys = sorted(key for key in ours.keys() | theirs.keys() if ours.get(key) != theirs.get(key))
    return [f"{key}: {our_name} has {ours.get(key)!r}, {their_name} has {theirs.get(key)!r}" for key in keys]


class FeatureStore:
    """Open with ``FeatureStore.open(path or URL)`` (read) or ``FeatureStore.create_or_open(...)`` (extraction).

    ``root`` is the directory (a Path) of a local store, the URL or archive path (a str) of any other.
    """

    def __init__(self, root: Path | str, meta: dict, meta_problem: str | None = None,
                 files: LocalFiles | FsspecFiles | None = None) -> None:
        self.files = files or LocalFiles(Path(root))
        self.root = Path(root) if self.files.writable else root
        self.meta, self.meta_problem = meta, meta_problem
        if meta.get("backend") not in BACKENDS or not isinstance(meta.get("streams"), dict):
            raise StoreError(f"{self.root / 'store.json'}: damaged (no valid backend or streams entry); restore "
                             f"store.json from a copy of the store")
        self.backend = meta["backend"]
        self.suffix, self._writer_cls, self._reader_cls = backend(self.backend)
        self._index: dict | None = None
        self._readers: dict[str, object] = {}

    # ---- opening -------------------------------------------------------------------------------------
    @classmethod
    def open(cls, root: Path | str, check: bool = True, cache: Path | str | None = None) -> "FeatureStore":
        """Open a store for reading: a directory, a packed ``.zip``/``.tar`` or an fsspec URL of either, with
        ``cache`` (default: $VIDSHIFT_STORE_CACHE) a directory keeping local copies of remote parts. A store.json
        that fails its checksum is refused; ``check=False`` opens it anyway and keeps the problem in
        ``meta_problem`` (for ``verify``, which reports it)."""
        files = open_location(root, cache)
        text = files.read_bytes("store.json")
        meta_path = f"{files.display}/store.json"
        if text is None:
            raise StoreError(f"{files.display}: not a vidshift feature store (no store.json); create one with "
                             f"`vidshift extract` or `vidshift store import`")
        meta, problem = _read_meta(text)
        if meta is None:
            raise StoreError(f"{meta_path}: {problem}; restore store.json from a copy of the store (it holds the "
                             f"provenance, which cannot be recovered from the parts)")
        if meta.get("format") != FORMAT or meta.get("format_version") not in READABLE_VERSIONS:
            raise StoreError(f"{meta_path}: format {meta.get('format')!r} version {meta.get('format_version')!r}"
                             f" is not {FORMAT!r} version {FORMAT_VERSION}; upgrade vidshift or re-extract")
        if problem and check:
            raise StoreError(f"{meta_path}: {problem}, so the provenance it records cannot be trusted; restore "
                             f"store.json from a copy of the store (`vidshift store verify` checks the rest)")
        return cls(files.display, meta, problem, files)

    @classmethod
    def create_or_open(cls, root: Path, backend: str, stream: str, provenance: dict) -> "FeatureStore":
        """Create the store, or open it and check that ``provenance["features"]`` matches this stream's."""
        root = Path(root)
        (root / "parts").mkdir(parents=True, exist_ok=True)
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "backend": backend,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "streams": {stream: provenance}}
        tmp = root / f".store.json.{os.getpid()}.tmp"
        try:
            tmp.write_text(checked_json_text(meta))
            os.link(tmp, root / "store.json")  # create-if-absent, atomic even between concurrent runs
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
        store = cls.open(root)
        if backend != store.backend:
            raise StoreError(f"{root} is a {store.backend} store; re-run with --format {store.backend} "
                             f"or choose a new --out directory")
        if stream not in store.meta["streams"]:
            store._add_stream(stream, provenance)
        store._check_compatible(stream, provenance)
        return store

    def _add_stream(self, stream: str, provenance: dict) -> None:
        """Add a stream (e.g. Flow next to RGB) to an existing store."""
        self._update_meta(lambda meta: meta["streams"].setdefault(stream, provenance))

    def claim_shard_layout(self, index: int, count: int) -> None:
        """Fix the N of ``--shard K/N`` on the first extraction and refuse another N later.

        Shard K of N takes every N-th video, so writers with different N would extract (and store) the same
        videos twice without ever sharing a lock. Stores made before the layout was recorded are read from
        their part names.
        """
        def claim(meta: dict) -> None:
            recorded = meta.get("shard_count") or self._shard_count_of_parts()
            if recorded and recorded != count:
                raise StoreError(
                    f"{self.root} is filled by {recorded} shard(s) (--shard K/{recorded}), so --shard "
                    f"{index}/{count} would store videos twice; use --shard K/{recorded} with K in 0..{recorded - 1}"
                    f", or another --out for another layout")
            meta["shard_count"] = count
        self._update_meta(claim)

    def _shard_count_of_parts(self) -> int | None:
        counts = {int(match.group(1)) for name in self.part_names()
                  if (match := re.match(r"part-s\d+of(\d+)-", name))}
        return max(counts) if counts else None

    def _update_meta(self, change: Callable[[dict], None]) -> None:
        """Apply ``change`` to the current store.json and write it back atomically if it changed."""
        with open(self.root / ".lock-store-json", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent writers (one per shard) queue up here
            meta, problem = _read_meta((self.root / "store.json").read_bytes())
            if problem:
                raise StoreError(f"{self.root / 'store.json'}: {problem}; restore it from a copy of the store")
            before = json.dumps(meta, sort_keys=True)
            change(meta)
            if json.dumps(meta, sort_keys=True) != before or meta["format_version"] != FORMAT_VERSION:
                meta["format_version"] = FORMAT_VERSION
                write_checked_json(self.root / "store.json", meta)
        self.meta = meta

    def _check_compatible(self, stream: str, provenance: dict) -> None:
        differences = feature_differences(self.meta["streams"][stream]["features"], provenance["features"], "store",
                                          "this run")
        if differences:
            raise StoreError(f"{self.root} was extracted with different settings, refusing to mix features:\n"
                             + "\n".join(f"  {line}" for line in differences)
                             + "\nUse the store's settings to resume, or a new --out directory.")

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
        """The committed parts: listed in a directory; elsewhere (nothing to list over plain HTTP) index.json's."""
        return self.files.list_parts(self.suffix) if self.files.writable else self.index()["parts"]

    def part_tables(self) -> dict[str, dict]:
        return {name: self.part_table(name) for name in self.part_names()}

    def part_table(self, part: str) -> dict:
        """A part's video table; StoreError naming the part when it cannot be read."""
        try:
            return self._reader(part).table()
        except BACKEND_READ_ERRORS as error:
            raise StoreError(f"{self.root}/parts/{part}: the part's video table is unreadable ({error}); run "
                             f"`vidshift store verify {self.root}`; {REEXTRACT}") from None

    # ---- index ---------------------------------------------------------------------------------------
    def index(self) -> dict:
        """The store index; rebuilt from the parts when the set of committed parts changed, or when index.json
        is missing or damaged (it holds nothing the parts do not, so a rebuild loses nothing). A read-only copy
        (a URL, a packed store) trusts an intact index.json: listing its parts would cost requests, and it
        never changes."""
        if not self.files.writable:
            if self._index is None:
                self._index = self._remote_index()
            return self._index
        parts = self.part_names()
        if self._index is None or self._index["parts"] != parts:
            cached, problem = self._index_on_disk()
            if problem and parts:
                log.warning("%s: %s; rebuilt it from the %d part(s), nothing is lost",
                            self.root / "index.json", problem, len(parts))
            self._index = cached if cached and cached.get("parts") == parts else self.rebuild_index()
        return self._index

    def _remote_index(self) -> dict:
        index, problem = self._index_on_disk()
        if index is not None:
            return index
        if not self.files.list_parts(self.suffix):
            raise StoreError(f"{self.root}: index.json is {problem}, and the parts cannot be listed here to rebuild "
                             f"it; ask for an intact copy (`vidshift store verify` rewrites index.json where the "
                             f"store was written)")
        log.warning("%s: index.json is %s; rebuilt it in memory from the listed parts", self.root, problem)
        return self.rebuild_index()

    def _index_on_disk(self) -> tuple[dict | None, str | None]:
        """index.json if it is intact, else (None, what is wrong with it)."""
        text = self.files.read_bytes("index.json")
        if text is None:
            return None, "missing"
        index, problem = parse_checked_json(text)
        return (None, problem) if problem else (index, None)

    def rebuild_index(self) -> dict:
        videos: dict[str, dict] = {}
        failures: dict[str, dict[str, dict]] = {}
        parts = self.files.list_parts(self.suffix)
        for part, table in ((part, self.part_table(part)) for part in parts):
            stream_videos = videos.setdefault(table["stream"], {})
            for row in table["videos"]:
                # Parts are scanned in commit-name order; the first copy of a video wins (verify flags repeats).
                stream_videos.setdefault(row["video_id"], {
                    "part": part, "offset": row["offset"], "n_steps": row["n_steps"],
                    "sha256": row["sha256"], "attrs": row["attrs"]})
            for failure in table["failures"]:
                failures.setdefault(table["stream"], {})[failure["video_id"]] = {**failure, "part": part}
        index = {"parts": parts, "videos": videos,
                 "failures": {stream: [f for vid, f in sorted(rows.items()) if vid not in videos.get(stream, {})]
                              for stream, rows in failures.items()}}
        if self.files.writable:
            try:
                write_checked_json(self.root / "index.json", index)
            except OSError:
                pass  # a read-only copy of a store still works; it just rebuilds the index in memory
        self._index = index
        return index

    # ---- reading -------------------------------------------------------------------------------------
    def read(self, video_id: str, array: str = "pooled", steps: Sequence[int] | np.ndarray | None = None,
             stream: str = DEFAULT_STREAM) -> np.ndarray:
        """``maps`` [T, H, W, C], ``pooled`` [T, C] or ``steps`` [T, 2] of a video; ``steps`` selects time steps.

        Chosen steps are read as contiguous runs of slices (never fancy indexing, which is 10-100x slower on
        chunked zarr/HDF5 arrays) and returned in the order asked, repeats allowed. Runs less than COALESCE_BYTES
        apart are read as one slice: a backend call costs ~1 ms in zarr (research/store.md §0.2), more than
        decoding the pooled rows between TSN segments (5 steps of a 100-step video: one call instead of five).
        """
        return self.read_record(self.video(video_id, stream), array, steps)

    def read_record(self, record: VideoRecord, array: str = "pooled",
                    steps: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """:meth:`read` of a video whose record (:meth:`videos`) the caller holds: a reader of many batches looks
        its videos up once, not the index on every read (which lists the parts to notice new ones)."""
        if steps is None:
            return self._read_rows(record, array, 0, record.n_steps)
        wanted = np.asarray(steps, dtype=np.int64).reshape(-1)
        if wanted.size and (wanted.min() < 0 or wanted.max() >= record.n_steps):
            raise IndexError(f"{record.video_id}: steps {wanted.tolist()} outside [0, {record.n_steps})")
        unique = np.unique(wanted)
        if not unique.size:
            return self._read_rows(record, array, 0, 0)
        gap_rows = COALESCE_BYTES // self._row_nbytes(record, array)
        runs = np.split(unique, np.flatnonzero(np.diff(unique) > gap_rows + 1) + 1)
        blocks = [self._read_rows(record, array, run[0], run[-1] + 1) for run in runs]
        return np.concatenate(blocks)[np.searchsorted(np.concatenate([np.arange(r[0], r[-1] + 1) for r in runs]),
                                                      wanted)]

    def read_videos(self, records: Sequence[VideoRecord], array: str = "pooled") -> Iterator[tuple[int, np.ndarray]]:
        """Every step of many videos (their records), as (position in ``records``, rows), in storage order, not
        in the order given.

        For loading a whole split: videos stored next to each other in a part are read as one slice of up to
        BULK_READ_BYTES, so the cost is the bytes, not a backend call per video.
        """
        records = sorted(((record, i) for i, record in enumerate(records)),
                         key=lambda pair: (pair[0].part, pair[0].offset))
        row_bytes = self._read_rows(records[0][0], array, 0, 1)[0].nbytes if records else 1
        rows_per_call = max(1, BULK_READ_BYTES // row_bytes)
        run: list[tuple[VideoRecord, int]] = []
        for record, position in records + [(None, -1)]:
            contiguous = (record is not None and run and record.part == run[-1][0].part
                          and record.offset == run[-1][0].offset + run[-1][0].n_steps)
            if run and (not contiguous or record.offset + record.n_steps - run[0][0].offset > rows_per_call):
                first = run[0][0]
                rows = self._read_rows(first, array, 0, run[-1][0].offset + run[-1][0].n_steps - first.offset)
                for member, member_position in run:
                    start = member.offset - first.offset
                    yield member_position, rows[start:start + member.n_steps]
                run = []
            if record is not None:
                run.append((record, position))

    def _read_rows(self, record: VideoRecord, array: str, start: int, stop: int) -> np.ndarray:
        """Steps [start, stop) of one video's array. A failed chunk checksum (or any damage the backend finds)
        becomes a StoreError naming the video, never a value that is silently wrong."""
        try:
            reader = self._reader(record.part)
            present = reader.has(record.stream, array)
            rows = reader.read(record.stream, array, record.offset + start, record.offset + stop) if present else None
        except BACKEND_READ_ERRORS as error:
            raise StoreError(f"{self.root}: cannot read {array!r} of video {record.video_id!r} (part {record.part}):"
                             f" {type(error).__name__}: {error}. The store is damaged; `vidshift store verify "
                             f"{self.root}` lists every affected video") from None
        if rows is None:
            raise StoreError(f"{self.root}: stream {record.stream!r} has no {array!r} array (features imported "
                             f"from a pooled-only release have no maps); use a head that reads 'pooled' or re-extract")
        return rows

    def _row_nbytes(self, record: VideoRecord, array: str) -> int:
        try:
            return self._reader(record.part).row_nbytes(record.stream, array)
        except BACKEND_READ_ERRORS:
            return COALESCE_BYTES + 1  # no coalescing; the read itself then reports what is wrong

    def _reader(self, part: str):
        if part not in self._readers:
            source = self.files.zarr_source(part) if self.backend == "zarr" else self.files.hdf5_source(part)
            self._readers[part] = self._reader_cls(source)
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
    def lock(self, tag: str, wait: bool = False) -> TextIO:
        """Exclusive lock for writers of parts tagged ``tag``, held until the returned file is closed (use it
        as a context manager); stale temporary parts of that tag are removed. Held by another process: a
        StoreError, or with ``wait`` a wait until it is released (a cluster task whose first copy still runs)."""
        handle = open(self.root / f".lock-{tag}", "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            handle.close()
            raise StoreError(f"{self.root}: another extraction is writing shard {tag} of this store; wait for it "
                             f"or give this run another --shard") from None
        for stale in (self.root / "parts").glob(f".tmp-part-{tag}-*"):
            PartWriter.remove(stale)
        for digests in (self.root / "parts").glob(f"part-{tag}-*{DIGESTS_SUFFIX}"):
            if not digests.with_name(digests.name[: -len(DIGESTS_SUFFIX)]).exists():
                digests.unlink()  # written by a run killed just before it committed its part
        return handle

    def next_part_name(self, tag: str, ahead: int = 0) -> str:
        """The name the next committed part tagged ``tag`` takes, part-<tag>-<number><suffix>, or with ``ahead``
        the one that many parts after it (an import's workers write parts named in advance)."""
        taken = [int(p.name[len(f"part-{tag}-"):][:6]) for p in (self.root / "parts").glob(f"part-{tag}-*")]
        return f"part-{tag}-{max(taken, default=-1) + 1 + ahead:06d}{self.suffix}"

    def annotate(self, **entries) -> None:
        """Record ``entries`` in store.json (e.g. which stores a merge made this one from)."""
        self._update_meta(lambda meta: meta.update(entries))

    def new_part(self, tag: str, stream: str, dtype: str, channels: int, part_info: dict,
                 shard_steps: int = 64, writer_threads: int = 1, name: str | None = None) -> PartWriter:
        """A writer for the next part tagged ``tag``, or for the part ``name`` (hold ``lock(tag)`` while writing);
        ``writer_threads`` > 1 compresses its chunks in that many threads (hdf5_part.py, zarr_part.py)."""
        name = name or self.next_part_name(tag)
        tmp = self.root / "parts" / f".tmp-{name}"
        return PartWriter(self._writer_cls(tmp, shard_steps, writer_threads), tmp, self.root / "parts" / name, stream,
                          self.map_shape(stream), channels, dtype, shard_steps, part_info)

    # ---- integrity -----------------------------------------------------------------------------------
    def verify(self, progress: Callable[[], None] | None = None) -> list[str]:
        """Check everything that can change on disk; one line per problem (extract/store/verify.py)."""
        from .verify import verify_store  # verify.py reads the store through this class
        return verify_store(self, progress)

    def recorded_digests(self, part: str) -> dict[str, str] | None:
        """The sha256 of each file of a part as recorded at commit; None for parts written before digests.
        ValueError when the digests file itself is damaged."""
        text = self.files.read_bytes(f"parts/{part}{DIGESTS_SUFFIX}")
        if text is None:
            return None
        recorded = json.loads(text.decode("utf-8"))
        if not isinstance(recorded, dict):
            raise ValueError(f"{part}{DIGESTS_SUFFIX} is not a JSON object")
        return recorded

    def disk_bytes(self) -> int:
        """Bytes on disk of the committed parts (with their digest files)."""
        total = 0
        for name in self.part_names():
            digests = self.files.read_bytes(f"parts/{name}{DIGESTS_SUFFIX}")
            total += self.files.part_bytes(name) + len(digests or b"")
        return total
