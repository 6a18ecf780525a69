"""The seeds' shared feature releases as importable sources (``vidshift store import``): a manifest row and a
loader per video, the stream's provenance, and the listed videos that are missing.

- TA3N: feature folders ``<video>/img_00001.t7`` named by list files ``<feature folder> <num_frames> <class_id>``
  whose paths are the authors' (found under the user's copy by ``lists.resolve_listed``); one step per frame.
- EPIC-KITCHENS-100 UDA: one pickle per split with ``features[modality]`` [N, 25, C] and ``narration_ids``,
  plus the UDA annotation pickles for labels and frame ranges; one step per segment.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from extract.importers import PooledSource, load_t7, load_t7_video, segment_steps, t7_frames
from extract.manifest import VideoEntry

from .common import ClassMap, available_class_maps
from .epic_kitchens import epic100_entries
from .lists import read_video_list, resolve_listed
from .pickles import load_pickle

EPIC100_MODALITIES = ("RGB", "Flow", "Audio")


@dataclass
class Release:
    sources: list[PooledSource]
    features: dict   # the stream's provenance; holds "channels"
    part_info: dict  # where the files came from, recorded in every part
    missing: list[str] = field(default_factory=list)
    loads_files: bool = False  # each loader reads files on its own (picklable): loaders may run in processes


def read_class_names(classes: str | None) -> dict[int, str]:
    """Class id -> name: a benchmark's class map by name, or a TA3N classInd file (``<id> <name>`` per line)."""
    if classes is None:
        return {}
    if classes in available_class_maps():
        return ClassMap.load(classes).by_id
    path = Path(classes)
    if not path.is_file():
        raise ValueError(f"classes {classes!r}: neither a class map ({', '.join(available_class_maps())}) "
                         f"nor a file")
    names = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        parts = line.split()
        if len(parts) != 2 or not parts[0].isdigit():
            raise ValueError(f"{path}:{number}: expected '<class id> <name>', got {line.strip()!r}")
        names[int(parts[0])] = parts[1]
    return names


def ta3n_release(release: Path, lists: list[tuple[str, str, Path]], class_names: dict[int, str]) -> Release:
    """``lists`` holds (domain, split, list file); a class id without a name becomes its own label."""
    release, pairs, missing = Path(release), [], []
    for domain, split, list_file in lists:
        for listed in read_video_list(list_file):
            folder = resolve_listed(listed.path, release)
            if folder is None:
                missing.append(listed.path)
                continue
            path = folder.relative_to(release).as_posix() if folder.is_relative_to(release) else str(folder)
            entry = VideoEntry(video_id=f"{domain}/{folder.name}", path=path, domain=domain, split=split,
                               label=class_names.get(listed.class_id, str(listed.class_id)),
                               attrs={"class_id": str(listed.class_id), "listed_frames": str(listed.num_frames)})
            pairs.append((entry, folder))
    features = {"origin": "TA3N release: one torch.save'd vector per frame (img_00001.t7)", "name": "resnet101",
                "weights": "imagenet", "layer": "avgpool", "dtype": "float32", "sampling": "all",
                "channels": _t7_channels([folder for _, folder in pairs], release)}
    sources = [PooledSource(entry, partial(load_t7_video, folder)) for entry, folder in pairs]
    part_info = {"source": str(release.resolve()), "lists": [str(Path(path).resolve()) for _, _, path in lists]}
    return Release(sources, features, part_info, missing, loads_files=True)


def _t7_channels(folders: list[Path], release: Path) -> int:
    """Feature size, from the first frame file that loads (one broken video must not stop the whole import)."""
    for folder in folders:
        try:
            return len(load_t7(t7_frames(folder)[0]))
        except (ValueError, OSError):
            continue
    raise FileNotFoundError(f"no listed feature folder under {release} holds a readable img_00001.t7")


def epic100_release(features_file: Path, modality: str, domain: str, split: str, labels: Path | None,
                    label_column: str = "verb_class") -> Release:
    """``modality`` is one of RGB, Flow, Audio, or ALL: the three concatenated, as the official TA3N baseline."""
    content = load_pickle(features_file)
    if not (isinstance(content, dict) and isinstance(content.get("features"), dict) and "narration_ids" in content):
        raise ValueError(f"{features_file}: expected a dict with 'features' (modality -> array) and 'narration_ids'")
    available = content["features"]
    if modality == "ALL":
        missing = [name for name in EPIC100_MODALITIES if name not in available]
        if missing:
            raise ValueError(f"{features_file}: ALL needs {', '.join(EPIC100_MODALITIES)}; {missing} are absent")
        arrays = np.concatenate([np.asarray(available[name], np.float32) for name in EPIC100_MODALITIES], axis=-1)
    elif modality in available:
        arrays = np.asarray(available[modality], dtype=np.float32)
    else:
        raise ValueError(f"{features_file}: no modality {modality!r}; it has {', '.join(available)} (or use ALL)")
    narration_ids = [str(nid) for nid in content["narration_ids"]]
    if arrays.ndim != 3 or len(arrays) != len(narration_ids):
        raise ValueError(f"{features_file}: features are shaped {list(arrays.shape)}; expected "
                         f"[{len(narration_ids)} segments, steps, channels]")
    entries = epic100_entries(narration_ids, labels, domain, split, label_column)
    sources = [PooledSource(entry, lambda row=row, entry=entry: (
        segment_steps(entry.start_frame, entry.end_frame, arrays.shape[1]), arrays[row]))
        for row, entry in enumerate(entries)]
    features = {"origin": "EPIC-KITCHENS-100 UDA features", "name": "tbn", "dtype": "float32",
                "modality": list(EPIC100_MODALITIES) if modality == "ALL" else modality,
                "channels": int(arrays.shape[2]), "sampling": f"uniform:{arrays.shape[1]} segments"}
    part_info = {"source": str(Path(features_file).resolve()), "labels": str(labels.resolve()) if labels else None}
    return Release(sources, features, part_info)
