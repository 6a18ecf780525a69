"""Cluster extraction (``vidshift extract --cluster local[:N] | tcp://HOST:PORT | slurm[:CONFIG.yaml]``).

The manifest is cut into chunks of ``--videos-per-part`` consecutive videos; chunk i of n is one dask task whose key
is its part tag ``c<i>of<n>`` (six digits each) and which commits exactly one part, ``part-c<i>of<n>-<k>``; k counts
the parts that tag already has (0 on a fresh store; a rerun that retries a chunk's failed videos writes k = 1).
research/store.md §5's idempotent-task recipe, on the store's own guarantees (one atomic rename per part):

- this process (the client) plans: it asks one worker for the provenance its backbone has there (the device and
  precision that workers resolve, not the client's), creates or checks the store, and sends each chunk that still has
  videos to extract, without those already stored, as a task that names the part it must commit;
- a task takes the lock of its tag (waiting if another copy of it runs, e.g. after the scheduler wrongly declared
  its worker dead), which deletes what a killed copy left under a temporary name; if its part is committed by then, it
  returns at once, else it extracts its videos into that part exactly as ``vidshift extract`` does (failed videos are
  recorded in the part, not raised) and commits it;
- a worker that dies (killed, out of memory, its SLURM job ended) loses only its uncommitted part; the scheduler
  reruns the task on another worker (up to ``distributed.scheduler.allowed-failures`` times, then the run stops with
  ``KilledWorker`` and a rerun resumes); a chunk's part holds the same videos in the same order whoever extracts it,
  so the store ends up holding what a single-process run with the same --videos-per-part writes
  (tests/test_cluster_extract.py compares every array);
- the client holds the store's shard locks (``s<k>of<N>`` of its recorded layout, ``s0of1`` for a new store) for the
  whole run, so a second ``--cluster`` run, or a ``--shard`` process, on the same store is refused with a message,
  never interleaved: two runs planning the same videos would store them twice.

Progress is one bar over the manifest's videos, advanced by a part's videos when its task finishes, with the failures
counted as they come; the dashboard's address is printed when the cluster is up.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import FIRST_COMPLETED, Future, wait
from contextlib import ExitStack
from dataclasses import dataclass, replace
from functools import lru_cache

from tqdm import tqdm

from .backbones import Backbone
from .cluster import dask_executor, visible_gpus
from .manifest import VideoEntry, read_manifest
from .run import (ExtractConfig, ExtractSummary, extract_videos, part_info, prepare_backbone, store_provenance)
from .store import FeatureStore, StoreError

CLUSTER_TAG = "c{index:06d}of{count:06d}"


@dataclass(frozen=True)
class PartTask:
    tag: str                         # the chunk's key, c<i>of<n>
    part: str                        # the part it commits; committed already: the task returns at once
    entries: tuple[VideoEntry, ...]  # its videos still to extract, in manifest order


@lru_cache(maxsize=1)
def _worker_backbone(config: ExtractConfig) -> tuple[ExtractConfig, Backbone]:
    """One backbone per worker process and run: its tasks share it (and a --compile's compiled kernels)."""
    return prepare_backbone(config)


def worker_provenance(config: ExtractConfig) -> dict:
    """The store provenance of this run's backbone on the worker that runs this."""
    config, backbone = _worker_backbone(config)
    return store_provenance(config, backbone)


def extract_part(config: ExtractConfig, task: PartTask) -> ExtractSummary:
    """A dask task: extract ``task``'s videos into its part, or nothing if that part is committed already."""
    started = time.perf_counter()
    config, backbone = _worker_backbone(config)
    provenance = store_provenance(config, backbone)
    # create_or_open checks this worker's settings against the store's: a worker whose GPU resolves another
    # precision than the store was made with is refused instead of mixing features.
    store = FeatureStore.create_or_open(config.out, config.format, config.stream, provenance)
    summary = ExtractSummary(store=config.out)
    with store, store.lock(task.tag, wait=True):
        if store.next_part_name(task.tag) != task.part:
            summary.skipped = len(task.entries)  # committed by an earlier copy of this task
        else:
            extract_videos(config, backbone, store, task.tag, list(task.entries),
                           part_info(config, task.tag, provenance), summary, len(task.entries), lambda: None)
    summary.seconds = time.perf_counter() - started
    return summary


def plan_tasks(entries: list[VideoEntry], videos_per_part: int, present: set[str], committed: list[str],
               suffix: str) -> list[PartTask]:
    """One task per chunk of ``videos_per_part`` consecutive entries that still has videos not in ``present``;
    ``committed``: the store's part names, ``suffix`` its backend's part suffix (.zarr, .h5)."""
    chunks = [entries[first:first + videos_per_part] for first in range(0, len(entries), videos_per_part)]
    parts_of_tag: dict[str, int] = {}
    for name in committed:  # part-<tag>-<k><suffix>
        tag, _, number = name[len("part-"):].rpartition("-")
        parts_of_tag[tag] = max(parts_of_tag.get(tag, 0), int(number[:6]) + 1)
    tasks = []
    for index, chunk in enumerate(chunks):
        tag = CLUSTER_TAG.format(index=index, count=len(chunks))
        todo = tuple(entry for entry in chunk if entry.video_id not in present)
        if todo:
            tasks.append(PartTask(tag, f"part-{tag}-{parts_of_tag.get(tag, 0):06d}{suffix}", todo))
    return tasks


def default_workers() -> int:
    """``--cluster local``: a worker process per GPU, else per CPU core."""
    return visible_gpus() or os.cpu_count() or 1


def run_on_cluster(config: ExtractConfig, show_progress: bool = True) -> ExtractSummary:
    # Workers may run elsewhere (a SLURM node) and in another directory: they get absolute paths.
    config = replace(config, manifest=config.manifest.resolve(), root=config.root.resolve(), out=config.out.resolve())
    entries = read_manifest(config.manifest)
    summary = ExtractSummary(store=config.out)
    started = time.perf_counter()
    with dask_executor(config.cluster, default_workers(), tqdm.write, one_gpu_each=True) as executor:
        provenance = executor.submit(worker_provenance, config).result()
        store = FeatureStore.create_or_open(config.out, config.format, config.stream, provenance)
        with store, ExitStack() as locks:
            for lock in _shard_locks(store):
                locks.enter_context(lock)
            tasks = plan_tasks(entries, config.videos_per_part, set(store.videos(config.stream)),
                               store.part_names(), store.suffix)
            summary.skipped = len(entries) - sum(len(task.entries) for task in tasks)
            try:
                _run_tasks(executor, config, tasks, summary, len(entries), show_progress)
            finally:
                store.rebuild_index()  # what was committed stays visible, also when a task failed
    summary.seconds = time.perf_counter() - started
    return summary


def _shard_locks(store: FeatureStore) -> list:
    """The locks of every shard of the store's layout (claiming one shard for a new store); a StoreError naming
    the cluster when another run holds one."""
    if not store.meta.get("shard_count"):
        store.claim_shard_layout(0, 1)
    count = store.meta["shard_count"]
    held = []
    try:
        for index in range(count):
            held.append(store.lock(f"s{index}of{count}"))
    except StoreError:
        for lock in held:
            lock.close()
        raise StoreError(f"{store.root}: another extraction (a --cluster run, or a --shard process) is writing into "
                         f"this store, so this --cluster run is refused rather than storing videos twice; wait for "
                         f"it to finish, then rerun this command, which resumes with the videos left") from None
    return held


def _run_tasks(executor, config: ExtractConfig, tasks: list[PartTask], summary: ExtractSummary, total: int,
               show_progress: bool) -> None:
    """Submit every task, merge their outcomes as they finish; the first task error cancels the rest."""
    bar = tqdm(total=total, initial=summary.skipped, unit="video", desc="extract",
               disable=None if show_progress else True)
    pending: dict[Future, PartTask] = {executor.submit(extract_part, config, task): task for task in tasks}
    with bar:
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                task = pending.pop(future)
                try:
                    outcome = future.result()
                except Exception as error:  # noqa: BLE001 - a store, disk or worker error: stop, keep what is done
                    for other in pending:
                        other.cancel()
                    raise StoreError(_task_failure(config, task, error)) from error
                _merge(summary, outcome)
                bar.update(len(task.entries))
                bar.set_postfix(failed=len(summary.failures))


def _merge(summary: ExtractSummary, outcome: ExtractSummary) -> None:
    summary.skipped += outcome.skipped
    summary.extracted += outcome.extracted
    summary.frames += outcome.frames
    summary.partial += outcome.partial
    summary.failures += outcome.failures


def _task_failure(config: ExtractConfig, task: PartTask, error: Exception) -> str:
    reason = f"{type(error).__name__}: {error}"
    if type(error).__name__ == "KilledWorker":
        reason += (" (its worker died each time it ran it, up to distributed.scheduler.allowed-failures; a video "
                   "that crashes the decoder or a worker out of memory does this: see the worker logs)")
    return (f"cluster extraction into {config.out} stopped at part {task.part}: {reason}.\nEvery part committed "
            f"before is intact, and rerunning the same command resumes with the videos left.")
