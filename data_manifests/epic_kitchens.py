"""EPIC-Kitchens: MM-SADA's domains D1/D2/D3 (kitchens P08, P01, P22; 8 verb classes; used by STDN and STCDA)
as manifest segments, and the manifest rows for EPIC-KITCHENS-100 UDA features (`vidshift store import epic100`).

MM-SADA's split files ``D1_train.pkl``, ``D1_test.pkl``, ... are pandas DataFrames (uid, video_id, start_frame,
stop_frame, verb, verb_class, ...), read here without pandas (``pickles.load_table``); a pickled dict of columns
or list of row dicts is read the same way. EPIC frame numbers start at 1 (``frame_0000000001.jpg``) and
``stop_frame`` is inclusive; a manifest segment is 0-based, so each segment is shifted by the first frame
number found in the recording's frame folder (1 for a video file). STDN's EPIC-Kitchens-DG lists (the same
segments, re-split per domain) are read by ``build_epic_kitchens_dg_from_lists``.
"""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np

from extract.manifest import VideoEntry

from .common import Build, ClassMap
from .lists import listed_parts, read_segment_list
from .pickles import Table, load_table

DOMAINS = {"D1": "P08", "D2": "P01", "D3": "P22"}
# MM-SADA's download script puts each recording's frames under rgb/<train|test>/<D1|D2|D3>/<P08_01>/.
DEFAULT_LAYOUT = "rgb/{split}/{domain}/{video_id}"
FRAME_NUMBER = re.compile(r"(\d+)$")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
EPIC100_ATTRIBUTES = ("participant_id", "verb", "verb_class", "noun", "noun_class", "narration")
UNLABELLED = "unlabelled"  # label of EPIC-100 target segments whose annotations carry no classes


def first_frame_number(path: Path) -> int | None:
    """The number of a recording's first frame: the smallest in a frame folder, 1 for a video; None if absent."""
    if path.is_file():
        return 1
    if not path.is_dir():
        return None
    numbers = [int(match.group(1)) for item in path.iterdir() if item.suffix.lower() in IMAGE_SUFFIXES
               and (match := FRAME_NUMBER.search(item.stem))]
    return min(numbers) if numbers else None


def _column(table: Table, name: str, path: Path) -> np.ndarray:
    if name not in table:
        raise ValueError(f"{path}: no column {name!r} (it has {', '.join(table)}); expected MM-SADA's split format")
    return table[name]


class Recordings:
    """Where each recording is (``frames_dir / layout``) and its first frame number, looked up once."""

    def __init__(self, frames_dir: Path, layout: str) -> None:
        self.frames_dir, self.layout = Path(frames_dir), layout
        self._first: dict[Path, int | None] = {}

    def find(self, split: str, domain: str, recording: str) -> tuple[Path, int | None]:
        """The recording's path and first frame number (None: not in the copy)."""
        path = self.frames_dir / self.layout.format(split=split, domain=domain, video_id=recording,
                                                    participant=recording.split("_")[0])
        if path not in self._first:
            self._first[path] = first_frame_number(path)
        return path, self._first[path]

    def require(self, build: Build, domain: str) -> None:
        """Fail clearly when none of ``domain``'s recordings was found: the layout is likely wrong."""
        if not any(entry.domain == domain for entry in build.entries):
            raise ValueError(f"{domain}: none of its recordings was found under {self.frames_dir} with layout "
                             f"{self.layout!r}; pass --layout matching your copy (e.g. "
                             f"'rgb/{{participant}}/{{video_id}}')")


def _verb(labels: dict[int, str], verb_class: int, where: str) -> str:
    if verb_class not in labels:
        raise ValueError(f"{where}: verb_class {verb_class} is not one of MM-SADA's 8 classes "
                         f"({', '.join(f'{k}={v}' for k, v in labels.items())})")
    return labels[verb_class]


def _check_domains(domains: tuple[str, ...]) -> None:
    for domain in domains:
        if domain not in DOMAINS:
            raise ValueError(f"unknown EPIC-Kitchens domain {domain!r}; use {', '.join(DOMAINS)}")


def build_epic_kitchens(splits_dir: Path, frames_dir: Path, layout: str = DEFAULT_LAYOUT,
                        domains: tuple[str, ...] = tuple(DOMAINS)) -> Build:
    """Segments of MM-SADA's train/test splits, over the recordings found at ``frames_dir / layout``.

    ``layout`` may use {split}, {domain}, {participant} and {video_id}; it names a frame folder or a video file.
    """
    _check_domains(domains)
    labels, build = ClassMap.load("epic-kitchens-verbs").by_id, Build("epic-kitchens", [])
    recordings = Recordings(frames_dir, layout)
    for domain in domains:
        for split in ("train", "test"):
            path = Path(splits_dir) / f"{domain}_{split}.pkl"
            if not path.is_file():
                raise FileNotFoundError(f"{path}: MM-SADA split file not found; pass the folder holding "
                                        f"D1_train.pkl ... D3_test.pkl (MM-SADA_Domain_Adaptation_Splits)")
            table = load_table(path)
            videos, starts, stops, verb_classes = (_column(table, name, path) for name in
                                                   ("video_id", "start_frame", "stop_frame", "verb_class"))
            uids = table.get("uid", np.arange(len(videos)))
            for row, recording in enumerate(map(str, videos)):
                label = _verb(labels, int(verb_classes[row]), f"{path}: row {row}")
                source, first = recordings.find(split, domain, recording)
                if first is None:
                    build.missing.append(f"{domain}/{recording}_{uids[row]} ({source} not found)")
                    continue
                build.entries.append(VideoEntry(
                    video_id=f"{domain}/{recording}_{uids[row]}", path=str(source), label=label, domain=domain,
                    split=split, start_frame=int(starts[row]) - first, end_frame=int(stops[row]) - first,
                    attrs={"recording": recording, "uid": str(uids[row])}))
        recordings.require(build, domain)
    return build


def build_epic_kitchens_dg_from_lists(source: str, lists_dir: Path, frames_dir: Path, layout: str = DEFAULT_LAYOUT,
                                      domains: tuple[str, ...] = tuple(DOMAINS)) -> Build:
    """STDN's EPIC-Kitchens-DG: its own lists ``epic_kitchens_55_da_<D>_{trainlist,vallist,fulllist}.txt``.

    Lines are ``<split>/<participant>/<recording> <start_frame> <stop_frame> <verb_class>`` (EPIC frame numbers,
    MM-SADA's split and classes). The source domain's trainlist and vallist give train and val, every other
    domain's fulllist its test set. Video ids are ``<domain>/<recording>_<start>_<stop>`` (the lists carry no
    uid, so they differ from ``build_epic_kitchens``'s ids).
    """
    _check_domains(domains)
    if source not in domains:
        raise ValueError(f"source domain {source!r} is not among the domains {', '.join(domains)}")
    labels, build = ClassMap.load("epic-kitchens-verbs").by_id, Build(f"epic-kitchens-dg:{source}", [])
    recordings, seen = Recordings(frames_dir, layout), Counter()
    for domain in domains:
        parts = (("trainlist", "train"), ("vallist", "val")) if domain == source else (("fulllist", "test"),)
        for part, split in parts:
            path = Path(lists_dir) / f"epic_kitchens_55_da_{domain}_{part}.txt"
            for listed in read_segment_list(path):
                where = f"{path}:{listed.line}"
                names = listed_parts(listed.path)
                if len(names) != 3 or names[0] not in ("train", "test") or names[1] != DOMAINS[domain]:
                    raise ValueError(f"{where}: expected a recording of {domain} as '<train|test>/"
                                     f"{DOMAINS[domain]}/<recording>', got {listed.path!r}")
                label = _verb(labels, listed.class_id, where)
                base = f"{domain}/{names[2]}_{listed.start_frame}_{listed.end_frame}"
                seen[base] += 1  # the same frames annotated twice are two rows
                video_id = base if seen[base] == 1 else f"{base}_{seen[base]}"
                recording, first = recordings.find(names[0], domain, names[2])
                if first is None:
                    build.missing.append(f"{video_id} ({recording} not found)")
                    continue
                build.entries.append(VideoEntry(
                    video_id=video_id, path=str(recording), label=label, domain=domain, split=split,
                    start_frame=listed.start_frame - first, end_frame=listed.end_frame - first,
                    attrs={"recording": names[2]}))
        recordings.require(build, domain)
    return build


def epic100_entries(narration_ids: list[str], annotations: Path | None, domain: str, split: str,
                    label_column: str = "verb_class") -> list[VideoEntry]:
    """Manifest rows for EPIC-KITCHENS-100 UDA segments, in the feature file's order.

    With the UDA annotations (``EPIC_100_uda_*.pkl``), each row is a segment of its recording
    (``<participant>/videos/<video_id>.MP4``, EPIC-100's own layout) labelled by ``label_column``; segments
    without annotations, or annotations without that column (the target test set), are ``unlabelled``.
    """
    table = load_table(annotations) if annotations else {"narration_id": np.asarray(narration_ids)}
    if "narration_id" not in table:
        raise ValueError(f"{annotations}: no narration_id column or index (it has {', '.join(table)})")
    rows = {str(nid): row for row, nid in enumerate(table["narration_id"])}
    entries = []
    for nid in map(str, narration_ids):
        if nid not in rows:
            raise ValueError(f"{annotations}: segment {nid!r} of the feature file is not annotated here")
        value = {name: column[rows[nid]] for name, column in table.items()}
        path, start, end = nid, None, None
        if "video_id" in value and "start_frame" in value:
            recording = str(value["video_id"])
            path = f"{recording.split('_')[0]}/videos/{recording}.MP4"
            start, end = int(value["start_frame"]) - 1, int(value["stop_frame"]) - 1  # EPIC counts from 1
        entries.append(VideoEntry(
            video_id=nid, path=path, domain=domain, split=split, start_frame=start, end_frame=end,
            label=str(value[label_column]) if label_column in value else UNLABELLED,
            attrs={name: str(value[name]) for name in EPIC100_ATTRIBUTES if name in value}))
    return entries
