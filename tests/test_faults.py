"""Fault injection: a full disk, read-only places, flipped bytes in every kind of store file, bad inputs.

Every fault must end in a message naming the file or option and what to do (exit 1, no traceback), lose
nothing already committed, and never let damaged features through. Real files and real flips throughout;
disk errors come from the kernel (a file-size limit, in a subprocess) or are injected at vidshift's own
write layer, never by mocking zarr or h5py.
"""
import errno
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import gradient_frames, make_feature_store, write_video
from extract.backbones import safe_load
from extract.run import ExtractConfig, run_extract
from extract.store import FeatureStore, StoreError
from extract.store import hdf5_part, zarr_part
from extract.store.summary import human_bytes
from pipelines.cli import main
from test_extract_run import TINIER, row, write_manifest
from test_store import provenance, random_maps, write_part

BACKENDS = ["zarr", "hdf5"]
REPO = Path(__file__).resolve().parent.parent
EXTRACT_OPTIONS = ["--backbone", "resnet18", "--weights", "none", "--frame-size", "32", "--resize", "32",
                   "--batch-size", "4"]

pytestmark = pytest.mark.usefixtures("one_thread")


def invoke(*arguments: str):
    return CliRunner().invoke(main, [str(argument) for argument in arguments])


def assert_clean_error(result, *expected: str) -> None:
    """Exit 1 with a message (no traceback) that contains every ``expected`` text."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and not isinstance(result.exception, (TypeError, AttributeError))
    for text in expected:
        assert text in result.output, result.output


@pytest.fixture
def videos(tmp_path):
    """Six short real videos and their manifest: (root, manifest)."""
    root = tmp_path / "data"
    for i in range(6):
        write_video(root / f"v{i}.mp4", gradient_frames(4 + i, seed=i))
    return root, write_manifest(root, [row(f"v{i}.mp4") for i in range(6)])


def extract_config(videos, out: Path, backend: str, **changes) -> ExtractConfig:
    root, manifest = videos
    return ExtractConfig(manifest=manifest, root=root, out=out, format=backend, videos_per_part=2,
                         **{**TINIER, **changes})


def committed(store_dir: Path) -> list[str]:
    return sorted(path.name for path in (store_dir / "parts").glob("part-*") if not path.name.endswith(".json"))


# ---- a full disk, a read-only file system ------------------------------------------------------------------

def fail_writes_of_the_third_part(monkeypatch, backend: str, code: int) -> None:
    """Make vidshift's own write layer fail with ``code`` once two parts are committed (a disk that fills up).

    HDF5: where the part's bytes reach the OS, below libhdf5 (as a real full disk does). zarr: the part
    writer's write, above zarr's file store.
    """
    def full(store_dir_of) -> bool:
        return len(committed(store_dir_of)) >= 2

    if backend == "hdf5":
        original = hdf5_part._DeferredErrorFile._write_to_disk

        def write_to_disk(self, data):
            if full(Path(self.name).parent.parent):
                raise OSError(code, os.strerror(code))
            return original(self, data)
        monkeypatch.setattr(hdf5_part._DeferredErrorFile, "_write_to_disk", write_to_disk)
    else:
        original = zarr_part.ZarrPartWriter.write

        def write(self, stream, name, start, rows):
            if full(Path(str(self.group.store.root)).parent.parent):
                raise OSError(code, os.strerror(code))
            return original(self, stream, name, start, rows)
        monkeypatch.setattr(zarr_part.ZarrPartWriter, "write", write)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_a_disk_failure_mid_part_rolls_it_back_and_a_rerun_resumes(videos, tmp_path, monkeypatch, backend, code):
    out = tmp_path / "store"
    fail_writes_of_the_third_part(monkeypatch, backend, code)
    result = invoke("extract", videos[1], "--out", out, "--format", backend, "--videos-per-part", 2,
                    *EXTRACT_OPTIONS)
    assert_clean_error(result, os.strerror(code), "The part being written was rolled back",
                       "the 2 committed part(s) (4 videos) are intact",
                       "rerunning the same command resumes with the 2 video(s) left")
    if code == errno.ENOSPC:  # how much space the rest needs: bytes per video so far x videos left
        per_video = FeatureStore.open(out).disk_bytes() / 4
        assert "which need about" in result.output
        assert f"about {human_bytes(2 * per_video)} more ({human_bytes(per_video)} per video so far)" in result.output
    else:
        assert "read-only" in result.output and "need about" not in result.output
    assert committed(out) == [f"part-s0of1-00000{i}{'.zarr' if backend == 'zarr' else '.h5'}" for i in (0, 1)]
    assert not list((out / "parts").glob(".tmp-*"))
    assert FeatureStore.open(out).verify() == []
    monkeypatch.undo()  # space freed: the same command finishes the job
    summary = run_extract(extract_config(videos, out, backend), show_progress=False)
    assert (summary.skipped, summary.extracted, summary.exit_code) == (4, 2, 0)
    store = FeatureStore.open(out)
    assert len(store.videos()) == 6 and store.verify() == []


LIMITED_EXTRACT = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG instead of killing
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), int(sys.argv[1])))
from pipelines.cli import main
main(sys.argv[2:])
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_writes_the_kernel_refuses_end_in_a_message_not_a_crash(tmp_path, backend):
    """A real write failure from the kernel (a file-size limit: what root cannot override, unlike chmod) in
    zarr's and libhdf5's own writes. HDF5 used to segfault (exit 139) here after printing error stacks."""
    root = tmp_path / "data"
    rows = []
    for i in range(4):  # two short videos fit the limit, the long ones do not
        write_video(root / f"v{i}.mp4", gradient_frames(3 if i < 2 else 40, seed=i))
        rows.append(row(f"v{i}.mp4"))
    manifest = write_manifest(root, rows)
    out = tmp_path / "store"
    arguments = ["extract", manifest, "--out", out, "--format", backend, "--videos-per-part", 1, *EXTRACT_OPTIONS]
    result = subprocess.run([sys.executable, "-c", LIMITED_EXTRACT, str(40_000), *map(str, arguments)],
                            env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr and "HDF5-DIAG" not in result.stderr
    assert "File too large" in result.stderr and "the 2 committed part(s) (2 videos) are intact" in result.stderr
    assert not list((out / "parts").glob(".tmp-*"))
    store = FeatureStore.open(out)
    assert sorted(store.videos()) == ["v0", "v1"] and store.verify() == []


ROOT_IGNORES_PERMISSIONS = pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")


@ROOT_IGNORES_PERMISSIONS
def test_extract_and_train_into_a_read_only_directory(videos, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        result = invoke("extract", videos[1], "--out", locked / "store", *EXTRACT_OPTIONS)
        assert_clean_error(result, str(locked / "store"), "Permission denied", "use a writable directory")
        store, manifest = make_feature_store(tmp_path / "features", per_class=2)
        result = invoke("train", "--store", store, "--manifest", manifest, "--head", "tempooling", "--source",
                        "src", "--out", locked / "run", "--set", "epochs=1")
        assert_clean_error(result, str(locked / "run"), "Permission denied")
    finally:
        locked.chmod(0o755)


def test_train_into_a_path_that_cannot_be_a_directory(tmp_path):
    store, manifest = make_feature_store(tmp_path / "features", per_class=2)
    (tmp_path / "file").write_text("not a directory")
    result = invoke("train", "--store", store, "--manifest", manifest, "--head", "tempooling", "--source", "src",
                    "--out", tmp_path / "file" / "run", "--set", "epochs=1")
    assert_clean_error(result, str(tmp_path / "file"), "Not a directory; check the path")


# ---- flipped bytes ----------------------------------------------------------------------------------------

def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def small_store(tmp_path: Path, backend: str) -> FeatureStore:
    store = FeatureStore.create_or_open(tmp_path / "store", backend, "rgb", provenance())
    rng = np.random.default_rng(0)
    write_part(store, {"first": random_maps(rng, 3), "second": random_maps(rng, 5)})
    FeatureStore.open(store.root).videos()  # writes index.json
    return FeatureStore.open(store.root)


def hdf5_offset(part: Path, kind: str) -> int:
    """Where in an HDF5 part a kind of content lives: the first maps chunk, the table's chunk, maps' header."""
    with h5py.File(part, "r") as handle:
        if kind == "data chunk":
            return handle["rgb/maps"].id.get_chunk_info(0).byte_offset + 5
        if kind == "video table":
            return handle["table"].id.get_chunk_info(0).byte_offset + 5
        return h5py.h5o.get_info(handle["rgb/maps"].id).addr + 8  # past the "OHDR" signature and version


def flip_kind(store: FeatureStore, kind: str) -> str:
    """Flip one byte of ``kind`` in ``store``; return the file flipped, relative to the part or the store."""
    part = store.root / "parts" / store.part_names()[0]
    if kind in ("index.json", "store.json"):
        text = (store.root / kind).read_text()
        flip(store.root / kind, text.index('"tiny"' if kind == "store.json" else '"second"') + 2)  # a value's letter
        return kind
    if kind == "part digests":
        target = part.with_name(part.name + ".sha256.json")
        flip(target, target.read_text().index(": ") + 5)
        return target.name
    if store.backend == "hdf5":
        flip(part, hdf5_offset(part, kind))
        return part.name
    relative = {"data chunk": "rgb/maps/c/0/0/0/0", "video table": "table/c/0", "array metadata": "rgb/maps/zarr.json"}
    target = part / relative[kind]
    # array metadata: a letter of a dimension name, a change zarr reads without complaint
    flip(target, target.read_text().index('"step"') + 2 if kind == "array metadata" else 5)
    return f"{part.name}/{relative[kind]}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind, expected", [
    ("data chunk", ["video first ("]),
    ("array metadata", {"zarr": ["rgb/maps/zarr.json differs from the digest recorded at commit"],
                        "hdf5": ["video first (", "video second ("]}),
    ("video table", ["video table unreadable (", "its videos: first, second; delete the part"]),
    ("part digests", ["differs from the digest recorded at commit in part-s0of1-000000.{suffix}.sha256.json"]),
    ("index.json", ["index.json: damaged: its checksum does not match", "rebuilt it from the parts"]),
    ("store.json", ["store.json: damaged: its checksum does not match", "provenance cannot be trusted"]),
])
def test_verify_catches_a_flip_in_every_kind_of_file_naming_the_video_or_file(tmp_path, backend, kind, expected):
    store = small_store(tmp_path, backend)
    flip_kind(store, kind)
    result = invoke("store", "verify", store.root)
    assert result.exit_code == 1, result.output
    suffix = "zarr" if backend == "zarr" else "h5"
    for text in expected[backend] if isinstance(expected, dict) else expected:
        assert f"BAD {text.format(suffix=suffix)}" in result.output or text.format(suffix=suffix) in result.output, \
            result.output
    if kind == "index.json":  # repaired: a second verify is clean
        assert invoke("store", "verify", store.root).exit_code == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_single_byte_flip_anywhere_in_a_part_goes_unnoticed(tmp_path, backend):
    """Flips spread over every file of a part: each is reported, by video or by the part's file."""
    store = small_store(tmp_path, backend)
    part = store.root / "parts" / store.part_names()[0]
    files = sorted(f for f in part.rglob("*") if f.is_file()) if part.is_dir() else [part]
    original = {f: f.read_bytes() for f in files}
    for path, data in original.items():
        for offset in np.linspace(0, len(data) - 1, 3 if backend == "zarr" else 40).astype(int):
            flip(path, offset)
            problems = FeatureStore.open(store.root).verify()
            path.write_bytes(data)
            assert problems, f"flip at {path.relative_to(store.root)}@{offset} went unnoticed"
            assert all(p.startswith(("video first", "video second", f"part {part.name}")) for p in problems), problems
    assert FeatureStore.open(store.root).verify() == []


def test_a_damaged_or_missing_index_is_rebuilt_with_a_warning(tmp_path, caplog):
    store = small_store(tmp_path, "zarr")
    index = store.root / "index.json"
    for damage in (lambda: flip(index, index.read_text().index('"second"') + 2), index.unlink):
        damage()
        with caplog.at_level(logging.WARNING, logger="extract.store.store"):
            assert sorted(FeatureStore.open(store.root).videos()) == ["first", "second"]
        assert f"{index}: " in caplog.text and "rebuilt it from the 1 part(s), nothing is lost" in caplog.text
        caplog.clear()
        assert json.loads(index.read_text())["sha256"]  # written again, with its checksum
        with caplog.at_level(logging.WARNING, logger="extract.store.store"):
            FeatureStore.open(store.root).videos()
        assert caplog.text == ""


def test_a_garbage_or_changed_store_json_is_named(tmp_path):
    store = small_store(tmp_path, "hdf5")
    meta = store.root / "store.json"
    flip(meta, meta.read_text().index('"tiny"') + 2)
    assert_clean_error(invoke("store", "info", store.root), f"{meta}: damaged: its checksum does not match",
                       "restore store.json from a copy")
    meta.write_bytes(b"\x00\xffnot json")
    assert_clean_error(invoke("store", "info", store.root), f"{meta}: damaged, not valid JSON")
    assert_clean_error(invoke("store", "verify", store.root), f"{meta}: damaged, not valid JSON")


@pytest.fixture
def trained_run(tmp_path):
    store, manifest = make_feature_store(tmp_path / "features", per_class=2)
    result = invoke("train", "--store", store, "--manifest", manifest, "--head", "tempooling", "--source", "src",
                    "--out", tmp_path / "run", "--set", "epochs=1", "--set", "batch_size=4", "--workers", 0)
    assert result.exit_code == 0, result.output
    return store, manifest, tmp_path / "run"


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_on_a_store_with_a_flipped_chunk_fails_naming_the_video(tmp_path, backend):
    store, manifest = make_feature_store(tmp_path / "features", per_class=2, backend=backend)
    part = store / "parts" / FeatureStore.open(store).part_names()[0]
    if backend == "zarr":
        flip(part / "rgb" / "pooled" / "c" / "0" / "0", 5)
    else:
        with h5py.File(part, "r") as handle:
            offset = handle["rgb/pooled"].id.get_chunk_info(0).byte_offset + 5
        flip(part, offset)
    result = invoke("train", "--store", store, "--manifest", manifest, "--head", "tempooling", "--source", "src",
                    "--out", tmp_path / "run", "--set", "epochs=1", "--workers", 0)
    assert_clean_error(result, "cannot read 'pooled' of video 'src/train/a/0'", "The store is damaged",
                       f"vidshift store verify {store}")
    assert not (tmp_path / "run" / "best.pt").exists()


def test_a_tampered_checkpoint_is_refused_without_advising_weights_only_false(trained_run, tmp_path):
    store, manifest, run = trained_run
    marker = tmp_path / "code_ran"

    class RunsCode:
        def __reduce__(self):
            return os.mkdir, (str(marker),)

    torch.save({"head": {}, "payload": RunsCode()}, run / "best.pt")
    with pytest.raises(ValueError) as refused:
        safe_load(run / "best.pt")
    message = str(refused.value)
    assert message.startswith(f"{run / 'best.pt'}: refused, not a checkpoint or weights file written by vidshift")
    assert "GLOBAL posix.mkdir" in message and "it was not unpickled" in message
    assert "weights_only=False" not in message and "weights_only` set to `False" not in message
    result = invoke("eval", run, "--store", store, "--manifest", manifest, "--domain", "src", "--workers", 0)
    assert_clean_error(result, "not a checkpoint or weights file written by vidshift", "it was not unpickled")
    assert "False" not in result.output and not marker.exists()


# ---- shard layouts ----------------------------------------------------------------------------------------

def test_a_second_shard_layout_is_refused(videos, tmp_path):
    out = tmp_path / "store"
    assert run_extract(extract_config(videos, out, "zarr", shard="0/2"), show_progress=False).exit_code == 0
    result = invoke("extract", videos[1], "--out", out, "--shard", "0/1", *EXTRACT_OPTIONS)
    assert_clean_error(result, f"{out} is filled by 2 shard(s) (--shard K/2), so --shard 0/1 would store videos "
                               f"twice; use --shard K/2 with K in 0..1")
    assert run_extract(extract_config(videos, out, "zarr", shard="1/2"), show_progress=False).exit_code == 0
    store = FeatureStore.open(out)
    assert len(store.videos()) == 6 and store.verify() == [] and store.meta["shard_count"] == 2


def test_a_store_made_before_the_layout_was_recorded_is_read_from_its_part_names(videos, tmp_path):
    out = tmp_path / "store"
    run_extract(extract_config(videos, out, "zarr", shard="1/3"), show_progress=False)
    store = FeatureStore.open(out)
    store._update_meta(lambda meta: meta.pop("shard_count"))  # as an older vidshift left it
    with pytest.raises(StoreError, match=r"is filled by 3 shard\(s\)"):
        run_extract(extract_config(videos, out, "zarr", shard="0/2"), show_progress=False)


# ---- bad input --------------------------------------------------------------------------------------------

def manifest_file(tmp_path: Path, content: bytes) -> Path:
    path = tmp_path / "manifest.csv"
    path.write_bytes(b"path,label,domain,split\n" + content)
    return path


@pytest.mark.parametrize("content, expected", [
    (b"a.mp4,caf\xe9,d,train\n", "manifest.csv:2: byte 0xe9 at column 10 is not UTF-8"),
    (bytes(range(256)) * 4, "is not UTF-8 (invalid start byte); save the manifest as UTF-8 text"),
    (b'a.mp4,"a,d,train\nb.mp4,b,d,train\n', "manifest.csv:2, column label: unbalanced quote (\"): the quoted "
                                               "cell runs on to line 3"),
])
def test_unreadable_manifests_name_the_line(tmp_path, content, expected):
    result = invoke("extract", manifest_file(tmp_path, content), "--out", tmp_path / "store")
    assert_clean_error(result, expected)


@pytest.mark.parametrize("options, expected", [
    (["--batch-size", "0"], "--batch-size 0: must be at least 1 (frames per backbone call)"),
    (["--videos-per-part", "0"], "--videos-per-part 0: must be at least 1"),
    (["--workers", "0"], "--workers 0: must be at least 1"),
    (["--frame-size", "0"], "--frame-size 0: must be at least 1"),
    (["--frame-size", "64", "--resize", "32"], "--resize 32: must be at least --frame-size (64)"),
    (["--shard", "2/2"], "--shard '2/2': need N >= 1 and K in 0..N-1"),
    (["--shard", "0/0"], "--shard '0/0': need N >= 1"),
    (["--fps", "0"], "--fps 0.0: the frame rate of frame directories must be a number > 0"),
    (["--sampling", "uniform:0"], "invalid sampling 'uniform:0'"),
    (["--seed", "-1"], "--seed -1: must be 0 or more"),
    (["--batch-size", "many"], "Invalid value for '--batch-size': 'many' is not a valid integer"),
])
def test_extract_options_are_range_checked_before_any_work(videos, tmp_path, options, expected):
    result = invoke("extract", videos[1], "--out", tmp_path / "store", *options)
    assert_clean_error(result, expected)
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize("options, expected", [
    (["--videos-per-class", "0"], "--videos-per-class 0 (SynthConfig.videos_per_class): need at least 3"),
    (["--frames", "1"], "--frames 1 (SynthConfig.num_frames): motion needs at least 2 frames"),
    (["--frame-size", "8"], "--frame-size 8 (SynthConfig.frame_size): use 16 or more pixels"),
    (["--seed", "-1"], "--seed -1 (SynthConfig.seed): must be 0 or more"),
])
def test_synth_options_are_range_checked(tmp_path, options, expected):
    assert_clean_error(invoke("synth", tmp_path / "out", *options), expected)


@pytest.mark.parametrize("config, assignment, expected", [
    (b"lr: [0.1\nepochs: 3\n", None, "--config {config}: not valid YAML (expected ',' or ']', but got ':' at "
                                     "line 2, column 7)"),
    (b"lr: \xff\n", None, "--config {config}: not valid YAML (unacceptable character #x00ff"),
    (None, "lr=[0.1", "--set 'lr=[0.1': not valid YAML"),
])
def test_malformed_hyper_parameters_name_the_file_and_place(tmp_path, config, assignment, expected):
    store, manifest = make_feature_store(tmp_path / "features", per_class=2)
    arguments = ["train", "--store", store, "--manifest", manifest, "--head", "tempooling", "--source", "src",
                 "--out", tmp_path / "run"]
    path = tmp_path / "hparams.yaml"
    if config is not None:
        path.write_bytes(config)
        arguments += ["--config", path]
    else:
        arguments += ["--set", assignment]
    assert_clean_error(invoke(*arguments), expected.format(config=path))


def test_debug_shows_the_traceback(videos, tmp_path):
    result = invoke("--debug", "extract", videos[1], "--out", tmp_path / "store", "--batch-size", "0")
    assert result.exit_code == 1 and isinstance(result.exception, ValueError)
    assert "--batch-size 0" in str(result.exception)
