"""Benchmark manifest builders on small fake dataset trees: the count report, the multi-view DG builders (NTU,
PKU-MMD), the generic builder and the seeded split. UCF-HMDB: test_manifest_builders_ucf_hmdb.py; EPIC-Kitchens
and pickles: test_manifest_builders_epic.py."""
import re
from pathlib import Path

import pytest

from data_manifests.common import Build, count_report, expected_counts, seeded_split
from data_manifests.generic import build_generic
from data_manifests.multiview import build_ntu_views, build_pku_views
from extract.manifest import VideoEntry


# ---- the count report ------------------------------------------------------------------------------------------

def test_count_report_says_ok_when_counts_match_the_paper():
    entries = [VideoEntry(f"{domain}/{split}/{i}", "x", "climb", domain, split)
               for (domain, split), expected in expected_counts("ucf-hmdb-full").items() for i in range(expected.count)]
    report = count_report(Build("ucf-hmdb-full", entries))
    assert re.search(r"ucf\s+train\s+1438\s+1438\s+ok", report) and re.search(r"hmdb\s+val\s+360\s+360\s+ok", report)
    assert "differs" not in report and "not found" not in report


def test_count_report_shows_only_the_domains_built():
    entries = [VideoEntry(f"D1/P08_01_{i}", "x", "take", "D1", "train", 0, 1) for i in range(3)]
    report = count_report(Build("epic-kitchens", entries))  # e.g. --domain D1
    assert re.search(r"D1\s+train\s+3\s+1543\s+differs by -1540", report)
    assert re.search(r"D1\s+test\s+0\s+435", report)  # a split of a built domain that came out empty is shown
    assert "D2" not in report and "D3" not in report


# ---- multi-view DG and the generic builder -----------------------------------------------------------------------

def test_ntu_views_by_camera_and_pku_views_by_view(tmp_path):
    ntu = tmp_path / "nturgb+d_rgb"
    ntu.mkdir()
    for camera in (1, 2, 3):
        for performer in range(1, 11):
            for action in (1, 2):
                (ntu / f"S001C{camera:03d}P{performer:03d}R001A{action:03d}_rgb.avi").write_bytes(b"")
    (ntu / "README.txt").write_text("not a video")
    build = build_ntu_views(ntu, "C002", seed=3)
    assert len(build.entries) == 60 and {e.domain for e in build.entries} == {"C001", "C002", "C003"}
    source = [e for e in build.entries if e.domain == "C002"]
    for action in ("A001", "A002"):
        assert sorted(e.split for e in source if e.label == action) == ["train"] * 7 + ["val"] * 3  # APN's 70/30
    assert {e.split for e in build.entries if e.domain != "C002"} == {"test"}

    videos, labels = tmp_path / "RGB_VIDEO", tmp_path / "Train_Label_PKU_final"
    videos.mkdir()
    labels.mkdir()
    for recording in range(2, 12):
        for view in "LMR":
            (videos / f"{recording:04d}-{view}.avi").write_bytes(b"")
            (labels / f"{recording:04d}-{view}.txt").write_text("12,10,80,2\n41,100,160,1\n3,200,260,1\n")
    (labels / "0012-L.txt").write_text("1,1,2,1\n")  # its video is missing from the copy
    pku = build_pku_views(videos, labels, "L")
    row = next(e for e in pku.entries if e.video_id == "M/0002-M_002")
    assert (row.label, row.start_frame, row.end_frame, row.split, Path(row.path).name) == \
        ("A41", 100, 160, "test", "0002-M.avi")
    assert pku.missing == ["0012-L"]
    splits: dict[str, set[str]] = {}
    for entry in pku.entries:
        if entry.domain == "L":
            splits.setdefault(entry.attrs["recording"], set()).add(entry.split)
    assert all(len(split) == 1 for split in splits.values())  # a recording's actions never straddle train and val
    assert sorted(split for (split,) in splits.values()) == ["train"] * 7 + ["val"] * 3  # 70/30 of 10 recordings


def test_generic_builder_domain_from_pattern_label_from_parent_folder(tmp_path):
    for domain in ("real", "game"):
        for label in ("jump", "run"):
            for k in range(10):
                (tmp_path / "data" / domain / label).mkdir(parents=True, exist_ok=True)
                (tmp_path / "data" / domain / label / f"clip{k}.mp4").write_bytes(b"")
    (tmp_path / "data" / "real" / "run" / "notes.txt").write_text("ignored")
    (tmp_path / "data" / "game" / "run" / "clip9.mp4").unlink()
    (tmp_path / "data" / "game" / "run" / "frames9").mkdir()  # a frame folder is a video too
    build = build_generic(tmp_path / "data", "{domain}/*/*", val_fraction=0.2, test_fraction=0.1, seed=0)
    assert len(build.entries) == 40 and {e.domain for e in build.entries} == {"real", "game"}
    for domain in ("real", "game"):
        for label in ("jump", "run"):
            group = sorted(e.split for e in build.entries if (e.domain, e.label) == (domain, label))
            assert group == ["test"] + ["train"] * 7 + ["val"] * 2  # floor cuts at 0.7 and 0.9 of 10
    assert "game/run/frames9" in {e.video_id for e in build.entries}
    with pytest.raises(ValueError, match="must contain {domain}"):
        build_generic(tmp_path / "data", "*/*/*")


def test_seeded_split_cuts_at_floor_of_cumulative_fractions():
    keys = [f"v{i}" for i in range(7)]
    splits = seeded_split(keys, {"train": 0.8, "val": 0.2}, "seed")
    assert sorted(splits.values()).count("train") == 5  # floor(0.8 * 7)
    assert splits == seeded_split(list(reversed(keys)), {"train": 0.8, "val": 0.2}, "seed")  # input order is irrelevant
