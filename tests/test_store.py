"""Feature store on real zarr v3 and HDF5 files: round trips, rollback, integrity, provenance, locking."""
import json
import pickle

import h5py
import numpy as np
import pytest
import zarr

from click.testing import CliRunner

from extract.store import FeatureStore, FeatureValueError, StoreError
from extract.store.part_writer import _cast
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
    assert not part.tmp_path.exists()


def test_float16_cast_is_bit_identical_to_numpy_including_rounding_edges():
    # Values at and around float16's limits: the largest normal and the rounding boundary to inf (65520),
    # ties between neighbours (round half to even), subnormals and their ties, signed zeros.
    tiny = float(np.finfo(np.float16).smallest_subnormal)
    edges = np.array([65504, 65505, 65519.99, 65520, 1e9, 1 + 2**-11, 1 + 3 * 2**-11, 2049, 2051, tiny, tiny / 2,
                      1.5 * tiny, 2.5 * tiny, 6.1e-5, 0.0, -0.0, 1e-30], dtype=np.float32)
    rng = np.random.default_rng(0)
    values = np.concatenate([edges, -edges, rng.normal(scale=10.0, size=4096).astype(np.float32),
                             rng.uniform(-65504, 65504, 4096).astype(np.float32)])
    with np.errstate(over="ignore"):
        expected = values.astype(np.float16)
    np.testing.assert_array_equal(_cast(values, np.dtype(np.float16)).view(np.uint16), expected.view(np.uint16))


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


def array_chunk_steps(store, name):
    """Steps per chunk of ``rgb/<name>`` in the store's first part, read from the file itself."""
    part = store.root / "parts" / store.part_names()[0]
    if store.backend == "zarr":
        return zarr.open_group(str(part), mode="r")[f"rgb/{name}"].chunks[0]
    with h5py.File(part, "r") as handle:
        return handle[f"rgb/{name}"].chunks[0]


def test_small_arrays_are_chunked_as_the_backend_reads_them_best_maps_by_one(store):
    rng = np.random.default_rng(5)
    # shard_steps 32: HDF5 has two pooled chunks of 16 a shard, zarr one (the shard). "broken" writes steps
    # 20..33 (one batch of 14), so the first shard is flushed before it is rolled back, and that shard is
    # re-buffered and written again with "b".
    videos = {"a": random_maps(rng, 20), "broken": random_maps(rng, 30), "b": random_maps(rng, 25),
              "c": random_maps(rng, 1)}
    write_part(store, videos, fail={"broken"}, shard_steps=32, batch=14)
    reopened = FeatureStore.open(store.root)
    small = {"hdf5": 16, "zarr": 32}[reopened.backend]
    assert [array_chunk_steps(reopened, name) for name in ("maps", "pooled", "steps")] == [1, small, small]
    for video_id in "abc":
        np.testing.assert_array_equal(reopened.read(video_id, "maps"), videos[video_id].astype(np.float16))
        np.testing.assert_allclose(reopened.read(video_id, "pooled"), videos[video_id].mean(axis=(1, 2)), rtol=1e-6)
        np.testing.assert_array_equal(reopened.read(video_id, "steps"), steps_for(len(videos[video_id])))
    np.testing.assert_array_equal(reopened.read("b", "pooled", steps=[24, 0, 15, 16]),
                                  reopened.read("b", "pooled")[[24, 0, 15, 16]])
    assert reopened.verify() == []


def test_info_json_sizes_and_compression_ratios_agree(store):
    rng = np.random.default_rng(6)
    write_part(store, {"a": random_maps(rng, 5), "b": random_maps(rng, 3), "x": random_maps(rng, 2)}, fail={"x"})
    result = CliRunner().invoke(main, ["store", "info", "--json", str(store.root)])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    parts = store.root / "parts"
    on_disk = sum(f.stat().st_size for f in parts.rglob("*") if f.is_file() and not f.name.startswith(".tmp"))
    steps, map_values, channels = 8, int(np.prod(MAP_SHAPE)), MAP_SHAPE[-1]
    assert (info["backend"], info["parts"], info["disk_bytes"]) == (store.backend, 1, on_disk)
    # per step: maps (float16 stored, float32 raw), pooled float32, steps 2 x int32
    assert info["raw_bytes_stored_dtype"] == steps * (map_values * 2 + channels * 4 + 8)
    assert info["raw_bytes_float32"] == steps * (map_values * 4 + channels * 4 + 8)
    assert info["compression_ratio"] == pytest.approx(info["raw_bytes_stored_dtype"] / on_disk)
    assert info["ratio_vs_float32"] == pytest.approx(info["raw_bytes_float32"] / on_disk)
    rgb = info["streams"]["rgb"]
    assert (rgb["videos"], rgb["steps"], rgb["partial"]) == (2, steps, 0)
    assert [f["video_id"] for f in rgb["failures"]] == ["x"]
    assert rgb["provenance"] == provenance()
    text = CliRunner().invoke(main, ["store", "info", str(store.root)]).output
    assert f"{info['compression_ratio']:.2f}x vs raw stored dtype" in text and "FAILED x" in text
