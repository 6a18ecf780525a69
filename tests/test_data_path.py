"""The read paths of stage two: bulk loading, coalesced step reads, and holding only the steps a run reads."""
from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import extract.store.store as store_module
from extract.manifest import read_manifest
from extract.store import BACKENDS, FeatureStore
import pipelines.data as data_module
from pipelines.data import FeatureSet, centre_steps, disk_has_room, place_features
from pipelines.runs import select
from tests.conftest import make_feature_store
from tests.test_store import provenance, random_maps, write_part

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(params=BACKENDS)
def two_part_store(request, tmp_path):
    """Two committed parts of videos 3-9 steps long (so reads cross shard and chunk boundaries)."""
    store = FeatureStore.create_or_open(tmp_path / "store", request.param, "rgb", provenance())
    rng = np.random.default_rng(0)
    lengths = [3, 9, 5, 7, 4, 8]
    videos = [{f"p{p}v{i}": random_maps(rng, n) for i, n in enumerate(lengths[p * 3:p * 3 + 3])} for p in range(2)]
    for part in videos:
        write_part(store, part)
    store.rebuild_index()
    return store, {vid: maps for part in videos for vid, maps in part.items()}


@pytest.mark.parametrize("bulk_bytes", [1, 10**9])
def test_read_videos_gives_every_video_whole_whatever_the_call_size(two_part_store, monkeypatch, bulk_bytes):
    store, videos = two_part_store
    monkeypatch.setattr(store_module, "BULK_READ_BYTES", bulk_bytes)  # one call per video, or one per part
    asked = ["p1v2", "p0v0", "p1v0", "p0v2", "p0v1"]                   # an order unlike the storage order
    records = [store.video(vid) for vid in asked]
    seen = {}
    for position, rows in store.read_videos(records, "maps"):
        seen[asked[position]] = rows
    assert sorted(seen) == sorted(asked)
    for vid in asked:
        np.testing.assert_array_equal(seen[vid], store.read(vid, "maps"))
        np.testing.assert_array_equal(seen[vid], videos[vid].astype(np.float16))


@pytest.mark.parametrize("coalesce_bytes", [0, 10**9])
def test_chosen_steps_come_back_in_the_order_asked_whether_or_not_gaps_are_read(two_part_store, monkeypatch,
                                                                                 coalesce_bytes):
    store, _ = two_part_store
    monkeypatch.setattr(store_module, "COALESCE_BYTES", coalesce_bytes)  # five slices, or one spanning them
    whole = store.read("p0v1", "maps")
    steps = [7, 0, 3, 3, 8, 1]                                           # unsorted, a repeat, gaps of 1 and 2
    np.testing.assert_array_equal(store.read("p0v1", "maps", steps=steps), whole[steps])
    np.testing.assert_array_equal(store.read("p0v1", "pooled", steps=[2]), store.read("p0v1", "pooled")[[2]])


def test_evaluation_sets_hold_only_their_segment_centres(tmp_path):
    store_dir, manifest = make_feature_store(tmp_path, steps=12)
    store = FeatureStore.open(store_dir)
    entries = select(read_manifest(manifest), "src", "val")
    full = FeatureSet(store, entries, "maps", {"a": 0, "b": 1, "c": 2})
    centres = FeatureSet(store, entries, "maps", {"a": 0, "b": 1, "c": 2})
    place_features([(full, None), (centres, 3)], "memory", torch.device("cpu"), budget_bytes=0)
    row_bytes = 2 * 2 * 8 * 2                                          # a 2x2x8 float16 map
    assert full.nbytes() == len(entries) * 12 * row_bytes
    assert centres.nbytes(3) == len(entries) * 3 * row_bytes           # 3 of 12 steps: a quarter of the memory
    assert centres._memory["rgb"][0].shape[0] == len(entries) * 3
    plan = centres.eval_plans(num_segments=3, batch_size=len(entries))[0]
    assert plan.steps[0].tolist() == centre_steps(12, 3).tolist() == [2, 6, 10]
    streamed = torch.stack([centres.read(v, s) for v, s in zip(plan.videos, plan.steps)])
    assert torch.equal(centres.gather(plan), streamed) and torch.equal(full.gather(plan), streamed)
    random_plan = centres.epoch_plans(3, 4, 1, "random", torch.Generator().manual_seed(1))[0]
    with pytest.raises(RuntimeError, match="only the segment centres were loaded"):
        centres.gather(random_plan)
    assert torch.equal(full.gather(random_plan),
                       torch.stack([full.read(v, s) for v, s in zip(random_plan.videos, random_plan.steps)]))


def test_auto_holds_the_smallest_sets_that_fit_and_streams_the_rest(tmp_path):
    store_dir, manifest = make_feature_store(tmp_path, steps=12)
    store = FeatureStore.open(store_dir)
    classes = {"a": 0, "b": 1, "c": 2}
    train_set, val_set = (FeatureSet(store, select(read_manifest(manifest), "src", split), "maps", classes)
                          for split in ("train", "val"))
    budget = val_set.nbytes(3)                                         # the evaluation centres, not the training set
    where = place_features([(train_set, None), (val_set, 3)], "auto", torch.device("cpu"), budget, tmp_path / "c")
    assert val_set.held_in == torch.device("cpu") and train_set.held_in == tmp_path / "c"
    assert where.startswith("1 of 2 sets in memory on cpu") and "1 of 2 sets in mapped files" in where
    streamed = FeatureSet(store, select(read_manifest(manifest), "src", "val"), "maps", classes)
    where = place_features([(streamed, 3)], "stream", torch.device("cpu"), budget)
    assert where.startswith("1 of 1 sets streamed from the store by workers")
    assert not streamed.held                                           # --features stream holds nothing, even what fits


@pytest.mark.parametrize("sampling", ["random", "centre"])
def test_a_disk_copy_gives_the_batches_memory_gives_and_is_reused_by_name(tmp_path, sampling):
    store_dir, manifest = make_feature_store(tmp_path, steps=12)
    classes = {"a": 0, "b": 1, "c": 2}
    entries = select(read_manifest(manifest), "src", "train")
    centres_of = 3 if sampling == "centre" else None
    in_memory, on_disk = (FeatureSet(FeatureStore.open(store_dir), entries, "maps", classes) for _ in range(2))
    in_memory.load(torch.device("cpu"), centres_of)
    on_disk.hold_on_disk(tmp_path / "copies", centres_of)
    copy = tmp_path / "copies" / f"{on_disk.disk_key('rgb', centres_of)}.npy"
    assert sorted(p.name for p in (tmp_path / "copies").iterdir()) == [copy.name]     # no temporary file left
    assert np.load(copy).shape[0] == len(entries) * (3 if centres_of else 12)
    for plan in on_disk.epoch_plans(3, 4, 3, sampling, torch.Generator().manual_seed(0)):
        assert torch.equal(on_disk.gather(plan), in_memory.gather(plan))

    # A copy of the store holds the same content: its sets map the same file, written once.
    shutil.copytree(store_dir, tmp_path / "copied-store")
    stamp = copy.stat().st_mtime_ns
    again = FeatureSet(FeatureStore.open(tmp_path / "copied-store"), entries, "maps", classes)
    assert again.has_disk_copy(tmp_path / "copies", centres_of)
    again.hold_on_disk(tmp_path / "copies", centres_of)
    assert copy.stat().st_mtime_ns == stamp
    plan = again.eval_plans(3, 8)[0]
    assert torch.equal(again.gather(plan), in_memory.gather(plan))
    # Other steps held (every step vs the centres) or other videos are another copy.
    assert again.disk_key("rgb", 5 if centres_of else 3) != again.disk_key("rgb", centres_of)
    other = FeatureSet(FeatureStore.open(store_dir), entries[1:], "maps", classes)
    assert other.disk_key("rgb", centres_of) != again.disk_key("rgb", centres_of)


def test_a_disk_copy_cut_short_is_written_again_and_a_killed_or_failed_write_leaves_nothing(tmp_path, monkeypatch):
    store_dir, manifest = make_feature_store(tmp_path, steps=12)
    entries = select(read_manifest(manifest), "src", "train")
    features = FeatureSet(FeatureStore.open(store_dir), entries, "maps", {"a": 0, "b": 1, "c": 2})
    copies = tmp_path / "copies"
    features.hold_on_disk(copies)
    copy = copies / f"{features.disk_key('rgb', None)}.npy"
    whole = copy.read_bytes()
    copy.write_bytes(whole[:len(whole) // 2])                          # e.g. a disk that filled up under another tool
    features.hold_on_disk(copies)
    assert copy.read_bytes() == whole

    def interrupted(*args):
        raise KeyboardInterrupt
    copy.unlink()
    killed = subprocess.Popen([sys.executable, "-c", "pass"])
    killed.wait()                                                      # a pid no process has any more
    abandoned = copies / f".tmp-{killed.pid}-{copy.name}"
    abandoned.write_bytes(whole[:100])                                 # what a run killed mid-copy leaves
    monkeypatch.setattr(FeatureSet, "_fill", interrupted)
    with pytest.raises(KeyboardInterrupt):
        features.hold_on_disk(copies)
    assert list(copies.iterdir()) == []


def test_streaming_reads_the_store_when_the_disk_has_no_room(tmp_path, monkeypatch):
    store_dir, manifest = make_feature_store(tmp_path, steps=12)
    features = FeatureSet(FeatureStore.open(store_dir), select(read_manifest(manifest), "src", "train"), "maps",
                          {"a": 0, "b": 1, "c": 2})
    free = shutil.disk_usage(tmp_path).free
    monkeypatch.setattr(data_module, "DISK_HEADROOM", free)            # nothing more fits
    assert not disk_has_room(tmp_path / "not" / "made", 1)
    where = place_features([(features, None)], "stream", torch.device("cpu"), 0, tmp_path / "copies")
    assert "streamed from the store by workers" in where and not features.held
    assert not (tmp_path / "copies").exists()


def test_a_run_holds_only_the_centres_of_every_set_under_centre_sampling(tmp_path):
    from pipelines.runs import load_run_inputs
    from pipelines.train import TrainConfig
    store_dir, manifest = make_feature_store(tmp_path, steps=12)
    config = TrainConfig(store=store_dir, manifest=manifest, head="tempooling", source="src", target="tgt",
                         setting="da", out=tmp_path / "run")
    inputs = load_run_inputs(config, "maps")
    random_reads = dict((id(s), n) for s, n in inputs.steps_read("random", 5))
    centre_reads = dict((id(s), n) for s, n in inputs.steps_read("centre", 5))
    assert random_reads == {id(inputs.source_train): None, id(inputs.source_val): 5,
                            id(inputs.target_train): None, id(inputs.target_eval): 5}
    assert set(centre_reads.values()) == {5}
