"""A builder for any dataset laid out in folders: the domain comes from a path pattern, the label from each
video's parent folder, and train/val/test splits are seeded and stratified per domain and label.

Patterns are relative to the dataset root and use ``/``: ``{domain}`` matches one folder name, ``*`` any part of
a name, ``**`` any number of folders. ``{domain}/*/*`` fits ``root/<domain>/<label>/<video or frame folder>``.
"""
from __future__ import annotations

import os
import re
from dataclasses import replace
from pathlib import Path

from extract.manifest import VideoEntry, default_video_id

from .common import VIDEO_SUFFIXES, Build, seeded_split


def pattern_regex(pattern: str) -> re.Pattern:
    components = pattern.strip("/").split("/")
    if "{domain}" not in pattern or components[-1] == "**":
        raise ValueError(f"pattern {pattern!r} must contain {{domain}} and end with a video or folder name part")
    regex = ""
    for component in components:
        if component == "**":
            regex += "(?:[^/]+/)*"
            continue
        part = re.escape(component).replace(re.escape("{domain}"), "(?P<domain>[^/]+)")
        regex += part.replace(r"\*", "[^/]*").replace(r"\?", "[^/]") + "/"
    return re.compile(regex[:-1] + "$")


def find_videos(root: Path, pattern: str) -> list[tuple[str, str]]:
    """(path relative to root, domain) of each video file or frame folder the pattern matches."""
    regex, depth = pattern_regex(pattern), None if "**" in pattern else len(pattern.strip("/").split("/"))
    found = []
    for folder, subfolders, files in os.walk(root):
        relative = Path(folder).relative_to(root).as_posix()
        prefix = "" if relative == "." else relative + "/"
        for name in sorted(files):
            match = regex.match(prefix + name)
            if match and Path(name).suffix.lower() in VIDEO_SUFFIXES:
                found.append((prefix + name, match.group("domain")))
        for name in sorted(subfolders):
            match = regex.match(prefix + name)
            if match:
                found.append((prefix + name, match.group("domain")))
        # a matched folder is a frame folder: never look inside; below the pattern's depth nothing can match
        level = prefix.count("/") + 1
        subfolders[:] = [name for name in sorted(subfolders) if not regex.match(prefix + name)
                         and (depth is None or level < depth)]
    return found


def build_generic(root: Path, pattern: str = "{domain}/*/*", val_fraction: float = 0.2, test_fraction: float = 0.0,
                  seed: int = 0) -> Build:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: dataset folder not found")
    found = find_videos(root, pattern)
    if not found:
        raise ValueError(f"{root}: no video file or frame folder matches {pattern!r}")
    entries = [VideoEntry(video_id=default_video_id(relative), path=str(root / relative),
                          label=Path(relative).parent.name, domain=domain, split="train")
               for relative, domain in found]
    fractions = {name: fraction for name, fraction in
                 (("train", 1 - val_fraction - test_fraction), ("val", val_fraction), ("test", test_fraction))
                 if fraction > 0}
    groups: dict[tuple[str, str], list[str]] = {}
    for entry in entries:
        groups.setdefault((entry.domain, entry.label), []).append(entry.video_id)
    splits = {}
    for (domain, label), video_ids in groups.items():
        splits.update(seeded_split(video_ids, fractions, f"{seed}/{domain}/{label}"))
    return Build("generic", [replace(entry, split=splits[entry.video_id]) for entry in entries])
