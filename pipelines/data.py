"""Cached features for stage two: videos of one domain and split, TSN segment sampling, batches.

A ``FeatureSet`` is the videos of one (domain, split) of a manifest, looked up in a store. Which time steps a
batch takes is decided in the main process by a seeded generator (``epoch_plan``), and only then are the
features fetched, from memory or from the store by DataLoader worker processes. Both paths therefore give the
same numbers, and the choice between them is just a matter of whether the features fit in memory.

TSN sampling (DESIGN §6, TA3N code ``dataset.py``): a video's T steps are cut into N equal segments; training
takes one random step per segment (or the segment centre, the official TA3N code's choice); evaluation takes
the centres ``int(T/N/2 + T/N*i)``. Videos shorter than N repeat their last step.

Several streams of one store (``--stream rgb,flow``) share one batch plan: a video's steps are cut to the range
every stream has (optical flow has one step fewer per clip than RGB), so the same step of every stream is read.
A batch is then {stream: features} (late fusion, one architecture per stream) or the streams' features
concatenated per step on the channel axis (early fusion, EPIC's ``ALL``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from extract.manifest import VideoEntry
from extract.store import FeatureStore, StoreError
from heads.base import Inputs, map_inputs

TRAIN_SAMPLINGS = ("random", "centre")
FEATURE_PLACES = ("auto", "memory", "stream")
FUSIONS = ("late", "early")


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
        steps_per_stream = []
        for stream in self.streams:
            records = store.videos(stream)
            missing = [vid for vid in self.video_ids if vid not in records]
            if missing:
                raise StoreError(f"{len(missing)} video(s) of domain {entries[0].domain!r}, split "
                                 f"{entries[0].split!r} are not in stream {stream!r} of the store {store.root} (e.g. "
                                 f"{', '.join(missing[:3])}); extract them (`vidshift extract` resumes), check "
                                 f"`vidshift store info` for failures, or pass --skip-missing to train without them")
            steps_per_stream.append(np.array([records[vid].n_steps for vid in self.video_ids]))
        self.stream_steps = dict(zip(self.streams, steps_per_stream))   # each stream's own length, for offsets
        self.n_steps = np.min(steps_per_stream, axis=0)                  # the range every stream has
        self.labels = torch.tensor([class_index[entry.label] for entry in entries]) if labelled else None
        self._memory: dict[str, tuple[torch.Tensor, np.ndarray]] | None = None

    def __len__(self) -> int:
        return len(self.video_ids)

    def nbytes(self) -> int:
        """Memory the features take when held whole (stored dtype: float16 maps, float32 pooled)."""
        total = 0
        for stream in self.streams:
            row = self.store.read(self.video_ids[0], self.array, steps=[0], stream=stream)
            total += int(self.stream_steps[stream].sum()) * row[0].nbytes
        return total

    def load(self, device: torch.device) -> None:
        """Hold every step of every video in one tensor per stream on ``device`` (fast random access)."""
        self._memory = {}
        for stream in self.streams:
            rows = [self.store.read(vid, self.array, stream=stream) for vid in self.video_ids]
            offsets = np.concatenate([[0], np.cumsum(self.stream_steps[stream])[:-1]])
            self._memory[stream] = (torch.from_numpy(np.concatenate(rows)).to(device), offsets)

    @property
    def in_memory(self) -> bool:
        return self._memory is not None

    def gather(self, plan: BatchPlan) -> Inputs:
        """Features [B, N, ...] float32 of a plan, from memory (call ``load`` first)."""
        per_stream = {}
        for stream, (features, offsets) in self._memory.items():
            index = torch.from_numpy(offsets[plan.videos][:, None] + plan.steps).to(features.device)
            per_stream[stream] = features[index].float()
        return combine_streams(per_stream, self.fusion)

    def read(self, video: int, steps: np.ndarray) -> Inputs:
        return combine_streams({stream: torch.from_numpy(self.store.read(self.video_ids[video], self.array,
                                                                         steps=steps, stream=stream)).float()
                                for stream in self.streams}, self.fusion)


class _PlanDataset(Dataset):
    """Streams the features of one BatchPlan per item from the store (used by DataLoader workers)."""

    def __init__(self, features: FeatureSet, plans: list[BatchPlan]) -> None:
        self.features, self.plans = features, plans

    def __len__(self) -> int:
        return len(self.plans)

    def __getitem__(self, i: int) -> Inputs:
        plan = self.plans[i]
        if not len(plan.videos):    # a batch of added examples only (ADA)
            return {}
        videos = [self.features.read(v, s) for v, s in zip(plan.videos, plan.steps)]
        return map_inputs(lambda *per_video: torch.stack(per_video), *videos)


def iterate(features: FeatureSet, plans: list[BatchPlan], workers: int, device: torch.device):
    """Yield (plan, features [B, N, ...] on ``device``, or {stream: ...}) for each plan, from memory or streamed.

    A plan without videos (only added examples) yields an empty dict as features.
    """
    if features.in_memory:
        for plan in plans:
            yield plan, features.gather(plan)
        return
    # Its own generator: a DataLoader otherwise draws its worker seed from the global RNG, and streaming would
    # then change the head's dropout draws relative to in-memory training.
    loader = DataLoader(_PlanDataset(features, plans), batch_size=None, num_workers=workers,
                        prefetch_factor=4 if workers else None, generator=torch.Generator())
    for plan, batch in zip(plans, loader):
        yield plan, map_inputs(lambda x: x.to(device), batch) if len(plan.videos) else {}


def place_features(sets: list[FeatureSet], where: str, device: torch.device, budget_bytes: int) -> str:
    """Load the sets into memory when ``where`` says so, or, for ``auto``, when together they fit the budget."""
    if where not in FEATURE_PLACES:
        raise ValueError(f"features place {where!r}: use one of {', '.join(FEATURE_PLACES)}")
    total = sum(s.nbytes() for s in sets)
    if where == "memory" or (where == "auto" and total <= budget_bytes):
        for feature_set in sets:
            feature_set.load(device)
        return f"memory ({total / 2**20:.1f} MiB on {device})"
    return f"streamed from the store ({total / 2**20:.1f} MiB; in-memory budget {budget_bytes / 2**20:.0f} MiB)"


def target_batch_size(source_batch: int, n_source: int, n_target: int) -> int:
    """Target batch size following the ratio of the training sets (TA3N: 128 source -> 74 target on UCF-HMDB)."""
    return max(1, math.floor(source_batch * n_target / n_source))
