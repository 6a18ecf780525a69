"""Sharing stores between people: compare two (``diff``), join several (``merge``), cut one (``subset``).

All three work from what a store already records, so nothing is re-extracted and no value is recomputed:

- provenance: two stores are compatible when every stream's ``features`` (backbone, weights and their sha256,
  preprocessing, sampling, dtype, map shape) agree and they hold the same streams: the same comparison that
  refuses a resume with other settings (``FeatureStore._check_compatible``). ``software`` is not compared;
- content: a video is the same in two stores when its content hash (sha256 of its stored bytes) is;
- copying: a part whose every video and failure is wanted is copied file by file, each file checked against
  the sha256 recorded when it was committed; otherwise the wanted videos are copied row by row, exactly as
  stored, into a new part, and each copy's content hash must equal the source's. Either way a damaged source
  stops the copy naming the part or video, and the new store verifies (``vidshift store verify``).

A new store is written with the same part names (``part-<shard tag>-<n>``, renumbered where two sources use
one name) and keeps the sources' shard layout when they agree. It records where it came from in
``store.json`` (``derived_from``: the operation and each source's store.json digest).
"""
from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .location import HashingReader
from .part_writer import PartWriter, digests_path, file_digests, write_digests
from .checked_json import digest
from .store import VERIFY_BLOCK_STEPS, FeatureStore, StoreError, feature_differences

PART_NAME = re.compile(r"part-(?P<tag>.+)-\d{6}\.(zarr|h5)$")


@dataclass
class StoreDiff:
    """What ``vidshift store diff A B`` reports; ``compatible``: the two can be merged and trained on alike."""

    a: str
    b: str
    provenance: list[str] = field(default_factory=list)
    only_a: dict[str, list[str]] = field(default_factory=dict)
    only_b: dict[str, list[str]] = field(default_factory=dict)
    changed: dict[str, list[str]] = field(default_factory=dict)  # same video id, different content hash

    @property
    def compatible(self) -> bool:
        return not self.provenance and not any(self.changed.values())

    def lines(self, limit: int = 20) -> list[str]:
        lines = [f"A = {self.a}", f"B = {self.b}"]
        lines += [f"PROVENANCE {line}" for line in self.provenance]
        for label, table in (("ONLY IN A", self.only_a), ("ONLY IN B", self.only_b), ("CONTENT DIFFERS", self.changed)):
            for stream, videos in table.items():
                if videos:
                    shown = ", ".join(videos[:limit]) + (f", ... ({len(videos) - limit} more)" if len(videos) > limit else "")
                    lines.append(f"{label} [{stream}] {len(videos)} video(s): {shown}")
        lines.append("compatible: same provenance and no video whose content differs" if self.compatible else
                     "NOT compatible: " + "; ".join(
                         reason for reason, bad in (("the provenance differs", self.provenance),
                                                    ("some videos' content differs", any(self.changed.values())))
                         if bad))
        return lines


def provenance_differences(a: FeatureStore, b: FeatureStore, a_name: str = "A", b_name: str = "B") -> list[str]:
    """The stream set and each common stream's feature settings, as lines naming what differs."""
    lines = []
    if set(a.streams) != set(b.streams):
        lines.append(f"streams: {a_name} has {', '.join(sorted(a.streams))}, {b_name} has {', '.join(sorted(b.streams))}")
    for stream in sorted(set(a.streams) & set(b.streams)):
        lines += [f"[{stream}] {line}" for line in feature_differences(
            a.provenance(stream)["features"], b.provenance(stream)["features"], a_name, b_name)]
    return lines


def diff_stores(a: FeatureStore, b: FeatureStore) -> StoreDiff:
    """Provenance and content of two stores, from their index alone (no feature is read)."""
    diff = StoreDiff(str(a.root), str(b.root), provenance_differences(a, b))
    for stream in sorted(set(a.streams) & set(b.streams)):
        ours, theirs = a.videos(stream), b.videos(stream)
        diff.only_a[stream] = sorted(ours.keys() - theirs.keys())
        diff.only_b[stream] = sorted(theirs.keys() - ours.keys())
        diff.changed[stream] = sorted(vid for vid in ours.keys() & theirs.keys() if ours[vid].sha256 != theirs[vid].sha256)
    return diff


@dataclass
class CopyReport:
    store: Path
    videos: int = 0
    failures: int = 0
    parts_copied: int = 0      # whole parts, file by file
    parts_rewritten: int = 0   # parts holding only some of a source part's videos
    skipped_duplicates: int = 0

    def line(self) -> str:
        return (f"wrote {self.store}: {self.videos} video(s), {self.failures} recorded failure(s); "
                f"{self.parts_copied} part(s) copied whole, {self.parts_rewritten} rewritten with the wanted videos"
                + (f"; {self.skipped_duplicates} video(s) present in several stores taken once"
                   if self.skipped_duplicates else ""))


# A copy plan: (stream, video_id) -> (index of the source store, part) of the copy to take.
Chosen = dict[tuple[str, str], tuple[int, str]]


def merge_stores(sources: list[FeatureStore], out: Path) -> CopyReport:
    """Join ``sources`` into the new store ``out``: provenance must agree; a video in several stores is taken once
    (its content hash must agree); a failure in one is cleared by the video stored in another."""
    if len(sources) < 2:
        raise ValueError("merge needs at least two stores")
    names = [str(source.root) for source in sources]
    differences = [f"  {names[0]} vs {names[i]}: {line}" for i, source in enumerate(sources[1:], 1)
                   for line in provenance_differences(sources[0], source, "the first", "this one")]
    if differences:
        raise StoreError("refusing to merge stores with different provenance (their features are not "
                         "comparable):\n" + "\n".join(differences))
    chosen: Chosen = {}
    hashes, conflicts, duplicates = {}, [], 0
    for i, source in enumerate(sources):
        for stream in source.streams:
            for vid, record in source.videos(stream).items():
                key = (stream, vid)
                if key not in chosen:
                    chosen[key], hashes[key] = (i, record.part), (record.sha256, names[i])
                elif hashes[key][0] == record.sha256:
                    duplicates += 1
                else:
                    conflicts.append(f"  {vid} [{stream}]: {hashes[key][1]} and {names[i]} hold different content")
    if conflicts:
        raise StoreError(f"refusing to merge: {len(conflicts)} video(s) differ between stores (same id, other "
                         f"content hash; `vidshift store diff` lists them):\n" + "\n".join(conflicts))
    report = _write(sources, out, chosen, lambda i, stream, failure: True, "merge")
    report.skipped_duplicates = duplicates
    return report


def subset_store(source: FeatureStore, out: Path, video_ids: Iterable[str] | None = None,
                 domains: Iterable[str] = (), splits: Iterable[str] = ()) -> CopyReport:
    """A new store ``out`` with the videos of ``source`` that are in ``video_ids`` (a manifest's) and in one of
    ``domains`` and one of ``splits`` (from the attributes each video was stored with); failures are kept for
    the ``video_ids`` asked for (a failure records no domain or split)."""
    ids = set(video_ids) if video_ids is not None else None
    domains, splits = set(domains), set(splits)
    if ids is None and not domains and not splits:
        raise ValueError("subset: say which videos to keep with --manifest, --domain and/or --split")

    def wanted(vid: str, attrs: dict) -> bool:
        return ((ids is None or vid in ids) and (not domains or attrs.get("domain") in domains)
                and (not splits or attrs.get("split") in splits))

    chosen = {(stream, vid): (0, record.part) for stream in source.streams
              for vid, record in source.videos(stream).items() if wanted(vid, record.attrs)}
    if not chosen:
        raise StoreError(f"{source.root}: no stored video matches the selection (manifest, --domain {sorted(domains)}"
                         f", --split {sorted(splits)}); `vidshift store info` shows what the store holds")
    keep_failure = (lambda i, stream, failure: failure["video_id"] in ids) if ids is not None else (lambda *_: False)
    return _write([source], out, chosen, keep_failure, "subset")


def _write(sources: list[FeatureStore], out: Path, chosen: Chosen,
           keep_failure: Callable[[int, str, dict], bool], operation: str) -> CopyReport:
    target = _create(sources, Path(out), operation)
    report = CopyReport(target.root)
    for i, source in enumerate(sources):
        for part in source.part_names():
            table = source.part_table(part)
            stream = table["stream"]
            rows = [row for row in table["videos"] if chosen.get((stream, row["video_id"])) == (i, part)]
            failures = [failure for failure in table["failures"] if keep_failure(i, stream, failure)]
            if not rows and not failures:
                continue
            whole = (len(rows) == len(table["videos"]) and len(failures) == len(table["failures"])
                     and source.backend == target.backend)
            if whole:
                _copy_part(source, part, target, _tag(part))
                report.parts_copied += 1
            else:
                _rewrite_part(source, part, table, rows, failures, target)
                report.parts_rewritten += 1
            report.videos += len(rows)
    index = target.rebuild_index()
    report.failures = sum(len(rows) for rows in index["failures"].values())
    return report


def _tag(part: str) -> str:
    match = PART_NAME.match(part)
    return match.group("tag") if match else "copy"


def _create(sources: list[FeatureStore], out: Path, operation: str) -> FeatureStore:
    """The new, empty store: the first source's backend and provenance, the shared shard layout if any."""
    if (out / "store.json").exists():
        raise StoreError(f"{out} already holds a store; {operation} writes a new one: choose another OUT or delete it")
    first = sources[0]
    for stream in first.streams:
        store = FeatureStore.create_or_open(out, first.backend, stream, first.provenance(stream))
    layouts = {source.meta.get("shard_count") or source._shard_count_of_parts() for source in sources}
    store.annotate(derived_from={"operation": operation, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                 "sources": [{"store": str(s.root), "store_json_sha256": digest(s.meta)}
                                             for s in sources]},
                   **({"shard_count": layouts.pop()} if len(layouts) == 1 and None not in layouts else {}))
    return store


def _copy_part(source: FeatureStore, part: str, target: FeatureStore, tag: str) -> None:
    """Copy a committed part file by file, each checked against its recorded sha256, then commit it by rename."""
    recorded = source.recorded_digests(part)
    names = sorted(recorded) if recorded else source.files.part_files(part)
    final = target.root / "parts" / target.next_part_name(tag)
    tmp = final.with_name(f".tmp-{final.name}")
    try:
        for name in names:
            path = tmp if name == "." else tmp / name
            path.parent.mkdir(parents=True, exist_ok=True)
            with source.files.open_part_file(part, name) as handle, open(path, "wb") as copy:
                reader = HashingReader(handle)
                shutil.copyfileobj(reader, copy)
            if recorded and reader.hexdigest() != recorded[name]:
                raise StoreError(f"{source.root}/parts/{part}: {name} does not match the sha256 recorded at commit; "
                                 f"the source is damaged: `vidshift store verify {source.root}` says what to do")
        write_digests(digests_path(final), recorded or file_digests(tmp))
        os.replace(tmp, final)
    finally:
        PartWriter.remove(tmp)  # nothing left once committed; a failed copy leaves no partial part


def _rewrite_part(source: FeatureStore, part: str, table: dict, rows: list[dict], failures: list[dict],
                  target: FeatureStore) -> None:
    """Copy some videos of a part row by row, as stored, into a new part of ``target``."""
    stream = table["stream"]
    part_info = {key: value for key, value in table.items() if key not in ("stream", "videos", "failures")}
    features = target.provenance(stream)["features"]
    map_shape = target.map_shape(stream)
    arrays = ("maps", "pooled", "steps") if map_shape else ("pooled", "steps")
    channels = map_shape[-1] if map_shape else features["channels"]  # imported pooled-only streams record it
    writer = target.new_part(_tag(part), stream, features.get("dtype", "float32"), channels, part_info)
    try:
        for row in rows:
            vid, n_steps = row["video_id"], row["n_steps"]
            video = writer.video(vid, row["attrs"])
            for start in range(0, n_steps, VERIFY_BLOCK_STEPS):
                steps = np.arange(start, min(start + VERIFY_BLOCK_STEPS, n_steps))
                video.append_stored({name: source.read(vid, name, steps=steps, stream=stream) for name in arrays})
            extra = {key: value for key, value in row.items()
                     if key not in ("video_id", "offset", "n_steps", "sha256", "attrs")}
            if video.finish(**extra) != row["sha256"]:
                raise StoreError(f"{source.root}: video {vid!r} (part {part}) does not read back as "
                                 f"its recorded content hash; the source is damaged: `vidshift store verify "
                                 f"{source.root}` names what to do")
        writer.table["failures"] += failures
        writer.commit()
    except BaseException:
        writer.abort()
        raise


__all__ = ["CopyReport", "StoreDiff", "diff_stores", "merge_stores", "provenance_differences",
           "subset_store"]
