"""Stage one: decode the videos of a manifest, run the backbone, write the feature store (``vidshift extract``).

The run is resumable and never stopped by a bad video:
- videos already in committed parts are skipped; a killed run loses only its uncommitted part;
- a video that cannot be decoded, or whose features are not storable, is recorded as a failure in the part
  (path, stage, reason) and the run goes on; the exit code is then 2;
- settings that change what is stored (backbone, weights, preprocessing, sampling, clips, flow method and its
  weights, dtype, --keep-partial, and --fps when sampling by frame rate) are fixed by the first run; a resume
  with different ones is refused.
A clip backbone (``extract/clips.py``) makes a time step of a window of frames; ``--flow`` computes optical flow
between consecutive sampled frames and feeds it to the network, stored under its own stream (``--stream flow``)
beside the RGB stream of the same videos, each with its own provenance.
``--shard K/N`` lets N independent processes (a SLURM array, several GPUs) fill one store: each takes every
N-th video, writes parts tagged with its shard and holds its own lock; the store records N and refuses another.
A run stopped by the disk (full, read-only) rolls back the part it was writing and says how much space the
videos left need; a rerun resumes.
``--cluster`` runs the parts as tasks on dask.distributed instead (``extract/cluster_run.py``).

Throughput: decoding runs ahead in background threads (``--workers``), the uint8 frames go to the GPU from
page-locked memory without blocking (``Backbone.prepare``), the store compresses its chunks in ``--writer-threads``
threads (``extract/store``), ``--decoder`` picks decord or torchcodec (CPU or NVDEC) and ``--compile``
``torch.compile``s the network; decoder and compilation are recorded in the provenance's ``software`` (they change
no value beyond float rounding, so stores of either mix).
"""
from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .backbones import Backbone, Preprocess, build_backbone
from .clips import ClipBackbone
from .decode import FRAME_DIR_FPS, VIDEO_DECODERS, DecodedVideo, DecodeError, DecodeJob, Sampling, prefetch
from .errors import OUT_OF_SPACE, describe_os_error, error_number
from .flow import FLOW_METHODS
from .heap import steady_heap, trim_heap
from .manifest import VideoEntry, file_sha256, read_manifest
from .provenance import software_versions
from .store import BACKENDS, DEFAULT_STREAM, FeatureStore, FeatureValueError, PartSequence, PartWriter, StoreError
from .store.summary import human_bytes

STORE_DTYPES = ("float16", "float32")
GPU_BATCH, GPU_DECODERS, GPU_WRITERS = 64, 2, 4  # defaults of --batch-size, --workers and --writer-threads
CPU_BATCH, CPU_DECODERS, CPU_WRITERS = 4, 1, 1   # per device (device_defaults)
FLOW_STREAM = "flow"


@dataclass(frozen=True)
class ExtractConfig:
    manifest: Path
    root: Path
    out: Path
    format: str = "zarr"
    backbone: str = "resnet50"
    weights: str = "imagenet"
    sampling: str = "all"
    frame_size: int = 224
    resize: int | None = None          # shorter side before the crop; default keeps ImageNet's 256/224 ratio
    dtype: str = "float16"
    device: str = "auto"
    precision: str = "auto"
    batch_size: int | None = None      # frames per decode batch and backbone call (clips: batch_size // clip length);
                                       # None: per device (device_defaults)
    workers: int | None = None         # background decode threads; None: per device
    videos_per_part: int = 64          # a part is committed after this many videos (the resume granularity)
    shard: str = "0/1"
    stream: str = DEFAULT_STREAM
    keep_partial: bool = False         # keep the decodable prefix of a video that breaks part-way
    seed: int = 0                      # random-init weights (--weights none)
    fps: float | None = None           # frame rate of frame directories (videos carry their own)
    clip_length: int | None = None     # frames per time step of a clip backbone (default: the backbone's own)
    clip_stride: int | None = None     # hop between clips (default: clip_length)
    flow: str | None = None            # optical-flow method: the network sees flow computed from the frames
    flow_weights: str = "default"      # the RAFT weights: default (torchvision's enum), none, or a state-dict path
    decoder: str = "decord"            # video decoder: decord, torchcodec or torchcodec-cuda (VIDEO_DECODERS)
    compile: bool = False              # torch.compile the backbone's network
    writer_threads: int | None = None  # threads compressing store chunks; None: per device
    cluster: str | None = None         # run the parts on this dask cluster (extract/cluster.py's parse_cluster)

    def __post_init__(self) -> None:
        """Refuse a setting that cannot work before any video is touched (the messages name the CLI option)."""
        for option, value, meaning in (("--frame-size", self.frame_size, "the centre-crop side in pixels"),
                                       ("--batch-size", self.batch_size, "frames per backbone call"),
                                       ("--workers", self.workers, "background decode threads"),
                                       ("--videos-per-part", self.videos_per_part, "videos per committed part"),
                                       ("--writer-threads", self.writer_threads, "threads compressing chunks")):
            if value is not None and value < 1:
                raise ValueError(f"{option} {value}: must be at least 1 ({meaning})")
        if self.resize is not None and self.resize < self.frame_size:
            raise ValueError(f"--resize {self.resize}: must be at least --frame-size ({self.frame_size}), so the "
                             f"centre crop fits in the resized frame")
        if self.format not in BACKENDS:
            raise ValueError(f"--format {self.format!r}: use one of {', '.join(BACKENDS)}")
        if self.dtype not in STORE_DTYPES:
            raise ValueError(f"--dtype {self.dtype!r}: use one of {', '.join(STORE_DTYPES)}")
        if self.fps is not None and not (math.isfinite(self.fps) and self.fps > 0):
            raise ValueError(f"--fps {self.fps}: the frame rate of frame directories must be a number > 0")
        if self.seed < 0:
            raise ValueError(f"--seed {self.seed}: must be 0 or more")
        Sampling.parse(self.sampling)
        parse_shard(self.shard)
        for option, value in (("--clip-length", self.clip_length), ("--clip-stride", self.clip_stride)):
            if value is not None and value < 1:
                raise ValueError(f"{option} {value}: must be at least 1 (frames per time step, hop between steps)")
        if self.flow is not None and self.flow not in FLOW_METHODS:
            raise ValueError(f"--flow {self.flow!r}: use one of {', '.join(FLOW_METHODS)}")
        if self.flow is None and self.stream == FLOW_STREAM:
            raise ValueError(f"--stream {FLOW_STREAM}: name the optical-flow method, --flow {'|'.join(FLOW_METHODS)}")
        if self.flow is not None and self.stream == DEFAULT_STREAM:
            raise ValueError(f"--flow {self.flow}: these are optical-flow features; store them under their own "
                             f"stream, e.g. --stream {FLOW_STREAM}, not the RGB stream {DEFAULT_STREAM!r}")
        if self.flow is None and self.flow_weights != "default":
            raise ValueError(f"--flow-weights {self.flow_weights!r}: only with --flow raft-small|raft-large")
        if self.decoder not in VIDEO_DECODERS:
            raise ValueError(f"--decoder {self.decoder!r}: use one of {', '.join(VIDEO_DECODERS)}")
        if self.cluster is not None:
            from .cluster import parse_cluster  # imported here: it imports dask.distributed, which runs without
            parse_cluster(self.cluster)         # --cluster need not load
            if self.shard != "0/1":
                raise ValueError(f"--cluster with --shard {self.shard}: the cluster schedules every video of the "
                                 f"manifest itself; drop --shard")


@dataclass
class ExtractSummary:
    store: Path
    skipped: int = 0
    extracted: int = 0
    partial: list[dict] = field(default_factory=list)  # videos kept up to where they broke (--keep-partial)
    failures: list[dict] = field(default_factory=list)
    frames: int = 0
    seconds: float = 0.0

    @property
    def exit_code(self) -> int:
        return 2 if self.failures else 0

    def lines(self) -> list[str]:
        rate = self.frames / self.seconds if self.seconds else 0.0
        lines = [f"store {self.store}: {self.extracted} extracted ({len(self.partial)} partial), {self.skipped} "
                 f"already present, {len(self.failures)} failed; {self.frames} frames in {self.seconds:.1f}s "
                 f"({rate:.1f} frames/s)"]
        lines += [f"  PARTIAL {p['video_id']} {p['path']}: kept {p['decoded_frames']} of {p['expected_frames']} "
                  f"frames; {p['reason']}" for p in self.partial]
        lines += [f"  FAILED {f['video_id']} [{f['stage']}] {f['path']}: {f['reason']}" for f in self.failures]
        return lines


def parse_shard(spec: str) -> tuple[int, int]:
    try:
        index, count = (int(part) for part in spec.split("/"))
    except ValueError:
        raise ValueError(f"--shard {spec!r}: expected K/N, e.g. 0/4") from None
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"--shard {spec!r}: need N >= 1 and K in 0..N-1, e.g. 0/4 to 3/4 for four processes")
    return index, count


def store_provenance(config: ExtractConfig, backbone: Backbone) -> dict:
    """``features`` must match for a resume; ``software`` is recorded, not compared."""
    sampling = Sampling.parse(config.sampling)
    features = {**backbone.provenance(), "map_shape": list(backbone.map_shape()), "sampling": str(sampling),
                "dtype": config.dtype, "stream": config.stream}
    if config.keep_partial:  # a video that breaks part-way is then stored (flagged partial), not a failure.
        features["keep_partial"] = True  # Recorded only when on, so stores made before the option still resume.
    if sampling.kind == "fps":  # --fps is a frame directory's frame rate, so it decides which frames fps:F takes
        features["frame_dir_fps"] = FRAME_DIR_FPS if config.fps is None else config.fps
    software = {key: features.pop(key) for key in ("torch", "torchvision") if key in features}
    software.update(decoder=video_decoder_version(config.decoder), compiled=config.compile)
    return {"features": features, "software": {**software_versions(), **software}}


def device_defaults(config: ExtractConfig, device: torch.device) -> tuple[int, int, int]:
    """(--batch-size, --workers, --writer-threads) as given, else what suits the device: a GPU wants large batches
    fed by two decoders and a store that compresses in several threads (benchmarks/README.md: one thread writes
    ~460 zarr / ~830 HDF5 steps/s of 7x7x2048 maps, far below a GPU's frames/s); a CPU computes a frame at a time
    anyway, and a batch of 64 ResNet-50 inputs makes activations of 50-200 MB that the allocator maps and unmaps
    on every call (5.4 M page faults and a third of the CPU time in the kernel for 128 frames; batch 8: 1.0 M).
    Batch 4 runs as fast as 8 on one core and holds ~50 MB less (benchmarks/README.md, peers.py), which keeps the
    whole process within video_features' peak RSS; one decoder and one writer keep up with its network easily and
    leave the cores to it."""
    on_gpu = device.type == "cuda"
    return (config.batch_size or (GPU_BATCH if on_gpu else CPU_BATCH),
            config.workers or (GPU_DECODERS if on_gpu else CPU_DECODERS),
            config.writer_threads or (GPU_WRITERS if on_gpu else CPU_WRITERS))


def check_decoder(config: ExtractConfig) -> None:
    """Refuse --decoder torchcodec before any video is touched when torchcodec cannot run here (else every video
    would be recorded as a decode failure)."""
    if config.decoder.startswith("torchcodec"):
        from .torchcodec_reader import problem  # imported here: torchcodec loads FFmpeg's libraries at import
        reason = problem()
        if reason is not None:
            raise ValueError(f"--decoder {config.decoder}: {reason}; or use --decoder decord")


def video_decoder_version(decoder: str) -> str:
    if decoder == "decord":
        import decord
        return f"decord-{decord.__version__}"
    from .torchcodec_reader import version
    return version() + ("-cuda" if decoder.endswith("-cuda") else "")


def prepare_backbone(config: ExtractConfig) -> tuple[ExtractConfig, Backbone]:
    """The run's backbone (compiled with --compile), and the config with the per-device defaults filled in."""
    check_decoder(config)
    resize = config.resize or round(config.frame_size * 256 / 224)
    backbone = build_backbone(config.backbone, config.weights, Preprocess(config.frame_size, resize),
                              config.device, config.precision, config.seed, config.clip_length, config.clip_stride,
                              config.flow, config.flow_weights, keep_model=False)  # extraction never trains
    if config.compile:
        backbone.compile()
    batch_size, workers, writer_threads = device_defaults(config, backbone.device)
    return replace(config, batch_size=batch_size, workers=workers, writer_threads=writer_threads), backbone


def part_info(config: ExtractConfig, tag: str, provenance: dict) -> dict:
    """What each part records of the run that wrote it."""
    return {"manifest": str(config.manifest), "manifest_sha256": file_sha256(config.manifest), "shard": tag,
            "software": provenance["software"]}


def run_extract(config: ExtractConfig, show_progress: bool = True) -> ExtractSummary:
    if config.cluster is not None:
        from .cluster_run import run_on_cluster  # imported here: cluster_run builds on this module
        return run_on_cluster(config, show_progress)
    shard_index, shard_count = parse_shard(config.shard)
    entries = read_manifest(config.manifest)[shard_index::shard_count]
    config, backbone = prepare_backbone(config)
    if backbone.device.type == "cpu":
        steady_heap()  # no page faults per batch (extract/heap.py)
    provenance = store_provenance(config, backbone)
    tag = f"s{shard_index}of{shard_count}"
    summary = ExtractSummary(store=config.out)
    started = time.perf_counter()
    store = FeatureStore.create_or_open(config.out, config.format, config.stream, provenance)
    store.claim_shard_layout(shard_index, shard_count)
    with store, store.lock(tag):
        present = store.videos(config.stream)
        todo = [entry for entry in entries if entry.video_id not in present]
        summary.skipped = len(entries) - len(todo)
        bar = tqdm(total=len(todo), unit="video", disable=None if show_progress else True, desc="extract")

        def progress() -> None:
            bar.update()
            bar.set_postfix(frames_per_s=f"{summary.frames / (time.perf_counter() - started):.1f}")

        with bar:
            extract_videos(config, backbone, store, tag, todo, part_info(config, tag, provenance), summary,
                           config.videos_per_part, progress)
        store.rebuild_index()
    summary.seconds = time.perf_counter() - started
    del backbone  # the last reference but the network's own cycles (torch.fx's graph and its module)
    release_memory()
    return summary


def release_memory() -> None:
    """Free what the run left and hand the heap's free pages back to the system (``extract/heap.py``): the network
    is in reference cycles (torch.fx's graph and its module), so only a collection frees it, and glibc keeps the
    freed weights, activations and decoded frames in the process's RSS. A CPU-only process then pays ~110 MB more
    at exit, when torch's CUDA libraries' destructors page their code in, on top of its end-of-run RSS
    (benchmarks/README.md, "Extraction's memory"): freeing and trimming lowers the end of the run by ~150 MB, so
    the process's peak is the run's own. Costs ~0.1 s (the collection walks torch's many objects)."""
    gc.collect()
    trim_heap()


def extract_videos(config: ExtractConfig, backbone: Backbone, store: FeatureStore, tag: str,
                   todo: list[VideoEntry], info: dict, summary: ExtractSummary, videos_per_part: int,
                   on_video: Callable[[], None]) -> None:
    """Decode, run and store ``todo`` in parts tagged ``tag`` of ``videos_per_part`` videos each (hold
    ``store.lock(tag)``); failures go into the parts and ``summary``. A disk error rolls the open part back and
    becomes a StoreError saying what a rerun needs."""
    sampling = Sampling.parse(config.sampling)
    reader = VIDEO_DECODERS[config.decoder]

    def new_part() -> PartWriter:
        return store.new_part(tag, config.stream, config.dtype, backbone.out_channels, info,
                              writer_threads=config.writer_threads)

    jobs = (DecodeJob(entry.video_id, entry.resolve(config.root), sampling, entry.start_frame, entry.end_frame,
                      config.fps, reader) for entry in todo)
    by_id = {entry.video_id: entry for entry in todo}
    try:
        with PartSequence(new_part, videos_per_part) as parts:
            for decoded in prefetch(jobs, config.batch_size, config.workers):
                entry = by_id[decoded.job.key]
                summary.frames += _extract_video(entry, decoded, backbone, parts.current(), config, summary)
                parts.video_done()
                on_video()
    except OSError as error:  # the disk, not a video: the part was rolled back on the way out
        raise StoreError(_write_failure(error, store, todo, config.stream)) from error


def _write_failure(error: OSError, store: FeatureStore, entries: list[VideoEntry], stream: str) -> str:
    """What a run stopped by the disk says: the error, that nothing committed is lost, what a rerun needs."""
    stored = store.videos(stream)  # the index is rebuilt in memory if it cannot be written
    left = sum(1 for entry in entries if entry.video_id not in stored)
    message = (f"extraction into {store.root} stopped: {describe_os_error(error)}.\nThe part being written was "
               f"rolled back; the {len(store.part_names())} committed part(s) ({len(stored)} videos) are intact, and "
               f"rerunning the same command resumes with the {left} video(s) left")
    if error_number(error) not in OUT_OF_SPACE:
        return message + "."
    if not stored:
        return message + (". No part was committed, so the space they need is unknown: at least one part "
                          "(--videos-per-part videos) must fit.")
    per_video = store.disk_bytes() / len(stored)
    return message + (f", which need about {human_bytes(per_video * left)} more ({human_bytes(per_video)} per "
                      f"video so far).")


def _extract_video(entry: VideoEntry, decoded: DecodedVideo, backbone: Backbone, part: PartWriter,
                   config: ExtractConfig, summary: ExtractSummary) -> int:
    """Extract one video into ``part``; record a failure instead of raising. Returns frames decoded."""
    def fail(stage: str, reason: str) -> None:
        part.record_failure(entry.video_id, entry.path, stage, reason)
        summary.failures.append({"video_id": entry.video_id, "path": entry.path, "stage": stage, "reason": reason})

    if decoded.error is not None:
        fail("decode", str(decoded.error))
        return 0
    video = part.video(entry.video_id, entry.attributes())
    decoded_frames = padded = 0

    def counted_batches():
        nonlocal decoded_frames
        for indices, frames in decoded.batches():
            decoded_frames += len(indices)
            yield indices, frames

    try:
        for batch in backbone.video_steps(counted_batches(), decoded.indices, config.batch_size):
            video.append(batch.steps, batch.maps.numpy())
            padded += batch.padded
    except DecodeError as error:
        if not (config.keep_partial and video.n_steps):
            video.discard()
            fail("decode", str(error))
            return decoded_frames
        counts = _counts(decoded, decoded_frames, backbone, padded)
        video.finish(**counts, partial=True, partial_reason=str(error))
        summary.partial.append({"video_id": entry.video_id, "path": entry.path, "reason": str(error), **counts})
        summary.extracted += 1
        return decoded_frames
    except (FeatureValueError, RuntimeError, ValueError) as error:
        video.discard()
        fail("features", str(error))
        return decoded_frames
    video.finish(**_counts(decoded, decoded_frames, backbone, padded), partial=False)
    summary.extracted += 1
    return decoded_frames


def _counts(decoded: DecodedVideo, decoded_frames: int, backbone: Backbone, padded: int) -> dict:
    counts = {"container_frames": int(decoded.num_frames), "expected_frames": int(len(decoded.indices)),
              "decoded_frames": decoded_frames, "fps": float(decoded.fps), "decoder": decoded.backend,
              "first_frame": int(np.min(decoded.indices)), "last_frame": int(np.max(decoded.indices))}
    if isinstance(backbone, ClipBackbone):  # frames (flow: fields) repeated to fill a clip the video is shorter than
        counts["padded_frames"] = padded
    return counts
