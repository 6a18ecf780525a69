"""EPIC-Kitchens manifest builders (MM-SADA pickles, STDN's DG lists) and the safe pickle loader, on small fake
frame trees and split files in the datasets' real formats (pandas 1.x and Python 2 pickles included)."""
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

from conftest import rows_by_id
from data_manifests.epic_kitchens import build_epic_kitchens_dg_from_lists
from data_manifests.pickles import PickleRefused, load_pickle, load_table
from extract.run import ExtractConfig, run_extract
from extract.store import FeatureStore
from pipelines.cli_data import manifest


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
