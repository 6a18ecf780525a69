"""Clip time steps: one time step is a window of frames, for 3D networks (I3D) and optical-flow stacks.

``--clip-length L --clip-stride S`` cut a video's items into windows of L; the items are the sampled frames
(``--sampling`` chooses them first, so ``fps:F`` resamples before windowing), or, for the flow stream, the
flow fields between consecutive sampled frames (n frames give n - 1 fields, so a flow window spans L + 1 frames).
``ClipWindows.plan`` says which windows a video of n items gets:
- windows start at 0, S, 2S, ... while they fit: [kS, kS + L) (S < L overlaps them, S > L skips frames);
- the tail: when items after the last full window would be left out although the next hop starts inside the
  video, one more window ends at the last item, [n - L, n), overlapping the one before, so no frame is dropped;
- a video shorter than one window: one window, padded to L by repeating the last frame (for flow: zero flow,
  which is what a repeated frame has); the video table records ``padded_frames``. Nothing is silently dropped.
A step's ``steps`` row is the first and last source frame the window really covers (padding excluded).

The network sees [B, L, C, s, s] (C = 3 RGB channels in [-1, 1] or ImageNet-normalised, or 2 flow channels):
a 3D network gets [B, C, L, s, s] and its maps [B, C', T', h, w] are averaged over T' (one map per window;
video_features averages I3D's Mixed_5c over time the same way, through a (2, 7, 7) average pool whose windows
weigh the two end steps half: the same numbers for T' = 2, i.e. 16-frame clips), a 2D network gets the L items
stacked on the channel axis, [B, L * C, s, s], frame-major (x1, y1, x2, y2, ...), as TSN stacks flow images.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torchvision.transforms.v2 import functional as TF

from .backbones import Backbone, Preprocess, StepBatch
from .flow import FlowEstimator, scale_flow


@dataclass(frozen=True)
class ClipWindows:
    length: int  # items per window
    stride: int  # hop between window starts

    def __post_init__(self) -> None:
        if self.length < 1 or self.stride < 1:
            raise ValueError(f"--clip-length {self.length} --clip-stride {self.stride}: both must be at least 1 "
                             f"(frames per time step and the hop between steps)")

    def plan(self, items: int) -> list[tuple[int, int]]:
        """[(start, stop)] item positions of each window, sorted; stop - start == length, stop may pass ``items``
        (the window is then padded)."""
        if items < self.length:
            return [(0, self.length)]
        starts = list(range(0, items - self.length + 1, self.stride))
        last = starts[-1]
        if last + self.length < items and last + self.stride < items:
            starts.append(items - self.length)
        return [(start, start + self.length) for start in starts]

    def as_dict(self) -> dict:
        return {"length": self.length, "stride": self.stride,
                "policy": "tail window ends at the last frame; shorter videos padded with their last frame"}


class ClipBackbone(Backbone):
    """A backbone whose time step is a window of ``clip.length`` items (here: RGB frames)."""

    ITEM_FRAMES = 1  # consecutive frames that make one item: 1 for an RGB frame, 2 for a flow field

    def __init__(self, name: str, layer: str, model: nn.Module, clip: ClipWindows, weights: str,
                 preprocess: Preprocess, device: torch.device, precision: str, in_channels: int = 3,
                 stacked: bool = False):
        self.clip, self.in_channels, self.stacked = clip, in_channels, stacked
        if not stacked:  # a 3D network's weights and inputs are 5-D
            self.MEMORY_FORMAT = torch.channels_last_3d
        super().__init__(name, layer, model, clip.length + self.ITEM_FRAMES - 1, weights, preprocess, device,
                         precision)

    def provenance(self) -> dict:
        return {**super().provenance(), "clip": self.clip.as_dict()}

    def _probe_input(self) -> torch.Tensor:
        side = self.preprocess.frame_size
        return torch.zeros(1, self.clip.length, self.in_channels, side, side, device=self.device)

    def _network(self, x: torch.Tensor) -> torch.Tensor:
        """Windows [B, L, C, s, s] -> one map per window [B, C', h, w]."""
        if self.stacked:
            return self.network(x.flatten(1, 2).contiguous(memory_format=self._memory_format))
        maps = self.network(x.transpose(1, 2).contiguous(memory_format=self._memory_format))
        return maps.mean(dim=2)

    def _items(self, batches: Iterable[tuple[np.ndarray, np.ndarray]]) -> Iterator[torch.Tensor]:
        """Decode batches -> network input items [k, C, s, s] on the device, in order."""
        for _, frames in batches:
            yield self._normalised(self._resized(frames))

    def _pad_item(self, last: torch.Tensor | None) -> torch.Tensor:
        """The item that pads a window past the video's end: the last frame again."""
        return last

    def clip_input(self, clips: np.ndarray) -> torch.Tensor:
        """uint8 RGB clips [B, F, H, W, 3] (F = frames_per_step) -> network input [B, L, C, s, s] on the device."""
        if not (isinstance(clips, np.ndarray) and clips.ndim == 5 and clips.shape[1] == self.frames_per_step):
            got = clips.shape if isinstance(clips, np.ndarray) else type(clips)
            raise ValueError(f"{self.name}: expected uint8 clips shaped [B, {self.frames_per_step}, H, W, 3], "
                             f"got {got}")
        return torch.stack([torch.cat(list(self._items([(np.arange(len(clip)), clip)]))) for clip in clips])

    def __call__(self, clips: np.ndarray) -> torch.Tensor:
        """uint8 RGB clips [B, F, H, W, 3] (F = frames_per_step) -> float32 maps [B, h, w, C] on the CPU."""
        return self.run_network(self.clip_input(clips))

    def video_steps(self, batches: Iterable[tuple[np.ndarray, np.ndarray]], indices: np.ndarray,
                    batch_size: int) -> Iterator[StepBatch]:
        """One video's decode batches -> its windows' maps, each window computed as soon as its frames arrived.

        ``batch_size`` frames per network call: batch_size // length windows (at least one). Only the items from
        the next window's start on are kept, so memory stays at about one call's worth of frames.
        """
        frames, items = len(indices), max(len(indices) - self.ITEM_FRAMES + 1, 0)
        windows = self.clip.plan(items)
        per_call = max(1, batch_size // self.clip.length)
        buffer: torch.Tensor | None = None
        buffer_start = next_window = 0

        def window(start: int, stop: int) -> torch.Tensor:
            real = buffer[start - buffer_start:min(stop, items) - buffer_start] if buffer is not None else None
            count = 0 if real is None else len(real)
            if count == self.clip.length:
                return real
            pad = self._pad_item(real[-1] if count else None).expand(self.clip.length - count, -1, -1, -1)
            return pad if real is None else torch.cat([real, pad])

        def ready(available: int) -> Iterator[StepBatch]:
            nonlocal next_window
            first = next_window
            while next_window < len(windows) and min(windows[next_window][1], items) <= available:
                next_window += 1
            for offset in range(first, next_window, per_call):
                chunk = windows[offset:min(offset + per_call, next_window)]
                steps = np.array([[indices[min(start, frames - 1)],
                                   indices[min(min(stop, items) + self.ITEM_FRAMES - 2, frames - 1)]]
                                  for start, stop in chunk], dtype=np.int32)
                padded = sum(stop - max(min(stop, items), start) for start, stop in chunk)
                yield StepBatch(steps, self.run_network(torch.stack([window(*w) for w in chunk])), padded)

        for new_items in self._items(batches):
            buffer = new_items if buffer is None else torch.cat([buffer, new_items])
            yield from ready(buffer_start + len(buffer))
            keep = windows[next_window][0] if next_window < len(windows) else buffer_start + len(buffer)
            buffer, buffer_start = buffer[keep - buffer_start:], keep
        yield from ready(items)  # windows padded past the last item


class FlowBackbone(ClipBackbone):
    """A clip backbone on optical flow: each item is the flow between two consecutive sampled frames.

    Flow is computed on the frames resized to the shorter side ``resize``, before the centre crop (I3D computes
    TV-L1 on the resized frames, then crops), by ``estimator`` on the backbone's device, then clipped and
    scaled to [-1, 1] (``extract.flow.scale_flow``). Each decode batch's pairs go to the estimator together;
    the last frame of a batch is kept to pair with the first of the next.
    """

    ITEM_FRAMES = 2

    def __init__(self, name: str, layer: str, model: nn.Module, clip: ClipWindows, weights: str,
                 preprocess: Preprocess, device: torch.device, precision: str, estimator: FlowEstimator,
                 stacked: bool = False):
        if preprocess.resize < estimator.min_side:
            raise ValueError(f"--resize {preprocess.resize}: {estimator.provenance()['method']} needs frames of at "
                             f"least {estimator.min_side} px (flow is computed on the resized frames); use --resize "
                             f"{estimator.min_side} or more")
        self.estimator = estimator
        super().__init__(name, layer, model, clip, weights, preprocess, device, precision, in_channels=2,
                         stacked=stacked)

    def provenance(self) -> dict:
        p = self.preprocess
        preprocess = {"method": "resize shorter side (bilinear, antialias), optical flow between consecutive "
                                "sampled frames, centre crop, clip to +-bound_px, / bound_px",
                      "frame_size": p.frame_size, "resize": p.resize}
        return {**super().provenance(), "preprocess": preprocess, "input": "optical flow",
                "flow": self.estimator.provenance()}

    def _items(self, batches: Iterable[tuple[np.ndarray, np.ndarray]]) -> Iterator[torch.Tensor]:
        previous = None
        for _, frames in batches:
            resized = self._resized(frames)
            sequence = resized if previous is None else torch.cat([previous, resized])
            previous = resized[-1:].clone()  # not a view: it would keep the whole batch alive
            if len(sequence) > 1:
                flow = self.estimator(sequence[:-1], sequence[1:])
                yield scale_flow(TF.center_crop(flow, [self.preprocess.frame_size]))

    def _pad_item(self, last: torch.Tensor | None) -> torch.Tensor:
        side = self.preprocess.frame_size
        return torch.zeros(2, side, side, device=self.device)
