"""The dask worker plugin of ``extract/cluster.py``, in a module of its own: a plugin must subclass distributed's
``WorkerPlugin``, and importing distributed costs ~16 MB of memory and ~0.2 s, which only a run on a dask cluster
should pay (``extract/cluster.py`` imports this module when it starts one)."""
from __future__ import annotations

import os

from distributed import WorkerPlugin


class OneGpuEach(WorkerPlugin):
    """Worker ``name`` (a local cluster numbers its workers 0..N-1) sees GPU ``name % gpus`` only."""

    def __init__(self, gpus: int) -> None:
        self.gpus = gpus

    def setup(self, worker) -> None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(int(worker.name) % self.gpus)
