"""What a training or evaluation run reads: the manifest's videos of each domain/split, found in a store.

Also the store identity a run records, so that a later resume or evaluation on a different store (another
backbone, other weights, other preprocessing) is refused instead of silently mixing features.

Classes are the labels of the source domain's rows (closed-set DA/DG: the target shares the source's label
space), so the target's label vocabulary never shapes the head. Rows labelled ``unlabelled`` (EPIC-100 target
segments without annotations) are adaptation data only: training or evaluating on them is an error.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, TypeVar

import torch

from data_manifests.epic_kitchens import UNLABELLED
from extract.manifest import VideoEntry, read_manifest
from extract.store import FeatureStore, StoreError
from pipelines.data import FeatureSet

Split = TypeVar("Split")   # what a run's open_split makes of a domain's split (a FeatureSet, a VideoSet)

if TYPE_CHECKING:
    from pipelines.feature_cache import FeatureCache


class RunError(ValueError):
    """A run cannot start or continue as asked; the message says what to change."""


def store_identity(store: FeatureStore, streams: tuple[str, ...]) -> dict:
    """The settings that make features comparable, over every stream a run reads, and their hash.

    One stream hashes its feature settings alone (so runs recorded before multi-stream input still match).
    """
    per_stream = {stream: store.provenance(stream)["features"] for stream in streams}
    hashed = per_stream[streams[0]] if len(streams) == 1 else per_stream
    digest = hashlib.sha256(json.dumps(hashed, sort_keys=True).encode()).hexdigest()
    return {"features_sha256": digest, "backbone": {s: f.get("backbone") for s, f in per_stream.items()},
            "weights": {s: f.get("weights") for s, f in per_stream.items()}, "streams": list(streams),
            "path": str(store.root)}


def check_store_matches(recorded: dict, store: FeatureStore, streams: tuple[str, ...]) -> None:
    missing = [stream for stream in streams if stream not in store.streams]
    if missing:
        raise RunError(f"store {store.root} has no stream {', '.join(map(repr, missing))} that the run was trained "
                       f"on; it has {', '.join(store.streams)}")
    current = store_identity(store, streams)
    if current["features_sha256"] != recorded["features_sha256"]:
        raise RunError(f"store {store.root} holds different features than the run was trained on "
                       f"(run: {recorded['backbone']} / {recorded['weights']} from {recorded['path']}; this store: "
                       f"{current['backbone']} / {current['weights']}); evaluate on a store extracted with the "
                       f"same settings (`vidshift store info` shows them)")


def resolve_device(name: str) -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else torch.device(name)


def save_atomic(state: dict, path: Path) -> None:
    """torch.save to a temporary file, then rename: a killed run never leaves a half-written checkpoint."""
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def select(entries: list[VideoEntry], domain: str, split: str) -> list[VideoEntry]:
    return [entry for entry in entries if entry.domain == domain and entry.split == split]


@dataclass
class RunInputs:
    store: FeatureStore
    classes: list[str]
    feat_shape: tuple[int, ...] | dict[str, tuple[int, ...]]
    source_train: FeatureSet             # the labelled training set (the target's in target-only)
    source_val: FeatureSet | None
    target_train: FeatureSet | None      # unlabelled (da only)
    target_eval: FeatureSet | None

    def steps_read(self, train_sampling: str, num_segments: int) -> list[tuple[FeatureSet, int | None]]:
        """Each set with what a run reads of it: the centres of ``num_segments`` segments (the number), or every
        step (None: training sets under random sampling). Evaluation only ever reads the centres."""
        train_reads = num_segments if train_sampling == "centre" else None
        return [(s, reads) for s, reads in ((self.source_train, train_reads), (self.source_val, num_segments),
                                            (self.target_train, train_reads), (self.target_eval, num_segments)) if s]


def stream_feature_shape(store: FeatureStore, array: str, stream: str) -> tuple[int, ...]:
    """One step's feature shape of ``stream``: (H, W, C) for maps, (C,) for pooled."""
    if array == "maps":
        shape = store.map_shape(stream)
        if shape is None:
            raise StoreError(f"{store.root}: stream {stream!r} has pooled features only (imported); this "
                             f"architecture reads spatial maps: extract the videos with `vidshift extract`, or "
                             f"choose a pooled architecture")
        return shape
    features = store.provenance(stream)["features"]
    return (features["map_shape"][-1] if features.get("map_shape") else features["channels"],)


def feature_shape(store: FeatureStore, array: str, streams: tuple[str, ...],
                  fusion: str = "late") -> tuple[int, ...] | dict[str, tuple[int, ...]]:
    """What the model is built for: one stream's shape, {stream: shape} (late fusion) or the concatenation of the
    streams' channels (early fusion, which needs the same spatial size in every stream)."""
    shapes = {stream: stream_feature_shape(store, array, stream) for stream in streams}
    if len(shapes) == 1:
        return shapes[streams[0]]
    if fusion == "late":
        return shapes
    spatial = {shape[:-1] for shape in shapes.values()}
    if len(spatial) > 1:
        raise RunError(f"early fusion concatenates the streams' channels, but their maps differ in size ({shapes}); "
                       f"use --fusion late")
    return (*spatial.pop(), sum(shape[-1] for shape in shapes.values()))


def source_classes(entries: list[VideoEntry], source: str) -> list[str]:
    """The run's classes: the labels of the source domain's labelled rows, sorted."""
    classes = sorted({entry.label for entry in entries if entry.domain == source and entry.label != UNLABELLED})
    if not classes:
        raise RunError(f"source domain {source!r} has no labelled videos (every row is {UNLABELLED!r})")
    return classes


def check_labels(entries: list[VideoEntry], classes: list[str]) -> None:
    """Refuse to train or evaluate on rows without a label, or with a label outside the run's classes."""
    where = f"domain {entries[0].domain!r}, split {entries[0].split!r}"
    unlabelled = [entry.video_id for entry in entries if entry.label == UNLABELLED]
    if unlabelled:
        raise RunError(f"{len(unlabelled)} of {len(entries)} videos of {where} are {UNLABELLED!r} "
                       f"(e.g. {', '.join(unlabelled[:3])}): they can be the unlabelled target train split of "
                       f"--setting da, but not trained or evaluated on; pick a labelled split (--eval-split)")
    unknown = sorted({entry.label for entry in entries} - set(classes))
    if unknown:
        raise RunError(f"labels {unknown} of {where} are not among the source classes {classes}: DA/DG here is "
                       f"closed-set (the target's classes must be a subset of the source's)")


def open_feature_set(store: FeatureStore, entries: list[VideoEntry], array: str, classes: list[str],
                     streams: tuple[str, ...], skip_missing: bool, labelled: bool = True,
                     fusion: str = "late") -> FeatureSet | None:
    if skip_missing:
        present = [store.videos(stream) for stream in streams]
        entries = [entry for entry in entries if all(entry.video_id in videos for videos in present)]
    if not entries:
        return None
    if labelled:
        check_labels(entries, classes)
    return FeatureSet(store, entries, array, {name: i for i, name in enumerate(classes)}, labelled, streams, fusion)


def load_run_inputs(config, array: str, cache: FeatureCache | None = None) -> RunInputs:
    """The four feature sets of a run (``config`` is a TrainConfig); clear errors for missing domains/splits.

    With a ``cache`` (a sweep's worker process), the store and the sets come from it: shared with earlier runs.

    ``target-only`` trains on the target's labelled train split (the upper bound of STCDA Tables 1-2) and selects
    on the target's val split when that is not the split it reports; the classes stay the source's, so its numbers
    compare with the DG/DA runs of the same pair.
    """
    entries = read_manifest(config.manifest)
    store = cache.open_store(config.store) if cache else FeatureStore.open(config.store)
    missing = [stream for stream in config.streams if stream not in store.streams]
    if missing:
        raise StoreError(f"{store.root}: no stream {', '.join(map(repr, missing))}; it has {', '.join(store.streams)}")
    classes = source_classes(entries, check_domains(config, entries))

    def open_split(domain: str, split: str, labelled: bool = True) -> FeatureSet | None:
        opener = cache.feature_set if cache else open_feature_set
        return opener(store, select(entries, domain, split), array, classes, config.streams, config.skip_missing,
                      labelled, config.fusion)

    sets = open_run_splits(config, entries, open_split)
    return RunInputs(store, classes, feature_shape(store, array, config.streams, config.fusion), *sets)


def check_domains(config, entries: list[VideoEntry]) -> str:
    """The source domain, after checking that ``config``'s --source and --target are domains of the manifest."""
    domains = sorted({entry.domain for entry in entries})
    for role, domain in (("--source", config.source), ("--target", config.target)):
        if domain is not None and domain not in domains:
            raise RunError(f"{role} {domain!r} is not a domain of {config.manifest}; its domains are "
                           f"{', '.join(domains)}")
    return config.source


def open_run_splits(config, entries: list[VideoEntry], open_split: Callable[..., Split | None]
                    ) -> tuple[Split, Split | None, Split | None, Split | None]:
    """The run's (train, train domain's val, target train, target eval) sets, each made by
    ``open_split(domain, split, labelled=True)`` (None where it has no videos), with clear errors for missing ones.

    ``target-only`` trains on the target's labelled train split (the upper bound of STCDA Tables 1-2) and selects
    on the target's val split when that is not the split it reports; the classes stay the source's, so its numbers
    compare with the DG/DA runs of the same pair.
    """
    target_train = target_eval = None
    eval_split = None
    if config.target:
        eval_split = config.eval_split or ("test" if select(entries, config.target, "test") else "val")
        target_eval = open_split(config.target, eval_split)
        if target_eval is None:
            raise RunError(f"domain {config.target!r} has no {eval_split!r} split in {config.manifest} to evaluate")
    if config.setting == "target-only":
        train_domain = config.target
        train_val = open_split(config.target, "val") if eval_split != "val" else None
    else:
        train_domain = config.source
        train_val = open_split(config.source, "val")
    train_set = open_split(train_domain, "train")
    if train_set is None:
        raise RunError(f"domain {train_domain!r} has no labelled train split in {config.manifest}")
    if config.setting == "da":
        target_train = open_split(config.target, "train", labelled=False)  # target labels never load
        if target_train is None:
            raise RunError(f"--setting da needs the target's train split; {config.target!r} has none")
    return train_set, train_val, target_train, target_eval
