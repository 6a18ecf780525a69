"""The list files the seeds' code reads: one video per line, ``<path> <num_frames> <class_id>``.

TA3N's lists point at per-video feature folders (``.../RGB-feature/v_Archery_g01_c01 180 10``), VideoDG's and
STDN's at videos or frame folders (``/data/UCF-HMDB/UCF/Archery/v_Archery_g01_c01.avi 171 10``). The paths are
absolute paths on the authors' machines, so ``resolve_listed`` finds each one under the user's copy by the
longest tail of the path that exists there.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath


@dataclass(frozen=True)
class ListedVideo:
    path: str        # as written in the list
    num_frames: int
    class_id: int
    line: int


def read_video_list(path: Path) -> list[ListedVideo]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: list file not found")
    videos = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        # split from the right: the path itself may contain spaces
        parts = line.strip().rsplit(maxsplit=2)
        if len(parts) != 3 or not parts[1].isdigit() or not parts[2].lstrip("-").isdigit():
            raise ValueError(f"{path}:{number}: expected '<path> <num_frames> <class_id>', got {line.strip()!r}")
        videos.append(ListedVideo(parts[0], int(parts[1]), int(parts[2]), number))
    if not videos:
        raise ValueError(f"{path}: the list file is empty")
    return videos


def resolve_listed(listed: str, root: Path) -> Path | None:
    """The file or folder ``listed`` names, under ``root``: the longest tail of its path that exists there.

    A listed video file may also exist as a frame folder of the same name without its extension.
    """
    as_written = Path(listed)
    if as_written.is_absolute() and as_written.exists():
        return as_written
    parts = PurePosixPath(listed.replace("\\", "/")).parts
    parts = parts[1:] if parts and parts[0] == "/" else parts
    for start in range(len(parts)):
        candidate = Path(root).joinpath(*parts[start:])
        if candidate.exists():
            return candidate
        if candidate.suffix and candidate.with_suffix("").is_dir():
            return candidate.with_suffix("")
    return None
