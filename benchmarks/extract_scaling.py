"""benchmarks/extract.py's rows about parallelism: store write per writer-thread count, dask LocalClusters against
one process, and (only where CUDA is present) the GPU rows of issue 15.

- store write, T threads: the store API writing random post-ReLU maps, each count in a fresh spawned process (zarr
  sizes its thread pool once per process, at first use);
- cluster, N workers: ``run_extract`` with ``--cluster local:N`` on the same videos as the single-process row, the
  cluster's start (N worker processes importing torch and building the backbone) included in the time, since a run
  pays it; workers run one torch thread each (dask's nanny sets OMP_NUM_THREADS=1);
- GPU: ResNet-50 bf16, channels-last, backbone only at --gpu-batch frames (the ceiling), then the full pipeline on
  240p and 360p videos with decord and with torchcodec on NVDEC, as fractions of that ceiling.
"""
from __future__ import annotations

import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch

from extract.backbones import Preprocess, build_backbone
from extract.run import ExtractConfig, run_extract
from extract.store import DEFAULT_STREAM, FeatureStore
from extract.store.summary import store_summary


def measure_store_write(root: Path, backend: str, map_shape: tuple[int, ...], dtype: str, videos: int,
                        steps_per_video: int, batch_size: int, writer_threads: int = 1) -> tuple[dict, float, float]:
    """Write random post-ReLU maps as ``videos`` videos through the store API; (store summary, seconds, CPU
    seconds of the process: all its threads, so the work done whether or not idle cores ran it in parallel)."""
    provenance = {"features": {"name": "benchmark-random-maps", "map_shape": list(map_shape), "dtype": dtype},
                  "software": {}}
    store = FeatureStore.create_or_open(root, backend, DEFAULT_STREAM, provenance)
    rng = np.random.default_rng(0)
    # One video's worth of distinct random steps, reused by every video: zstd compresses each step on its own,
    # so repeats across videos neither help nor hurt, and generating them stays out of the timing.
    maps = np.maximum(rng.standard_normal((steps_per_video, *map_shape), dtype=np.float32), 0)
    steps = np.repeat(np.arange(steps_per_video, dtype=np.int32)[:, None], 2, axis=1)
    started, cpu_started = time.perf_counter(), time.process_time()
    with store.lock("s0of1"):
        part = store.new_part("s0of1", DEFAULT_STREAM, dtype, map_shape[-1], {}, writer_threads=writer_threads)
        for v in range(videos):
            video = part.video(f"bench_{v:04d}", {})
            for first in range(0, steps_per_video, batch_size):
                video.append(steps[first:first + batch_size], maps[first:first + batch_size])
            video.finish()
        part.commit()
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    return store_summary(FeatureStore.open(root)), seconds, cpu_seconds


def measure_store_write_fresh(*args, **kwargs) -> tuple[dict, float, float]:
    """``measure_store_write`` in a new spawned process, so that its thread pools are its own."""
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        return pool.submit(measure_store_write, *args, **kwargs).result()


def cluster_runs(config: ExtractConfig, worker_counts: list[int], work: Path) -> list[tuple[int, object]]:
    """(workers, ExtractSummary) of ``config`` on a LocalCluster of each size, each into a fresh store."""
    return [(count, run_extract(replace(config, out=work / f"cluster-{count}", cluster=f"local:{count}"),
                                show_progress=False)) for count in worker_counts]


def gpu_ceiling(frame_size: int, batch: int, device: torch.device, calls: int = 20) -> float:
    """ResNet-50 bf16 channels-last frames/s on uint8 frames already on the host (resize, crop, network, maps back)."""
    backbone = build_backbone("resnet50", "none", Preprocess(frame_size, round(frame_size * 256 / 224)),
                              str(device), "bf16")
    frames = np.random.default_rng(0).integers(0, 255, (batch, 240, 320, 3), dtype=np.uint8)
    backbone(frames)
    torch.cuda.synchronize(device)
    started = time.perf_counter()
    for _ in range(calls):
        backbone(frames)
    torch.cuda.synchronize(device)
    return calls * batch / (time.perf_counter() - started)


def gpu_pipeline_runs(make_manifest, base: ExtractConfig, work: Path) -> list[tuple[str, object]]:
    """(label, ExtractSummary) of the full pipeline at 240p and 360p with decord (CPU) and torchcodec (NVDEC)."""
    runs = []
    for label, (width, height) in (("240p", (320, 240)), ("360p", (640, 360))):
        manifest = make_manifest(work / label, width, height)
        for decoder in ("decord", "torchcodec-cuda"):
            config = replace(base, manifest=manifest, root=work / label, out=work / f"gpu-{label}-{decoder}",
                             decoder=decoder)
            runs.append((f"{label}, {decoder}", run_extract(config, show_progress=False)))
    return runs
