"""Where tasks run: this process, a pool of local worker processes, or a dask.distributed cluster.

Everything here hands out a ``concurrent.futures.Executor``, so a caller (the training sweep, ``pipelines/sweep.py``;
cluster extraction, ``extract/cluster_run.py``) writes one submit/wait loop and does not care where its tasks run.
It knows nothing of training or extraction: a task is any importable function of picklable arguments.

- ``local`` with K slots: K long-lived worker processes on this machine (``spawn``, torch threads split between
  them), or, with one slot, this process itself (no start-up at all). K runs in flight share one GPU: light heads
  on cached features leave it mostly idle (harness.md §2.5: DomainBed's ``multi_gpu_launcher`` allows one process
  per GPU, which is what we do not want here).
- ``dask`` with a cluster address (``parse_cluster``):
  ``local[:N]`` a LocalCluster of N worker processes (one thread each: a task is one run), started and closed here;
  ``tcp://HOST:PORT`` (or ``tls://``) a scheduler that is already running (its workers are started elsewhere, e.g.
  ``dask worker tcp://HOST:PORT --nthreads 1`` on each GPU node);
  ``slurm[:CONFIG.yaml]`` dask-jobqueue's SLURMCluster: CONFIG's mapping is passed to ``SLURMCluster`` as keyword
  arguments (queue, cores, memory, walltime, ``job_extra_directives: ["--gres=gpu:1"]``, ``worker_extra_args:
  ["--lifetime", "55m", "--lifetime-stagger", "4m"]`` so workers retire before the walltime), plus ``jobs: N``
  (scale to N jobs, default: the slots) or ``adapt: {minimum_jobs: 0, maximum_jobs: N}`` (adaptive scaling).
  The dashboard's address is printed. Dask reschedules a dead worker's task elsewhere (up to
  ``distributed.scheduler.allowed-failures`` times, then the task fails with ``KilledWorker``).
Local dask workers are started non-daemonic, so a task may start DataLoader worker processes of its own; dask's
nanny sets ``OMP_NUM_THREADS=1`` in them (one torch thread per task), as we want. With ``one_gpu_each`` a local
cluster's worker N sees only GPU N (``CUDA_VISIBLE_DEVICES``, set by a worker plugin before any task touches CUDA;
a worker restarted after a crash keeps its name and so its GPU), so N workers share N GPUs without a device option.
"""
from __future__ import annotations

import os
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Iterator

import yaml

LAUNCHERS = ("local", "dask")


class ClusterError(ValueError):
    """A cluster address or configuration that cannot be used; the message says what to write."""


class InlineExecutor(Executor):
    """Runs each task in this process as it is submitted: one slot, no start-up, this process's caches."""

    def submit(self, fn: Callable, /, *args, **kwargs) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as error:    # the caller's result() raises it, as any executor's would
            future.set_exception(error)
        return future


def limit_threads(threads: int) -> None:
    """Torch's intra-op threads in a worker process, so that K workers share the cores instead of fighting."""
    import torch

    torch.set_num_threads(threads)


def threads_per_worker(workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // workers)


def local_executor(slots: int) -> Executor:
    """``slots`` long-lived worker processes (spawned: safe with CUDA), or this process for one slot."""
    if slots < 1:
        raise ClusterError(f"--slots {slots}: must be at least 1")
    if slots == 1:
        return InlineExecutor()
    return ProcessPoolExecutor(slots, mp_context=get_context("spawn"), initializer=limit_threads,
                               initargs=(threads_per_worker(slots),))


@dataclass(frozen=True)
class ClusterAddress:
    kind: str                   # local | scheduler | slurm
    workers: int | None = None  # local:N
    address: str | None = None  # tcp://HOST:PORT
    config: Path | None = None  # slurm:CONFIG.yaml


def parse_cluster(text: str) -> ClusterAddress:
    """``local[:N]``, ``tcp://HOST:PORT`` / ``tls://HOST:PORT``, or ``slurm[:CONFIG.yaml]``."""
    kind, _, argument = text.partition(":")
    if kind == "local":
        if argument and not (argument.isdigit() and int(argument) >= 1):
            raise ClusterError(f"--cluster {text!r}: write local or local:N with N >= 1 worker processes")
        return ClusterAddress("local", int(argument) if argument else None)
    if kind in ("tcp", "tls") and argument.startswith("//") and ":" in argument[2:]:
        return ClusterAddress("scheduler", address=text)
    if kind == "slurm":
        return ClusterAddress("slurm", config=Path(argument) if argument else None)
    raise ClusterError(f"--cluster {text!r}: use local[:N], tcp://HOST:PORT (a running scheduler) or "
                       f"slurm[:CONFIG.yaml]")


def slurm_cluster(config_path: Path | None):
    """A dask-jobqueue SLURMCluster from CONFIG.yaml's keyword arguments, and how to scale it (jobs / adapt)."""
    from dask_jobqueue import SLURMCluster

    options = {}
    if config_path is not None:
        loaded = yaml.safe_load(Path(config_path).read_bytes())
        if not isinstance(loaded, dict):
            raise ClusterError(f"{config_path}: expected a mapping of SLURMCluster arguments (queue, cores, memory, "
                               f"walltime, job_extra_directives, ...) and optionally jobs or adapt")
        options = dict(loaded)
    scaling = {key: options.pop(key) for key in ("jobs", "adapt") if key in options}
    try:
        cluster = SLURMCluster(**options)
    except TypeError as error:
        raise ClusterError(f"{config_path}: {error}; its keys are SLURMCluster's arguments "
                           f"(dask-jobqueue documentation)") from None
    return cluster, scaling


def visible_gpus() -> int:
    """CUDA devices this process sees (0 without CUDA); counting them does not initialise CUDA."""
    import torch

    return torch.cuda.device_count()


@contextmanager
def dask_executor(text: str, workers: int, echo: Callable[[str], None] = print,
                  one_gpu_each: bool = False) -> Iterator[Executor]:
    """An executor on the dask cluster ``text`` (``parse_cluster``); local and SLURM clusters are closed after.
    ``one_gpu_each``: a local cluster's workers get one GPU each (``OneGpuEach``), when there are GPUs."""
    import dask                                  # imported here: only a run on a dask cluster needs them
    from distributed import Client, LocalCluster

    from .cluster_plugins import OneGpuEach

    address = parse_cluster(text)
    cluster = None
    with dask.config.set({"distributed.worker.daemon": False}):   # tasks may start DataLoader processes
        if address.kind == "local":
            count = address.workers or workers
            cluster = LocalCluster(n_workers=count, threads_per_worker=1, processes=True)
        elif address.kind == "slurm":
            cluster, scaling = slurm_cluster(address.config)
            if "adapt" in scaling:
                cluster.adapt(**(scaling["adapt"] or {}))
            else:
                cluster.scale(jobs=int(scaling.get("jobs", workers)))
        client = Client(cluster if cluster is not None else address.address)
    try:
        if one_gpu_each and address.kind == "local" and visible_gpus():
            client.register_plugin(OneGpuEach(visible_gpus()), name="vidshift-one-gpu-each")
        echo(f"dask cluster {text}: dashboard {client.dashboard_link}")
        yield client.get_executor(pure=False)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


@contextmanager
def open_executor(launcher: str, slots: int, cluster: str = "local",
                  echo: Callable[[str], None] = print) -> Iterator[Executor]:
    """The executor of ``--launcher local|dask`` (``--slots``, ``--cluster``), shut down on exit."""
    if launcher == "local":
        executor = local_executor(slots)
        with executor:
            yield executor
    elif launcher == "dask":
        with dask_executor(cluster, slots, echo) as executor:
            yield executor
    else:
        raise ClusterError(f"--launcher {launcher!r}: use one of {', '.join(LAUNCHERS)}")
