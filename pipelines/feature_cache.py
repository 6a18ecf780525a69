"""Features shared by the runs of one process: a sweep's worker loads each store's features once.

A grid of small runs on cached features (heads x methods x seeds x directions) would otherwise pay, per run, for
opening the store (``store.json``, ``index.json``) and reading every step of every video into memory again: on
UCF-HMDB_full-sized pooled features that read is seconds, as long as a short run's training. A
:class:`FeatureCache` keeps the open stores and the :class:`~pipelines.data.FeatureSet` objects of the runs it has
served, keyed by everything that decides their content (the store and its freshness, the videos and their labels,
the array, the class list, the streams and their fusion, labelled or not), so a later run asking for the same
(domain, split) gets the same object, already in memory (on the GPU when the runs train there).

It wraps, and never changes, how a FeatureSet loads: :meth:`place` hands the sets not yet in memory to
``pipelines.data.place_features`` and leaves the others as they are. A FeatureSet is read-only once placed
(``gather`` copies what it indexes), so sharing one between runs changes no number. ``PROCESS_CACHE`` is the
instance a sweep's worker process uses (``pipelines/sweep.py``); ``vidshift train`` uses none.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch

from extract.manifest import VideoEntry
from extract.store import FeatureStore
from pipelines.data import FeatureSet, place_features
from pipelines.runs import open_feature_set

DEFAULT_MAX_SETS = 32   # a sweep over a few directions of one store uses 4-5 sets per direction


def _freshness(path) -> tuple:
    """What changes when a local store grows (a later extraction): its store.json and index.json stamps."""
    root = Path(str(path))
    stamps = []
    for name in ("store.json", "index.json"):
        try:
            stat = (root / name).stat()
            stamps.append((stat.st_mtime_ns, stat.st_size))
        except OSError:       # a URL or a packed store: read-only, so its identity is its address
            stamps.append(None)
    return tuple(stamps)


class FeatureCache:
    """Open stores and feature sets of one process, least recently used evicted beyond ``max_sets`` sets."""

    def __init__(self, max_sets: int = DEFAULT_MAX_SETS) -> None:
        self.max_sets = max_sets
        self._stores: dict[str, tuple[tuple, FeatureStore]] = {}
        self._sets: OrderedDict[tuple, FeatureSet | None] = OrderedDict()
        self._placed_on: dict[int, tuple] = {}   # id(set) -> (device or disk directory, centres held or None)
        self.hits = self.misses = 0

    def open_store(self, path) -> FeatureStore:
        """The store at ``path``, opened once while its store.json and index.json stay the same."""
        key, stamp = str(path), _freshness(path)
        cached = self._stores.get(key)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        if cached is not None:      # the store changed on disk: its sets are stale too
            self._sets = OrderedDict((k, v) for k, v in self._sets.items() if k[0] != key)
        store = FeatureStore.open(path)
        self._stores[key] = (stamp, store)
        return store

    def feature_set(self, store: FeatureStore, entries: list[VideoEntry], array: str, classes: list[str],
                    streams: tuple[str, ...], skip_missing: bool, labelled: bool = True,
                    fusion: str = "late") -> FeatureSet | None:
        """``pipelines.runs.open_feature_set``, memoised: the same videos of the same store give the same set."""
        store_key = next((key for key, (_, cached) in self._stores.items() if cached is store), str(store.root))
        key = (store_key, array, tuple((entry.video_id, entry.label) for entry in entries), tuple(classes),
               tuple(streams), skip_missing, labelled, fusion)
        if key in self._sets:
            self.hits += 1
            self._sets.move_to_end(key)
            return self._sets[key]
        self.misses += 1
        feature_set = open_feature_set(store, entries, array, classes, streams, skip_missing, labelled, fusion)
        self._sets[key] = feature_set
        while len(self._sets) > self.max_sets:
            _, evicted = self._sets.popitem(last=False)
            self._placed_on.pop(id(evicted), None)
        return feature_set

    def place(self, sets: list[tuple[FeatureSet, int | None]], where: str, device: torch.device,
              budget_bytes: int, disk: Path | None = None) -> str:
        """``place_features`` for the sets not already held as this run would hold them (in memory on ``device``,
        or, streaming, in mapped files in ``disk``) with what it reads (every step, or the centres of as many
        segments); the others are shared as they are."""
        homes = (device, disk) if where == "stream" else (device,)
        fresh = [(s, reads) for s, reads in sets
                 if not (s.held and self._placed_on.get(id(s)) in [(home, r) for home in homes for r in (None, reads)])]
        shared = len(sets) - len(fresh)
        placed = place_features(fresh, where, device, budget_bytes, disk) if fresh else f"held (in {device})"
        for feature_set, reads in fresh:
            if feature_set.held:
                self._placed_on[id(feature_set)] = (feature_set.held_in, reads)
        return placed + (f"; {shared} of {len(sets)} sets already held from earlier runs of this process"
                         if shared else "")

PROCESS_CACHE = FeatureCache()
