"""Extraction's memory (issue 20): a backend's libraries load only when used, the run frees its network, and the
heap trims (extract/heap.py) leave the stored bytes as they were."""
import gc
import json
import subprocess
import sys
import textwrap
import weakref
from pathlib import Path

import numpy as np
import pytest
from torch import nn

from conftest import gradient_frames, write_video
from extract.backbones import Preprocess, build_backbone
from extract.decode import open_source
from extract.heap import trim_heap
from extract.run import ExtractConfig, run_extract
from extract.store import FeatureStore
from test_extract_run import TINIER, TINY, row, write_manifest

REPO = Path(__file__).resolve().parents[1]
BACKEND_MODULES = ("zarr", "h5py", "hdf5plugin", "extract.store.zarr_part", "extract.store.hdf5_part")


def run_python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_importing_the_cli_loads_no_store_backend():
    loaded = json.loads(run_python(f"""
        import json, sys
        import pipelines.cli
        print(json.dumps([name for name in {BACKEND_MODULES!r} if name in sys.modules]))
        """))
    assert loaded == []


@pytest.mark.parametrize("backend, unused", [("zarr", ("h5py", "hdf5plugin", "extract.store.hdf5_part")),
                                             ("hdf5", ("zarr", "extract.store.zarr_part"))])
def test_an_extraction_imports_only_its_own_backend(tmp_path, backend, unused):
    write_video(tmp_path / "v.mp4", gradient_frames(6))
    manifest = write_manifest(tmp_path, [row("v.mp4")])
    arguments = ["extract", str(manifest), "--out", str(tmp_path / "store"), "--format", backend,
                 "--backbone", "resnet18", "--weights", "none", "--frame-size", "32", "--resize", "32",
                 "--device", "cpu"]
    loaded = json.loads(run_python(f"""
        import atexit, json, sys
        from pipelines.cli import main
        atexit.register(lambda: print(json.dumps([name for name in {BACKEND_MODULES!r} if name in sys.modules])))
        main({arguments!r})  # exits with the run's status
        """).splitlines()[-1])
    assert [name for name in unused if name in loaded] == []
    assert f"extract.store.{backend}_part" in loaded
    assert FeatureStore.open(tmp_path / "store").verify() == []


def test_the_run_frees_its_network_though_torch_fx_holds_it_in_cycles(tmp_path):
    """The folded network lives in reference cycles: only a collection frees it, which the run makes itself
    (before the heap trim that hands the memory back)."""
    backbone = build_backbone("resnet18", "none", Preprocess(32, 32), "cpu", keep_model=False)
    network = weakref.ref(backbone.network)
    enabled = gc.isenabled()
    gc.disable()  # only explicit collections from here on
    try:
        del backbone
        assert network() is not None  # the cycles keep it
        gc.collect()
        assert network() is None

        write_video(tmp_path / "v.mp4", gradient_frames(6))
        manifest = write_manifest(tmp_path, [row("v.mp4")])
        before = sum(issubclass(type(o), nn.Module) for o in gc.get_objects())
        run_extract(ExtractConfig(manifest=manifest, root=tmp_path, out=tmp_path / "store", **TINIER),
                    show_progress=False)
        assert sum(issubclass(type(o), nn.Module) for o in gc.get_objects()) == before
    finally:
        if enabled:
            gc.enable()


def test_trim_heap_returns_freed_heap_pages_to_the_system():
    if not trim_heap():
        pytest.skip("this C library has no malloc_trim")
    # In a fresh process: 64 KiB blocks come from the heap (below glibc's mmap threshold); one live block after
    # them keeps the freed ones off the top of the heap, from where glibc would return them by itself.
    freed_mb, trimmed_mb = map(float, run_python("""
        import numpy as np
        from extract.heap import trim_heap

        def rss_mb():
            with open("/proc/self/statm") as statm:
                return int(statm.read().split()[1]) * 4096 / 2**20

        blocks = [np.ones(8192) for _ in range(2000)]  # 64 KiB each, 125 MiB
        pin = np.ones(8192)
        del blocks
        freed = rss_mb()
        trim_heap()
        print(freed, rss_mb())
        """).split())
    assert freed_mb - trimmed_mb > 100



@pytest.mark.parametrize("steady", [False, True])
def test_a_steady_heap_serves_an_activation_sized_block_from_the_heap(steady):
    """glibc maps a fresh 20 MiB block on its own (its pages fault in anew each time one is allocated); after
    ``steady_heap`` (blocks up to 32 MiB kept in the heap) the same block lies in the process's [heap]."""
    in_heap = run_python(f"""
        import numpy as np
        from extract.heap import steady_heap
        if {steady}:
            assert steady_heap(), "this C library has no mallopt"
        block = np.ones(20 * 2**20 // 8)
        address = block.__array_interface__["data"][0]
        with open("/proc/self/maps") as maps:
            heap = [line.split()[0] for line in maps if line.rstrip().endswith("[heap]")]
        print(any(int(low, 16) <= address < int(high, 16) for low, high in (r.split("-") for r in heap)))
        """).strip()
    assert in_heap == str(steady)

@pytest.mark.parametrize("backend", ["zarr", "hdf5"])
def test_trimmed_runs_store_exactly_what_the_backbone_computes(tmp_path, backend):
    """A video longer than a shard (64 steps) is flushed, and the heap trimmed, mid-video; the stored bytes are
    those of the backbone run on the same batches of frames, and the content hashes verify."""
    write_video(tmp_path / "long.mp4", gradient_frames(90, seed=3))
    write_video(tmp_path / "short.mp4", gradient_frames(7, seed=4))
    manifest = write_manifest(tmp_path, [row("long.mp4"), row("short.mp4")])
    config = ExtractConfig(manifest=manifest, root=tmp_path, out=tmp_path / "store", format=backend,
                           **{**TINIER, "workers": 1})
    run_extract(config, show_progress=False)
    store = FeatureStore.open(tmp_path / "store")
    assert store.verify() == []
    backbone = build_backbone("resnet18", "none", Preprocess(32, 32), "cpu", keep_model=False)
    for name, frames in (("long", 90), ("short", 7)):
        source = open_source(tmp_path / f"{name}.mp4")
        maps = np.concatenate([backbone(source.read(np.arange(start, min(start + TINY["batch_size"], frames))))
                               .numpy() for start in range(0, frames, TINY["batch_size"])])
        np.testing.assert_array_equal(store.read(name, "maps"), maps.astype(np.float16))
        np.testing.assert_array_equal(store.read(name, "pooled"), maps.mean(axis=(1, 2), dtype=np.float32))
