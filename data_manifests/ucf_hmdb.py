"""UCF101 / HMDB51 / Olympic Sports benchmarks: TA3N's UCF-HMDB_full, UCF-HMDB_small and UCF-Olympic (official
splits; DA), and VideoDG's / STDN's UCF-HMDB (every video re-split 80/20, or their own lists; DG).

Expected layouts (the datasets' own): ``UCF-101/<Class>/<video>.avi`` with ``ucfTrainTestlist/`` (trainlist01.txt,
testlist01.txt); ``hmdb51/<class>/<video>.avi`` with ``testTrainMulti_7030_splits/`` (<class>_test_split1.txt:
1 = train, 2 = test, 0 = unused); Olympic Sports ``<class>/<video>.<ext>`` with ``train/<class>.txt`` and
``test/<class>.txt``. A video may also be a frame folder named after it, and a copy without class folders
(every video in one folder) works too. Video ids are ``<domain>/<source class>/<video name>``.
"""
from __future__ import annotations

import re
from pathlib import Path

from extract.manifest import VideoEntry

from .common import (OFFICIAL_TEST_SPLIT, VIDEO_SUFFIXES, Build, ClassMap, FolderIndex, assign_dg_splits,
                     require_every_class)
from .lists import listed_parts, read_video_list

DG_VAL_FRACTION = 0.2  # VideoDG's lists hold floor(0.8 n) of each source class for training
UCF_NAME = re.compile(r"^v_([A-Za-z]+)_g\d+_c\d+$")  # v_<Class>_g<group>_c<clip>


def video_name(path: Path) -> str:
    return path.stem if path.suffix.lower() in VIDEO_SUFFIXES else path.name


def video_entry(path: Path, label: str, domain: str, split: str, source_class: str) -> VideoEntry:
    return VideoEntry(video_id=f"{domain}/{source_class}/{video_name(path)}", path=str(path), label=label,
                      domain=domain, split=split, attrs={"source_class": source_class})


class DatasetCopy:
    """One dataset directory; each folder is scanned once, on first use."""

    def __init__(self, root: Path, name: str) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root}: {name} directory not found")
        self._indexes: dict[Path, FolderIndex] = {}

    def find(self, source_class: str, name: str) -> Path | None:
        folder = self.root / source_class
        folder = folder if folder.is_dir() else self.root  # without class folders, every video sits in the root
        if folder not in self._indexes:
            self._indexes[folder] = FolderIndex(folder)
        return self._indexes[folder].find(name)


# ---- official split files -----------------------------------------------------------------------------------

def read_ucf_split(splits_dir: Path) -> dict[str, str]:
    """``<Class>/<video>.avi`` -> ``train`` or the official test split, from UCF101's split 1 lists."""
    splits = {}
    for name, split in (("trainlist01.txt", "train"), ("testlist01.txt", OFFICIAL_TEST_SPLIT)):
        path = Path(splits_dir) / name
        if not path.is_file():
            raise FileNotFoundError(f"{path}: UCF101 split file not found; pass the ucfTrainTestlist folder "
                                    f"(from UCF101TrainTestSplits-RecognitionTask.zip) as the UCF splits")
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                splits[line.split()[0]] = split
    return splits


def read_hmdb_split(splits_dir: Path, hmdb_class: str) -> dict[str, str]:
    """``<video>.avi`` -> ``train`` or the official test split, from ``<class>_test_split1.txt`` (0 = unused)."""
    path = Path(splits_dir) / f"{hmdb_class}_test_split1.txt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: HMDB51 split file not found; pass the testTrainMulti_7030_splits folder "
                                f"(from test_train_splits.rar) as the HMDB splits")
    splits = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
            raise ValueError(f"{path}:{number}: expected '<video>.avi <0|1|2>', got {line.strip()!r}")
        if parts[1] != "0":
            splits[parts[0]] = "train" if parts[1] == "1" else OFFICIAL_TEST_SPLIT
    return splits


def read_olympic_split(splits_dir: Path, olympic_class: str) -> dict[str, str]:
    """Video id -> ``train`` or the official test split, from Olympic Sports' ``{train,test}/<class>.txt``."""
    splits = {}
    for folder, split in (("train", "train"), ("test", OFFICIAL_TEST_SPLIT)):
        path = Path(splits_dir) / folder / f"{olympic_class}.txt"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: Olympic Sports split file not found; pass the folder holding the "
                                    f"dataset's train/ and test/ class lists as the Olympic splits")
        splits.update((line.strip(), split) for line in path.read_text(encoding="utf-8").splitlines()
                      if line.strip())
    return splits


# ---- builders -----------------------------------------------------------------------------------------------

def _listed_entries(copy: DatasetCopy, domain: str, sources: dict[str, str],
                    listed: list[tuple[str, str, str]], build: Build) -> None:
    """Add (source class, video name, split) rows found in ``copy``; record the others as missing."""
    for source_class, name, split in listed:
        path = copy.find(source_class, name)
        if path is None:
            build.missing.append(f"{domain}/{source_class}/{name}")
        else:
            build.entries.append(video_entry(path, sources[source_class], domain, split, source_class))
    require_every_class(build.entries, domain, sources, copy.root)


def _ucf_official(build: Build, classes: ClassMap, ucf_dir: Path, ucf_splits: Path) -> None:
    sources = classes.sources("ucf")
    listed = [(*path.split("/"), split) for path, split in read_ucf_split(ucf_splits).items()
              if path.split("/")[0] in sources]
    _listed_entries(DatasetCopy(ucf_dir, "UCF101"), "ucf", sources, listed, build)


def build_ucf_hmdb(benchmark: str, ucf_dir: Path, ucf_splits: Path, hmdb_dir: Path, hmdb_splits: Path) -> Build:
    """UCF-HMDB_full or UCF-HMDB_small (TA3N): official split 1 of both datasets, test split named ``val``."""
    classes, build = ClassMap.load(benchmark), Build(benchmark, [])
    _ucf_official(build, classes, ucf_dir, ucf_splits)
    sources = classes.sources("hmdb")
    listed = [(hmdb_class, name, split) for hmdb_class in sources
              for name, split in read_hmdb_split(hmdb_splits, hmdb_class).items()]
    _listed_entries(DatasetCopy(hmdb_dir, "HMDB51"), "hmdb", sources, listed, build)
    return build


def build_ucf_olympic(ucf_dir: Path, ucf_splits: Path, olympic_dir: Path, olympic_splits: Path) -> Build:
    """UCF-Olympic (TA3N): UCF101 split 1 for the six UCF classes, Olympic Sports' own train/test lists."""
    classes, build = ClassMap.load("ucf-olympic"), Build("ucf-olympic", [])
    _ucf_official(build, classes, ucf_dir, ucf_splits)
    sources = classes.sources("olympic")
    listed = [(olympic_class, name, split) for olympic_class in sources
              for name, split in read_olympic_split(olympic_splits, olympic_class).items()]
    _listed_entries(DatasetCopy(olympic_dir, "Olympic Sports"), "olympic", sources, listed, build)
    return build


def build_ucf_hmdb_dg(source: str, ucf_dir: Path, hmdb_dir: Path, seed: int = 0) -> Build:
    """UCF-HMDB DG (VideoDG/STDN): every video of the 12 classes; the source domain re-split 80/20 (seeded,
    within each source class), the whole other domain as the target test set."""
    classes, entries = ClassMap.load("ucf-hmdb-full"), []
    for domain, root, name in (("ucf", ucf_dir, "UCF101"), ("hmdb", hmdb_dir, "HMDB51")):
        copy, sources = DatasetCopy(root, name), classes.sources(domain)
        for source_class, label in sources.items():  # class folders are needed here: they give the labels
            videos = FolderIndex(copy.root / source_class).videos()
            entries += [video_entry(path, label, domain, "train", source_class) for path in videos]
        require_every_class(entries, domain, sources, copy.root)
    entries = assign_dg_splits(entries, source, DG_VAL_FRACTION, seed, group=lambda e: e.attrs["source_class"])
    return Build(f"ucf-hmdb-dg:{source}", entries)


def build_ucf_hmdb_dg_from_lists(source: str, lists_dir: Path, ucf_dir: Path, hmdb_dir: Path) -> Build:
    """UCF-HMDB DG from VideoDG's / STDN's own lists ({ucf,hmdb}_{train,val}.txt, ``<path> <frames> <label>``):
    their exact videos and splits; the other domain's train and val lists together form the target test set.

    Each listed video is found in your copy by its name, whatever folders the authors kept it in: a UCF101
    video in the class folder its name gives (``v_<Class>_gXX_cYY``), an HMDB51 video in the folder of its
    listed class. Video ids are those of the official-split builders, so one extraction serves both.
    """
    classes = ClassMap.load("ucf-hmdb-full")
    labels, build = classes.by_id, Build(f"ucf-hmdb-dg:{source}", [])
    for domain, root, name in (("ucf", ucf_dir, "UCF101"), ("hmdb", hmdb_dir, "HMDB51")):
        copy, sources = DatasetCopy(root, name), classes.sources(domain)
        for part in ("train", "val"):
            path = Path(lists_dir) / f"{domain}_{part}.txt"
            for listed in read_video_list(path):
                if listed.class_id not in labels:
                    raise ValueError(f"{path}:{listed.line}: class id {listed.class_id} is not one of UCF-HMDB's "
                                     f"12 (0-11, TA3N's order: {', '.join(labels.values())})")
                label, video = labels[listed.class_id], video_name(Path(listed_parts(listed.path)[-1]))
                source_class = _listed_source_class(domain, video, label, sources, f"{path}:{listed.line}")
                found = copy.find(source_class, video)
                if found is None:
                    build.missing.append(f"{domain}/{source_class}/{video}")
                    continue
                split = part if domain == source else "test"
                build.entries.append(video_entry(found, label, domain, split, source_class))
        require_every_class(build.entries, domain, sources, copy.root, hint="" if domain == "ucf" else (
            "; VideoDG's HMDB lists name renamed frame folders (climb/video_0056) that only VideoDG's own "
            "frames have: pass those as --hmdb"))
    return build


def _listed_source_class(domain: str, video: str, label: str, sources: dict[str, str], where: str) -> str:
    """The source class a listed video belongs to: from a UCF101 name, or the HMDB51 class of its label."""
    if domain == "hmdb":
        return next(source_class for source_class, shared in sources.items() if shared == label)
    match = UCF_NAME.match(video)
    if not match or match.group(1) not in sources:
        raise ValueError(f"{where}: {video!r} is not a UCF101 video of the 12 classes (v_<Class>_gXX_cYY with "
                         f"<Class> one of {', '.join(sources)})")
    ucf_class = match.group(1)
    if sources[ucf_class] != label:
        raise ValueError(f"{where}: {video} is in UCF101 class {ucf_class} (shared class {sources[ucf_class]!r}), "
                         f"but the list labels it {label!r}")
    return ucf_class
