"""Features shared by other teams, into and out of a feature store (pooled vectors only; no maps).

Into a store: ``import_pooled`` writes videos whose pooled features come from elsewhere, with the same index
attributes, ``steps`` and part layout as extracted ones, so stage two reads them alike; the stream's
provenance says where they came from, and has no ``map_shape`` (a head that needs maps is told so by the store).
Loaders for the seeds' releases:
- TA3N: one ``torch.save``d 2048-d tensor per frame, ``<video>/img_00001.t7`` (1-indexed), read with
  ``torch.load(weights_only=True)``; anything but a plain 1-D float tensor is refused;
- EPIC-KITCHENS-100 UDA: arrays [N, 25, C] per modality; ``segment_steps`` spreads the 25 segments over
  each action's frames.
Out of a store: ``export_store`` writes one ``.npy`` (plus ``.steps.npy``) or ``.h5`` file per video and an
``index.csv``, for tools that cannot read our stores.
"""
from __future__ import annotations

import csv
import json
import multiprocessing
import os
import re
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from .manifest import VideoEntry
from .provenance import software_versions
from .store import FeatureStore, FeatureValueError, PartSequence, PartWriter, StoreError
from .weights import safe_load

IMPORT_TAG = "import"
VIDEOS_PER_PART = 256
# Worker processes. Twice the cores: a tree of 320k small files is read from the disk while the others load and
# write (full size on 2 cores: 2 workers 71-89 s, 4 workers 47-61 s; benchmarks/README.md, store_import.py).
DEFAULT_JOBS = min(8, 2 * (os.cpu_count() or 1))
PROCESS_POOL_MIN_VIDEOS = 16  # below this, forking and joining the workers (~0.05 s) costs more than it saves
T7_NAME = re.compile(r"^img_(\d+)\.t7$")
EXPORT_FORMATS = ("npy", "hdf5")


@dataclass(frozen=True)
class PooledSource:
    """One video to import: its manifest row and a loader returning steps [T, 2] int32 and pooled [T, C] (a
    module-level function or a ``functools.partial`` of one where the loaders may run in processes)."""

    entry: VideoEntry
    load: Callable[[], tuple[np.ndarray, np.ndarray]]


@dataclass
class ImportSummary:
    store: Path
    imported: int = 0
    skipped: int = 0
    failures: list[dict] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 2 if self.failures else 0

    def lines(self) -> list[str]:
        lines = [f"imported {self.imported} videos into {self.store} ({self.skipped} already there), "
                 f"{len(self.failures)} failed"]
        lines += [f"FAILED {f['video_id']} {f['path']}: {f['reason']}" for f in self.failures]
        return lines


def import_pooled(sources: Sequence[PooledSource], out: Path, backend: str, stream: str, features: dict,
                  part_info: dict, jobs: int = DEFAULT_JOBS, processes: bool = False) -> ImportSummary:
    """Write ``sources`` into the store ``out``; resumes (skips videos already there) like extraction.

    ``features`` is the stream's provenance and must hold ``channels``; a video whose loader fails is recorded
    as a failure in the store and never stops the import. With ``processes`` (loaders that read files), ``jobs``
    worker processes each load and write whole parts of their own: nothing but a progress count crosses between
    processes, and no thread of a worker waits on another's GIL (loader threads beside zarr's event loop made
    every shard write 5x slower). The videos are cut into parts in list order, so the store holds the same
    videos, bytes and order for any ``jobs``; only where parts begin depends on it.
    """
    features = {**features, "map_shape": None, "stream": stream}
    provenance = {"features": features, "software": software_versions()}
    summary = ImportSummary(store=Path(out))
    with FeatureStore.create_or_open(out, backend, stream, provenance) as store, store.lock(IMPORT_TAG):
        present = store.videos(stream)
        todo = [source for source in sources if source.entry.video_id not in present]
        summary.skipped = len(sources) - len(todo)
        workers = jobs if processes and len(todo) >= PROCESS_POOL_MIN_VIDEOS else 1
        chunks = _part_chunks(todo, workers)
        tasks = [PartTask(Path(out), store.next_part_name(IMPORT_TAG, ahead=i), stream, features["channels"],
                          {**part_info, "software": provenance["software"]}, chunk) for i, chunk in enumerate(chunks)]
        summary.failures = _write_parts(tasks, workers)
        summary.imported = len(todo) - len(summary.failures)
        store.rebuild_index()
    return summary


def _part_chunks(sources: Sequence[PooledSource], workers: int) -> list[Sequence[PooledSource]]:
    """Consecutive runs of at most VIDEOS_PER_PART videos, of equal sizes, as many as a multiple of ``workers``
    (so no worker is left with a short last part while another still writes a long one)."""
    count = -(-len(sources) // VIDEOS_PER_PART)
    count = -(-count // workers) * workers
    bounds = [round(i * len(sources) / count) for i in range(count + 1)] if sources else [0]
    return [sources[start:stop] for start, stop in zip(bounds, bounds[1:]) if stop > start]


@dataclass(frozen=True)
class PartTask:
    """One part of an import: written by one process under a name the parent chose."""

    store: Path
    part_name: str
    stream: str
    channels: int
    part_info: dict
    sources: Sequence[PooledSource]


def _write_parts(tasks: list[PartTask], workers: int) -> list[dict]:
    """Every part's failures, in order, written here (one worker) or by ``workers`` forked processes, with a
    progress bar of videos done. A worker's error (a full disk, a killed process) stops the import: the parts
    already committed stay, and the next run resumes after them."""
    total = sum(len(task.sources) for task in tasks)
    if workers == 1:
        with tqdm(total=total, unit="video", desc="import", disable=None) as bar:
            return [failure for task in tasks for failure in write_part(task, bar.update)]
    # fork, not spawn: a spawned worker re-imports the command's main module (the whole CLI, ~3 s of CPU each),
    # a forked one starts at once with torch, zarr and h5py loaded. zarr resets its event loop in a forked child
    # (zarr.core.sync's at-fork hook) and each worker opens the store afresh; the workers are forked before the
    # progress bar starts its monitor thread.
    context = multiprocessing.get_context("fork")
    done = context.SimpleQueue()
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_report_videos_to, initargs=(done,)) as pool:
        futures = [pool.submit(write_part, task, _video_done) for task in tasks]
        pending = set(futures)
        with tqdm(total=total, unit="video", desc="import", disable=None) as bar:
            try:
                while pending:
                    finished, pending = wait(pending, timeout=0.2, return_when=FIRST_EXCEPTION)
                    while not done.empty():
                        bar.update(done.get())
                    for future in finished:
                        future.result()  # a worker's error, raised here
            except BrokenProcessPool:
                raise StoreError(f"{tasks[0].store}: an import worker process died (killed, or out of memory); the "
                                 f"parts it committed before are kept: run the same command again to import the "
                                 f"rest") from None
            except BaseException:
                pool.shutdown(cancel_futures=True)  # parts not yet begun are not begun
                raise
    return [failure for future in futures for failure in future.result()]


_videos_done = None  # in a worker process: the parent's queue of finished-video counts


def _report_videos_to(queue) -> None:
    global _videos_done
    _videos_done = queue


def _video_done() -> None:
    _videos_done.put(1)


def write_part(task: PartTask, video_done: Callable[[], None]) -> list[dict]:
    """Load and write ``task``'s videos into one new part and commit it; returns the recorded failures."""
    failures = []
    with FeatureStore.open(task.store) as store:
        def new_part() -> PartWriter:
            return store.new_part(IMPORT_TAG, task.stream, "float32", task.channels, task.part_info,
                                  name=task.part_name)

        with PartSequence(new_part, VIDEOS_PER_PART) as parts:  # one part: a task holds at most that many videos
            for source in task.sources:
                failure = _import_one(source, parts.current(), task.channels)
                failures += [failure] if failure else []
                parts.video_done()
                video_done()
    return failures


def _import_one(source: PooledSource, part: PartWriter, channels: int) -> dict | None:
    """Load and write one video; a failure is recorded in the part and returned."""
    entry = source.entry
    try:
        steps, pooled = source.load()
        if pooled.ndim != 2 or pooled.shape[1] != channels or not len(pooled):
            raise ValueError(f"features are shaped {list(pooled.shape)}, expected [steps > 0, {channels}] like "
                             f"the rest of this stream")
        if not np.isfinite(pooled).all():
            raise ValueError("the features hold NaN or inf values")
        video = part.video(entry.video_id, entry.attributes())
        video.append(steps, pooled=pooled)  # one call per video: it checks everything before writing a row
        video.finish(imported_steps=len(pooled))
    except (ValueError, OSError, RuntimeError, FeatureValueError) as error:
        part.record_failure(entry.video_id, entry.path, "import", str(error))
        return {"video_id": entry.video_id, "path": entry.path, "reason": str(error)}
    return None


# ---- TA3N: one .t7 tensor per frame ------------------------------------------------------------------------

def load_t7(path: Path) -> np.ndarray:
    """One frame's feature vector: a plain 1-D float tensor, loaded without running code from the file."""
    value = safe_load(path, kind="a plain saved tensor")
    if type(value) is not torch.Tensor or value.ndim != 1 or not value.is_floating_point():
        raise ValueError(f"{path}: expected a 1-D float feature tensor (torch.Tensor), found {_describe(value)}")
    return value.detach().numpy().astype(np.float32)


def _describe(value) -> str:
    """The loaded object's type, by its full name, and a tensor's shape and dtype."""
    kind = type(value)
    name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    return f"{name} ({value.ndim}-D {value.dtype})" if isinstance(value, torch.Tensor) else name


def t7_frames(folder: Path) -> list[Path]:
    """A TA3N feature folder's frame files in frame order; numbering must run 1..n without gaps."""
    numbered = sorted((int(match.group(1)), path) for path in Path(folder).iterdir()
                      if (match := T7_NAME.match(path.name)))
    if not numbered:
        raise ValueError(f"{folder}: no img_00001.t7 ... frame feature files")
    numbers = [number for number, _ in numbered]
    if numbers != list(range(1, len(numbers) + 1)):
        gap = next(n for i, n in enumerate(numbers, start=1) if n != i)
        raise ValueError(f"{folder}: frame files are not numbered 1..{len(numbers)} "
                         f"(first irregular: img_{gap:05d}.t7)")
    return [path for _, path in numbered]


def load_t7_video(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """Steps and pooled features of a TA3N feature folder: step t covers frame t (0-based)."""
    pooled = np.stack([load_t7(path) for path in t7_frames(folder)])
    frames = np.arange(len(pooled), dtype=np.int32)
    return np.stack([frames, frames], axis=1), pooled


# ---- EPIC-KITCHENS-100: 25 segments per action -------------------------------------------------------------

def segment_steps(start: int | None, end: int | None, count: int) -> np.ndarray:
    """First/last frame of ``count`` equal segments of [start, end] (inclusive); segment indices if unknown."""
    if start is None or end is None:
        indices = np.arange(count, dtype=np.int32)
        return np.stack([indices, indices], axis=1)
    bounds = start + np.floor(np.arange(count + 1) * (end - start + 1) / count).astype(np.int64)
    first = bounds[:-1]
    last = np.maximum(first, bounds[1:] - 1)  # a segment of an action shorter than `count` frames is one frame
    return np.stack([first, last], axis=1).astype(np.int32)


# ---- export ------------------------------------------------------------------------------------------------

def export_store(store: FeatureStore, out: Path, fmt: str, stream: str) -> int:
    """One file per video under ``out`` (video ids become relative paths), an index.csv and provenance.json."""
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"export format {fmt!r}: use one of {', '.join(EXPORT_FORMATS)}")
    videos = store.videos(stream)
    if not videos:
        raise StoreError(f"{store.root}: stream {stream!r} holds no videos to export")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(key for record in videos.values() for key in record.attrs))
    if fmt == "hdf5":
        import h5py  # imported here: the CLI imports this module, and an extraction into zarr never needs h5py
    with open(out / "index.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["video_id", "file", "n_steps", *columns])
        for video_id, record in tqdm(sorted(videos.items()), unit="video", desc="export", disable=None):
            relative = _export_path(video_id, ".npy" if fmt == "npy" else ".h5")
            target = out / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            pooled = store.read(video_id, "pooled", stream=stream)
            steps = store.read(video_id, "steps", stream=stream)
            if fmt == "npy":
                np.save(target, pooled)
                np.save(target.with_name(target.name[:-4] + ".steps.npy"), steps)
            else:
                with h5py.File(target, "w") as h5:
                    h5.create_dataset("pooled", data=pooled)
                    h5.create_dataset("steps", data=steps)
                    h5.attrs.update({key: str(value) for key, value in record.attrs.items() if value is not None})
            writer.writerow([video_id, relative.as_posix(), record.n_steps,
                             *["" if record.attrs.get(key) is None else record.attrs[key] for key in columns]])
    (out / "provenance.json").write_text(json.dumps(store.provenance(stream), indent=1, sort_keys=True))
    return len(videos)


def _export_path(video_id: str, suffix: str) -> PurePosixPath:
    relative = PurePosixPath(video_id + suffix)
    if relative.is_absolute() or ".." in relative.parts:
        raise ValueError(f"video id {video_id!r} cannot be used as a file name inside the export folder")
    return relative
