"""Importing shared pooled features (TA3N .t7 trees, EPIC-KITCHENS-100 UDA pickles) into stores, and exporting."""
import base64
import csv
import json
import os
import pickle
import signal
import zlib
from functools import partial

import h5py
import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from data_manifests.pickles import PickleRefused
from extract import importers
from extract.importers import segment_steps
from extract.manifest import VideoEntry, read_manifest
from extract.store import FeatureStore, StoreError
from pipelines.cli import main
from pipelines.cli_data import export, import_
from pipelines.runs import store_identity

CHANNELS = 8


class NotATensor:
    """Saved with torch.save, it needs code to load: weights_only must refuse it."""

    def __init__(self):
        self.values = [1.0, 2.0]


def write_t7_video(folder, num_frames, seed):
    """A TA3N feature folder: img_00001.t7 ... (1-indexed), one saved 1-D tensor per frame."""
    folder.mkdir(parents=True)
    features = torch.from_numpy(np.random.default_rng(seed).normal(size=(num_frames, CHANNELS)).astype(np.float32))
    for t in range(num_frames):
        torch.save(features[t].clone(), folder / f"img_{t + 1:05d}.t7")
    return features.numpy()


@pytest.fixture
def ta3n_release(tmp_path):
    """A release unpacked under RELEASE, with lists holding the authors' absolute paths."""
    release = tmp_path / "TA3N_release"
    ucf, hmdb = release / "ucf101" / "RGB-feature", release / "hmdb51" / "RGB-feature"
    features = {"ucf/v_Archery_g08_c01": write_t7_video(ucf / "v_Archery_g08_c01", 5, 0),
                "ucf/v_Fencing_g01_c02": write_t7_video(ucf / "v_Fencing_g01_c02", 3, 1),
                "hmdb/Sword_fencing_f_cm_np1_le_bad_1": write_t7_video(hmdb / "Sword_fencing_f_cm_np1_le_bad_1", 4, 2)}
    write_t7_video(hmdb / "bad_dict", 2, 3)
    torch.save({"feature": torch.zeros(CHANNELS)}, hmdb / "bad_dict" / "img_00002.t7")  # not a plain tensor
    write_t7_video(hmdb / "bad_object", 2, 4)
    torch.save(NotATensor(), hmdb / "bad_object" / "img_00001.t7")  # loading it would run code
    write_t7_video(hmdb / "bad_parameter", 2, 5)
    torch.save(torch.nn.Parameter(torch.zeros(CHANNELS)), hmdb / "bad_parameter" / "img_00002.t7")
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "list_ucf101_train.txt").write_text("/home/author/dataset/ucf101/RGB-feature/v_Archery_g08_c01 5 10\n")
    (lists / "list_ucf101_val.txt").write_text("/home/author/dataset/ucf101/RGB-feature/v_Fencing_g01_c02 3 1\n")
    (lists / "list_hmdb51_train.txt").write_text(
        "/home/author/dataset/hmdb51/RGB-feature/Sword_fencing_f_cm_np1_le_bad_1 4 1\n"
        "/home/author/dataset/hmdb51/RGB-feature/bad_dict 2 1\n"
        "/home/author/dataset/hmdb51/RGB-feature/bad_object 2 1\n"
        "/home/author/dataset/hmdb51/RGB-feature/bad_parameter 2 1\n"
        "/home/author/dataset/hmdb51/RGB-feature/not_in_this_copy 9 1\n")
    specs = [f"ucf:train={lists / 'list_ucf101_train.txt'}", f"ucf:val={lists / 'list_ucf101_val.txt'}",
             f"hmdb:train={lists / 'list_hmdb51_train.txt'}"]
    specs = [argument for spec in specs for argument in ("--list", spec)]
    return release, specs, features


def test_ta3n_t7_import_round_trip_refusals_manifest_and_resume(ta3n_release, tmp_path):
    release, specs, features = ta3n_release
    out = tmp_path / "store"
    args = ["ta3n", str(release), *specs, "--classes", "ucf-hmdb-full", "--out", str(out)]
    result = CliRunner().invoke(import_, args)
    assert result.exit_code == 2, result.output  # some videos failed: listed in the store and on screen
    assert "1 listed video(s) not found in your copy" in result.stderr and "not_in_this_copy" in result.stderr
    store = FeatureStore.open(out)
    videos = store.videos()
    assert set(videos) == set(features)
    for video_id, expected in features.items():
        np.testing.assert_array_equal(store.read(video_id, "pooled"), expected)
        frames = np.arange(len(expected))
        np.testing.assert_array_equal(store.read(video_id, "steps"), np.stack([frames, frames], 1))  # step t = frame t
    archery = videos["ucf/v_Archery_g08_c01"].attrs
    assert (archery["label"], archery["domain"], archery["split"]) == ("shoot_bow", "ucf", "train")
    assert archery["path"] == "ucf101/RGB-feature/v_Archery_g08_c01" and archery["listed_frames"] == "5"
    assert videos["hmdb/Sword_fencing_f_cm_np1_le_bad_1"].attrs["label"] == "fencing"
    reasons = {failure["video_id"]: failure["reason"] for failure in store.failures()}
    assert "expected a 1-D float feature tensor (torch.Tensor), found dict" in reasons["hmdb/bad_dict"]
    assert "found torch.nn.parameter.Parameter (1-D torch.float32)" in reasons["hmdb/bad_parameter"]
    assert "refused, not a plain saved tensor (Unsupported global: GLOBAL test_import_export.NotATensor)" in \
        reasons["hmdb/bad_object"]
    assert "FAILED hmdb/bad_object" in result.output
    provenance = store.provenance()["features"]
    assert provenance["channels"] == CHANNELS and provenance["map_shape"] is None and provenance["name"] == "resnet101"
    assert store.map_shape() is None and store.verify() == []
    with pytest.raises(StoreError, match="pooled-only"):
        store.read("ucf/v_Archery_g08_c01", "maps")
    manifest = {entry.video_id: entry for entry in read_manifest(out / "manifest.csv")}
    assert set(manifest) == set(features)  # the failed videos are not in the manifest
    assert manifest["ucf/v_Fencing_g01_c02"].split == "val" and manifest["ucf/v_Fencing_g01_c02"].label == "fencing"

    again = CliRunner().invoke(import_, args)  # resumes: nothing imported twice
    assert "imported 0 videos" in again.output and "(3 already there)" in again.output
    assert set(FeatureStore.open(out).videos()) == set(features) and len(read_manifest(out / "manifest.csv")) == 3


def test_parallel_import_writes_the_same_store_as_one_loader(ta3n_release, tmp_path, monkeypatch):
    release, specs, _ = ta3n_release
    monkeypatch.setattr(importers, "PROCESS_POOL_MIN_VIDEOS", 0)  # loader processes even for these few videos
    identities, failures = [], []
    for jobs in (1, 4):
        out = tmp_path / f"store{jobs}"
        result = CliRunner().invoke(import_, ["ta3n", str(release), *specs, "--out", str(out), "--jobs", str(jobs)])
        assert result.exit_code == 2, result.output  # the broken videos are recorded failures either way
        with FeatureStore.open(out) as store:
            identities.append(store_identity(store, ("rgb",))["features_sha256"])
            failures.append(sorted(f["video_id"] for f in store.failures()))
            assert [r.video_id for r in sorted(store.videos().values(), key=lambda r: (r.part, r.offset))] == \
                ["ucf/v_Archery_g08_c01", "ucf/v_Fencing_g01_c02", "hmdb/Sword_fencing_f_cm_np1_le_bad_1"]
    assert identities[0] == identities[1] and failures[0] == failures[1] == \
        ["hmdb/bad_dict", "hmdb/bad_object", "hmdb/bad_parameter"]
    with FeatureStore.open(tmp_path / "store1") as one, FeatureStore.open(tmp_path / "store4") as parallel:
        assert len(one.part_names()) == 1 and len(parallel.part_names()) == 4  # one per worker


@pytest.mark.parametrize("count, workers, sizes", [
    (803, 2, [201, 201, 200, 201]),    # 4 parts of <= 256 videos, a multiple of the 2 workers
    (803, 1, [201, 201, 200, 201]),
    (1024, 1, [256] * 4), (1025, 2, [171, 171, 170, 171, 171, 171]), (3, 2, [2, 1]), (0, 2, [])])
def test_videos_are_cut_into_equal_consecutive_parts_for_the_workers(count, workers, sizes):
    chunks = importers._part_chunks(list(range(count)), workers)
    assert [len(chunk) for chunk in chunks] == sizes
    assert [video for chunk in chunks for video in chunk] == list(range(count))  # list order, nothing twice


def load_or_kill_the_worker(folder, kill: bool):
    """A TA3N loader that, for one video, kills its own process outright (as the OOM killer would)."""
    if kill:
        os.kill(os.getpid(), signal.SIGKILL)
    return importers.load_t7_video(folder)


def test_a_killed_import_worker_stops_the_import_keeps_committed_parts_and_the_rerun_completes(tmp_path, monkeypatch):
    monkeypatch.setattr(importers, "PROCESS_POOL_MIN_VIDEOS", 0)  # worker processes even for these few videos
    release, folders = tmp_path / "release", []
    for i in range(12):
        folders.append(release / f"v{i:02d}")
        write_t7_video(folders[-1], 3, i)
    entries = [VideoEntry(video_id=f"ucf/v{i:02d}", path=str(folder), label="0", domain="ucf", split="train")
               for i, folder in enumerate(folders)]
    features = {"name": "resnet101", "channels": CHANNELS}

    def sources(kill_at: int | None) -> list[importers.PooledSource]:
        return [importers.PooledSource(entry, partial(load_or_kill_the_worker, folder, i == kill_at))
                for i, (entry, folder) in enumerate(zip(entries, folders))]

    out = tmp_path / "store"
    with pytest.raises(StoreError, match="an import worker process died.*run the same command again"):
        importers.import_pooled(sources(kill_at=0), out, "zarr", "rgb", features, {}, jobs=2, processes=True)
    with FeatureStore.open(out) as store:
        survived = set(store.videos())  # the other worker's part, if it committed before the pool was shut down
        assert survived <= {entry.video_id for entry in entries[6:]}
    summary = importers.import_pooled(sources(kill_at=None), out, "zarr", "rgb", features, {}, jobs=2,
                                      processes=True)
    assert summary.skipped == len(survived) and summary.imported == 12 - len(survived) and not summary.failures
    clean = tmp_path / "clean"
    importers.import_pooled(sources(kill_at=None), clean, "zarr", "rgb", features, {}, jobs=1, processes=False)
    with FeatureStore.open(out) as resumed, FeatureStore.open(clean) as once:
        assert not list((out / "parts").glob(".tmp-*"))  # the killed worker's part was never committed
        assert resumed.verify() == []
        assert store_identity(resumed, ("rgb",))["features_sha256"] == store_identity(once, ("rgb",))["features_sha256"]


# EPIC_100_uda_source_train.pkl-style annotations, pickled by pandas 2.2.3 (protocol 5), narration_id as the index:
# P01_01_0 frames 1-50 take(0); P01_01_1 frames 101-150 open(3); P02_03_7 frames 51-75 take(0).
EPIC100_LABELS_PANDAS2 = """
eNp1U89v0zAUTtt0v1qNX2LABXFAqFyirkPAAQmJTRMsoiBuHCbjJG5tNXEix9mYxCQ4bGySb3vs34VnNx1rET7ke+/Fz/78vfe+
t38FvueWuVVQmdAyiHPFgpGiGQOzukM13XX2BTz9AcfQMz7JxgrMw+vbhdRMSZqWQUYlHTNVgum+SfN48n7qY7rZqDNIKqLybwqY
G6SShYgnKSORzbGb78gqK44C4o5HmykRg+mQkcqzqBqN3JG9yy9T8l6jRlbjVo2DGi9rDL351VrwVxfinRrBtB0hxEQfFVYO0xQv
4fzsJ3yCXtgyjVcwHA73fuNyn9DTEIV+2DoF09gGjdv4eu/yUX1gc+Gido3Lswv53dA/Af7AJoZNewvvmI3rqmRVqgVViiKrLlEs
zmWpVRVrJMdvmmUU2/28gNA7ge1GBFOujSkrfts0P8y94NvCC17jC873seStj/1N4AOLAzBL6BEbeGbNAelvgfE1nWC/+HnBJPDn
phVXBbpJnmOrtCdSjBgwPO66BN5C7epG9Jb+L8EpWDr351svYV9ZGUS0RAJrRLJD8s7GrAo7pj2zXesm2M7AH/MnVhHem+mxgk7g
XrpeUKVFLPAGTUQCZuVAJCx3ZqfU+JPUo7FW6ryYOf4BUxHGLJA4pSV2tS/zSmLMQh2zCmDcpgyrU1vSXf4WifG9fzm1rjitTPUm
fbgyN51ppScvprp+Nl1py61FLi1bdzyzHxxY7FicZfv42VyTjGnq1NjH+lCtcWKPsbRklNKxM+/RNM0PS5JURSpiqhlJacRwXM/K
Kgr+AJd2ZJs="""


def write_epic100(tmp_path):
    rng = np.random.default_rng(5)
    features = {"RGB": rng.normal(size=(3, 25, 6)).astype(np.float32),
                "Flow": rng.normal(size=(3, 25, 5)).astype(np.float32),
                "Audio": rng.normal(size=(3, 25, 4)).astype(np.float32)}
    source, labels = tmp_path / "source_train.pkl", tmp_path / "EPIC_100_uda_source_train.pkl"
    with open(source, "wb") as handle:
        pickle.dump({"features": features, "narration_ids": ["P01_01_0", "P01_01_1", "P02_03_7"]}, handle)
    labels.write_bytes(zlib.decompress(base64.b64decode(EPIC100_LABELS_PANDAS2)))
    return source, labels, features


def test_epic100_pickle_import_labels_segments_and_modalities(tmp_path):
    source, labels, features = write_epic100(tmp_path)
    out = tmp_path / "epic_store"
    result = CliRunner().invoke(import_, ["epic100", str(source), "--labels", str(labels), "--domain", "source",
                                          "--split", "train", "--out", str(out), "--format", "hdf5"])
    assert result.exit_code == 0, result.output
    store = FeatureStore.open(out)
    assert store.streams == ["rgb"] and store.backend == "hdf5"
    for row, narration_id in enumerate(["P01_01_0", "P01_01_1", "P02_03_7"]):
        np.testing.assert_array_equal(store.read(narration_id, "pooled"), features["RGB"][row])
    steps = store.read("P01_01_0", "steps")  # 25 segments over EPIC frames 1-50 = 0-based frames 0-49
    np.testing.assert_array_equal(steps[:3], [[0, 1], [2, 3], [4, 5]])
    assert steps[-1].tolist() == [48, 49]
    rows = {entry.video_id: entry for entry in read_manifest(out / "manifest.csv")}
    opened = rows["P01_01_1"]
    assert (opened.path, opened.start_frame, opened.end_frame, opened.label) == ("P01/videos/P01_01.MP4", 100, 149, "3")
    assert opened.attrs["noun"] == "door" and opened.attrs["noun_class"] == "3"

    # unlabelled target segments extend the same store and manifest
    target = tmp_path / "target_test.pkl"
    with open(target, "wb") as handle:
        pickle.dump({"features": {"RGB": features["RGB"][:1] + 1}, "narration_ids": np.array(["P30_05_2"])}, handle)
    result = CliRunner().invoke(import_, ["epic100", str(target), "--domain", "target", "--split", "test",
                                          "--out", str(out), "--format", "hdf5"])
    assert result.exit_code == 0, result.output
    rows = {entry.video_id: entry for entry in read_manifest(out / "manifest.csv")}
    assert len(rows) == 4 and (rows["P30_05_2"].label, rows["P30_05_2"].domain) == ("unlabelled", "target")
    np.testing.assert_array_equal(FeatureStore.open(out).read("P30_05_2", "steps")[:, 0], np.arange(25))

    result = CliRunner().invoke(import_, ["epic100", str(source), "--modality", "ALL", "--domain", "source",
                                          "--split", "train", "--out", str(tmp_path / "all_store")])
    assert result.exit_code == 0, result.output
    everything = FeatureStore.open(tmp_path / "all_store")
    assert everything.streams == ["all"] and everything.provenance("all")["features"]["channels"] == 15
    np.testing.assert_array_equal(everything.read("P02_03_7", "pooled", stream="all"),
                                  np.concatenate([features[m][2] for m in ("RGB", "Flow", "Audio")], axis=-1))


def test_epic100_pickle_holding_more_than_arrays_is_refused(tmp_path):
    path = tmp_path / "features.pkl"
    with open(path, "wb") as handle:
        pickle.dump({"features": {"RGB": np.zeros((1, 25, 4), np.float32)}, "narration_ids": ["a"],
                     "extra": NotATensor()}, handle)
    result = CliRunner().invoke(import_, ["epic100", str(path), "--domain", "source", "--split", "train",
                                          "--out", str(tmp_path / "store")])
    assert isinstance(result.exception, PickleRefused)
    assert "refusing to load test_import_export.NotATensor" in str(result.exception)
    assert not (tmp_path / "store").exists()


def test_segment_steps_cover_the_action():
    np.testing.assert_array_equal(segment_steps(10, 19, 5), [[10, 11], [12, 13], [14, 15], [16, 17], [18, 19]])
    short = segment_steps(0, 2, 5)  # fewer frames than segments: each segment is one frame, in order
    assert short.tolist() == [[0, 0], [0, 0], [1, 1], [1, 1], [2, 2]]
    np.testing.assert_array_equal(segment_steps(None, None, 3), [[0, 0], [1, 1], [2, 2]])


def test_export_npy_and_hdf5_read_back_without_vidshift(ta3n_release, tmp_path):
    release, specs, features = ta3n_release
    CliRunner().invoke(import_, ["ta3n", str(release), *specs, "--out", str(tmp_path / "store")])
    result = CliRunner().invoke(export, [str(tmp_path / "store"), str(tmp_path / "npy"), "--format", "npy"])
    assert result.exit_code == 0 and "exported 3 videos" in result.output
    np.testing.assert_array_equal(np.load(tmp_path / "npy" / "ucf" / "v_Archery_g08_c01.npy"),
                                  features["ucf/v_Archery_g08_c01"])
    assert np.load(tmp_path / "npy" / "ucf" / "v_Archery_g08_c01.steps.npy").tolist()[-1] == [4, 4]
    with open(tmp_path / "npy" / "index.csv", newline="") as handle:
        index = {row["video_id"]: row for row in csv.DictReader(handle)}
    assert index["ucf/v_Fencing_g01_c02"]["file"] == "ucf/v_Fencing_g01_c02.npy"
    assert (index["ucf/v_Fencing_g01_c02"]["label"], index["ucf/v_Fencing_g01_c02"]["n_steps"]) == ("1", "3")
    assert json.loads((tmp_path / "npy" / "provenance.json").read_text())["features"]["channels"] == CHANNELS

    CliRunner().invoke(export, [str(tmp_path / "store"), str(tmp_path / "h5"), "--format", "hdf5"])
    with h5py.File(tmp_path / "h5" / "hmdb" / "Sword_fencing_f_cm_np1_le_bad_1.h5", "r") as h5:
        np.testing.assert_array_equal(h5["pooled"][...], features["hmdb/Sword_fencing_f_cm_np1_le_bad_1"])
        assert h5["steps"].shape == (4, 2) and h5.attrs["domain"] == "hmdb" and h5.attrs["split"] == "train"


# ---- imported stores train through the CLI -----------------------------------------------------------------------

TRAIN_FAST = ["--set", "epochs=1", "--set", "batch_size=4", "--device", "cpu", "--workers", "0"]


def test_imported_ta3n_store_trains_pooled_heads_and_refuses_maps_heads(tmp_path):
    """TA3N's release -> `store import ta3n` -> `vidshift train --setting da` on the store it wrote."""
    release, lists, specs = tmp_path / "TA3N_release", tmp_path / "lists", []
    lists.mkdir()
    for domain, dataset in (("ucf", "ucf101"), ("hmdb", "hmdb51")):
        for split in ("train", "val"):
            lines = []
            for class_id, name in ((0, "climb"), (1, "fencing")):
                for k in range(2):
                    video = f"{name}_{split}_{k}"
                    write_t7_video(release / dataset / "RGB-feature" / video, 6, seed=len(specs) * 4 + class_id * 2 + k)
                    lines.append(f"/home/author/{dataset}/RGB-feature/{video} 6 {class_id}\n")
            (lists / f"list_{dataset}_{split}.txt").write_text("".join(lines))
            specs += ["--list", f"{domain}:{split}={lists / f'list_{dataset}_{split}.txt'}"]
    store = tmp_path / "store"
    result = CliRunner().invoke(main, ["store", "import", "ta3n", str(release), *specs, "--classes", "ucf-hmdb-full",
                                       "--out", str(store)])
    assert result.exit_code == 0, result.output
    train = ["train", "--store", str(store), "--manifest", str(store / "manifest.csv"), "--source", "ucf",
             "--target", "hmdb", *TRAIN_FAST]
    for method in ("erm", "ta3n"):
        result = CliRunner().invoke(main, [*train, "--setting", "da", "--head", "trn", "--method", method, "--out",
                                           str(tmp_path / method)])
        assert result.exit_code == 0, result.output
        metrics = json.loads((tmp_path / method / "metrics.json").read_text())
        assert metrics["final"]["epochs_run"] == 1 and 0 <= metrics["final"]["target_acc_selected"] <= 1
    result = CliRunner().invoke(main, [*train, "--head", "stdn", "--out", str(tmp_path / "stdn")])
    assert result.exit_code == 1
    assert "has pooled features only" in result.output and "spatial maps" in result.output


def test_epic100_modalities_become_streams_and_train_picks_one(tmp_path):
    source, labels, features = write_epic100(tmp_path)
    out = tmp_path / "epic_store"
    for modality in ("RGB", "Flow"):
        result = CliRunner().invoke(import_, ["epic100", str(source), "--labels", str(labels), "--modality", modality,
                                              "--domain", "source", "--split", "train", "--out", str(out)])
        assert result.exit_code == 0, result.output
    with FeatureStore.open(out) as store:
        assert store.streams == ["flow", "rgb"]
        assert [store.provenance(stream)["features"]["channels"] for stream in store.streams] == [5, 6]
        assert store.provenance("flow")["features"]["modality"] == "Flow"
        np.testing.assert_array_equal(store.read("P01_01_1", "pooled", stream="flow"), features["Flow"][1])
        flow_identity = store_identity(store, ("flow",))
    assert len(read_manifest(out / "manifest.csv")) == 3  # one row per segment, whatever the streams

    train = ["train", "--store", str(out), "--manifest", str(out / "manifest.csv"), "--head", "trn", "--source",
             "source", *TRAIN_FAST]
    result = CliRunner().invoke(main, [*train, "--stream", "flow", "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    record = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert record["store"] == flow_identity  # the run trained on the Flow features and says so
    result = CliRunner().invoke(main, [*train, "--stream", "audio", "--out", str(tmp_path / "run2")])
    assert result.exit_code == 1 and "no stream 'audio'; it has flow, rgb" in result.output
    for fusion in ("late", "early"):     # EPIC's two-stream model and its ALL (features concatenated)
        result = CliRunner().invoke(main, [*train, "--stream", "rgb,flow", "--fusion", fusion, "--out",
                                           str(tmp_path / fusion)])
        assert result.exit_code == 0, result.output
        assert yaml.safe_load((tmp_path / fusion / "config.yaml").read_text())["store"]["streams"] == ["rgb", "flow"]
