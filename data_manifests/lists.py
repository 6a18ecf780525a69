"""The list files the seeds' code reads.

- Video lists, one video per line, ``<path> <num_frames> <class_id>``: TA3N's point at per-video feature folders
  (``.../RGB-feature/v_Archery_g01_c01 180 10``), VideoDG's and STDN's UCF-HMDB lists at videos or frame folders
  (``/data/UCF-HMDB/UCF/Archery/v_Archery_g01_c01.avi 171 10``, ``UCF101/frames/v_Archery_g01_c01 171 10``).
- Segment lists, one action per line, ``<path> <start_frame> <end_frame> <class_id>``: STDN's EPIC-Kitchens-DG
  (``train/P08/P08_21 72393 72490 2``) and Jester-DG (``13779 0 24 0``) lists.

The paths are the authors' own. ``resolve_listed`` finds a TA3N feature folder under the user's copy of the
release by the longest tail of its path that exists there; the UCF-HMDB and EPIC builders find list entries by
the video's name instead (``ucf_hmdb``, ``epic_kitchens``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath


@dataclass(frozen=True)
class ListedVideo:
    path: str        # as written in the list
    num_frames: int
    class_id: int
    line: int


@dataclass(frozen=True)
class ListedSegment:
    path: str        # as written in the list
    start_frame: int
    end_frame: int
    class_id: int
    line: int


def _read_lines(path: Path, columns: str) -> list[tuple[int, list[str]]]:
    """(line number, fields) of every non-empty line; ``columns`` names the expected fields, path first.

    Lines are split from the right, so the path itself may contain spaces; every other field is an integer.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: list file not found")
    count = len(columns.split())
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.strip().rsplit(maxsplit=count - 1)
        if len(parts) != count or not all(re.fullmatch(r"-?[0-9]+", part) for part in parts[1:]):
            raise ValueError(f"{path}:{number}: expected '{columns}', got {line.strip()!r}")
        rows.append((number, parts))
    if not rows:
        raise ValueError(f"{path}: the list file is empty")
    return rows


def read_video_list(path: Path) -> list[ListedVideo]:
    return [ListedVideo(parts[0], int(parts[1]), int(parts[2]), number)
            for number, parts in _read_lines(path, "<path> <num_frames> <class_id>")]


def read_segment_list(path: Path) -> list[ListedSegment]:
    return [ListedSegment(parts[0], int(parts[1]), int(parts[2]), int(parts[3]), number)
            for number, parts in _read_lines(path, "<path> <start_frame> <end_frame> <class_id>")]


def listed_parts(listed: str) -> tuple[str, ...]:
    """The components of a listed path, whatever separator the authors' machine used."""
    parts = PurePosixPath(listed.replace("\\", "/")).parts
    return parts[1:] if parts and parts[0] == "/" else parts


def resolve_listed(listed: str, root: Path) -> Path | None:
    """The file or folder ``listed`` names, under ``root``: the longest tail of its path that exists there.

    A listed video file may also exist as a frame folder of the same name without its extension.
    """
    as_written = Path(listed)
    if as_written.is_absolute() and as_written.exists():
        return as_written
    parts = listed_parts(listed)
    for start in range(len(parts)):
        candidate = Path(root).joinpath(*parts[start:])
        if candidate.exists():
            return candidate
        if candidate.suffix and candidate.with_suffix("").is_dir():
            return candidate.with_suffix("")
    return None
