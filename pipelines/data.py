"""Cached features for stage two: videos of one domain and split, TSN segment sampling, batches.

A ``FeatureSet`` is the videos of one (domain, split) of a manifest, looked up in a store. Which time steps a
batch takes is decided in the main process by a seeded generator (``epoch_plan``), and only then are the
features fetched: indexed in the set's held features (in memory, or a memory-mapped disk copy of them, see
``place_features``) or read from the store by DataLoader worker processes. Every path therefore gives the same
numbers, and the choice between them is a matter of what fits where.

TSN sampling (DESIGN §6, TA3N code ``dataset.py``): a video's T steps are cut into N equal segments; training
takes one random step per segment (or the segment centre, the official TA3N code's choice); evaluation takes
the centres ``int(T/N/2 + T/N*i)``. Videos shorter than N repeat their last step.

Several streams of one store (``--stream rgb,flow``) share one batch plan: a video's steps are cut to the range
every stream has (optical flow has one step fewer per clip than RGB), so the same step of every stream is read.
A batch is then {stream: features} (late fusion, one architecture per stream) or the streams' features
concatenated per step on the channel axis (early fusion, EPIC's ``ALL``).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from extract.manifest import VideoEntry
from extract.store import FeatureStore, StoreError
from heads.base import Inputs, map_inputs

TRAIN_SAMPLINGS = ("random", "centre")
FEATURE_PLACES = ("auto", "memory", "stream")
FUSIONS = ("late", "early")
DISK_FORMAT = 1            # in every disk copy's name: a change of how copies are laid out names new files
DISK_HEADROOM = 2**30      # free space a disk copy leaves on its filesystem


def centre_steps(n_steps: int, num_segments: int) -> np.ndarray:
    """Centre step of each of ``num_segments`` equal segments (TA3N ``_get_test_indices``, 0-based)."""
    if n_steps < num_segments:
        return np.minimum(np.arange(num_segments), n_steps - 1)
    tick = n_steps / num_segments
    return np.array([int(tick / 2 + tick * i) for i in range(num_segments)])


def random_steps(n_steps: int, num_segments: int, generator: torch.Generator) -> np.ndarray:
    """One uniformly drawn step inside each of ``num_segments`` equal segments (TSN training sampling)."""
    if n_steps < num_segments:
        return np.minimum(np.arange(num_segments), n_steps - 1)
    bounds = np.linspace(0, n_steps, num_segments + 1)
    starts, ends = np.floor(bounds[:-1]).astype(int), np.floor(bounds[1:]).astype(int)
    draws = torch.rand(num_segments, generator=generator).numpy()
    return np.minimum(starts + (draws * (ends - starts)).astype(int), ends - 1)


@dataclass(frozen=True)
class BatchPlan:
    """Which videos (positions in a FeatureSet) and which steps of each, [B] and [B, N].

    ``extra``: positions among the examples a method added to the training data (Volpi's ADA), drawn into the
    same batch; empty when there are none.
    """

    videos: np.ndarray
    steps: np.ndarray
    extra: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


def combine_streams(per_stream: dict[str, torch.Tensor], fusion: str) -> Inputs:
    """One stream's tensor as it is; several as {stream: tensor} (late) or concatenated channels (early)."""
    if len(per_stream) == 1:
        return next(iter(per_stream.values()))
    return per_stream if fusion == "late" else torch.cat(list(per_stream.values()), dim=-1)


class PlannedVideos:
    """Videos whose batches are planned in the main process: a subclass has ``n_steps`` [V] (time steps per
    video: a store's steps, or a raw video's frames in end-to-end mode) and ``__len__``."""

    n_steps: np.ndarray

    def eval_plans(self, num_segments: int, batch_size: int, order: np.ndarray | None = None) -> list[BatchPlan]:
        """Every video once, at its segment centres: in order, or in ``order`` (a permutation of the videos, or
        of some of them)."""
        order = np.arange(len(self)) if order is None else order
        steps = np.stack([centre_steps(self.n_steps[v], num_segments) for v in order])
        return [BatchPlan(order[i:i + batch_size], steps[i:i + batch_size]) for i in range(0, len(order), batch_size)]

    def epoch_plans(self, num_segments: int, batch_size: int, num_batches: int, sampling: str,
                    generator: torch.Generator, extra: int = 0) -> list[BatchPlan]:
        """``num_batches`` batches drawn without replacement, reshuffling whenever the videos run out.

        With ``extra`` added examples, batches are drawn from the videos and those examples together (positions
        from ``len(self)`` on are the examples), so each is seen once per epoch as a video is.
        """
        order = []
        while len(order) < num_batches * batch_size:
            order.extend(torch.randperm(len(self) + extra, generator=generator).tolist())
        plans = []
        for b in range(num_batches):
            drawn = np.array(order[b * batch_size:(b + 1) * batch_size])
            videos, added = drawn[drawn < len(self)], drawn[drawn >= len(self)] - len(self)
            if sampling == "centre":
                steps = [centre_steps(self.n_steps[v], num_segments) for v in videos]
            else:
                steps = [random_steps(self.n_steps[v], num_segments, generator) for v in videos]
            plans.append(BatchPlan(videos, np.array(steps, dtype=np.int64).reshape(len(videos), num_segments),
                                   added))
        return plans


class FeatureSet(PlannedVideos):
    """The videos of one domain and split: ids, labels (None for unlabelled target data) and their features,
    in one or several streams of a store (combined as ``fusion`` says, :func:`combine_streams`)."""

    def __init__(self, store: FeatureStore, entries: list[VideoEntry], array: str, class_index: dict[str, int],
                 labelled: bool = True, streams: tuple[str, ...] = ("rgb",), fusion: str = "late") -> None:
        if not entries:
            raise ValueError("a feature set needs at least one video")
        self.store, self.array, self.streams, self.fusion = store, array, tuple(streams), fusion
        self.video_ids = [entry.video_id for entry in entries]
        steps_per_stream, self.records = [], {}
        for stream in self.streams:
            records = store.videos(stream)
            missing = [vid for vid in self.video_ids if vid not in records]
            if missing:
                raise StoreError(f"{len(missing)} video(s) of domain {entries[0].domain!r}, split "
                                 f"{entries[0].split!r} are not in stream {stream!r} of the store {store.root} (e.g. "
                                 f"{', '.join(missing[:3])}); extract them (`vidshift extract` resumes), check "
                                 f"`vidshift store info` for failures, or pass --skip-missing to train without them")
            self.records[stream] = [records[vid] for vid in self.video_ids]
            steps_per_stream.append(np.array([record.n_steps for record in self.records[stream]]))
        self.stream_steps = dict(zip(self.streams, steps_per_stream))   # each stream's own length, for offsets
        self.n_steps = np.min(steps_per_stream, axis=0)                  # the range every stream has
        self.labels = torch.tensor([class_index[entry.label] for entry in entries]) if labelled else None
        self._memory: dict[str, tuple[torch.Tensor, np.ndarray, np.ndarray]] | None = None  # per stream, held
        self.held_in: torch.device | Path | None = None   # the device, or the directory of the mapped files
        self.idle_loaders: dict[int, list[DataLoader]] = {}   # streaming loaders by worker count, see _streamed

    def __len__(self) -> int:
        return len(self.video_ids)

    def held_steps(self, video: int, centres_of: int | None) -> np.ndarray:
        """The steps of a video held in memory: every one, or the centres of ``centres_of`` segments."""
        if centres_of is None:
            return np.arange(self.n_steps[video])
        return np.unique(centre_steps(self.n_steps[video], centres_of))

    def nbytes(self, centres_of: int | None = None) -> int:
        """Memory the features take in memory (stored dtype: float16 maps, float32 pooled): every step, or only
        the segment centres (``centres_of`` segments) when the run reads nothing else."""
        total = 0
        for stream in self.streams:
            row = self._sample_row(stream)
            steps = (self.stream_steps[stream].sum() if centres_of is None else
                     sum(len(self.held_steps(v, centres_of)) for v in range(len(self))))
            total += int(steps) * row[0].nbytes
        return total

    def load(self, device: torch.device, centres_of: int | None = None) -> None:
        """Hold the features in one tensor per stream on ``device`` (fast random access by batch plans).

        ``centres_of``: hold only the centre steps of that many segments, all an evaluation set (or training with
        ``--train-sampling centre``) ever reads. The tensor is allocated once and filled in place, so memory peaks
        at its size plus one read of up to ``BULK_READ_BYTES``, not twice its size.
        """
        self._memory = {}
        for stream in self.streams:
            layout = self._layout(stream, centres_of)
            sample = self._sample_row(stream)
            features = torch.empty((layout.n_rows, *sample.shape[1:]), dtype=torch.from_numpy(sample).dtype,
                                   device=device)
            self._fill(features, stream, layout, centres_of)
            self._memory[stream] = (features, layout.offsets, layout.row_of)
        self.held_in = device

    def hold_on_disk(self, directory: Path, centres_of: int | None = None) -> None:
        """Hold the features in one memory-mapped ``.npy`` file per stream in ``directory``: batches index it as
        they index memory, and the kernel's page cache keeps in RAM what fits (shared by every process that maps
        the same file), the disk the rest.

        The file is named by the content hashes of what it holds (:meth:`disk_key`), so later runs on the same
        videos, of this store or of a copy, reuse it instead of reading the store again. It is written under a
        temporary name and renamed when complete: a killed run leaves no file that looks whole.
        """
        directory.mkdir(parents=True, exist_ok=True)
        self._memory = {}
        for stream in self.streams:
            layout = self._layout(stream, centres_of)
            sample = self._sample_row(stream)
            shape = (layout.n_rows, *sample.shape[1:])
            path = self._disk_path(directory, stream, centres_of)
            features = _mapped(path, shape, sample.dtype)
            if features is None:
                _remove_abandoned_copies(directory, path.name)
                partial = directory / f".tmp-{os.getpid()}-{path.name}"
                try:
                    written = np.lib.format.open_memmap(partial, mode="w+", dtype=sample.dtype, shape=shape)
                    self._fill(torch.from_numpy(written), stream, layout, centres_of)
                    written.flush()
                    del written
                    os.replace(partial, path)
                finally:
                    partial.unlink(missing_ok=True)
                features = _mapped(path, shape, sample.dtype)
            self._memory[stream] = (torch.from_numpy(features), layout.offsets, layout.row_of)
        self.held_in = directory

    def disk_key(self, stream: str, centres_of: int | None) -> str:
        """What a disk copy of ``stream`` holds, as a name: the array, which steps, and each video's content hash
        (its step count cut to the range every stream has). Records without a hash (stores of format 1) are
        named by where they are stored instead."""
        videos = [(record.sha256 or f"{self.store.root}:{record.part}:{record.offset}", int(n))
                  for record, n in zip(self.records[stream], self.n_steps)]
        identity = json.dumps([DISK_FORMAT, self.array, centres_of, videos])
        return hashlib.sha256(identity.encode()).hexdigest()[:32]

    def has_disk_copy(self, directory: Path, centres_of: int | None = None) -> bool:
        """Whether ``directory`` holds a disk copy of every stream (of what ``centres_of`` says is read)."""
        return all(self._disk_path(directory, stream, centres_of).is_file() for stream in self.streams)

    def _disk_path(self, directory: Path, stream: str, centres_of: int | None) -> Path:
        return directory / f"{self.disk_key(stream, centres_of)}.npy"

    def _layout(self, stream: str, centres_of: int | None) -> "_Layout":
        offsets = np.concatenate([[0], np.cumsum(self.stream_steps[stream])[:-1]])
        held = [self.held_steps(v, centres_of) for v in range(len(self))]
        first_row = np.concatenate([[0], np.cumsum([len(h) for h in held])[:-1]])
        row_of = np.full(int(self.stream_steps[stream].sum()), -1, dtype=np.int64)  # -1: step not held
        for v, steps in enumerate(held):
            row_of[offsets[v] + steps] = first_row[v] + np.arange(len(steps))
        return _Layout(offsets, held, first_row, row_of, int(first_row[-1] + len(held[-1])))

    def _sample_row(self, stream: str) -> np.ndarray:
        return self.store.read_record(self.records[stream][0], self.array, steps=[0])

    def _fill(self, features: torch.Tensor, stream: str, layout: "_Layout", centres_of: int | None) -> None:
        """Read the held steps of ``stream`` into ``features`` (rows in layout order)."""
        if centres_of is None:
            for v, rows in self.store.read_videos(self.records[stream], self.array):
                kept = rows[:self.n_steps[v]]   # a stream longer than the others (rgb beside flow) is cut
                features[layout.first_row[v]:layout.first_row[v] + len(kept)] = torch.from_numpy(kept)
        else:
            for v, steps in enumerate(layout.held):
                rows = self.store.read_record(self.records[stream][v], self.array, steps=steps)
                features[layout.first_row[v]:layout.first_row[v] + len(rows)] = torch.from_numpy(rows)

    @property
    def held(self) -> bool:
        """Whether batches index held features (in memory or a mapped file) instead of reading the store."""
        return self._memory is not None

    def gather(self, plan: BatchPlan) -> Inputs:
        """Features [B, N, ...] float32 of a plan, from the held features (call ``load`` or ``hold_on_disk``
        first), on the device that holds them."""
        per_stream = {}
        for stream, (features, offsets, row_of) in self._memory.items():
            rows = row_of[offsets[plan.videos][:, None] + plan.steps]
            if (rows < 0).any():
                raise RuntimeError(f"a batch reads steps the {stream!r} features held do not include (only the "
                                   f"segment centres were loaded); load every step for random sampling")
            per_stream[stream] = features[torch.from_numpy(rows).to(features.device)].float()
        return combine_streams(per_stream, self.fusion)

    def read(self, video: int, steps: np.ndarray) -> Inputs:
        return _StoredStreams.of(self).read(video, steps)


@dataclass(frozen=True)
class _StoredStreams:
    """What reading a FeatureSet's videos from its store takes, without the set itself."""

    store: FeatureStore
    records: dict[str, list]
    array: str
    streams: tuple[str, ...]
    fusion: str

    @classmethod
    def of(cls, features: FeatureSet) -> _StoredStreams:
        return cls(features.store, features.records, features.array, features.streams, features.fusion)

    def read(self, video: int, steps: np.ndarray) -> Inputs:
        return combine_streams({stream: torch.from_numpy(self.store.read_record(self.records[stream][video],
                                                                                self.array, steps)).float()
                                for stream in self.streams}, self.fusion)


@dataclass(frozen=True)
class _Layout:
    """Where a stream's held steps go: rows of video v start at ``first_row[v]``; ``row_of`` maps (the video's
    offset in the stream's concatenated steps + step) to a row, -1 where the step is not held."""

    offsets: np.ndarray
    held: list[np.ndarray]
    first_row: np.ndarray
    row_of: np.ndarray
    n_rows: int


def _mapped(path: Path, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray | None:
    """The disk copy at ``path`` mapped copy-on-write (read-only in effect; torch wants a writable array), or
    None when there is none of that shape and dtype (never written, or cut short)."""
    try:
        array = np.load(path, mmap_mode="c")
    except (OSError, ValueError):
        return None
    return array if array.shape == shape and array.dtype == dtype else None


def _remove_abandoned_copies(directory: Path, name: str) -> None:
    """Delete the partial copies named ``name`` that killed processes left (``.tmp-<pid>-<name>``); a copy being
    written by a live process is left alone."""
    for partial in directory.glob(f".tmp-*-{name}"):
        pid = int(partial.name.split("-")[1])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            partial.unlink(missing_ok=True)
        except PermissionError:     # alive, another user's
            pass


def disk_has_room(directory: Path, nbytes: int) -> bool:
    """Whether ``nbytes`` more fit on the filesystem of ``directory`` (created or not) with DISK_HEADROOM left."""
    existing = next(parent for parent in (directory, *directory.parents) if parent.exists())
    return shutil.disk_usage(existing).free >= nbytes + DISK_HEADROOM


class _PlanDataset(Dataset):
    """Reads the features of the BatchPlan it is given as its index (in DataLoader workers).

    It holds the set's store and records, not the set: the set holds its idle loaders (and so this dataset), and
    that reference cycle would leave their shutdown to the garbage collector, which may close the loader's
    queues before the loader tells its workers to stop; each worker then sat out DataLoader's 5 s join timeout
    (10 s per discarded set with the default 2 workers, once per DG run's target train split). Without the
    cycle, dropping the set shuts its workers down at once. Workers started by spawn pickle only this, too.
    """

    def __init__(self, features: FeatureSet) -> None:
        self.stored = _StoredStreams.of(features)

    def __getitem__(self, plan: BatchPlan) -> Inputs:
        if not len(plan.videos):    # a batch of added examples only (ADA)
            return {}
        videos = [self.stored.read(v, s) for v, s in zip(plan.videos, plan.steps)]
        return map_inputs(lambda *per_video: torch.stack(per_video), *videos)


class _PlanSampler(Sampler):
    """The plans of a loader's current pass, handed to its workers as indices: a loader (and its worker
    processes) then serves every epoch, instead of forking new workers for each pass over a set."""

    def __init__(self) -> None:
        self.plans: list[BatchPlan] = []

    def __iter__(self) -> Iterator[BatchPlan]:
        return iter(self.plans)

    def __len__(self) -> int:
        return len(self.plans)


def _streamed(features: FeatureSet, plans: list[BatchPlan], workers: int) -> Iterator[Inputs]:
    """The features of each plan, read by ``workers`` persistent DataLoader processes (0: this process).

    A set keeps its idle loaders: each pass takes one (or makes one: two passes over the same set may be in
    flight, e.g. a method's before-epoch statistics) and gives it back when it ends or is abandoned.
    """
    idle = features.idle_loaders.setdefault(workers, [])
    # Its own generator: a DataLoader otherwise draws its worker seed from the global RNG, and streaming would
    # then change the head's dropout draws relative to in-memory training.
    loader = idle.pop() if idle else DataLoader(
        _PlanDataset(features), batch_size=None, sampler=_PlanSampler(), num_workers=workers,
        persistent_workers=workers > 0, prefetch_factor=4 if workers else None, generator=torch.Generator())
    loader.sampler.plans = plans
    try:
        yield from loader
    finally:
        idle.append(loader)


def iterate(features: FeatureSet, plans: list[BatchPlan], workers: int, device: torch.device):
    """Yield (plan, features [B, N, ...] on ``device``, or {stream: ...}) for each plan, from the held features
    or read from the store by ``workers`` processes.

    A plan without videos (only added examples) yields an empty dict as features.
    """
    batches = (features.gather(plan) for plan in plans) if features.held else _streamed(features, plans, workers)
    for plan, batch in zip(plans, batches):
        yield plan, map_inputs(lambda x: x.to(device), batch) if len(plan.videos) else {}


def place_features(sets: list[tuple[FeatureSet, int | None]], where: str, device: torch.device,
                   budget_bytes: int, disk: Path | None = None) -> str:
    """Hold the sets in memory (``memory``), stream all of them (``stream``), or, for ``auto``, hold in memory
    every set that fits the budget, the smallest first, and stream the rest. Returns what it did, for the log.

    ``sets``: (set, the centres of how many segments the run reads of it, or None for every step); memory holds
    only what is read. Smallest first because the evaluation sets' segment centres are a few steps per video and
    are read again every epoch: when the training features do not fit, they still do.

    A streamed set is held in a memory-mapped file in ``disk`` (:meth:`FeatureSet.hold_on_disk`) when there is
    room for it there: batches then index the file as they index memory, at page-cache speed. Without ``disk``,
    or without room, each batch is read from the store by DataLoader workers (a store call per video: slower,
    and zarr's calls cost ~1-3 ms each).
    """
    if where not in FEATURE_PLACES:
        raise ValueError(f"features place {where!r}: use one of {', '.join(FEATURE_PLACES)}")
    sizes = [feature_set.nbytes(centres_of) for feature_set, centres_of in sets]
    in_memory: list[int] = []
    if where == "memory":
        in_memory = list(range(len(sets)))
    elif where == "auto":
        for i in sorted(range(len(sets)), key=sizes.__getitem__):
            if sum(sizes[j] for j in in_memory) + sizes[i] <= budget_bytes:
                in_memory.append(i)
    on_disk = []
    for i, (feature_set, centres_of) in enumerate(sets):
        if i in in_memory:
            feature_set.load(device, centres_of)
        elif disk is not None and (feature_set.has_disk_copy(disk, centres_of) or disk_has_room(disk, sizes[i])):
            feature_set.hold_on_disk(disk, centres_of)
            on_disk.append(i)
    places = [(in_memory, f"in memory on {device}"), (on_disk, f"in mapped files in {disk}"),
              ([i for i in range(len(sets)) if i not in in_memory + on_disk], "streamed from the store by workers")]
    described = [f"{len(held)} of {len(sets)} sets {place} ({sum(sizes[i] for i in held) / 2**20:.1f} MiB)"
                 for held, place in places if held]
    budget = f"in-memory budget {budget_bytes / 2**20:.0f} MiB" if where == "auto" else f"--features {where}"
    return f"{'; '.join(described)}; {budget}"


def target_batch_size(source_batch: int, n_source: int, n_target: int) -> int:
    """Target batch size following the ratio of the training sets (TA3N: 128 source -> 74 target on UCF-HMDB)."""
    return max(1, math.floor(source_batch * n_target / n_source))
