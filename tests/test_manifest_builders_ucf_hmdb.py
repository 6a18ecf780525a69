"""UCF-HMDB manifest builders (full, small, UCF-Olympic, the DG re-split and the STDN / VideoDG lists) on small
fake dataset trees with split files in the datasets' real formats."""
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import rows_by_id
from data_manifests.common import ClassMap, expected_counts
from data_manifests.ucf_hmdb import build_ucf_hmdb, build_ucf_hmdb_dg, build_ucf_hmdb_dg_from_lists, build_ucf_olympic
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
