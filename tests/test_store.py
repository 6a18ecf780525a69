"""Feature store on real zarr v3 and HDF5 files: round trips, rollback, integrity, provenance, locking."""
import pickle

import h5py
import numpy as np
import pytest

from click.testing import CliRunner

from extract.store import FeatureStore, FeatureValueError, StoreError
from pipelines.cli import main

MAP_SHAPE = (2, 3, 4)
BACKENDS = ["zarr", "hdf5"]


def provenance(**features):
    return {"features": {"backbone": "tiny", "map_shape": list(MAP_SHAPE), "dtype": "float16", **features},
            "software": {"torch": "x"}}


def steps_for(n):
    return np.stack([np.arange(n), np.arange(n)], axis=1)


def write_part(store, videos, fail=(), shard_steps=4, batch=3):
    """Write ``videos`` {id: float32 maps}; ids in ``fail`` break after their first batch and are rolled back."""
    part = store.new_part("s0of1", "rgb", "float16", MAP_SHAPE[-1], {"manifest_sha256": "m"}, shard_steps)
    for video_id, maps in videos.items():
        video = part.video(video_id, {"label": "a", "domain": "d"})
        for start in range(0, len(maps), batch):
            video.append(steps_for(len(maps))[start:start + batch], maps[start:start + batch])
            if video_id in fail:
                break
        if video_id in fail:
            video.discard()
            part.record_failure(video_id, f"{video_id}.mp4", "decode", "broken")
        else:
            video.finish(expected_frames=len(maps))
    return part.commit()


@pytest.fixture(params=BACKENDS)
def store(request, tmp_path):
    return FeatureStore.create_or_open(tmp_path / "store", request.param, "rgb", provenance())


def random_maps(rng, n):
    return np.maximum(rng.normal(size=(n, *MAP_SHAPE)), 0).astype(np.float32) * 10


def test_round_trip_pooled_steps_and_rollback(store):
    rng = np.random.default_rng(0)
    # lengths chosen so the failed video spans a flushed shard boundary (shard_steps=4)
    videos = {"a": random_maps(rng, 3), "broken": random_maps(rng, 7), "b": random_maps(rng, 6), "c": random_maps(rng, 1)}
    write_part(store, videos, fail={"broken"})
    reopened = FeatureStore.open(store.root)
    assert sorted(reopened.videos()) == ["a", "b", "c"]
    for video_id in "abc":
        maps = reopened.read(video_id, "maps")
        assert maps.dtype == np.float16 and maps.shape == videos[video_id].shape
        np.testing.assert_array_equal(maps, videos[video_id].astype(np.float16))
        pooled = reopened.read(video_id, "pooled")
        assert pooled.dtype == np.float32
        np.testing.assert_allclose(pooled, videos[video_id].mean(axis=(1, 2)), rtol=1e-6)  # from un-rounded maps
        np.testing.assert_array_equal(reopened.read(video_id, "steps"), steps_for(len(videos[video_id])))
    chosen = reopened.read("b", "maps", steps=[4, 0, 1, 1])
    np.testing.assert_array_equal(chosen, videos["b"].astype(np.float16)[[4, 0, 1, 1]])
    assert [f["video_id"] for f in reopened.failures()] == ["broken"]
    assert reopened.verify() == []
    with pytest.raises(IndexError):
        reopened.read("a", "maps", steps=[3])


def test_failure_cleared_by_later_success_and_index_rebuilt(store):
    rng = np.random.default_rng(1)
    write_part(store, {"x": random_maps(rng, 2)}, fail={"x"})
    assert [f["video_id"] for f in FeatureStore.open(store.root).failures()] == ["x"]
    write_part(store, {"x": random_maps(rng, 2)})
    (store.root / "index.json").unlink()
    reopened = FeatureStore.open(store.root)
    assert list(reopened.videos()) == ["x"] and reopened.failures() == []
    assert (store.root / "index.json").is_file()


def test_overflow_and_nan_are_refused_naming_the_video(store):
    part = store.new_part("s0of1", "rgb", "float16", MAP_SHAPE[-1], {})
    huge = np.full((1, *MAP_SHAPE), 1e6, dtype=np.float32)
    with pytest.raises(FeatureValueError, match=r"v1: activation 1e\+06 exceeds float16.*--dtype float32"):
        part.video("v1", {}).append(steps_for(1), huge)
    with pytest.raises(FeatureValueError, match="v2: the backbone produced NaN or inf"):
        part.video("v2", {}).append(steps_for(1), np.full((1, *MAP_SHAPE), np.nan, dtype=np.float32))
    part.abort()


def flip_byte_in_first_chunk(store):
    part = store.root / "parts" / store.part_names()[0]
    if store.backend == "zarr":
        target, offset = part / "rgb" / "maps" / "c" / "0" / "0" / "0" / "0", 5
    else:
        with h5py.File(part, "r") as handle:
            offset = handle["rgb/maps"].id.get_chunk_info(0).byte_offset + 5
        target = part
    data = bytearray(target.read_bytes())
    data[offset] ^= 0xFF
    target.write_bytes(bytes(data))


def test_verify_names_the_video_with_a_flipped_byte(store):
    rng = np.random.default_rng(2)
    write_part(store, {"first": random_maps(rng, 2), "second": random_maps(rng, 2)})
    assert CliRunner().invoke(main, ["store", "verify", str(store.root)]).exit_code == 0
    flip_byte_in_first_chunk(store)
    problems = FeatureStore.open(store.root).verify()
    assert len(problems) == 1 and problems[0].startswith("video first")
    result = CliRunner().invoke(main, ["store", "verify", str(store.root)])
    assert result.exit_code == 1 and "BAD video first" in result.output and "1 problem(s)" in result.output


def test_changed_settings_are_refused(store):
    with pytest.raises(StoreError, match=r"backbone: store has 'tiny', this run has 'other'"):
        FeatureStore.create_or_open(store.root, store.backend, "rgb", provenance(backbone="other"))
    other = "hdf5" if store.backend == "zarr" else "zarr"
    with pytest.raises(StoreError, match=f"is a {store.backend} store"):
        FeatureStore.create_or_open(store.root, other, "rgb", provenance())
    same = FeatureStore.create_or_open(store.root, store.backend, "rgb", provenance())
    assert same.provenance()["features"]["backbone"] == "tiny"


def test_a_second_stream_joins_the_store_with_its_own_provenance(store):
    rng = np.random.default_rng(4)
    write_part(store, {"v": random_maps(rng, 2)})
    flow = {"features": {"name": "flow-net", "channels": 3}, "software": {}}
    with_flow = FeatureStore.create_or_open(store.root, store.backend, "flow", flow)
    part = with_flow.new_part("flow", "flow", "float32", 3, {})
    video = part.video("v", {"label": "a"})
    video.append(steps_for(4), pooled=np.ones((4, 3), dtype=np.float32))
    video.finish()
    part.commit()
    reopened = FeatureStore.open(store.root)
    assert sorted(reopened.streams) == ["flow", "rgb"] and reopened.provenance("flow") == flow
    assert reopened.read("v", "pooled", stream="flow").shape == (4, 3)
    assert reopened.read("v", "pooled", stream="rgb").shape == (2, MAP_SHAPE[-1])


def test_lock_is_exclusive_and_cleans_stale_temporary_parts(store):
    stale = store.new_part("s0of1", "rgb", "float16", MAP_SHAPE[-1], {})
    assert stale.tmp_path.exists()
    with store.lock("s0of1"):
        assert not stale.tmp_path.exists()
        with pytest.raises(StoreError, match="another extraction is writing shard s0of1"):
            store.lock("s0of1")
        store.lock("s1of2").close()  # another shard may write at the same time


def test_store_pickles_without_open_handles(store):
    rng = np.random.default_rng(3)
    write_part(store, {"v": random_maps(rng, 2)})
    opened = FeatureStore.open(store.root)
    expected = opened.read("v", "pooled")
    clone = pickle.loads(pickle.dumps(opened))
    np.testing.assert_array_equal(clone.read("v", "pooled"), expected)


def test_not_a_store(tmp_path):
    with pytest.raises(StoreError, match="not a vidshift feature store"):
        FeatureStore.open(tmp_path)
