"""Stage one's decoding layer: open a video or a frame directory, plan which frames to sample, and decode
them in bounded batches, ahead of the consumer, in background threads.

Everything downstream sees one interface, `FrameSource.read(sorted indices) -> uint8 RGB [n, H, W, 3]`.
`open_source` picks the first registered reader whose `accepts(path)` is true: decord for video files, PIL for
directories of JPEG/PNG frames. Another decoder is one `register_reader` call; torchcodec (CPU, and CUDA/NVDEC)
is registered that way (`extract/torchcodec_reader.py`) and chosen per run by name (`VIDEO_DECODERS`,
``vidshift extract --decoder``), which puts it ahead of the others for that run's videos.

Decoding never hides damage (research/extraction.md §5.5): every planned frame must really come back, else a
DecodeError names the file and the frame index where decoding stopped, after the good batches before it.
"""
from __future__ import annotations

import math
import queue
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Protocol

import decord
import numpy as np
import PIL
from PIL import Image

# decord 0.6.0 cannot return frames of exactly these widths: it allocates the padded width FFmpeg decoded
# into and then refuses to copy it into the unpadded array ("Check failed: from_size == to_size"). Measured
# for H.264 and MPEG-4 at every even width from 2 to 1024 px (10 and 14 work); heights do not matter.
DECORD_UNREADABLE_WIDTHS = (2, 4, 6, 8, 12, 16, 24, 48, 72)
FRAME_DIR_FPS = 30.0  # frame rate of a frame directory when the caller gives none (it has no container)


class DecodeError(Exception):
    """A video could not be opened, or stopped decoding part-way. str() says which file and why."""


class FrameSource(Protocol):
    """One opened video or frame directory."""

    path: Path
    num_frames: int  # frames the container / directory claims to have
    fps: float
    backend: str  # e.g. "decord-0.6.0"; goes into the store's provenance

    def read(self, indices: np.ndarray) -> np.ndarray: ...  # sorted indices -> uint8 RGB [n, H, W, 3]
    def close(self) -> None: ...


# ---------------------------------------------------------------------------------------------- readers

class DecordSource:
    """A video file decoded by decord on the CPU with one decoder thread (we parallelise across videos)."""

    # decord's default fault_tol=-1 silently returns a copy of the last good frame for a frame it cannot
    # decode. It raises once the count of such frames exceeds int(fault_tol * num_frames); a tiny fraction
    # makes that threshold 0, so the first substituted frame raises. (fault_tol=0 would switch the check off.)
    _NO_SUBSTITUTED_FRAMES = 1e-12

    def __init__(self, path: Path, fps: float | None = None):
        del fps  # a video carries its own frame rate; the caller's fps is for frame directories
        if path.stat().st_size == 0:
            raise DecodeError(f"{path}: the file is empty (0 bytes)")
        try:
            self._reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1,
                                              fault_tol=self._NO_SUBSTITUTED_FRAMES)
        except Exception as error:  # decord raises RuntimeError, DECORDError or AssertionError here
            raise DecodeError(f"{path}: FFmpeg cannot open it as a video ({_decord_reason(error)}); "
                              "it is truncated, corrupt or not a video") from error
        self.path = path
        self.num_frames = len(self._reader)
        self.fps = self._reader.get_avg_fps()
        self.backend = f"decord-{decord.__version__}"

    def read(self, indices: np.ndarray) -> np.ndarray:
        # No vr.seek(0) after each batch (the workaround for decord#197/#208): measured here on 320x240 it
        # halved throughput, and resident memory stayed flat over 1,500 frames in 64-frame batches without it.
        try:
            frames = self._reader.get_batch(indices).asnumpy()
        except Exception as error:
            reason = _decord_reason(error)
            if "from_size == to_size" in reason:
                reason = _explain_decord_width_bug(self.path, reason)
            raise DecodeError(f"{self.path}: decoding frames {indices[0]}..{indices[-1]} failed: "
                              f"{reason}") from error
        return frames  # iter_batches checks that every requested frame came back

    def close(self) -> None:
        self._reader = None  # decord frees the decoder when the VideoReader is collected


def _decord_reason(error: Exception) -> str:
    """decord's message without its '[hh:mm:ss] file.cc:123: ' prefixes."""
    return re.sub(r"\[\d\d:\d\d:\d\d\] \S+:\d+: ", "", str(error)).strip() or type(error).__name__


def _explain_decord_width_bug(path: Path, reason: str) -> str:
    """decord's size-check message, plus what it means when the video has one of the widths decord misreads."""
    import av  # here, not at the top: PyAV's FFmpeg libraries cost ~16 MB of memory, needed only for this message

    try:  # decord does not expose the frame size without decoding; the container header has it
        with av.open(str(path)) as container:
            width = container.streams.video[0].codec_context.width
    except (av.FFmpegError, IndexError):
        return reason
    if width not in DECORD_UNREADABLE_WIDTHS:
        return reason
    return (f"{reason} (a known decord 0.6.0 bug: it cannot return frames {width} px wide, nor any of "
            f"{', '.join(map(str, DECORD_UNREADABLE_WIDTHS))} px; re-encode the video at another even width, "
            f"e.g. ffmpeg -i IN -vf scale={width + 2}:-2 OUT)")


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class ImageDirSource:
    """A directory of JPEG/PNG frames, in file-name order, decoded with PIL."""

    def __init__(self, path: Path, fps: float | None = None):
        self.files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise DecodeError(f"{path}: the directory holds no {'/'.join(IMAGE_SUFFIXES)} frames")
        self.fps = FRAME_DIR_FPS if fps is None else float(fps)
        self.path = path
        self.num_frames = len(self.files)
        self.backend = f"images-pillow-{PIL.__version__}"
        with self._open(self.files[0]) as first:  # reads the header only
            self._size = first.size  # every frame must match the first one's (W, H)

    def _open(self, file: Path) -> Image.Image:
        try:
            return Image.open(file)
        except (OSError, ValueError) as error:
            raise DecodeError(f"{file}: cannot read the image: {error}") from error

    def read(self, indices: np.ndarray) -> np.ndarray:
        frames = []
        for index in indices:
            file = self.files[index]
            with self._open(file) as image:
                if image.size != self._size:
                    raise DecodeError(f"{file}: frame is {image.size[0]}x{image.size[1]} but "
                                      f"{self.files[0].name} is {self._size[0]}x{self._size[1]}")
                try:
                    frames.append(np.asarray(image.convert("RGB")))
                except (OSError, ValueError) as error:  # e.g. a truncated JPEG
                    raise DecodeError(f"{file}: cannot decode the image: {error}") from error
        return np.stack(frames)

    def close(self) -> None:
        pass  # every image is closed right after it is read


# name -> (accepts, factory); dicts keep insertion order, so "first registered" is well defined.
_READERS: dict[str, tuple[Callable[[Path], bool], Callable[..., FrameSource]]] = {}


def register_reader(name: str, accepts: Callable[[Path], bool], factory: Callable[..., FrameSource]) -> None:
    """Add a reader, tried after those registered before it. `factory(path, fps)` opens a FrameSource;
    `fps` is the frame rate for sources without one of their own (None: the reader's default). Registering
    an existing name replaces that reader in place: register_reader("video", ...) swaps decord out."""
    _READERS[name] = (accepts, factory)


def _torchcodec(device: str) -> Callable[..., FrameSource]:
    def open_with_torchcodec(path: Path, fps: float | None = None) -> FrameSource:
        # Imported on first use: torchcodec loads the system's FFmpeg libraries at import, which a machine that
        # only ever decodes with decord need not have.
        from .torchcodec_reader import TorchcodecSource
        return TorchcodecSource(path, fps, device)
    return open_with_torchcodec


register_reader("video", Path.is_file, DecordSource)  # FFmpeg sniffs the format; the suffix does not matter
register_reader("frame_dir", Path.is_dir, ImageDirSource)
register_reader("torchcodec", Path.is_file, _torchcodec("cpu"))  # never first on its own: chosen by name
register_reader("torchcodec-cuda", Path.is_file, _torchcodec("cuda"))
VIDEO_DECODERS = {"decord": "video", "torchcodec": "torchcodec", "torchcodec-cuda": "torchcodec-cuda"}  # --decoder


def open_source(path: Path, fps: float | None = None, reader: str | None = None) -> FrameSource:
    """Open `path` with the first registered reader that accepts it, trying the reader named `reader` first
    (a frame directory, which no video decoder accepts, still goes to PIL). `fps` is the frame rate of a frame
    directory (default FRAME_DIR_FPS); a video file keeps its container's rate."""
    path = Path(path)
    if not path.exists():
        raise DecodeError(f"{path}: no such file or directory")
    if fps is not None and not (math.isfinite(fps) and fps > 0):
        raise DecodeError(f"{path}: fps must be a number > 0, got {fps}")
    if reader is not None and reader not in _READERS:
        raise DecodeError(f"{path}: no reader {reader!r} is registered (readers: {', '.join(_READERS)})")
    preferred = [_READERS[reader]] if reader is not None else []
    for accepts, factory in preferred + list(_READERS.values()):
        if accepts(path):
            return factory(path, fps)
    raise DecodeError(f"{path}: no registered reader accepts it (readers: {', '.join(_READERS)})")


# --------------------------------------------------------------------------------------------- sampling

@dataclass(frozen=True)
class Sampling:
    """Which frames of a video (or of a segment of it) become time steps."""

    kind: str  # "all" | "fps" | "uniform"
    value: float | int | None = None

    def __post_init__(self):
        number = isinstance(self.value, (int, float)) and not isinstance(self.value, bool)
        valid = {"all": self.value is None,
                 "fps": number and math.isfinite(self.value) and self.value > 0,
                 "uniform": number and isinstance(self.value, int) and self.value >= 1}
        if not valid.get(self.kind, False):
            raise ValueError(f"invalid sampling {self.kind}:{self.value}: expected 'all', 'fps:F' "
                             "(F > 0 frames per second) or 'uniform:N' (N >= 1 frames)")

    @classmethod
    def parse(cls, spec: str) -> Sampling:
        kind, colon, argument = spec.strip().partition(":")
        try:
            if kind == "fps" and colon:
                return cls("fps", float(argument))
            if kind == "uniform" and colon:
                return cls("uniform", int(argument))
            if kind == "all" and not colon:
                return cls("all")
        except ValueError:
            pass  # an unparsable number or a value out of range gets the message below
        raise ValueError(f"invalid sampling {spec!r}: expected 'all', 'fps:F' (F > 0 frames per second, "
                         "e.g. fps:2.5) or 'uniform:N' (N >= 1 frames, e.g. uniform:8)")

    def __str__(self) -> str:
        if self.kind == "fps":  # "fps:2" rather than "fps:2.0", so parse -> str round-trips
            return f"fps:{int(self.value) if float(self.value).is_integer() else self.value!r}"
        return self.kind if self.value is None else f"{self.kind}:{self.value}"

    def plan(self, num_frames: int, fps: float, start: int = 0, end: int | None = None) -> np.ndarray:
        """Sorted int64 frame indices within [start, end] (inclusive; end defaults to the last frame)."""
        end = num_frames - 1 if end is None else end
        if not 0 <= start <= end < num_frames:
            raise ValueError(f"frame segment [{start}, {end}] is empty or outside the video's "
                             f"{num_frames} frames [0, {num_frames - 1}]")
        length = end - start + 1
        if self.kind == "all":
            offsets = np.arange(length)
        elif self.kind == "fps":
            if not (math.isfinite(fps) and fps > 0):
                raise ValueError(f"sampling {self} needs the video's frame rate, which is {fps}; pass fps")
            # Tick k is at k/F seconds; the frame on screen then is floor(k * fps / F). The segment lasts
            # length/fps seconds, so there are ceil(length * F / fps) ticks. The 1e-9 keeps exact ratios
            # (30 fps -> fps:3) from landing a hair below an integer in floating point.
            ticks = math.ceil(length * self.value / fps - 1e-9)
            offsets = np.minimum(np.floor(np.arange(ticks) * fps / self.value + 1e-9), length - 1)
        else:  # uniform: TSN segment centres, floor((i + 0.5) * L / N), in exact integer arithmetic
            offsets = (2 * np.arange(self.value) + 1) * length // (2 * self.value)
        return start + offsets.astype(np.int64)


# ----------------------------------------------------------------------------------------------- batches

def iter_batches(source: FrameSource, indices: np.ndarray,
                 batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (indices, frames [n <= batch_size, H, W, 3]) in order, so a long video never sits in memory
    whole. A failed or short batch raises DecodeError after the good batches before it were yielded."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if np.any(np.diff(indices) < 0):
        raise ValueError("frame indices must be sorted (decoders read forward)")
    for first in range(0, len(indices), batch_size):
        batch = indices[first:first + batch_size]
        try:
            frames = source.read(batch)
        except DecodeError as error:
            raise DecodeError(f"{error} [stopped at frame {batch[0]}: {first} of {len(indices)} "
                              "planned frames decoded]") from error
        if len(frames) != len(batch):
            raise DecodeError(f"{source.path}: the decoder returned {len(frames)} frames for the "
                              f"{len(batch)} requested from frame {batch[0]} [stopped at frame {batch[0]}: "
                              f"{first} of {len(indices)} planned frames decoded]")
        yield batch, frames


# ---------------------------------------------------------------------------------------------- prefetch

@dataclass(frozen=True)
class DecodeJob:
    key: str  # the caller's id (video_id)
    path: Path
    sampling: Sampling
    start_frame: int | None = None
    end_frame: int | None = None  # inclusive
    fps: float | None = None  # frame rate of a frame directory (default FRAME_DIR_FPS); videos keep their own
    reader: str | None = None  # a registered reader tried first (open_source), e.g. "torchcodec"


class _Pipe:
    """A bounded queue from one worker to the consumer, which the consumer may walk away from."""

    def __init__(self, maxsize: int, stop: threading.Event):
        self.queue: queue.Queue = queue.Queue(maxsize)
        self.abandoned = threading.Event()
        self._stop = stop

    def put(self, item) -> bool:
        """Block until there is room; False (item dropped) once nobody will read it."""
        while not (self.abandoned.is_set() or self._stop.is_set()):
            try:
                self.queue.put(item, timeout=0.05)  # wake up now and then to notice a consumer that left
                return True
            except queue.Full:
                pass
        return False


_END = object()  # the last item of a video that decoded completely


@dataclass
class DecodedVideo:
    job: DecodeJob
    error: DecodeError | None  # set when the video could not be opened or planned; then no batches
    num_frames: int  # claimed by the container (0 when error)
    fps: float
    indices: np.ndarray  # planned frame indices (empty when error)
    backend: str
    _pipe: _Pipe | None = field(default=None, repr=False, compare=False)

    def batches(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The prefetched (indices, frames) batches in order; raises DecodeError where decoding stopped.
        Consume them before asking prefetch for the next video, which drops what is left of this one."""
        if self.error is not None:
            return
        while True:
            if self._pipe.abandoned.is_set():
                raise RuntimeError(f"{self.job.key}: batches read after prefetch moved on to the next video")
            item = self._pipe.queue.get()
            if item is _END:
                return
            if isinstance(item, DecodeError):
                raise item
            yield item


def _failed(job: DecodeJob, error: Exception) -> DecodedVideo:
    return DecodedVideo(job, _as_decode_error(job, error), 0, 0.0, np.empty(0, np.int64), "")


def _as_decode_error(job: DecodeJob, error: Exception) -> DecodeError:
    if isinstance(error, DecodeError):
        return error
    return DecodeError(f"{job.path}: {type(error).__name__}: {error}")


def _decode_job(job: DecodeJob, batch_size: int, pipe: _Pipe) -> None:
    """Send one video down its pipe: a DecodedVideo, then its batches, then _END or the DecodeError."""
    try:
        source = open_source(job.path, job.fps, job.reader)
    except Exception as error:
        pipe.put(_failed(job, error))
        return
    try:
        try:
            indices = job.sampling.plan(source.num_frames, source.fps, job.start_frame or 0, job.end_frame)
        except ValueError as error:
            pipe.put(_failed(job, DecodeError(f"{job.path}: cannot sample it: {error}")))
            return
        video = DecodedVideo(job, None, source.num_frames, source.fps, indices, source.backend, pipe)
        if not pipe.put(video):
            return
        for batch in iter_batches(source, indices, batch_size):
            if not pipe.put(batch):
                return
        pipe.put(_END)
    except Exception as error:  # any failure becomes this video's error, never the run's
        pipe.put(_as_decode_error(job, error))
    finally:
        source.close()


def prefetch(jobs: Iterable[DecodeJob], batch_size: int, workers: int = 2,
             queue_batches: int = 4) -> Iterator[DecodedVideo]:
    """Decode ahead of the consumer in `workers` threads (decord and PIL release the GIL while decoding) and
    yield DecodedVideo objects in job order. Each worker holds one video at a time and at most
    `queue_batches` of its batches wait in memory. Closing the generator stops the workers."""
    if workers < 1 or queue_batches < 1:
        raise ValueError(f"workers and queue_batches must be >= 1, got {workers} and {queue_batches}")
    jobs = list(jobs)
    stop = threading.Event()
    pipes: queue.Queue[_Pipe] = queue.Queue()  # one per job, in job order
    claim = threading.Lock()
    next_job = iter(range(len(jobs)))

    def work() -> None:
        while not stop.is_set():
            with claim:  # take the next job and queue its pipe atomically, so pipes stay in job order
                index = next(next_job, None)
                if index is None:
                    return
                pipe = _Pipe(queue_batches, stop)
                pipes.put(pipe)
            _decode_job(jobs[index], batch_size, pipe)

    threads = [threading.Thread(target=work, name=f"vidshift-decode-{i}", daemon=True)
               for i in range(min(workers, len(jobs)))]
    for thread in threads:
        thread.start()
    try:
        for _ in jobs:
            pipe = pipes.get()
            yield pipe.queue.get()  # the DecodedVideo comes first
            pipe.abandoned.set()  # the consumer asked for the next video: drop what it left of this one
    finally:
        stop.set()
        for thread in threads:  # each finishes at most the batch it is decoding
            thread.join()
