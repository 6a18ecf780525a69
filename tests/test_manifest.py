"""Manifest parsing: valid rows, segments, attributes, and errors that name file, line and column."""
from pathlib import Path

import pytest

from extract.manifest import ManifestError, default_video_id, read_manifest


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "manifest.csv"
    path.write_text(text)
    return path


def test_rows_ids_segments_and_attributes(tmp_path):
    path = write(tmp_path, "path,label,domain,split,video_id,start_frame,end_frame,camera\n"
                           "ucf/climb/v 1.mp4,climb,ucf,train,,,,C001\n"
                           "/abs/frames/P01_01,open,D1,test,P01_01_3,10,42,\n")
    first, segment = read_manifest(path)
    assert first.video_id == "ucf/climb/v 1" and first.start_frame is None
    assert first.attrs == {"camera": "C001"} and first.resolve(tmp_path) == tmp_path / "ucf/climb/v 1.mp4"
    assert (segment.video_id, segment.start_frame, segment.end_frame) == ("P01_01_3", 10, 42)
    assert segment.resolve(tmp_path) == Path("/abs/frames/P01_01")
    assert segment.attributes()["domain"] == "D1"


def test_default_video_id_is_posix_without_extension():
    assert default_video_id("a\\b\\c.avi") == "a/b/c"
    assert default_video_id("frames/dir") == "frames/dir"


@pytest.mark.parametrize("body, expected", [
    ("a.mp4,x,d,train\nb.mp4,x,d,bogus\n", ":3, column split: unknown split 'bogus'"),
    ("a.mp4,x,d,train\na.mp4,y,d,val\n", ":3, column video_id: duplicate video_id 'a' (first on line 2)"),
    ("a.mp4,,d,train\n", ":2, column label: empty value"),
    ("a.mp4,x,d,train,extra\n", ":2, column (extra)"),
])
def test_errors_name_line_and_column(tmp_path, body, expected):
    path = write(tmp_path, "path,label,domain,split\n" + body)
    with pytest.raises(ManifestError) as error:
        read_manifest(path)
    assert str(error.value).startswith(str(path)) and expected in str(error.value)


@pytest.mark.parametrize("row, expected", [
    ("v.mp4,x,d,train,,3,9", "column video_id: segment rows"),
    ("v.mp4,x,d,train,s,3,", "column end_frame: a segment needs both"),
    ("v.mp4,x,d,train,s,9,3", "column end_frame: end_frame 3 is before start_frame 9"),
    ("v.mp4,x,d,train,s,-1,3", "column start_frame: must be a non-negative integer"),
    ("v.mp4,x,d,train,s,\u00b2,3", "column start_frame: must be a non-negative integer"),  # '²'.isdigit() is True
    ("v.mp4,x,d,train,s,3,\u0663", "column end_frame: must be a non-negative integer"),  # Arabic-Indic 3
])
def test_segment_errors(tmp_path, row, expected):
    path = write(tmp_path, "path,label,domain,split,video_id,start_frame,end_frame\n" + row + "\n")
    with pytest.raises(ManifestError, match=expected):
        read_manifest(path)


def test_header_problems_name_the_line_and_column(tmp_path):
    with pytest.raises(ManifestError, match=r":1, column label: the header names column 'label' 2 times"):
        read_manifest(write(tmp_path, "path,label,domain,split,label\na,b,c,train,d\n"))
    with pytest.raises(ManifestError, match=r"manifest.csv:2: the manifest has a header \(line 1\) but no rows"):
        read_manifest(write(tmp_path, "path,label,domain,split\n"))


def test_missing_column_and_missing_file(tmp_path):
    with pytest.raises(ManifestError, match=r":1: missing column\(s\) split"):
        read_manifest(write(tmp_path, "path,label,domain\na,b,c\n"))
    with pytest.raises(ManifestError, match="manifest not found"):
        read_manifest(tmp_path / "nope.csv")
