"""The store's writer threads (HDF5: chunks compressed in a pool and written directly; zarr: its codec pipeline's
threads) store exactly what one thread stores, readable and checked by the existing reader."""
from dataclasses import replace

import h5py
import numpy as np
import pytest

from conftest import gradient_frames, write_video
from extract.run import ExtractConfig, run_extract
from extract.store import FeatureStore
from extract.store.hdf5_part import Hdf5PartWriter, fletcher32
from test_extract_run import TINY, row, write_manifest


@pytest.mark.parametrize("backend", ["zarr", "hdf5"])
def test_writer_threads_store_what_one_thread_stores(tmp_path, backend, one_thread):
    root = tmp_path / "data"
    for i in range(3):
        write_video(root / f"v{i}.mp4", gradient_frames(30 + i, seed=i))
    manifest = write_manifest(root, [row(f"v{i}.mp4") for i in range(3)])
    config = ExtractConfig(manifest=manifest, root=root, out=tmp_path / "one", format=backend, writer_threads=1,
                           **{**TINY, "frame_size": 32, "resize": 32})
    run_extract(config, show_progress=False)
    run_extract(replace(config, out=tmp_path / "three", writer_threads=3), show_progress=False)
    one, three = FeatureStore.open(tmp_path / "one"), FeatureStore.open(tmp_path / "three")
    assert three.verify() == []  # chunk checksums (fletcher32 / crc32c) and content hashes hold
    for video_id, record in one.videos().items():
        assert three.video(video_id).sha256 == record.sha256
        for array in ("maps", "pooled", "steps"):
            np.testing.assert_array_equal(three.read(video_id, array), one.read(video_id, array))


def test_direct_hdf5_chunks_carry_the_checksum_libhdf5_computes(tmp_path):
    rows = np.maximum(np.random.default_rng(0).normal(size=(37, 3, 3, 8)), 0).astype(np.float16)
    for threads, name in ((1, "library.h5"), (2, "direct.h5")):
        writer = Hdf5PartWriter(tmp_path / name, 64, threads)
        writer.create("rgb", "maps", (3, 3, 8), "float16", 4)
        writer.write("rgb", "maps", 0, rows[:32])
        writer.write("rgb", "maps", 32, rows[32:])  # a short last chunk: padded with the fill value
        writer.truncate("rgb", "maps", 37)
        writer.finish({"videos": []})
    with h5py.File(tmp_path / "library.h5") as library, h5py.File(tmp_path / "direct.h5") as direct:
        np.testing.assert_array_equal(direct["rgb/maps"][:], rows)
        lengths = set()
        for first in range(0, 40, 4):
            ours = direct["rgb/maps"].id.read_direct_chunk((first, 0, 0, 0))[1]
            theirs = library["rgb/maps"].id.read_direct_chunk((first, 0, 0, 0))[1]
            assert fletcher32(theirs[:-4]) == theirs[-4:] and fletcher32(ours[:-4]) == ours[-4:]
            lengths.add(len(theirs) % 2)
    assert lengths == {0, 1}  # both the even and the odd-length branch of the checksum were checked
