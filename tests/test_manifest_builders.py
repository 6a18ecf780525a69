"""Benchmark manifest builders on small fake dataset trees with split files in the datasets' real formats."""
import base64
import codecs
import pickle
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from data_manifests.common import Build, ClassMap, count_report, expected_counts, seeded_split
from data_manifests.epic_kitchens import build_epic_kitchens, build_epic_kitchens_dg_from_lists
from data_manifests.generic import build_generic
from data_manifests.multiview import build_ntu_views, build_pku_views
from data_manifests.pickles import PickleRefused, load_pickle, load_table
from data_manifests.ucf_hmdb import build_ucf_hmdb, build_ucf_hmdb_dg, build_ucf_hmdb_dg_from_lists, build_ucf_olympic
from extract.manifest import VideoEntry, read_manifest
from extract.run import ExtractConfig, run_extract
from extract.store import FeatureStore
from pipelines.cli_data import manifest

# TA3N supplementary Table 13, typed from the paper: shared class -> UCF101 classes, HMDB51 class.
TABLE_13 = {"climb": (["RockClimbingIndoor", "RopeClimbing"], "climb"), "fencing": (["Fencing"], "fencing"),
            "golf": (["GolfSwing"], "golf"), "kick_ball": (["SoccerPenalty"], "kick_ball"),
            "pullup": (["PullUps"], "pullup"), "punch": (["Punch", "BoxingPunchingBag", "BoxingSpeedBag"], "punch"),
            "pushup": (["PushUps"], "pushup"), "ride_bike": (["Biking"], "ride_bike"),
            "ride_horse": (["HorseRiding"], "ride_horse"), "shoot_ball": (["Basketball"], "shoot_ball"),
            "shoot_bow": (["Archery"], "shoot_bow"), "walk": (["WalkingWithDog"], "walk")}
UCF_CLASSES = [source for sources, _ in TABLE_13.values() for source in sources]
HMDB_CLASSES = [hmdb for _, hmdb in TABLE_13.values()]


# ---- fake datasets in the official layouts ---------------------------------------------------------------------

def make_ucf(root: Path, classes: list[str], groups=(1, 8, 9)) -> tuple[Path, Path]:
    """UCF-101/<Class>/v_<Class>_gXX_c01.avi; split 1 tests on groups 1-7 (CRLF lines, as UCF ships them)."""
    videos, splits = root / "UCF-101", root / "ucfTrainTestlist"
    splits.mkdir(parents=True)
    train, test = [], []
    for index, name in enumerate(classes, start=1):
        for group in groups:
            relative = f"{name}/v_{name}_g{group:02d}_c01.avi"
            (videos / name).mkdir(parents=True, exist_ok=True)
            (videos / relative).write_bytes(b"")
            if group <= 7:
                test.append(relative)
            else:
                train.append(f"{relative} {index}")
    (splits / "trainlist01.txt").write_bytes("\r\n".join(train).encode() + b"\r\n")
    (splits / "testlist01.txt").write_bytes("\r\n".join(test).encode() + b"\r\n")
    return videos, splits


def make_hmdb(root: Path, classes: list[str]) -> tuple[Path, Path]:
    """hmdb51/<class>/<video>.avi and testTrainMulti_7030_splits/<class>_test_split1.txt (1 train, 2 test, 0 unused)."""
    videos, splits = root / "hmdb51", root / "testTrainMulti_7030_splits"
    splits.mkdir(parents=True)
    for name in classes:
        (videos / name).mkdir(parents=True)
        lines = []
        for k, flag in enumerate((1, 2, 0)):
            video = f"Some_Title_{name}_f_cm_np1_fr_med_{k}.avi"
            (videos / name / video).write_bytes(b"")
            lines.append(f"{video} {flag} ")
        (splits / f"{name}_test_split1.txt").write_text("\n".join(lines) + "\n")
    return videos, splits


@pytest.fixture
def ucf_hmdb(tmp_path):
    ucf, ucf_splits = make_ucf(tmp_path, UCF_CLASSES + ["ApplyEyeMakeup"])
    hmdb, hmdb_splits = make_hmdb(tmp_path, HMDB_CLASSES + ["brush_hair"])
    return ucf, ucf_splits, hmdb, hmdb_splits


def rows_by_id(path: Path) -> dict[str, VideoEntry]:
    return {entry.video_id: entry for entry in read_manifest(path)}


# ---- class maps -----------------------------------------------------------------------------------------------

def test_class_map_is_ta3n_table_13():
    classes = ClassMap.load("ucf-hmdb-full")
    assert classes.by_id == dict(enumerate(TABLE_13))  # TA3N's classInd order: climb=0 ... walk=11
    assert classes.sources("ucf") == {source: label for label, (sources, _) in TABLE_13.items() for source in sources}
    assert classes.sources("hmdb") == {hmdb: label for label, (_, hmdb) in TABLE_13.items()}
    small = ClassMap.load("ucf-hmdb-small").sources("ucf")
    assert small == {"GolfSwing": "golf", "PullUps": "pullup", "Biking": "ride_bike", "HorseRiding": "ride_horse",
                     "Basketball": "shoot_ball"}
    assert ClassMap.load("ucf-olympic").sources("olympic")["diving_springboard_3m"] == "Diving"


# ---- UCF-HMDB_full through the CLI -----------------------------------------------------------------------------

def test_ucf_hmdb_full_manifest_and_count_report(ucf_hmdb, tmp_path):
    ucf, ucf_splits, hmdb, hmdb_splits = ucf_hmdb
    (ucf / "Archery" / "v_Archery_g08_c01.avi").unlink()  # a listed video the copy lacks
    frames = hmdb / "walk" / "Some_Title_walk_f_cm_np1_fr_med_1"  # a video stored as a frame folder
    (hmdb / "walk" / f"{frames.name}.avi").unlink()
    frames.mkdir()
    out = tmp_path / "manifests" / "ucf_hmdb_full.csv"
    result = CliRunner().invoke(manifest, ["ucf-hmdb-full", "--ucf", str(ucf), "--ucf-splits", str(ucf_splits),
                                           "--hmdb", str(hmdb), "--hmdb-splits", str(hmdb_splits), "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = rows_by_id(out)
    # 15 UCF source classes x (2 train + 1 test) - 1 missing; 12 HMDB classes x (1 train + 1 test); extras excluded
    assert len(rows) == 15 * 3 - 1 + 12 * 2
    assert rows["ucf/BoxingSpeedBag/v_BoxingSpeedBag_g08_c01"].label == "punch"
    assert rows["ucf/RopeClimbing/v_RopeClimbing_g01_c01"].split == "val"  # official test split, named as TA3N
    assert rows["hmdb/kick_ball/Some_Title_kick_ball_f_cm_np1_fr_med_0"].split == "train"
    assert rows["hmdb/kick_ball/Some_Title_kick_ball_f_cm_np1_fr_med_1"].split == "val"
    assert "hmdb/kick_ball/Some_Title_kick_ball_f_cm_np1_fr_med_2" not in rows  # 0 = unused
    assert not [vid for vid in rows if "ApplyEyeMakeup" in vid or "brush_hair" in vid]
    walk = rows["hmdb/walk/Some_Title_walk_f_cm_np1_fr_med_1"]
    assert (out.parent / walk.path).resolve() == frames.resolve() and walk.path.startswith("../")
    report = result.output
    assert re.search(r"ucf\s+train\s+29\s+1438\s+differs by -1409", report)
    assert re.search(r"hmdb\s+val\s+12\s+360\s+differs by -348", report)
    assert "1 listed video(s) not found in your copy and left out: ucf/Archery/v_Archery_g08_c01.avi" in report
    assert "TA3N supplementary Table 12" in report


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


def test_missing_class_and_missing_split_file_are_clear_errors(ucf_hmdb):
    ucf, ucf_splits, hmdb, hmdb_splits = ucf_hmdb
    for video in (hmdb / "shoot_bow").iterdir():
        video.unlink()
    with pytest.raises(ValueError, match=r"hmdb: no video of class 'shoot_bow' \(source class shoot_bow\) .*hmdb51"):
        build_ucf_hmdb("ucf-hmdb-full", ucf, ucf_splits, hmdb, hmdb_splits)
    (hmdb_splits / "golf_test_split1.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"golf_test_split1.txt: HMDB51 split file not found.*testTrainMulti"):
        build_ucf_hmdb("ucf-hmdb-small", ucf, ucf_splits, hmdb, hmdb_splits)


def test_ucf_hmdb_small_keeps_five_classes(ucf_hmdb):
    build = build_ucf_hmdb("ucf-hmdb-small", *ucf_hmdb)
    assert {entry.label for entry in build.entries} == {"golf", "pullup", "ride_bike", "ride_horse", "shoot_ball"}
    assert {entry.attrs["source_class"] for entry in build.entries if entry.domain == "ucf"} == \
        {"GolfSwing", "PullUps", "Biking", "HorseRiding", "Basketball"}
    assert len(build.entries) == 5 * 3 + 5 * 2 and not build.missing


def test_ucf_olympic_reads_olympic_class_lists(tmp_path):
    olympic_classes = ["basketball_layup", "clean_and_jerk", "discus_throw", "diving_springboard_3m", "pole_vault",
                       "tennis_serve"]
    ucf, ucf_splits = make_ucf(tmp_path, ["Basketball", "CleanAndJerk", "ThrowDiscus", "Diving", "PoleVault",
                                          "TennisSwing"])
    olympic, splits = tmp_path / "olympic_sports", tmp_path / "olympic_splits"
    for part in ("train", "test"):
        (splits / part).mkdir(parents=True)
    for name in olympic_classes:
        (olympic / name).mkdir(parents=True)
        for video_id in ("a1", "b2", "c3"):
            (olympic / name / f"{video_id}.avi").write_bytes(b"")
        (splits / "train" / f"{name}.txt").write_text("a1\nb2\n")
        (splits / "test" / f"{name}.txt").write_text("c3\n")
    build = build_ucf_olympic(ucf, ucf_splits, olympic, splits)
    olympic_rows = [entry for entry in build.entries if entry.domain == "olympic"]
    assert len(olympic_rows) == 18 and sum(entry.split == "val" for entry in olympic_rows) == 6
    assert {entry.label for entry in olympic_rows} == {"Basketball", "CleanAndJerk", "ThrowDiscus", "Diving",
                                                       "PoleVault", "TennisSwing"}
    assert next(e for e in olympic_rows if e.video_id == "olympic/discus_throw/c3").label == "ThrowDiscus"


# ---- UCF-HMDB DG (VideoDG / STDN) ------------------------------------------------------------------------------

def test_dg_resplit_is_floor_80_percent_per_source_class_and_seeded(tmp_path):
    ucf, sizes = tmp_path / "UCF-101", {name: 5 + index % 4 for index, name in enumerate(UCF_CLASSES)}
    for name, size in sizes.items():
        (ucf / name).mkdir(parents=True)
        for group in range(1, size + 1):
            (ucf / name / f"v_{name}_g{group:02d}_c01.avi").write_bytes(b"")
    hmdb, _ = make_hmdb(tmp_path, HMDB_CLASSES)
    build = build_ucf_hmdb_dg("ucf", ucf, hmdb, seed=0)
    for name, size in sizes.items():
        rows = [entry for entry in build.entries if entry.attrs["source_class"] == name]
        assert sum(entry.split == "train" for entry in rows) == int(0.8 * size)  # floor, like VideoDG
        assert {entry.split for entry in rows} == {"train", "val"}
    assert {entry.split for entry in build.entries if entry.domain == "hmdb"} == {"test"}
    assert sum(entry.domain == "hmdb" for entry in build.entries) == 12 * 3  # the whole target domain
    again = build_ucf_hmdb_dg("ucf", ucf, hmdb, seed=0)
    other = build_ucf_hmdb_dg("ucf", ucf, hmdb, seed=1)
    assert [e.split for e in again.entries] == [e.split for e in build.entries]
    assert [e.split for e in other.entries] != [e.split for e in build.entries]
    assert build.benchmark == "ucf-hmdb-dg:ucf" and expected_counts(build.benchmark)[("ucf", "train")].count == 1603


FULL = ClassMap.load("ucf-hmdb-full")
CLASS_IDS = {label: class_id for class_id, label in FULL.by_id.items()}


def write_dg_lists(folder: Path, ucf_path, hmdb_path) -> Path:
    """{ucf,hmdb}_{train,val}.txt naming one video per source class and part, as ucf_path(Class, group) and
    hmdb_path(class, k) write it; train lists UCF group 8 / HMDB video 0, val lists group 9 / video 1."""
    folder.mkdir()
    for part, (group, k) in {"train": (8, 0), "val": (9, 1)}.items():
        (folder / f"ucf_{part}.txt").write_text("".join(f"{ucf_path(name, group)} 120 {CLASS_IDS[label]}\n"
                                                        for name, label in FULL.sources("ucf").items()))
        (folder / f"hmdb_{part}.txt").write_text("".join(f"{hmdb_path(name, k)} 80 {CLASS_IDS[label]}\n"
                                                         for name, label in FULL.sources("hmdb").items()))
    return folder


def test_dg_reads_stdn_lists_against_the_official_copies_with_the_official_ids(ucf_hmdb, tmp_path):
    ucf, ucf_splits, hmdb, hmdb_splits = ucf_hmdb
    lists = write_dg_lists(tmp_path / "UCF-HMDB-DG-list",  # STDN's paths: its own frame folders
                           lambda name, group: f"UCF101/frames/v_{name}_g{group:02d}_c01",
                           lambda name, k: f"HMDB51/frames/Some_Title_{name}_f_cm_np1_fr_med_{k}")
    with open(lists / "ucf_train.txt", "a") as handle:
        handle.write("UCF101/frames/v_Archery_g25_c01 99 10\n")  # not in this copy
    out = tmp_path / "dg_hmdb.csv"
    result = CliRunner().invoke(manifest, ["ucf-hmdb-dg", "--source", "hmdb", "--lists", str(lists), "--ucf", str(ucf),
                                           "--hmdb", str(hmdb), "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = rows_by_id(out)
    official = {entry.video_id for entry in build_ucf_hmdb("ucf-hmdb-full", *ucf_hmdb).entries}
    assert len(rows) == 15 * 2 + 12 * 2 and set(rows) <= official  # one extraction serves both manifests
    climb = rows["ucf/RockClimbingIndoor/v_RockClimbingIndoor_g08_c01"]
    assert (climb.label, climb.split, climb.attrs["source_class"]) == ("climb", "test", "RockClimbingIndoor")
    assert (out.parent / climb.path).resolve() == (ucf / "RockClimbingIndoor" / "v_RockClimbingIndoor_g08_c01.avi")
    kick = rows["hmdb/kick_ball/Some_Title_kick_ball_f_cm_np1_fr_med_1"]
    assert (kick.label, kick.split) == ("kick_ball", "val")
    assert re.search(r"hmdb\s+train\s+12\s+1434\s+differs by -1422", result.output)
    assert "1 listed video(s) not found in your copy and left out: ucf/Archery/v_Archery_g25_c01" in result.output

    for video in (ucf / "Archery").iterdir():  # a whole class missing from the copy is an error
        video.unlink()
    with pytest.raises(ValueError, match=r"ucf: no video of class 'shoot_bow' \(source class Archery\) was found"):
        build_ucf_hmdb_dg_from_lists("ucf", lists, ucf, hmdb)


def test_dg_videodg_lists_and_their_renamed_hmdb_frames(ucf_hmdb, tmp_path):
    ucf, _, hmdb, _ = ucf_hmdb
    lists = write_dg_lists(tmp_path / "data_list",  # VideoDG's paths: UCF videos, renamed HMDB frame folders
                           lambda name, group: f"/data/UCF-HMDB/UCF/{name}/v_{name}_g{group:02d}_c01.avi",
                           lambda name, k: f"/data/UCF-HMDB/HMDB/{name}/video_{k:04d}")
    with pytest.raises(ValueError, match=r"hmdb: no video of class 'climb' .*only VideoDG's own frames have"):
        build_ucf_hmdb_dg_from_lists("ucf", lists, ucf, hmdb)  # the official HMDB51 has no video_0000
    videodg_hmdb = tmp_path / "UCF-HMDB" / "HMDB"
    for name in HMDB_CLASSES:
        for k in (0, 1):
            (videodg_hmdb / name / f"video_{k:04d}").mkdir(parents=True)  # same name in every class folder
    build = build_ucf_hmdb_dg_from_lists("ucf", lists, ucf, videodg_hmdb)
    rows = {entry.video_id: entry for entry in build.entries}
    assert len(rows) == 15 * 2 + 12 * 2 and not build.missing
    assert (rows["ucf/Archery/v_Archery_g09_c01"].label, rows["ucf/Archery/v_Archery_g09_c01"].split) == \
        ("shoot_bow", "val")
    assert (rows["hmdb/fencing/video_0001"].label, rows["hmdb/fencing/video_0001"].split) == ("fencing", "test")
    assert Path(rows["hmdb/climb/video_0000"].path) == videodg_hmdb / "climb" / "video_0000"


@pytest.mark.parametrize("line, message", [
    ("UCF101/frames/v_Archery_g08_c01 171 12", r"ucf_train.txt:1: class id 12 is not one of UCF-HMDB's 12"),
    ("UCF101/frames/v_Archery_g08_c01 171 0", r"ucf_train.txt:1: v_Archery_g08_c01 is in UCF101 class Archery "
                                              r"\(shared class 'shoot_bow'\), but the list labels it 'climb'"),
    ("UCF101/frames/clip_0001 171 0", r"ucf_train.txt:1: 'clip_0001' is not a UCF101 video of the 12 classes"),
    ("UCF101/frames/v_Archery_g08_c01 171", r"ucf_train.txt:1: expected '<path> <num_frames> <class_id>'"),
    ("UCF101/frames/v_Archery_g08_c01 1\u00b2 0", r"ucf_train.txt:1: expected '<path> <num_frames> <class_id>'"),
    ("UCF101/frames/v_Archery_g08_c01 --5 0", r"ucf_train.txt:1: expected '<path> <num_frames> <class_id>'"),
])
def test_dg_list_errors_name_the_line(ucf_hmdb, tmp_path, line, message):
    ucf, _, hmdb, _ = ucf_hmdb
    lists = write_dg_lists(tmp_path / "lists", lambda name, group: f"v_{name}_g{group:02d}_c01",
                           lambda name, k: f"Some_Title_{name}_f_cm_np1_fr_med_{k}")
    (lists / "ucf_train.txt").write_text(line + "\n")
    with pytest.raises(ValueError, match=message):
        build_ucf_hmdb_dg_from_lists("ucf", lists, ucf, hmdb)


# ---- EPIC-Kitchens (MM-SADA splits) ----------------------------------------------------------------------------

# pandas 1.x layout (BlockManager state tuple) of MM-SADA's columns, written by pandas 2.2.3 with the state its
# own __getstate__ gives; pandas reads it back unchanged. zlib + base64 of the pickle bytes.
D1_TRAIN_PANDAS1 = """
eNqNVFFP1EAQvuN6d3CAhkRFXgg+qIeaBowPPGiMYoxaPQ3vZN22y21Dr212tyCJJPoAQjJvjO/+U53d9pLjAon70JmdnW9n5pud
/vB+//EabsFSwbOYaz/KlfD3FB8JhLk33PC3Tr/A9Z94jH3w2GioEFYn3ZPMCJXxVPsjnvGhUBph4XWaR/ufqn0F7+8S/u5lYCy+
Ce2HXFO4HsvEIXtvbQSQ89Ae6y5wTMkg3MnKUXHkM4cflalJuFL8iAIyJaI800aVkSEMtJ0nQpfiOZcLDBonuN0M8RfuYD9oBrMn
KG9DOzZHhS0RZj5v4flZddqC5nccDAYf/tJyn+ClwfDcFtEqkxjhRsGVSaKEKjLMGmYPkljkTp3LbEyT5BnCvDbkyGpSe9rkxXjj
HQgVks0KFqVcaxQUBLzMHg/KU0pFLsLKVaQpng3tfTtWTjAl/QG0XUiqFzwbDqkaUgQpTXenoCrkLblsCZErYzq8oHWKchVmkks0
PJ+ioWFp2P7aq15OY76WC7WcqWWnlq1atms5V8tu4/Ia45q1RApzXY73qjZ82dhCGcgAOqSxjU2UH2v1KXXD8H2xFpUFdSAvRLYW
K35IbxG6RWkqu2ddSNhjhBbZHf2OnUV505K5dEUKJ3UC8r5cl4/kE4sh1utu/QfugXwo+/LxJE4cI3Q2/M1n/mb13Dn1GGUPOqEd
JI2Es/bOAU9Le/ICZmkSGR3S5spYr86318bkelNN6E6QXNp8c/lOFtff05xqUmuqye4eUWr3eBnNE42AHdjxn4SNhOFugndpMrkx
9I+wFbO9lA+duszTND/ULC6LNIm4ESzloUg1nuky9P8BSQaRDw=="""
# its rows: uid 10 P08_01 frames 2-5 take (0); uid 11 P08_01 frames 6-9 open (2); uid 12 P08_02 frames 3-7 put (1)


def write_frames(folder: Path, count: int, first_number: int = 1) -> None:
    folder.mkdir(parents=True)
    for number in range(first_number, first_number + count):
        Image.fromarray(np.full((16, 16, 3), number * 10, np.uint8)).save(folder / f"frame_{number:010d}.jpg")


def test_epic_kitchens_segments_from_pandas_and_plain_pickles_extract_the_right_frames(tmp_path):
    splits, frames = tmp_path / "splits", tmp_path / "EPIC_KITCHENS_2018" / "frames_rgb_flow"
    splits.mkdir()
    (splits / "D1_train.pkl").write_bytes(zlib.decompress(base64.b64decode(D1_TRAIN_PANDAS1)))
    with open(splits / "D1_test.pkl", "wb") as handle:  # the plain dict-of-columns form is accepted too
        pickle.dump({"uid": [20], "video_id": ["P08_09"], "start_frame": [2], "stop_frame": [4],
                     "verb_class": [3]}, handle)
    write_frames(frames / "rgb" / "train" / "D1" / "P08_01", 12)
    write_frames(frames / "rgb" / "test" / "D1" / "P08_09", 6)  # P08_02 is absent from this copy
    out = tmp_path / "epic.csv"
    result = CliRunner().invoke(manifest, ["epic-kitchens", "--splits", str(splits), "--frames", str(frames),
                                           "--domain", "D1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = rows_by_id(out)
    assert set(rows) == {"D1/P08_01_10", "D1/P08_01_11", "D1/P08_09_20"}
    take = rows["D1/P08_01_10"]
    assert (take.label, take.split, take.start_frame, take.end_frame) == ("take", "train", 1, 4)  # 1-based -> 0-based
    assert (rows["D1/P08_01_11"].label, rows["D1/P08_09_20"].label) == ("open", "close")
    assert rows["D1/P08_09_20"].split == "test"
    assert re.search(r"D1\s+train\s+2\s+1543\s+differs by -1541", result.output)
    assert "1 listed video(s) not found" in result.output and "P08_02_12" in result.output
    # stage one reads exactly EPIC frames 2..5 (files frame_0000000002.jpg ... _5.jpg) for segment uid 10
    config = ExtractConfig(manifest=out, root=out.parent, out=tmp_path / "store", backbone="resnet18", weights="none",
                           frame_size=32, device="cpu", batch_size=8, workers=1, fps=30.0)
    assert run_extract(config, show_progress=False).exit_code == 0
    store = FeatureStore.open(tmp_path / "store")
    np.testing.assert_array_equal(store.read("D1/P08_01_10", "steps"), [[1, 1], [2, 2], [3, 3], [4, 4]])
    np.testing.assert_array_equal(store.read("D1/P08_09_20", "steps")[:, 0], [1, 2, 3])


def test_epic_kitchens_dg_reads_stdn_four_column_lists(tmp_path):
    frames, lists = tmp_path / "frames_rgb_flow", tmp_path / "EPIC-KITCHENS-55-DG-list"
    write_frames(frames / "rgb" / "train" / "D1" / "P08_01", 12)
    write_frames(frames / "rgb" / "test" / "D1" / "P08_09", 6)
    write_frames(frames / "rgb" / "train" / "D2" / "P01_01", 8)
    lists.mkdir()
    (lists / "epic_kitchens_55_da_D1_trainlist.txt").write_text(
        "train/P08/P08_01 2 5 0\ntrain/P08/P08_01 2 5 2\n")  # the same frames annotated twice: two rows
    (lists / "epic_kitchens_55_da_D1_vallist.txt").write_text("test/P08/P08_09 3 4 3\n")
    (lists / "epic_kitchens_55_da_D2_fulllist.txt").write_text("train/P01/P01_01 1 3 1\ntrain/P01/P01_05 1 2 1\n")
    out = tmp_path / "epic_dg.csv"
    result = CliRunner().invoke(manifest, ["epic-kitchens-dg", "--source", "D1", "--lists", str(lists), "--frames",
                                           str(frames), "--domain", "D1", "--domain", "D2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = rows_by_id(out)
    assert set(rows) == {"D1/P08_01_2_5", "D1/P08_01_2_5_2", "D1/P08_09_3_4", "D2/P01_01_1_3"}
    take = rows["D1/P08_01_2_5"]
    assert (take.label, take.split, take.start_frame, take.end_frame) == ("take", "train", 1, 4)  # EPIC frames 2-5
    assert (rows["D1/P08_01_2_5_2"].label, rows["D1/P08_09_3_4"].split) == ("open", "val")
    assert (rows["D2/P01_01_1_3"].label, rows["D2/P01_01_1_3"].split) == ("put", "test")
    assert "1 listed video(s) not found" in result.output and "D2/P01_05_1_2" in result.output
    assert "D3" not in result.output

    (lists / "epic_kitchens_55_da_D2_fulllist.txt").write_text("train/P08/P08_01 1 3 1\n")
    with pytest.raises(ValueError, match=r"D2_fulllist.txt:1: expected a recording of D2 as '<train\|test>/P01/"):
        build_epic_kitchens_dg_from_lists("D1", lists, frames, domains=("D1", "D2"))
    (lists / "epic_kitchens_55_da_D2_fulllist.txt").write_text("train/P01/P01_01 1 3\n")
    with pytest.raises(ValueError, match=r"D2_fulllist.txt:1: expected '<path> <start_frame> <end_frame> <class_id>'"):
        build_epic_kitchens_dg_from_lists("D1", lists, frames, domains=("D1", "D2"))


def test_pickles_with_code_are_refused_before_anything_runs(tmp_path):
    class Exploit:
        def __reduce__(self):
            return (print, ("this must never run",))
    path = tmp_path / "D1_train.pkl"
    path.write_bytes(pickle.dumps({"uid": [1], "payload": Exploit()}))
    with pytest.raises(PickleRefused, match=r"D1_train.pkl: refusing to load builtins.print"):
        load_pickle(path)
    path.write_bytes(pickle.dumps(np.arange(3)))  # numpy arrays load; a bare array is not a table
    np.testing.assert_array_equal(load_pickle(path), [0, 1, 2])
    with pytest.raises(ValueError, match="expected a DataFrame, a dict of columns or a list of row dicts"):
        load_table(path)


# A DataFrame pickled as pandas < 1.1 under Python 2 did (pandas is not needed to write it): the opcodes those
# versions emit, from a pickler that writes the pandas globals by name, Python 2's str as byte strings (STRING /
# BINSTRING) and objects through copy_reg._reconstructor (protocol 0/1) or NEWOBJ (protocol 2).

class Name:
    """A module-level name of a library that need not be installed here: pickle's GLOBAL opcode."""

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name


class Call:
    """``func(*args)``: REDUCE."""

    def __init__(self, func: Name, *args) -> None:
        self.func, self.args = func, args


class Instance:
    """An instance of the class ``cls`` with ``state``, rebuilt as Python pickles instances of plain classes."""

    def __init__(self, cls: Name, state) -> None:
        self.cls, self.state = cls, state


class Python2Pickler(pickle._Pickler):
    dispatch = pickle._Pickler.dispatch.copy()

    def save_python2_str(self, value) -> None:
        raw = value if isinstance(value, bytes) else value.encode("utf-8")
        if self.proto == 0:
            self.write(b"S'" + codecs.escape_encode(raw)[0].replace(b"'", b"\\'") + b"'\n")
        elif len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)

    def save_name(self, name: Name) -> None:
        self.write(pickle.GLOBAL + f"{name.module}\n{name.name}\n".encode())

    def save_call(self, call: Call) -> None:
        self.save(call.func)
        self.save(call.args)
        self.write(pickle.REDUCE)

    def save_instance(self, instance: Instance) -> None:
        if self.proto < 2:
            self.save(Call(Name("copy_reg", "_reconstructor"), instance.cls, Name("__builtin__", "object"), None))
        else:
            self.save(instance.cls)
            self.save(())
            self.write(pickle.NEWOBJ)
        self.save(instance.state)
        self.write(pickle.BUILD)

    dispatch.update({str: save_python2_str, bytes: save_python2_str, Name: save_name, Call: save_call,
                     Instance: save_instance})


def pandas_1_0_frame() -> Instance:
    """MM-SADA-style columns, row index Int64Index([1543, 1544]); pandas 1.0's __getstate__ of frame and manager."""
    def index(module: str, kind: str, data: np.ndarray) -> Call:
        return Call(Name("pandas.core.indexes.base", "_new_Index"), Name(f"pandas.core.indexes.{module}", kind),
                    {"data": data, "name": None})
    axes = [index("base", "Index", np.array(["uid", "video_id", "start_frame", "stop_frame", "verb_class"], object)),
            index("numeric", "Int64Index", np.array([1543, 1544]))]
    blocks = [{"values": np.array([[10, 11], [72393, 6], [72490, 9], [0, 2]]), "mgr_locs": np.array([0, 2, 3, 4])},
              {"values": np.array([["P08_21", "P08_01"]], object), "mgr_locs": slice(1, 2, 1)}]
    manager = Instance(Name("pandas.core.internals.managers", "BlockManager"),
                       (axes, [block["values"] for block in blocks], [], {"0.14.1": {"axes": axes, "blocks": blocks}}))
    return Instance(Name("pandas.core.frame", "DataFrame"), {"_data": manager, "_typ": "dataframe", "_metadata": []})


@pytest.mark.parametrize("protocol", [0, 2])
def test_pandas_1_0_dataframes_pickled_by_python_2_are_read(tmp_path, protocol):
    path = tmp_path / "D1_train.pkl"
    with open(path, "wb") as handle:
        Python2Pickler(handle, protocol).dump(pandas_1_0_frame())
    table = load_table(path)  # int64 bytes such as 0xc9 arrive as Python 2 str: read as latin-1
    assert list(table) == ["uid", "video_id", "start_frame", "stop_frame", "verb_class"]  # unnamed row index dropped
    assert table["video_id"].tolist() == ["P08_21", "P08_01"] and table["start_frame"].tolist() == [72393, 6]
    assert table["stop_frame"].tolist() == [72490, 9] and table["verb_class"].tolist() == [0, 2]


def test_broken_pickles_and_other_reconstructed_objects_are_refused(tmp_path):
    path = tmp_path / "D1_train.pkl"
    with open(path, "wb") as handle:
        Python2Pickler(handle, 0).dump({"rows": Instance(Name("numpy", "ndarray"), {})})
    with pytest.raises(PickleRefused, match=r"copyreg._reconstructor\(ndarray, object, ...\) builds only plain pandas"):
        load_pickle(path)
    for content, error in ((b"\x80\x04X\x02\x00\x00\x00\xff\xfe.", "UnicodeDecodeError"),
                           (b"\x80\x09N.", "ValueError: unsupported pickle protocol")):
        path.write_bytes(content)
        with pytest.raises(PickleRefused, match=f"D1_train.pkl: not a readable pickle \\({error}"):
            load_pickle(path)


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
