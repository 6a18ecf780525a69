"""Multi-view domain generalization (APN §5.5): each camera view is a domain. The source view is split 70/30
into train/val within each action (APN §5.1, seeded); the other views are the target test sets.

- NTU RGB+D: the camera is in the file name, ``S001C002P003R002A013_rgb.avi`` (setup, Camera, Performer,
  Replication, Action); domains ``C001``, ``C002``, ``C003``; labels ``A001`` ... (the action id).
- PKU-MMD: long recordings ``RGB_VIDEO/0002-L.avi`` (views L, M, R; APN calls M "C") with one label file per
  recording (``0002-L.txt``: ``action_id,start_frame,end_frame,confidence`` per line); every labelled action
  becomes a segment row, labelled ``A01`` ... Frame numbers are used as 0-based indices. The source view's
  recordings (not its segments) are split 70/30, so no recording has actions in both train and val.
"""
from __future__ import annotations

import re
from pathlib import Path

from extract.manifest import VideoEntry

from .common import VIDEO_SUFFIXES, Build, FolderIndex, assign_dg_splits

APN_VAL_FRACTION = 0.3
NTU_NAME = re.compile(r"S(\d{3})C(\d{3})P(\d{3})R(\d{3})A(\d{3})")
PKU_NAME = re.compile(r"^(\d+)-([LMR])$")


def build_ntu_views(video_dir: Path, source: str, val_fraction: float = APN_VAL_FRACTION, seed: int = 0) -> Build:
    video_dir = Path(video_dir)
    if not video_dir.is_dir():
        raise FileNotFoundError(f"{video_dir}: NTU RGB+D video folder not found")
    entries = []
    for path in sorted(video_dir.rglob("*")):
        match = NTU_NAME.search(path.stem)
        if match and path.suffix.lower() in VIDEO_SUFFIXES:
            entries.append(VideoEntry(video_id=f"C{match.group(2)}/{path.stem}", path=str(path),
                                      label=f"A{match.group(5)}", domain=f"C{match.group(2)}", split="train",
                                      attrs={"setup": f"S{match.group(1)}", "performer": f"P{match.group(3)}"}))
    if not entries:
        raise ValueError(f"{video_dir}: no NTU RGB+D videos (named like S001C001P001R001A001_rgb.avi) found")
    return Build("ntu-views", assign_dg_splits(entries, source, val_fraction, seed))


def build_pku_views(video_dir: Path, label_dir: Path, source: str, val_fraction: float = APN_VAL_FRACTION,
                    seed: int = 0) -> Build:
    videos, label_dir = FolderIndex(video_dir), Path(label_dir)
    if not videos.by_name:
        raise FileNotFoundError(f"{video_dir}: no PKU-MMD videos found (expected RGB_VIDEO/0002-L.avi ...)")
    if not label_dir.is_dir():
        raise FileNotFoundError(f"{label_dir}: PKU-MMD label folder not found (Train_Label_PKU_final/)")
    build = Build("pku-views", [])
    for label_file in sorted(label_dir.glob("*.txt")):
        match = PKU_NAME.match(label_file.stem)
        if not match:
            continue
        video = videos.find(label_file.stem)
        if video is None:
            build.missing.append(label_file.stem)
            continue
        view = match.group(2)
        for number, line in enumerate(label_file.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            fields = [field.strip() for field in line.split(",")]
            if len(fields) < 3 or not all(field.isdigit() for field in fields[:3]):
                raise ValueError(f"{label_file}:{number}: expected 'action_id,start_frame,end_frame,confidence', "
                                 f"got {line.strip()!r}")
            action, start, end = map(int, fields[:3])
            build.entries.append(VideoEntry(video_id=f"{view}/{label_file.stem}_{number:03d}", path=str(video),
                                            label=f"A{action:02d}", domain=view, split="train",
                                            start_frame=start, end_frame=end,
                                            attrs={"recording": label_file.stem}))
    if not build.entries:
        raise ValueError(f"{label_dir}: no label files of the videos in {video_dir} (named like 0002-L.txt)")
    # one recording holds actions of many classes: split recordings, never its segments, between train and val
    build.entries = assign_dg_splits(build.entries, source, val_fraction, seed, group=lambda entry: "recordings",
                                     unit=lambda entry: entry.attrs["recording"])
    return build
