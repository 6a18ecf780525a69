"""Stage two's speed on this machine: epoch time and videos/s of a head on a UCF-HMDB_full-sized synthetic store,
with the features held in memory or streamed from a zarr or an HDF5 store.

The store is built through the store API with random features of the real shapes: by default 1438 labelled source
(UCF) and 840 unlabelled target (HMDB) training videos in 12 classes, once as 2048-d pooled vectors (25 steps a
video) and once as 7x7x2048 maps (8 steps a video). Real clips are longer (UCF101 averages ~180 frames), but the
steps per video change only the build and load times, not an epoch's, which reads --segments steps per video:
maps cost 200 KB a step in float16, so 2278 videos x 8 steps is already 3.8 GB raw (2.3 GB on disk) per backend,
and zarr writes about a thousand one-step chunks a second on a 2-core CPU, so 100 pooled steps would take minutes.

One epoch is what ``vidshift train`` runs, evaluation, checkpoints and logging left out: a pass over the source
in batches of the model's batch size (trn: 128) with, for a method that needs a target (``da`` only), a target
batch beside each (the trainer's ratio: 74); 5 TSN segments per video at random steps, planned by ``FeatureSet.epoch_plans``,
fetched by ``pipelines.data.iterate`` (--workers DataLoader processes per domain when streaming) and fed to
``model.update``. The pooled features train --method (default ``erm``) on architecture --head (default ``trn``);
the maps train it on the first registered architecture that reads maps, or, when there is none, the data path
alone is timed (read and batch, both domains).

    .venv/bin/python benchmarks/train.py                                # the sizes above; ~10 min on 2 CPU cores
    .venv/bin/python benchmarks/train.py --scale 0.25 --arrays pooled   # a quick look

Streaming reads a few random steps per video every epoch; "memory" reads every step once (the load column) and
then gathers batches from one tensor. The stores were just written, so reads come from the OS page cache. They are
written to a temporary directory (set TMPDIR to choose where: up to ~2.5 GB at a time by default), one at a time,
each removed once timed.
"""
from __future__ import annotations

import argparse
import gc
import math
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

# Run as a script, Python puts this directory first on the path; the repository root takes its place, so the
# project's packages (and the report helpers in benchmarks/extract.py) import from an uninstalled checkout too.
sys.path[0] = str(Path(__file__).resolve().parents[1])

import heads  # noqa: E402
from benchmarks.extract import format_markdown, load_average, machine_line  # noqa: E402
from extract.manifest import VideoEntry  # noqa: E402
from extract.store import BACKENDS, DEFAULT_STREAM, FeatureStore  # noqa: E402
from extract.store.summary import store_summary  # noqa: E402
from heads import LabelledBatch, UnlabelledBatch  # noqa: E402
from pipelines.data import FeatureSet, iterate, place_features, target_batch_size  # noqa: E402
from pipelines.runs import resolve_device  # noqa: E402

SOURCE, TARGET = "ucf", "hmdb"
VIDEOS_PER_PART = 64  # `vidshift extract`'s default: stores hold many parts, and readers open each
POOL_STEPS = 256      # distinct random steps, cycled through the videos (generating every step would dominate)
DATA_ONLY_BATCH = 128  # source videos per batch when no head is timed (TA3N §7.3)


@dataclass
class Case:
    """One timed epoch."""
    array: str
    place: str
    head: str
    load_seconds: float
    epoch_seconds: float  # the fastest of --epochs
    batch_size: int       # source videos per update
    videos: int
    slices_per_video: float  # contiguous runs of steps, one store read each when streaming


# ------------------------------------------------------------------------------------------------- the stores

def video_entries(source_videos: int, target_videos: int, classes: int) -> tuple[list[VideoEntry], list[VideoEntry]]:
    """The source and target training videos, classes in turn."""
    def domain(name: str, count: int) -> list[VideoEntry]:
        return [VideoEntry(f"{name}/{i:05d}", f"{name}/{i:05d}.avi", f"class{i % classes:02d}", name, "train")
                for i in range(count)]
    return domain(SOURCE, source_videos), domain(TARGET, target_videos)


def build_store(root: Path, backend: str, array: str, entries: list[VideoEntry], steps: int,
                feat_shape: tuple[int, ...], stream: str = DEFAULT_STREAM) -> float:
    """Write random features for ``entries`` through the store API, as an extraction would; returns seconds.

    ``maps`` stores hold maps and their pooled means; ``pooled`` stores only vectors (like an imported release).
    Called again with another ``stream`` on the same root, it adds that stream beside the first (RGB + flow).
    """
    shape_key = {"map_shape": list(feat_shape)} if array == "maps" else {"channels": feat_shape[0]}
    provenance = {"features": {"name": "benchmark-random", "dtype": "float16", **shape_key}, "software": {}}
    store = FeatureStore.create_or_open(root, backend, stream, provenance)
    rng = np.random.default_rng(0)
    pool = rng.standard_normal((POOL_STEPS, *feat_shape), dtype=np.float32)
    # Maps as after a ReLU (half zeros, which is what zstd finds to compress); pooled vectors are dense and positive.
    pool = np.maximum(pool, 0) if array == "maps" else np.abs(pool)
    step_ranges = np.repeat(np.arange(steps, dtype=np.int32)[:, None], 2, axis=1)
    started = time.perf_counter()
    with store.lock("s0of1"):
        for first in range(0, len(entries), VIDEOS_PER_PART):
            part = store.new_part("s0of1", stream, "float16", feat_shape[-1], {})
            for v, entry in enumerate(entries[first:first + VIDEOS_PER_PART], start=first):
                rows = pool[(v + np.arange(steps)) % POOL_STEPS]
                video = part.video(entry.video_id, entry.attributes())
                video.append(step_ranges, **{"maps" if array == "maps" else "pooled": rows})
                video.finish()
            part.commit()
    store.rebuild_index()
    return time.perf_counter() - started


# ------------------------------------------------------------------------------------------------- the epochs

def time_epochs(store: FeatureStore, array: str, feat_shape: tuple[int, ...], place: str,
                entries: tuple[list[VideoEntry], list[VideoEntry]], head_name: str | None, args: argparse.Namespace,
                device: torch.device) -> tuple[float, float, int, int, float]:
    """Load (if ``place`` is memory), then run --epochs epochs of the trainer's data path and ``head.update``.

    Returns (load seconds, seconds of the fastest epoch, source batch size, videos fed per epoch (source and
    target), store reads per video when streaming: the segments' steps in contiguous runs, one slice each).
    """
    source_entries, target_entries = entries
    class_index = {label: i for i, label in enumerate(sorted({e.label for e in source_entries}))}
    method_cls = heads.methods()[args.method] if head_name else None
    adapting = method_cls is None or "dg" not in method_cls.settings  # the data path alone reads both domains
    source = FeatureSet(store, source_entries, array, class_index)
    target = FeatureSet(store, target_entries, array, class_index, labelled=False) if adapting else None

    started = time.perf_counter()
    place_features([(s, None) for s in (source, target) if s is not None], place, device, budget_bytes=0)
    load_seconds = time.perf_counter() - started if place == "memory" else 0.0

    head, batch_size = None, args.batch_size or DATA_ONLY_BATCH
    if method_cls is not None:
        torch.manual_seed(0)
        overrides = {"batch_size": args.batch_size} if args.batch_size else {}
        head = heads.build(head_name, args.method, feat_shape, len(class_index), args.segments, overrides)
        head.to(device).train()
        batch_size = head.hparams["batch_size"]
    batches = math.ceil(len(source) / batch_size)
    target_batch = target_batch_size(batch_size, len(source), len(target)) if target else 0
    fastest = math.inf
    for epoch in range(args.epochs):
        generator = torch.Generator().manual_seed(epoch)
        source_plans = source.epoch_plans(args.segments, batch_size, batches, "random", generator)
        target_plans = (target.epoch_plans(args.segments, target_batch, batches, "random", generator) if target
                        else [None] * batches)
        started = time.perf_counter()
        target_stream = iterate(target, target_plans, args.workers, device) if target else iter(target_plans)
        for step, (plan, x_source) in enumerate(iterate(source, source_plans, args.workers, device)):
            target_item = next(target_stream)
            if head is not None:
                x_target = UnlabelledBatch(target_item[1]) if target_item is not None else None
                progress = (epoch * batches + step) / (args.epochs * batches)
                head.update(LabelledBatch(x_source, source.labels[plan.videos].to(device)), x_target, progress)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the last update's kernels belong to the epoch
        fastest = min(fastest, time.perf_counter() - started)
        del target_stream  # its DataLoader workers exit now, not during the next epoch
    steps = [row for plan in source_plans + target_plans if plan is not None for row in plan.steps]
    slices = sum(1 + np.count_nonzero(np.diff(np.unique(row)) != 1) for row in steps)
    return load_seconds, fastest, batch_size, len(steps), slices / len(steps)


def maps_head(requested: str) -> str | None:
    """The maps architecture to time: the one asked for, the first registered (auto), or None (data path only)."""
    registry = heads.architectures()
    if requested == "auto":
        return next((name for name, cls in registry.items() if cls.input == "maps"), None)
    if requested == "none":
        return None
    if requested not in registry or registry[requested].input != "maps":
        readers = [name for name, cls in registry.items() if cls.input == "maps"] or ["none registered"]
        raise ValueError(f"--maps-head {requested!r}: not a registered architecture reading maps "
                         f"({', '.join(readers)})")
    return requested


# ---------------------------------------------------------------------------------------------------- the run

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--head", default="trn", help="architecture trained on the pooled features")
    parser.add_argument("--method", default="erm", help="method training both architectures")
    parser.add_argument("--maps-head", default="auto",
                        help="architecture trained on the maps: auto (the first registered maps architecture), a "
                             "name, or none (time the data path alone)")
    parser.add_argument("--source-videos", type=int, default=1438, help="UCF-HMDB_full: UCF train")
    parser.add_argument("--target-videos", type=int, default=840, help="UCF-HMDB_full: HMDB train")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies both video counts (quick runs)")
    parser.add_argument("--classes", type=int, default=12)
    parser.add_argument("--pooled-steps", type=int, default=25, help="steps per video in the pooled store")
    parser.add_argument("--map-steps", type=int, default=8,
                        help="steps per video in the maps store (200 KB each in float16: keep it small)")
    parser.add_argument("--channels", type=int, default=2048)
    parser.add_argument("--map-size", type=int, default=7, help="maps are MAP_SIZE x MAP_SIZE x CHANNELS")
    parser.add_argument("--segments", type=int, default=5, help="TSN segments per video")
    parser.add_argument("--batch-size", type=int,
                        help=f"source videos per update; default: each model's own (trn: 128, TA3N §7.3), "
                             f"{DATA_ONLY_BATCH} for the data path alone")
    parser.add_argument("--arrays", default="both", choices=("both", "pooled", "maps"))
    parser.add_argument("--format", default="both", choices=("both", *BACKENDS))
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader processes per domain when streaming")
    parser.add_argument("--epochs", type=int, default=1,
                        help="epochs timed per case; the fastest is reported (other load only slows epochs down)")
    args = parser.parse_args(argv)
    args.source_videos = max(1, round(args.source_videos * args.scale))
    args.target_videos = max(1, round(args.target_videos * args.scale))
    args.map_shape = (args.map_size, args.map_size, args.channels)
    try:
        args.maps_head = maps_head(args.maps_head)
    except ValueError as error:
        parser.error(str(error))
    if args.head not in heads.architectures() or heads.architectures()[args.head].input != "pooled":
        readers = [name for name, cls in heads.architectures().items() if cls.input == "pooled"]
        parser.error(f"--head {args.head!r}: not a registered architecture reading pooled features "
                     f"({', '.join(readers)})")
    if args.method not in heads.methods():
        parser.error(f"--method {args.method!r}: not a registered method ({', '.join(heads.methods())})")
    if min(args.classes, args.pooled_steps, args.map_steps, args.channels, args.map_size, args.segments,
           args.batch_size or 1, args.epochs) < 1 or args.workers < 0:
        parser.error("sizes must be >= 1 and --workers >= 0")
    return args


def run(args: argparse.Namespace, work: Path, device: torch.device) -> tuple[list[list[str]], list[Case]]:
    arrays = ["pooled", "maps"] if args.arrays == "both" else [args.arrays]
    backends = list(BACKENDS) if args.format == "both" else [args.format]
    entries = video_entries(args.source_videos, args.target_videos, args.classes)
    store_rows, cases = [], []
    for array in arrays:
        steps, feat_shape = ((args.map_steps, args.map_shape) if array == "maps"
                             else (args.pooled_steps, (args.channels,)))
        head_name = args.maps_head if array == "maps" else args.head
        for backend in backends:
            root = work / f"{array}-{backend}"
            print(f"building the {array} store ({backend}) ...", file=sys.stderr)
            seconds = build_store(root, backend, array, entries[0] + entries[1], steps, feat_shape)
            store = FeatureStore.open(root)
            summary = store_summary(store)
            store_rows.append([array, backend, f"{len(entries[0])} + {len(entries[1])}", str(steps),
                               f"{summary['raw_bytes_stored_dtype'] / 1e9:.2f}", f"{summary['disk_bytes'] / 1e9:.2f}",
                               f"{seconds:.1f}"])
            # Streaming first: loading the maps into memory takes GBs of RAM, which can evict the store's files
            # from the page cache that the build filled, and make the streamed reads that follow cold.
            for place in ("stream", "memory"):
                print(f"  timing {array} features, {place} ...", file=sys.stderr)
                timings = time_epochs(store, array, feat_shape, place, entries, head_name, args, device)
                label = f"memory (loaded from {backend})" if place == "memory" else f"stream from {backend}"
                cases.append(Case(array, label, head_name or "none: data path only", *timings))
                gc.collect()  # drop the in-memory features before the next case loads its own
            store.close()
            shutil.rmtree(root)  # disk: a maps store is GBs
    return store_rows, cases


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = resolve_device(args.device)
    started, load_before = time.strftime("%Y-%m-%d %H:%M %Z"), load_average()
    work = Path(tempfile.mkdtemp(prefix="vidshift-bench-train-"))
    try:
        store_rows, cases = run(args, work, device)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"vidshift train benchmark, {started}")
    print(f"machine: {machine_line(device)}")
    print(f"setup: {args.source_videos} source + {args.target_videos} target videos, {args.classes} classes, "
          f"{args.segments} segments, device {device}, "
          f"{args.workers} DataLoader workers per domain when streaming, fastest of {args.epochs} epoch(s) per case")
    print(f"load average (1, 5, 15 min): {load_before} at start, {load_average()} at end")
    print(format_markdown([["features", "backend", "videos", "steps/video", "raw GB", "disk GB", "build s"],
                           *store_rows]))
    print()
    print(format_markdown([["features", "place", "head", "batch", "load s", "epoch s", "videos/s", "reads/video"],
                           *[case_cells(case) for case in cases]]))


def case_cells(case: Case) -> list[str]:
    streamed = not case.load_seconds
    return [case.array, case.place, case.head, str(case.batch_size), "" if streamed else f"{case.load_seconds:.2f}",
            f"{case.epoch_seconds:.2f}", f"{case.videos / case.epoch_seconds:.0f}",
            f"{case.slices_per_video:.1f}" if streamed else ""]


if __name__ == "__main__":
    main()
