"""What every benchmark builder shares: class maps and expected counts (small data files beside this module),
finding listed videos on disk, seeded splits, writing the manifest, and the count report.

Builders return a ``Build``: manifest rows (``extract.manifest.VideoEntry`` with absolute paths) plus the listed
videos they could not find. ``write_manifest`` makes the paths relative to the extraction root and re-reads the
file with ``read_manifest``, so a builder can never write a manifest that `vidshift extract` rejects.
"""
from __future__ import annotations

import csv
import math
import os
import random
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Callable

from extract.manifest import SPLITS, VideoEntry, read_manifest

DATA_DIR = Path(__file__).resolve().parent
VIDEO_SUFFIXES = (".avi", ".mp4", ".mkv", ".webm", ".mov", ".mpg", ".mpeg", ".m4v", ".flv", ".wmv", ".3gp")
# TA3N (and the papers after it) call the official *test* split of UCF101/HMDB51/Olympic "val"; we keep its name.
OFFICIAL_TEST_SPLIT = "val"


# ---- class maps and expected counts ------------------------------------------------------------------------

@dataclass(frozen=True)
class ClassRow:
    class_id: int
    label: str
    domain: str | None = None        # the dataset the source class comes from (None: any)
    source_class: str | None = None  # the class name in that dataset


class ClassMap:
    """A benchmark's shared classes: ``classes/<name>.csv`` with columns class_id, label[, domain, source_class]."""

    def __init__(self, rows: list[ClassRow]) -> None:
        self.rows = rows

    @classmethod
    def load(cls, name: str) -> "ClassMap":
        path = DATA_DIR / "classes" / f"{name.replace('-', '_')}.csv"
        if not path.is_file():
            raise ValueError(f"unknown class map {name!r}; available: {', '.join(available_class_maps())}")
        with open(path, newline="", encoding="utf-8") as handle:
            rows = [ClassRow(int(row["class_id"]), row["label"], row.get("domain"), row.get("source_class"))
                    for row in csv.DictReader(handle)]
        return cls(rows)

    @property
    def by_id(self) -> dict[int, str]:
        return {row.class_id: row.label for row in sorted(self.rows, key=lambda row: row.class_id)}

    def sources(self, domain: str) -> dict[str, str]:
        """Source class -> shared label, for one dataset of the benchmark."""
        return {row.source_class: row.label for row in self.rows if row.domain == domain}


def available_class_maps() -> list[str]:
    return sorted(path.stem.replace("_", "-") for path in (DATA_DIR / "classes").glob("*.csv"))


@dataclass(frozen=True)
class ExpectedCount:
    count: int
    reference: str


def expected_counts(benchmark: str) -> dict[tuple[str, str], ExpectedCount]:
    """(domain, split) -> the count the papers report; split ``*`` is a whole domain."""
    with open(DATA_DIR / "expected_counts.csv", newline="", encoding="utf-8") as handle:
        return {(row["domain"], row["split"]): ExpectedCount(int(row["count"]), row["reference"])
                for row in csv.DictReader(handle) if row["benchmark"] == benchmark}


# ---- finding videos ---------------------------------------------------------------------------------------

@dataclass
class Build:
    """A builder's result: manifest rows with absolute paths, and the listed videos missing from the copy."""

    benchmark: str
    entries: list[VideoEntry]
    missing: list[str] = field(default_factory=list)


class FolderIndex:
    """The videos directly inside one folder (video files and frame folders), found by file name or stem.

    Scanning a class folder once is much faster than probing every candidate name of every listed video.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.by_name: dict[str, Path] = {}
        self.by_stem: dict[str, Path] = {}
        if not self.folder.is_dir():
            return
        for item in os.scandir(self.folder):
            path = Path(item.path)
            if item.is_dir():
                self.by_name[item.name] = path
                self.by_stem.setdefault(item.name, path)
            elif path.suffix.lower() in VIDEO_SUFFIXES:
                self.by_name[item.name] = path
                self.by_stem[path.stem] = path  # a video file wins over a frame folder of the same name

    def find(self, name: str) -> Path | None:
        return self.by_name.get(name) or self.by_stem.get(PurePosixPath(name).stem)

    def videos(self) -> list[Path]:
        return sorted(set(self.by_stem.values()))


def require_every_class(entries: list[VideoEntry], domain: str, labels: dict[str, str], where: Path,
                        hint: str = "") -> None:
    """Fail clearly when a class has no video at all in ``domain``: the copy lacks it or uses another layout.

    ``labels`` maps source class -> shared label; ``hint`` ends the message (what else may be wrong).
    """
    present = {entry.label for entry in entries if entry.domain == domain}
    for label in dict.fromkeys(labels.values()):
        if label not in present:
            sources = [source for source, shared in labels.items() if shared == label]
            raise ValueError(f"{domain}: no video of class {label!r} (source class {', '.join(sources)}) was found "
                             f"under {where}; the copy lacks it, or its videos are not in {where}/<source class>/ "
                             f"as video files or frame folders{hint}")


# ---- splits -----------------------------------------------------------------------------------------------

def seeded_split(keys: list[str], fractions: dict[str, float], seed: str) -> dict[str, str]:
    """Assign each key a split: shuffle (seeded by ``seed``), then cut at floor(n * cumulative fraction).

    Floor cuts per class reproduce VideoDG's lists: floor(0.8 n) of every UCF source class sums to its 1603.
    """
    if abs(sum(fractions.values()) - 1) > 1e-6:
        raise ValueError(f"split fractions {fractions} must sum to 1")
    order = sorted(keys)
    random.Random(seed).shuffle(order)
    splits, start, cumulative = {}, 0, 0.0
    for index, (split, fraction) in enumerate(fractions.items()):
        cumulative += fraction
        last = index == len(fractions) - 1  # takes the rest, whatever the rounding
        stop = len(order) if last else math.floor(len(order) * cumulative + 1e-9)
        splits.update((key, split) for key in order[start:stop])
        start = stop
    return splits


def assign_dg_splits(entries: list[VideoEntry], source: str, val_fraction: float, seed: int,
                     group: Callable[[VideoEntry], str] = lambda entry: entry.label,
                     unit: Callable[[VideoEntry], str] = lambda entry: entry.video_id) -> list[VideoEntry]:
    """Domain generalization: the source domain split train/val within each group, every other domain test.

    ``unit`` is what is split: each video by default; the recording, so that the segments of one recording
    all land in the same split.
    """
    domains = sorted({entry.domain for entry in entries})
    if source not in domains:
        raise ValueError(f"source domain {source!r} has no videos; the domains found are {', '.join(domains)}")
    groups: dict[str, set[str]] = {}
    for entry in entries:
        if entry.domain == source:
            groups.setdefault(group(entry), set()).add(unit(entry))
    splits = {}
    for name, members in groups.items():
        splits.update(seeded_split(list(members), {"train": 1 - val_fraction, "val": val_fraction},
                                   f"{seed}/{source}/{name}"))
    return [replace(entry, split=splits[unit(entry)] if entry.domain == source else "test") for entry in entries]


# ---- output ------------------------------------------------------------------------------------------------

def write_manifest(entries: list[VideoEntry], out: Path, root: Path | None = None) -> Path:
    """Write ``entries`` as a manifest CSV, paths relative to ``root`` (default: the manifest's folder)."""
    out = Path(out)
    root = Path(root) if root is not None else out.parent
    if not entries:
        raise ValueError(f"{out}: no videos to write")
    segments = any(entry.start_frame is not None for entry in entries)
    extra = list(dict.fromkeys(key for entry in entries for key in entry.attrs))
    columns = ["path", "label", "domain", "split", "video_id"] + (["start_frame", "end_frame"] if segments else [])
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns + extra)
        for entry in entries:
            segment = [entry.start_frame, entry.end_frame] if segments else []
            writer.writerow([_relative(entry.path, root), entry.label, entry.domain, entry.split, entry.video_id,
                             *["" if value is None else value for value in segment],
                             *[entry.attrs.get(key, "") for key in extra]])
    read_manifest(out)  # the file must be one `vidshift extract` accepts
    return out


def _relative(path: str, root: Path) -> str:
    if not Path(path).is_absolute():
        return path
    try:
        return Path(os.path.relpath(path, root)).as_posix()
    except ValueError:  # another drive on Windows: keep it absolute
        return path


def count_report(build: Build) -> str:
    """Per-domain, per-split counts beside the papers' counts, and the videos that were not found."""
    found = Counter((entry.domain, entry.split) for entry in build.entries)
    for (domain, _), count in list(found.items()):
        found[(domain, "*")] += count
    built = {entry.domain for entry in build.entries}  # e.g. --domain D1: the other domains were not asked for
    expected = {key: value for key, value in expected_counts(build.benchmark).items() if key[0] in built}
    order = SPLITS + ("*",)
    keys = sorted({key for key in found if key[1] != "*"} | set(expected),
                  key=lambda key: (key[0], order.index(key[1])))
    lines = [f"{build.benchmark}: {len(build.entries)} videos",
             f"  {'domain':10} {'split':6} {'found':>7} {'paper':>7}"]
    for domain, split in keys:
        paper = expected.get((domain, split))
        have = found.get((domain, split), 0)
        verdict = "" if paper is None else ("  ok" if have == paper.count else f"  differs by {have - paper.count:+d}")
        lines.append(f"  {domain:10} {split:6} {have:7d} {paper.count if paper else '-':>7}{verdict}")
    references = dict.fromkeys(value.reference for value in expected.values())
    lines += [f"  paper counts: {reference}" for reference in references]
    if build.missing:
        shown = ", ".join(build.missing[:5]) + (", ..." if len(build.missing) > 5 else "")
        lines.append(f"  {len(build.missing)} listed video(s) not found in your copy and left out: {shown}")
    return "\n".join(lines)
