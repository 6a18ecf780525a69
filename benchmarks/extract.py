"""Stage one's throughput on this machine, as one table: decode only, backbone only, the full pipeline, and the
feature store's write and random-read speed for each backend.

The full pipeline's frames/s is printed as a fraction of the backbone-only ceiling measured here, with the same
backbone, device, precision and batch size, so the table says how much the decoding and the store cost on top of
the network. The script writes its own H.264 test videos (a panning textured scene, PyAV) and uses a seeded
random-init backbone by default, so it runs on any machine, a GPU node with no data or network included:

    .venv/bin/python benchmarks/extract.py                                   # defaults: a GPU-sized run
    .venv/bin/python benchmarks/extract.py --videos 4 --frames-per-video 16  # a few minutes on a laptop CPU

What each row measures:
- decode only: ``prefetch`` with --workers threads and --batch-size frames per batch, batches consumed and dropped
  (the fastest of 3 passes over the videos);
- backbone only: ``Backbone.__call__`` (resize, crop, normalise, network, maps back on the CPU) on one pre-decoded
  uint8 batch at the videos' size, called until it has seen as many frames, after one warm-up call; the batch is
  what the pipeline feeds: --batch-size frames, or a whole video when videos are shorter (batches never span two).
  Measured before and after the full pipeline runs; the faster is the ceiling;
- full pipeline: ``run_extract`` into a fresh store of each backend (decode, network, checks, compression, write);
- store write, T threads: --store-steps random post-ReLU maps (half zeros) of the backbone's map shape, as videos
  of --frames-per-video steps, appended through the store API in --batch-size steps (finite check, pooling,
  down-cast, hashing, compression and write), then committed, for each --writer-threads count T, in a fresh
  process each; independent of the backbone, so it can be larger than the videos' frame count where the backbone
  is slow (a CPU);
- cluster, N workers: the full pipeline (zarr) on a dask LocalCluster of each --cluster-workers N
  (``benchmarks/extract_scaling.py``), against the single-process row;
- GPU rows, only where CUDA is present: ResNet-50 bf16 channels-last backbone only at --gpu-batch frames, and the
  full pipeline at 240p and 360p with decord and with torchcodec on NVDEC, as fractions of it;
- random read: one process reading --segments random steps of ``maps`` per video (TSN training sampling) through
  ``FeatureStore.read``; the files were just written, so they are in the OS page cache (a warm read).
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

# Run as a script, Python puts this directory first on the path, where this file would shadow the `extract`
# package; the repository root takes its place (which also makes an uninstalled checkout work).
sys.path[0] = str(Path(__file__).resolve().parents[1])

from extract.backbones import Backbone, Preprocess, available_backbones, build_backbone  # noqa: E402
from extract.clips import ClipBackbone, FlowBackbone  # noqa: E402
from extract.decode import DecodeJob, Sampling, open_source, prefetch  # noqa: E402
from extract.flow import FLOW_METHODS  # noqa: E402
from extract.run import ExtractConfig, run_extract  # noqa: E402
from extract.store import BACKENDS, FeatureStore  # noqa: E402
from benchmarks.extract_scaling import (cluster_runs, gpu_ceiling, gpu_pipeline_runs,  # noqa: E402
                                        measure_store_write_fresh)
from extract.synth import write_video  # noqa: E402
from pipelines.data import random_steps  # noqa: E402

VIDEO_FPS = 25
# A random-init ResNet-101 peaks near 2e5, beyond float16's 65504; ResNet-50 near 200. A peak within 1/16 of the
# limit on the probe batch could still overflow on other frames, so "auto" then stores float32.
FLOAT16_HEADROOM = 16
READ_PASSES = 3  # each pass reads every video once at fresh random steps
DECODE_PASSES = 3


@dataclass
class Row:
    """One line of the result table."""
    what: str
    amount: str
    seconds: float
    rate: str
    fraction: str = ""
    note: str = ""


# ------------------------------------------------------------------------------------------------- test videos

def panning_scene(num_frames: int, height: int, width: int, seed: int) -> np.ndarray:
    """uint8 RGB frames [T, H, W, 3]: a textured scene panning diagonally under a bright square crossing it.

    Coarse blocks plus fine grain give H.264 both motion and detail to encode, so decoding costs what real
    footage of this size costs, roughly; a flat or static picture would decode unrealistically fast.
    """
    rng = np.random.default_rng(seed)
    blocks = rng.integers(40, 200, (2 * height // 16 + 1, 2 * width // 16 + 1, 3)).repeat(16, 0).repeat(16, 1)
    grain = rng.integers(-20, 21, blocks.shape)
    canvas = np.clip(blocks + grain, 0, 255).astype(np.uint8)
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    side = max(8, height // 6)
    for t in range(num_frames):
        y, x = (2 * t) % height, (3 * t) % width
        frames[t] = canvas[y:y + height, x:x + width]
        corner = (t * 5) % max(1, width - side)
        frames[t, height // 3:height // 3 + side, corner:corner + side] = 250
    return frames


def write_test_videos(directory: Path, videos: int, frames: int, width: int, height: int) -> Path:
    """H.264 .mp4 test videos and their manifest (all one class and domain); returns the manifest path."""
    rows = []
    for i in range(videos):
        relative = f"videos/bench_{i:04d}.mp4"
        write_video(directory / relative, panning_scene(frames, height, width, seed=i), VIDEO_FPS, "mp4")
        rows.append({"path": relative, "label": "pan", "domain": "bench", "split": "train"})
    manifest = directory / "manifest.csv"
    with open(manifest, "w", newline="") as handle:
        writer = csv.DictWriter(handle, ["path", "label", "domain", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return manifest


# ------------------------------------------------------------------------------------------------ measurements

def measure_decode(video_paths: list[Path], batch_size: int, workers: int) -> tuple[int, float]:
    """Frames decoded and seconds taken by the prefetching decoder, consuming every batch."""
    jobs = [DecodeJob(path.stem, path, Sampling("all")) for path in video_paths]
    frames, started = 0, time.perf_counter()
    for decoded in prefetch(jobs, batch_size, workers):
        if decoded.error is not None:
            raise SystemExit(f"decode-only: {decoded.error}")
        for indices, _ in decoded.batches():
            frames += len(indices)
    return frames, time.perf_counter() - started


def backbone_batch(backbone: Backbone, frames: np.ndarray, batch_size: int) -> tuple[np.ndarray, int]:
    """What one network call of the pipeline takes, from one video's decoded frames, and how many frames it covers.

    A per-frame backbone: --batch-size frames (or the whole video when shorter). A clip backbone: --batch-size //
    clip length windows (at least one), each of frames_per_step frames (flow: one more than the clip length),
    hopping by the clip length, so that each window covers clip-length new frames.
    """
    if not isinstance(backbone, ClipBackbone):
        batch = frames[:batch_size]
        return batch, len(batch)
    length, span = backbone.clip.length, backbone.frames_per_step
    if len(frames) < span:
        raise SystemExit(f"--frames-per-video {len(frames)}: a {backbone.name} clip needs {span} frames")
    windows = min(max(1, batch_size // length), (len(frames) - span) // length + 1)
    return np.stack([frames[w * length:w * length + span] for w in range(windows)]), windows * length


def measure(call, argument, frames_per_call: int, total_frames: int, device: torch.device) -> tuple[int, float, float]:
    """(frames, seconds, peak |output|) of ``call(argument)`` repeated until it has seen ``total_frames``."""
    peak = float(call(argument).abs().max())  # warm-up: allocator, cuDNN autotuning, lazy initialisation
    calls = max(1, round(total_frames / frames_per_call))
    synchronize(device)
    started = time.perf_counter()
    for _ in range(calls):
        call(argument)
    synchronize(device)
    return calls * frames_per_call, time.perf_counter() - started, peak


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":  # kernels run asynchronously: the clock must wait for them
        torch.cuda.synchronize(device)


def choose_dtype(requested: str, peak: float) -> str:
    """The store dtype: as requested, or for "auto" float16 unless the probe batch came close to its range."""
    if requested != "auto":
        return requested
    return "float16" if peak * FLOAT16_HEADROOM < float(np.finfo(np.float16).max) else "float32"


def measure_random_reads(root: Path, segments: int) -> tuple[int, float]:
    """Steps read and seconds for READ_PASSES passes of ``segments`` random maps steps per video."""
    store = FeatureStore.open(root)
    records = list(store.videos().values())
    generator = torch.Generator().manual_seed(0)
    plans = [[random_steps(r.n_steps, segments, generator) for r in records] for _ in range(READ_PASSES)]
    store.read(records[0].video_id, "maps", steps=[0])  # opens the part outside the timing
    started = time.perf_counter()
    for plan in plans:
        for record, steps in zip(records, plan):
            store.read(record.video_id, "maps", steps=steps)
    seconds = time.perf_counter() - started
    store.close()
    return sum(len(steps) for plan in plans for steps in plan), seconds


# ---------------------------------------------------------------------------------------------------- the run

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--backbone", default="resnet50", choices=available_backbones())
    parser.add_argument("--weights", default="none", help="none (seeded random init), imagenet, or a state-dict path")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--precision", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), fp32, bf16 or fp16")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float16", "float32"),
                        help="store dtype; auto: float16 unless the backbone's activations come near its range")
    parser.add_argument("--clip-length", type=int, help="clip backbones: frames per step [default: the backbone's]")
    parser.add_argument("--flow", choices=FLOW_METHODS, help="feed optical flow (this method) to the backbone")
    parser.add_argument("--flow-weights", default="none", help="RAFT weights: none (seeded random init), default "
                                                               "(torchvision's enum) or a state-dict path")
    parser.add_argument("--frame-size", type=int, default=224, help="centre-crop side fed to the backbone")
    parser.add_argument("--batch-size", type=int, default=64, help="frames per decode batch and backbone call")
    parser.add_argument("--workers", type=int, default=2, help="decode threads (decode only and full pipeline)")
    parser.add_argument("--videos", type=int, default=16)
    parser.add_argument("--frames-per-video", type=int, default=128)
    parser.add_argument("--video-size", default="320x240", help="WIDTHxHEIGHT of the test videos (even numbers)")
    parser.add_argument("--format", default="both", choices=("both", *BACKENDS))
    parser.add_argument("--store-steps", type=int, default=2048,
                        help="steps written (and then read) per backend in the store rows")
    parser.add_argument("--segments", type=int, default=5, help="random steps read per video (TSN segments)")
    parser.add_argument("--writer-threads", default="1,2,4", help="store-write rows: writer thread counts")
    parser.add_argument("--cluster-workers", default="1,2", help="LocalCluster sizes to compare with one process "
                        "('' for none)")
    parser.add_argument("--gpu-batch", type=int, default=256, help="GPU rows: frames per ResNet-50 call")
    parser.add_argument("--out", type=Path, help="keep videos and stores here (an absent or empty directory); "
                                                 "default: a temporary directory, removed afterwards")
    args = parser.parse_args(argv)
    try:
        args.width, args.height = (int(n) for n in args.video_size.lower().split("x"))
    except ValueError:
        parser.error(f"--video-size {args.video_size!r}: expected WIDTHxHEIGHT, e.g. 320x240")
    if args.width % 2 or args.height % 2 or min(args.width, args.height) < 32:
        parser.error(f"--video-size {args.video_size}: H.264 (yuv420p) needs even sizes; use at least 32x32")
    if min(args.videos, args.frames_per_video, args.batch_size, args.workers, args.store_steps, args.segments) < 1:
        parser.error("--videos, --frames-per-video, --batch-size, --workers, --store-steps and --segments must be "
                     ">= 1")
    try:
        args.writer_threads = [int(value) for value in args.writer_threads.split(",")]
        args.cluster_workers = [int(value) for value in args.cluster_workers.split(",") if value.strip()]
    except ValueError:
        parser.error("--writer-threads and --cluster-workers: comma-separated counts, e.g. 1,2,4")
    if args.out is not None and args.out.exists() and any(args.out.iterdir()):
        parser.error(f"--out {args.out}: the directory is not empty (a store there would be resumed, not timed); "
                     f"give an absent or empty directory")
    return args


def machine_line(device: torch.device) -> str:
    """CPU model and count, GPU, library versions: what the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").is_file():
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    gpu = f", GPU {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    return f"{cpu}, {os.cpu_count()} CPUs{gpu}; torch {torch.__version__}, Python {platform.python_version()}"


def load_average() -> str:
    """The 1, 5 and 15 minute load averages: other work on the machine slows every row down."""
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def run(args: argparse.Namespace, work: Path) -> tuple[list[Row], str, str]:
    """Every measurement, in ``work``; returns the table's rows, the machine line and the setup line."""
    backends = list(BACKENDS) if args.format == "both" else [args.format]
    print(f"writing {args.videos} test videos of {args.frames_per_video} frames, {args.width}x{args.height} ...",
          file=sys.stderr)
    manifest = write_test_videos(work, args.videos, args.frames_per_video, args.width, args.height)
    video_paths = sorted((work / "videos").glob("*.mp4"))
    total_frames = args.videos * args.frames_per_video
    rows = []

    # The fastest of a few passes: decoding is quick, so one pass is short enough for a hiccup to distort it.
    frames, seconds = min((measure_decode(video_paths, args.batch_size, args.workers) for _ in range(DECODE_PASSES)),
                          key=lambda result: result[1])
    rows.append(Row(f"decode only (prefetch, {args.workers} workers)", f"{frames} frames", seconds,
                    f"{frames / seconds:.1f} frames/s",
                    note=f"{args.width}x{args.height} H.264, fastest of {DECODE_PASSES} passes"))

    resize = round(args.frame_size * 256 / 224)  # ImageNet's 256/224 ratio, as `vidshift extract` uses
    flow_weights = args.flow_weights if args.flow in ("raft-small", "raft-large") else "default"
    backbone = build_backbone(args.backbone, args.weights, Preprocess(args.frame_size, resize), args.device,
                              args.precision, clip_length=args.clip_length, flow=args.flow, flow_weights=flow_weights)
    source = open_source(video_paths[0])
    batch, frames_per_call = backbone_batch(backbone, source.read(np.arange(args.frames_per_video)), args.batch_size)
    source.close()
    # The ceiling is the network alone: for flow, on the flow input computed once beforehand (a "flow only" row
    # and a "flow + backbone" row then show what computing flow costs); otherwise on the uint8 frames, as before.
    network, network_input = ((backbone.run_network, backbone.clip_input(batch)) if isinstance(backbone, FlowBackbone)
                              else (backbone, batch))
    device = backbone.device

    def measure_network() -> tuple[int, float, float]:
        try:
            return measure(network, network_input, frames_per_call, total_frames, device)
        except ValueError as error:  # fp16 autocast overflowing inside a random deep net: the message says what to use
            raise SystemExit(f"backbone only: {error}") from error

    frames, seconds_before, peak = measure_network()
    dtype = choose_dtype(args.dtype, peak)
    map_shape = backbone.map_shape()

    pipelines = {}
    for backend in backends:
        config = ExtractConfig(manifest=manifest, root=work, out=work / f"pipeline-{backend}", format=backend,
                               backbone=args.backbone, weights=args.weights, frame_size=args.frame_size,
                               resize=resize, dtype=dtype, device=args.device, precision=args.precision,
                               batch_size=args.batch_size, workers=args.workers, clip_length=args.clip_length,
                               flow=args.flow, flow_weights=flow_weights, stream="flow" if args.flow else "rgb")
        pipelines[backend] = run_extract(config, show_progress=False)
    clusters = cluster_runs(replace(config, format="zarr"), args.cluster_workers, work)

    # Measured again after the pipeline runs: the faster of the two is the ceiling, so that a burst of other load
    # during one measurement does not make the pipeline look faster than the network alone.
    _, seconds_after, _ = measure_network()
    seconds = min(seconds_before, seconds_after)
    ceiling = frames / seconds
    setup = f"{backbone.device.type} {backbone.precision}, batch {len(batch)}"
    if isinstance(backbone, ClipBackbone):
        setup += f" clips of {backbone.clip.length}"
    rows.append(Row(f"backbone only ({args.backbone}, {setup})", f"{frames} frames", seconds,
                    f"{ceiling:.1f} frames/s", "1.00",
                    f"faster of {frames / seconds_before:.1f} (before) and {frames / seconds_after:.1f} (after "
                    f"the pipeline runs); peak activation {peak:.3g}"))
    if isinstance(backbone, FlowBackbone):
        for what, call in ((f"flow only ({args.flow})", backbone.clip_input),
                           (f"flow + backbone ({args.flow}, {args.backbone})", backbone)):
            flow_frames, flow_seconds, _ = measure(call, batch, frames_per_call, total_frames, backbone.device)
            rate = flow_frames / flow_seconds
            rows.append(Row(what, f"{flow_frames} frames", flow_seconds, f"{rate:.1f} frames/s",
                            f"{rate / ceiling:.2f}", "resize, flow, crop, scale" if call != backbone else ""))
    for backend, summary in pipelines.items():
        rate = summary.frames / summary.seconds
        failed = (f"{len(summary.failures)} of {args.videos} videos FAILED, e.g. {summary.failures[0]['reason'][:90]}"
                  if summary.failures else "")
        rows.append(Row(f"full pipeline, {backend} (run_extract)", f"{summary.frames} frames", summary.seconds,
                        f"{rate:.1f} frames/s", f"{rate / ceiling:.2f}", failed))
    for workers, summary in clusters:
        rate = summary.frames / summary.seconds
        rows.append(Row(f"cluster, zarr, LocalCluster of {workers} worker(s)", f"{summary.frames} frames",
                        summary.seconds, f"{rate:.1f} frames/s", f"{rate / ceiling:.2f}",
                        "cluster start included; one torch thread per worker"))
    flow_setup = f", flow {args.flow} (weights {flow_weights})" if args.flow else ""
    setup_line = (f"{args.backbone} weights={args.weights}{flow_setup} on {setup}, frame size {args.frame_size}, maps "
                  f"{'x'.join(map(str, map_shape))} stored as {dtype}, {args.workers} decode workers, "
                  f"{args.videos} videos x {args.frames_per_video} frames")
    machine = machine_line(backbone.device)
    del backbone  # free the device memory before the store measurements

    videos_written = math.ceil(args.store_steps / args.frames_per_video)
    for backend in backends:
        for threads in args.writer_threads:  # the first count's store is the one random reads then read
            out = work / (f"write-{backend}" if threads == args.writer_threads[0] else f"write-{backend}-{threads}")
            summary, seconds, cpu_seconds = measure_store_write_fresh(
                out, backend, map_shape, dtype, videos_written, args.frames_per_video, args.batch_size, threads)
            megabytes = summary["raw_bytes_stored_dtype"] / 1e6
            steps_per_second = videos_written * args.frames_per_video / seconds
            rows.append(Row(f"store write, {backend}, {threads} thread(s) (random post-ReLU {dtype})",
                            f"{megabytes:.1f} MB raw", seconds, f"{megabytes / seconds:.1f} MB/s raw",
                            note=f"{steps_per_second:.0f} steps/s, {cpu_seconds / seconds:.2f} cores busy, "
                                 f"{1e3 * cpu_seconds / (videos_written * args.frames_per_video):.2f} CPU ms/step; "
                                 f"compressed {summary['compression_ratio']:.2f}x"))
    if torch.cuda.is_available():
        rows += gpu_rows(args, work, dtype)

    for backend in backends:
        steps, seconds = measure_random_reads(work / f"write-{backend}", args.segments)
        step_megabytes = int(np.prod(map_shape)) * np.dtype(dtype).itemsize / 1e6
        rows.append(Row(f"random read, {backend} ({args.segments} steps/video, 1 process)", f"{steps} steps",
                        seconds, f"{steps / seconds:.1f} steps/s",
                        note=f"{steps * step_megabytes / seconds:.1f} MB/s of maps, warm cache"))
    return rows, machine, setup_line


def gpu_rows(args: argparse.Namespace, work: Path, dtype: str) -> list[Row]:
    """Issue 15's GPU rows: the ResNet-50 bf16 ceiling and the full pipeline at 240p/360p, decord vs NVDEC."""
    device = torch.device("cuda")
    ceiling = gpu_ceiling(224, args.gpu_batch, device)
    rows = [Row(f"GPU backbone only (resnet50 bf16 channels-last, batch {args.gpu_batch})", "", 0.0,
                f"{ceiling:.0f} frames/s", "1.00", torch.cuda.get_device_name(device))]
    base = ExtractConfig(manifest=work / "unused.csv", root=work, out=work / "unused", backbone="resnet50",
                         weights="none", dtype=dtype, device="cuda", precision="bf16", batch_size=args.gpu_batch,
                         workers=args.workers)
    def videos_of_size(directory: Path, width: int, height: int) -> Path:
        return write_test_videos(directory, args.videos, args.frames_per_video, width, height)

    for label, summary in gpu_pipeline_runs(videos_of_size, base, work):
        rate = summary.frames / summary.seconds
        rows.append(Row(f"GPU full pipeline, {label}", f"{summary.frames} frames", summary.seconds,
                        f"{rate:.0f} frames/s", f"{rate / ceiling:.2f}", f"{args.workers} decode workers"))
    return rows


def format_markdown(cells: list[list[str]]) -> str:
    """A Markdown table (the first row is the header), aligned so that it also reads well on a terminal."""
    widths = [max(len(line[i]) for line in cells) for i in range(len(cells[0]))]
    lines = ["| " + " | ".join(cell.ljust(width) for cell, width in zip(line, widths)) + " |" for line in cells]
    lines.insert(1, "|" + "|".join("-" * (width + 2) for width in widths) + "|")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started, load_before = time.strftime("%Y-%m-%d %H:%M %Z"), load_average()
    work = args.out or Path(tempfile.mkdtemp(prefix="vidshift-bench-extract-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        rows, machine, setup_line = run(args, work)
    finally:
        if args.out is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"vidshift extract benchmark, {started}")
    print(f"machine: {machine}")
    print(f"setup: {setup_line}")
    print(f"load average (1, 5, 15 min): {load_before} at start, {load_average()} at end")
    print(format_markdown([["measurement", "amount", "seconds", "rate", "fraction of backbone ceiling", "note"],
                           *[[r.what, r.amount, f"{r.seconds:.2f}", r.rate, r.fraction, r.note] for r in rows]]))


if __name__ == "__main__":
    main()
