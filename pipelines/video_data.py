"""End-to-end mode's data (``vidshift finetune``): decoded frames of a manifest's videos, TSN segments, and the
augmentation of the official TSN-family code that APN and STDN fine-tune with (research/heads_official_code.md §2.1,
§3.1).

- Frames come from stage one's decoders (``extract/decode.py``: decord for video files, PIL for frame folders),
  opened inside the DataLoader worker that reads the clip, so no decoder is ever shared between processes.
- A video's time steps are its frames (its ``[start_frame, end_frame]`` range for a segment row). Which frames a
  batch takes is planned in the main process by the same TSN sampler the cached-feature mode uses
  (``pipelines/data.py``: one random frame per segment in training, the centres at test), so both modes sample
  alike; TSN's own sampler puts its segments ``floor(T/N)`` frames apart (leaving up to N-1 tail frames unsampled)
  where ours cuts T into N equal parts.
- Training: ``GroupMultiScaleCrop(S, [1, .875, .75, .66])`` (TSN ``transforms.py``: a (width, height) pair of
  those fractions of the shorter side, at most one scale apart, sizes within 3 px of S snapped to S, at one of 13
  fixed offsets), resized to S x S, then a horizontal flip with p = 0.5, the same for every frame of the clip.
  Test: the shorter side resized to ``S * 256 / 224`` (256 at S = 224), centre crop S (TSN ``GroupScale`` +
  ``GroupCenterCrop``, stage one's ``Preprocess``). The crop, offset and flip are drawn in the main process with
  the batch plan, so a run is the same with any number of workers or GPUs.
- A video that cannot be opened is skipped and listed before training (:func:`probe_videos`); one that fails while
  its frames are decoded is dropped from that batch, listed, and left out of later epochs (``pipelines/finetune.py``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.v2 import functional as TF

from extract.backbones import Preprocess
from extract.decode import DecodeError, open_source
from extract.manifest import VideoEntry
from pipelines.data import BatchPlan, PlannedVideos

MULTI_SCALES = (1.0, 0.875, 0.75, 0.66)          # TSN GroupMultiScaleCrop's scales
MAX_DISTORT = 1                                  # width and height at most one scale apart
SNAP_PX = 3                                      # a crop side within 3 px of the input size becomes the input size
# (width scale, height scale) indices in TSN's order: heights outer, widths inner
CROP_PAIRS = tuple((w, h) for h in range(len(MULTI_SCALES)) for w in range(len(MULTI_SCALES))
                   if abs(w - h) <= MAX_DISTORT)
# TSN fill_fix_offset(more_fix_crop=True): offsets in quarters of the free width / height, in its order
FIXED_OFFSETS = ((0, 0), (4, 0), (0, 4), (4, 4), (2, 2), (0, 2), (4, 2), (2, 4), (2, 0), (1, 1), (3, 1), (1, 3),
                 (3, 3))


def eval_preprocess(frame_size: int) -> Preprocess:
    """The test transform: shorter side to ``frame_size * 256 / 224``, centre crop, ImageNet mean/std."""
    return Preprocess(frame_size, round(frame_size * 256 / 224))


def crop_box(width: int, height: int, size: int, pair: int, offset: int) -> tuple[int, int, int, int]:
    """(left, top, crop width, crop height) of GroupMultiScaleCrop's ``pair``-th size at its ``offset``-th offset."""
    base = min(width, height)
    sides = [size if abs(int(base * scale) - size) < SNAP_PX else int(base * scale) for scale in MULTI_SCALES]
    w_index, h_index = CROP_PAIRS[pair]
    crop_w, crop_h = sides[w_index], sides[h_index]
    quarter_w, quarter_h = (width - crop_w) // 4, (height - crop_h) // 4
    across, down = FIXED_OFFSETS[offset]
    return across * quarter_w, down * quarter_h, crop_w, crop_h


def augment_clip(frames: torch.Tensor, size: int, pair: int, offset: int, flip: bool) -> torch.Tensor:
    """Training transform of uint8 frames [N, 3, H, W]: the multi-scale crop resized to size x size, maybe flipped."""
    left, top, crop_w, crop_h = crop_box(frames.shape[-1], frames.shape[-2], size, pair, offset)
    # out-of-frame parts of a crop (a frame smaller than the snapped size) are black, as PIL's crop pads them
    frames = TF.resized_crop(frames, top, left, crop_h, crop_w, [size, size], antialias=True)
    return TF.horizontal_flip(frames) if flip else frames


def eval_clip(frames: torch.Tensor, preprocess: Preprocess) -> torch.Tensor:
    """Test transform of uint8 frames [N, 3, H, W]: resize the shorter side, centre crop."""
    return TF.center_crop(TF.resize(frames, [preprocess.resize], antialias=True), [preprocess.frame_size])


def normalise(frames: torch.Tensor, preprocess: Preprocess) -> torch.Tensor:
    """uint8 clips [B, N, S, S, 3] -> float32 (v / 255 - mean) / std per channel, channels last, on their device."""
    mean, std = (torch.tensor(v, device=frames.device) for v in (preprocess.mean, preprocess.std))
    return (frames.float() / 255.0 - mean) / std


# ----------------------------------------------------------------------------------------------------------
# the videos of one domain and split


@dataclass(frozen=True)
class ClipPlan(BatchPlan):
    """A batch plan with the training augmentation of each video, [B, 3] (crop pair, offset, flip), or None (test)."""

    augment: np.ndarray | None = None


class VideoSet(PlannedVideos):
    """The videos of one domain and split that decode: paths, first frames, frame counts (``n_steps``), labels."""

    def __init__(self, entries: list[VideoEntry], root: Path, frames: dict[str, int], class_index: dict[str, int],
                 labelled: bool = True) -> None:
        self.entries = [entry for entry in entries if entry.video_id in frames]
        if not self.entries:
            raise ValueError(f"no video of domain {entries[0].domain!r}, split {entries[0].split!r} decodes")
        self._rebuild = (root, frames, class_index, labelled)
        self.video_ids = [entry.video_id for entry in self.entries]
        self.paths = [entry.resolve(root) for entry in self.entries]
        self.first_frames = np.array([entry.start_frame or 0 for entry in self.entries])
        self.n_steps = np.array([frames[entry.video_id] for entry in self.entries])
        self.labels = (torch.tensor([class_index[entry.label] for entry in self.entries]) if labelled else None)

    def __len__(self) -> int:
        return len(self.video_ids)

    def without(self, video_ids: set[str]) -> VideoSet:
        """This set less ``video_ids`` (videos that failed while training)."""
        if not video_ids & set(self.video_ids):
            return self
        return VideoSet([entry for entry in self.entries if entry.video_id not in video_ids], *self._rebuild)

    def training_plans(self, num_segments: int, batch_size: int, num_batches: int, sampling: str,
                       generator: torch.Generator) -> list[ClipPlan]:
        """TSN training batches (``epoch_plans``) with each video's crop pair, offset and flip drawn after them."""
        plans = self.epoch_plans(num_segments, batch_size, num_batches, sampling, generator)
        drawn = []
        for plan in plans:
            count = len(plan.videos)
            augment = torch.stack([torch.randint(len(CROP_PAIRS), (count,), generator=generator),
                                   torch.randint(len(FIXED_OFFSETS), (count,), generator=generator),
                                   (torch.rand(count, generator=generator) < 0.5).long()], dim=1)
            drawn.append(ClipPlan(plan.videos, plan.steps, augment=augment.numpy()))
        return drawn

    def centre_plans(self, num_segments: int, batch_size: int, videos: np.ndarray | None = None) -> list[ClipPlan]:
        """Every video (or ``videos``, positions in order) once at its segment centres, in batches."""
        plans = self.eval_plans(num_segments, batch_size, videos)
        return [ClipPlan(plan.videos, plan.steps) for plan in plans]


def shard(plan: ClipPlan, rank: int, world: int) -> ClipPlan:
    """This process's contiguous share of a global batch (``DataParallel``'s scatter); equal shares when
    the batch divides by ``world``."""
    bounds = np.linspace(0, len(plan.videos), world + 1).round().astype(int)
    part = slice(bounds[rank], bounds[rank + 1])
    return ClipPlan(plan.videos[part], plan.steps[part],
                    augment=plan.augment[part] if plan.augment is not None else None)


# ----------------------------------------------------------------------------------------------------------
# decoding in DataLoader workers


def _set_worker_threads(_worker: int) -> None:
    torch.set_num_threads(1)   # parallelism is across workers; torch's pool in each one would oversubscribe


def _loader(dataset: Dataset, workers: int) -> DataLoader:
    # Its own generator: a DataLoader otherwise draws its worker seed from the global RNG (the model's dropout)
    return DataLoader(dataset, batch_size=None, num_workers=workers, prefetch_factor=2 if workers else None,
                      worker_init_fn=_set_worker_threads, generator=torch.Generator())


class _ProbeDataset(Dataset):
    def __init__(self, entries: list[VideoEntry], root: Path) -> None:
        self.entries, self.root = entries, root

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> tuple[str, int | None, str]:
        entry = self.entries[i]
        try:
            source = open_source(entry.resolve(self.root))
            count = source.num_frames
            source.close()
        except DecodeError as error:
            return entry.video_id, None, str(error)
        first, last = entry.start_frame or 0, count - 1 if entry.end_frame is None else entry.end_frame
        if not 0 <= first <= last < count:
            return entry.video_id, None, (f"{entry.resolve(self.root)}: frames [{first}, {last}] are not within "
                                          f"the video's {count} frames")
        return entry.video_id, last - first + 1, ""


def probe_videos(entries: list[VideoEntry], root: Path, workers: int) -> tuple[dict[str, int], dict[str, str]]:
    """Open every video once (in worker processes): frames per video id, and the reason of each that fails."""
    frames, failures = {}, {}
    for video_id, count, reason in _loader(_ProbeDataset(entries, root), workers):
        if count is None:
            failures[video_id] = reason
        else:
            frames[video_id] = count
    return frames, failures


@dataclass
class Clips:
    """The decoded clips of a plan: uint8 [k, N, S, S, 3] of the videos ``kept`` (positions in the plan)."""

    frames: torch.Tensor
    kept: np.ndarray
    failures: dict[str, str] = field(default_factory=dict)   # video id -> reason


class _ClipDataset(Dataset):
    def __init__(self, videos: VideoSet, plans: list[ClipPlan], preprocess: Preprocess) -> None:
        self.videos, self.plans, self.preprocess = videos, plans, preprocess

    def __len__(self) -> int:
        return len(self.plans)

    def __getitem__(self, i: int) -> Clips:
        plan, size = self.plans[i], self.preprocess.frame_size
        clips, kept, failures = [], [], {}
        for position, (video, steps) in enumerate(zip(plan.videos, plan.steps)):
            path = self.videos.paths[video]
            try:
                source = open_source(path)
                try:
                    decoded = source.read(self.videos.first_frames[video] + steps)
                finally:
                    source.close()
                if len(decoded) != len(steps):
                    raise DecodeError(f"{path}: {len(decoded)} of the {len(steps)} requested frames decoded")
            except DecodeError as error:
                failures[self.videos.video_ids[video]] = str(error)
                continue
            frames = torch.from_numpy(np.ascontiguousarray(decoded)).permute(0, 3, 1, 2)
            if plan.augment is None:
                frames = eval_clip(frames, self.preprocess)
            else:
                pair, offset, flip = plan.augment[position]
                frames = augment_clip(frames, size, int(pair), int(offset), bool(flip))
            clips.append(frames.permute(0, 2, 3, 1).contiguous())
            kept.append(position)
        stacked = (torch.stack(clips) if clips
                   else torch.zeros((0, plan.steps.shape[1], size, size, 3), dtype=torch.uint8))
        return Clips(stacked, np.array(kept, dtype=np.int64), failures)


def iterate_clips(videos: VideoSet, plans: list[ClipPlan], preprocess: Preprocess, workers: int):
    """Yield (plan, Clips) per plan, decoded ahead in ``workers`` processes (0: in this one), in plan order."""
    yield from zip(plans, _loader(_ClipDataset(videos, plans, preprocess), workers))
