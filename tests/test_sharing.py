"""Sharing stores: merge, diff, subset, pack, remote reads (a local HTTP server, fsspec memory), the store card.

Real tiny stores in tmp dirs; the HTTP server is python's http.server on 127.0.0.1 with byte ranges (which
fsspec needs, as every object store and web server serves them), started by the test; no external network.
"""
from __future__ import annotations

import json
import re
import shutil
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import fsspec
import numpy as np
import pytest
from click.testing import CliRunner

from conftest import make_feature_store
from extract.store import FeatureStore, StoreError
from pipelines.cli import main
from test_store import provenance, random_maps, write_part

BACKENDS = ["zarr", "hdf5"]
PACK = {"zarr": "zip", "hdf5": "tar"}


def invoke(*arguments: str):
    return CliRunner().invoke(main, list(arguments))


def new_store(path: Path, backend: str, videos: dict, fail=(), **features) -> FeatureStore:
    store = FeatureStore.create_or_open(path, backend, "rgb", provenance(**features))
    write_part(store, videos, fail=set(fail))
    return FeatureStore.open(path)


def all_maps(store: FeatureStore) -> dict:
    return {vid: store.read(vid, "maps") for vid in store.videos()}


@pytest.fixture
def halves(tmp_path, request):
    """Two half-stores as two clusters would write them: b in both (same bytes); x failed in A, stored in B."""
    backend_a, backend_b = getattr(request, "param", ("zarr", "zarr"))
    rng = np.random.default_rng(0)
    maps = {name: random_maps(rng, n) for name, n in (("a", 3), ("b", 5), ("c", 2), ("x", 4))}
    a = new_store(tmp_path / "a", backend_a, {"a": maps["a"], "b": maps["b"], "x": maps["x"]}, fail={"x"})
    b = new_store(tmp_path / "b", backend_b, {"b": maps["b"], "x": maps["x"], "c": maps["c"]})
    return a, b, maps


@pytest.mark.parametrize("halves", [("zarr", "zarr"), ("hdf5", "hdf5"), ("zarr", "hdf5")], indirect=True)
def test_merge_takes_shared_videos_once_clears_failures_and_verifies(halves, tmp_path):
    a, b, maps = halves
    result = invoke("store", "merge", str(tmp_path / "m"), str(a.root), str(b.root))
    assert result.exit_code == 0, result.output
    assert "1 video(s) present in several stores taken once" in result.output
    merged = FeatureStore.open(tmp_path / "m")
    assert sorted(merged.videos()) == ["a", "b", "c", "x"] and merged.failures() == []
    assert merged.backend == a.backend and merged.provenance() == a.provenance()
    for vid, expected in maps.items():
        np.testing.assert_array_equal(merged.read(vid, "maps"), expected.astype(np.float16))
        assert merged.video(vid).sha256 == (a.videos().get(vid) or b.video(vid)).sha256
    assert merged.meta["derived_from"]["operation"] == "merge" and merged.meta["shard_count"] == 1
    # A's part holds x's failure and is copied whole; B's part is rewritten without b (already taken from A).
    assert sorted(merged.part_names()) == ["part-s0of1-000000" + merged.suffix, "part-s0of1-000001" + merged.suffix]
    assert invoke("store", "verify", str(tmp_path / "m")).exit_code == 0


def test_merge_refuses_different_content_and_different_provenance(tmp_path):
    rng = np.random.default_rng(1)
    a = new_store(tmp_path / "a", "zarr", {"v": random_maps(rng, 2), "w": random_maps(rng, 2)})
    b = new_store(tmp_path / "b", "zarr", {"v": random_maps(rng, 2)})
    result = invoke("store", "merge", str(tmp_path / "m"), str(a.root), str(b.root))
    assert result.exit_code == 1 and "1 video(s) differ between stores" in result.output
    assert re.search(r"v \[rgb\]: .*a and .*b hold different content", result.output)
    other = new_store(tmp_path / "other", "zarr", {"w": random_maps(rng, 2)}, backbone="resnet18")
    result = invoke("store", "merge", str(tmp_path / "m2"), str(a.root), str(other.root))
    assert result.exit_code == 1 and "different provenance" in result.output
    assert "[rgb] backbone: the first has 'tiny', this one has 'resnet18'" in result.output
    assert not (tmp_path / "m2").exists() and not (tmp_path / "m" / "store.json").exists()


def test_diff_reports_provenance_membership_and_content(halves, tmp_path):
    a, b, _ = halves
    result = invoke("store", "diff", str(a.root), str(b.root))
    assert result.exit_code == 0, result.output
    assert "ONLY IN A [rgb] 1 video(s): a" in result.output and "ONLY IN B [rgb] 2 video(s): c, x" in result.output
    assert "compatible" in result.output.splitlines()[-1]
    rng = np.random.default_rng(2)
    changed = new_store(tmp_path / "changed", "zarr", {"b": random_maps(rng, 5)}, dtype="float32")
    result = invoke("store", "diff", str(a.root), str(changed.root))
    assert result.exit_code == 1
    assert "PROVENANCE [rgb] dtype: A has 'float16', B has 'float32'" in result.output
    assert "CONTENT DIFFERS [rgb] 1 video(s): b" in result.output and "NOT compatible" in result.output


@pytest.mark.parametrize("backend", BACKENDS)
def test_subset_by_domain_split_or_manifest_keeps_the_stored_bytes(tmp_path, backend):
    store_dir, manifest = make_feature_store(tmp_path, per_class=1, steps=3, backend=backend, classes=("a", "b"))
    source = FeatureStore.open(store_dir)
    result = invoke("store", "subset", str(store_dir), str(tmp_path / "tgt"), "--domain", "tgt", "--split", "test")
    assert result.exit_code == 0, result.output
    subset = FeatureStore.open(tmp_path / "tgt")
    assert sorted(subset.videos()) == ["tgt/test/a/0", "tgt/test/b/0"]
    for vid, record in subset.videos().items():
        assert record.sha256 == source.video(vid).sha256
        np.testing.assert_array_equal(subset.read(vid, "maps"), source.read(vid, "maps"))
    assert invoke("store", "verify", str(tmp_path / "tgt")).exit_code == 0
    lines = manifest.read_text().splitlines()
    (tmp_path / "two.csv").write_text("\n".join([lines[0], lines[1], lines[-1]]) + "\n")
    result = invoke("store", "subset", str(store_dir), str(tmp_path / "two"), "--manifest", str(tmp_path / "two.csv"))
    assert result.exit_code == 0, result.output
    assert sorted(FeatureStore.open(tmp_path / "two").videos()) == ["src/train/a/0", "tgt/test/b/0"]
    result = invoke("store", "subset", str(store_dir), str(tmp_path / "none"), "--domain", "nowhere")
    assert result.exit_code == 1 and "no stored video matches" in result.output


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_packed_store_is_read_and_verified_in_place(tmp_path, backend):
    rng = np.random.default_rng(3)
    store = new_store(tmp_path / "s", backend, {"a": random_maps(rng, 3), "b": random_maps(rng, 2), "x": random_maps(rng, 1)},
                      fail={"x"})
    packed = tmp_path / f"s.{PACK[backend]}"
    result = invoke("store", "pack", str(store.root), str(packed))
    assert result.exit_code == 0, result.output
    opened = FeatureStore.open(packed)
    assert opened.files.writable is False and [f["video_id"] for f in opened.failures()] == ["x"]
    for vid, expected in all_maps(store).items():
        np.testing.assert_array_equal(opened.read(vid, "maps"), expected)
    verify = invoke("store", "verify", str(packed))
    assert verify.exit_code == 0 and "2 videos checked, 0 problem(s)" in verify.output
    assert "# Feature store" in fsspec.filesystem(PACK[backend], fo=str(packed)).cat_file("README.md").decode()
    wrong = "tar" if backend == "zarr" else "zip"
    result = invoke("store", "pack", str(store.root), str(tmp_path / f"s.{wrong}"))
    assert result.exit_code == 1 and f"stores pack to .{PACK[backend]}, not .{wrong}" in result.output


def test_a_damaged_store_is_not_packed(tmp_path):
    from test_store import flip_byte_in_first_chunk

    rng = np.random.default_rng(4)
    store = new_store(tmp_path / "s", "zarr", {"a": random_maps(rng, 2)})
    flip_byte_in_first_chunk(store)
    result = invoke("store", "pack", str(store.root), str(tmp_path / "s.zip"))
    assert result.exit_code == 1 and "does not match the sha256 recorded at commit" in result.output
    assert not (tmp_path / "s.zip").exists()


class RangeRequestHandler(SimpleHTTPRequestHandler):
    """http.server with single byte ranges (fsspec reads parts by range), counting the requests it serves."""

    requests: list[str]

    def send_head(self):
        self.requests.append(f"{self.command} {self.path}")
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", ""))
        path = Path(self.translate_path(self.path))
        if not match or not path.is_file():
            return super().send_head()
        size = path.stat().st_size
        start, end = match.groups()
        start, end = (int(start), min(int(end or size - 1), size - 1)) if start else (size - int(end), size - 1)
        handle = open(path, "rb")
        handle.seek(start)
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        self.range_left = end - start + 1
        return handle

    def copyfile(self, source, outputfile):
        left = getattr(self, "range_left", None)
        outputfile.write(source.read(left) if left is not None else source.read())

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def http_root(tmp_path):
    """(served directory, base URL, list of requests served) of a server on 127.0.0.1, stopped afterwards."""
    served = tmp_path / "served"
    served.mkdir()
    handler = type("Handler", (RangeRequestHandler,), {"requests": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(served)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_port}", handler.requests
    server.shutdown()
    server.server_close()


def three_part_store(path: Path, backend: str) -> FeatureStore:
    rng = np.random.default_rng(5)
    store = FeatureStore.create_or_open(path, backend, "rgb", provenance())
    for i in range(3):
        write_part(store, {f"v{i}": random_maps(rng, 3)})
    store.rebuild_index()  # as an extraction does when it ends: index.json is what remote readers open
    return FeatureStore.open(path)


@pytest.mark.parametrize("backend", BACKENDS)
def test_remote_open_costs_two_requests_and_reads_verify(http_root, tmp_path, backend):
    served, base, requests = http_root
    local = three_part_store(served / "store", backend)
    remote = FeatureStore.open(f"{base}/store")
    assert sorted(remote.videos()) == ["v0", "v1", "v2"]
    assert len(requests) == 2, requests  # store.json and index.json: not one per part
    requests.clear()
    np.testing.assert_array_equal(remote.read("v1", "maps"), local.read("v1", "maps"))
    if backend == "zarr":  # the part's consolidated zarr.json, then the shard index and the shard of each array
        assert sum("zarr.json" in r for r in requests) == 1, requests
    verify = invoke("store", "verify", f"{base}/store")
    assert verify.exit_code == 0 and "3 videos checked, 0 problem(s)" in verify.output
    info = json.loads(invoke("store", "info", "--json", f"{base}/store").output)
    assert info["disk_bytes"] == local.disk_bytes() and info["streams"]["rgb"]["videos"] == 3


def test_a_remote_packed_store_with_a_local_cache(http_root, tmp_path):
    served, base, requests = http_root
    local = three_part_store(tmp_path / "store", "hdf5")
    assert invoke("store", "pack", str(local.root), str(served / "store.tar")).exit_code == 0
    cache = tmp_path / "cache"
    remote = FeatureStore.open(f"{base}/store.tar", cache=cache)
    np.testing.assert_array_equal(remote.read("v2", "maps"), local.read("v2", "maps"))
    assert any(cache.iterdir())  # the archive is now a local copy
    requests.clear()
    again = FeatureStore.open(f"{base}/store.tar", cache=cache)
    np.testing.assert_array_equal(again.read("v0", "pooled"), local.read("v0", "pooled"))
    assert not any(r.startswith("GET") for r in requests), requests


def test_train_reads_a_store_over_http(http_root, tmp_path, one_thread):
    served, base, _ = http_root
    FeatureStore.open(make_feature_store(served, per_class=2, steps=3, classes=("a", "b"))[0]).rebuild_index()
    result = invoke("train", "--store", f"{base}/store", "--manifest", str(served / "manifest.csv"), "--head",
                    "tempooling", "--source", "src", "--target", "tgt", "--out", str(tmp_path / "run"),
                    "--workers", "0", "--set", "epochs=1", "--features", "stream",
                    "--feature-cache", str(tmp_path / "copies"))
    assert result.exit_code == 0, result.output
    record = (tmp_path / "run" / "config.yaml").read_text()
    assert f"path: {base}/store" in record
    # Streamed: each set read once into a local disk copy, which the epochs index.
    assert f"3 of 3 sets in mapped files in {tmp_path / 'copies'}" in (tmp_path / "run" / "train.log").read_text()
    assert len(list((tmp_path / "copies").glob("*.npy"))) == 3
    from_store = invoke("train", "--store", f"{base}/store", "--manifest", str(served / "manifest.csv"), "--head",
                        "tempooling", "--source", "src", "--target", "tgt", "--out", str(tmp_path / "run2"),
                        "--workers", "0", "--set", "epochs=1", "--features", "stream", "--feature-cache", "none")
    assert from_store.exit_code == 0, from_store.output
    assert "3 of 3 sets streamed from the store by workers" in (tmp_path / "run2" / "train.log").read_text()
    assert json.loads((tmp_path / "run2" / "metrics.json").read_text())["epochs"] == \
        json.loads((tmp_path / "run" / "metrics.json").read_text())["epochs"]


def test_a_store_in_an_fsspec_memory_filesystem(tmp_path):
    local = three_part_store(tmp_path / "store", "zarr")
    memory = fsspec.filesystem("memory")
    memory.put(str(local.root), "/shared/store", recursive=True)
    remote = FeatureStore.open("memory://shared/store")
    np.testing.assert_array_equal(remote.read("v0", "maps"), local.read("v0", "maps"))
    assert remote.verify() == []
    memory.rm("/shared/store/index.json")  # rebuilt in memory from the listed parts
    assert sorted(FeatureStore.open("memory://shared/store").videos()) == ["v0", "v1", "v2"]
    memory.rm("/shared", recursive=True)


def test_zarr_parts_consolidate_their_metadata(tmp_path):
    store = three_part_store(tmp_path / "store", "zarr")
    root = json.loads((store.root / "parts" / store.part_names()[0] / "zarr.json").read_text())
    assert {"rgb/maps", "rgb/pooled", "rgb/steps", "table"} <= root["consolidated_metadata"]["metadata"].keys()


def card_recipe(card: str) -> str:
    return re.search(r"```python\n(.*?)```", card, re.S).group(1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_card_describes_the_store_and_its_recipe_reads_it_without_vidshift(tmp_path, backend, monkeypatch):
    store_dir, _ = make_feature_store(tmp_path, per_class=1, steps=3, backend=backend, classes=("a", "b"))
    result = invoke("store", "info", "--card", str(store_dir))
    assert result.exit_code == 0, result.output
    card = (store_dir / "README.md").read_text()
    assert "LICENCE: (to fill in" in card and "| tgt | test | 2 |" in card and "- name: `synthetic`" in card
    recipe = card_recipe(card)
    assert "vidshift" not in recipe and "extract" not in recipe
    monkeypatch.chdir(store_dir)
    namespace: dict = {}
    exec(compile(recipe, "README.md", "exec"), namespace)  # noqa: S102 - the card's own instructions
    if backend == "hdf5":
        namespace["part"].close()  # HDF5 refuses a second open of a file with other locking flags
    store = FeatureStore.open(store_dir)
    video = namespace["video"]
    np.testing.assert_array_equal(namespace["maps"], store.read(video, "maps"))
    np.testing.assert_array_equal(namespace["pooled"], store.read(video, "pooled"))
    np.testing.assert_array_equal(namespace["steps"], store.read(video, "steps"))


def test_the_zip_recipe_of_the_card_reads_a_packed_zarr_store(tmp_path):
    import zarr

    store = three_part_store(tmp_path / "store", "zarr")
    invoke("store", "pack", str(store.root), str(tmp_path / "s.zip"))
    row = store.index()["videos"]["rgb"]["v1"]
    group = zarr.open_group(zarr.storage.ZipStore(tmp_path / "s.zip", mode="r"), path=f"parts/{row['part']}", mode="r")
    np.testing.assert_array_equal(group["rgb/maps"][row["offset"]: row["offset"] + row["n_steps"]],
                                  store.read("v1", "maps"))


def test_read_only_stores_cannot_get_a_card_and_missing_stores_are_named(tmp_path):
    store = three_part_store(tmp_path / "store", "zarr")
    invoke("store", "pack", str(store.root), str(tmp_path / "s.zip"))
    result = invoke("store", "info", "--card", str(tmp_path / "s.zip"))
    assert result.exit_code == 1 and "read-only here" in result.output
    with pytest.raises(StoreError, match="not a vidshift feature store"):
        FeatureStore.open("memory://nothing/here")
    shutil.rmtree(store.root)
