"""Dataset manifests: the one input format for videos (DESIGN §2).

A manifest is a CSV with a header. Required columns: ``path``, ``label``, ``domain``, ``split``. Optional:
``video_id`` (default: ``path`` without its extension, with ``/`` separators), ``start_frame`` and
``end_frame`` (a segment of a longer video, 0-based, end inclusive; ``video_id`` is then required because one
recording holds many segments). Any other column is kept as a per-video attribute.

The whole file is validated before any work starts, and every error names the file, line and column.
"""
from __future__ import annotations

import csv
import hashlib
import io
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO

REQUIRED_COLUMNS = ("path", "label", "domain", "split")
KNOWN_COLUMNS = REQUIRED_COLUMNS + ("video_id", "start_frame", "end_frame")
SPLITS = ("train", "val", "test")


class ManifestError(ValueError):
    """A manifest is malformed; the message names file, line and column."""


@dataclass(frozen=True)
class VideoEntry:
    """One manifest row: a video file, a frame directory, or a segment of either."""

    video_id: str
    path: str                      # as written in the manifest (relative to the root, or absolute)
    label: str
    domain: str
    split: str
    start_frame: int | None = None
    end_frame: int | None = None   # inclusive
    attrs: dict[str, str] = field(default_factory=dict)
    line: int = 0                  # line number in the manifest, for error messages

    def resolve(self, root: Path | None) -> Path:
        path = Path(self.path)
        return path if path.is_absolute() or root is None else Path(root) / path

    def attributes(self) -> dict[str, str | int | None]:
        """Everything the store keeps about the video besides its features."""
        return {"label": self.label, "domain": self.domain, "split": self.split, "path": self.path,
                "start_frame": self.start_frame, "end_frame": self.end_frame, **self.attrs}


def default_video_id(path: str) -> str:
    """``path`` without extension, ``/``-separated, so ids are stable across operating systems."""
    posix = PurePosixPath(path.replace("\\", "/"))
    return str(posix.with_suffix("")) if posix.suffix else str(posix)


def file_sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return stream_sha256(handle)


def stream_sha256(handle: BinaryIO) -> str:
    """sha256 of what is left to read in a binary file (local, or opened through fsspec)."""
    digest = hashlib.sha256()
    for block in iter(lambda: handle.read(1 << 20), b""):
        digest.update(block)
    return digest.hexdigest()


def read_manifest(path: Path) -> list[VideoEntry]:
    """Parse and validate a manifest; raise ManifestError naming ``file:line, column`` on the first problem."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found (pass the CSV written by `vidshift synth` or a builder)")
    try:
        return _read_rows(path, csv.DictReader(io.StringIO(_decode(path), newline="")))
    except csv.Error as error:  # e.g. a NUL byte: the file is not text
        raise ManifestError(f"{path}: not a CSV manifest ({error}); a manifest is UTF-8 text with a header") from None


def _decode(path: Path) -> str:
    """The manifest's text; a byte that is not UTF-8 is an error naming its line and column."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
        raise ManifestError(f"{path}:{line}: byte 0x{data[error.start]:02x} at column {column} is not UTF-8 "
                            f"({error.reason}); save the manifest as UTF-8 text (a binary file is not a manifest)"
                            ) from None


def _read_rows(path: Path, reader: csv.DictReader) -> list[VideoEntry]:
    header = reader.fieldnames or []
    missing = [name for name in REQUIRED_COLUMNS if name not in header]
    if missing:
        raise ManifestError(f"{path}:1: missing column(s) {', '.join(missing)}; "
                            f"the header must contain {', '.join(REQUIRED_COLUMNS)}")
    repeated = [name for name, count in Counter(header).items() if count > 1]
    if repeated:
        raise ManifestError(f"{path}:1, column {repeated[0]}: the header names column {repeated[0]!r} "
                            f"{header.count(repeated[0])} times; give each column once")
    entries, seen = [], {}
    for row in reader:
        entry = _parse_row(path, _first_line(path, reader.line_num, row), row)
        if entry.video_id in seen:
            raise ManifestError(f"{path}:{entry.line}, column video_id: duplicate video_id "
                                f"{entry.video_id!r} (first on line {seen[entry.video_id]})")
        seen[entry.video_id] = entry.line
        entries.append(entry)
    if not entries:
        raise ManifestError(f"{path}:2: the manifest has a header (line 1) but no rows; add one line per video")
    return entries


def _first_line(path: Path, last_line: int, row: dict) -> int:
    """The line a row starts on. A cell holding a line break means a quote (") was opened and not closed on
    its line, so csv read on to the next quote or the end of the file; that is an error at the opening quote
    (no manifest value spans lines), not the "empty value" in a later column it would otherwise become."""
    cells = [(column, value) for column, value in row.items() if isinstance(value, str)]
    first = last_line - sum(value.rstrip("\r\n").count("\n") for _, value in cells)  # a cell read to EOF ends in one
    for column, value in cells:
        if "\n" in value or "\r" in value:
            raise ManifestError(f"{path}:{first}, column {column}: unbalanced quote (\"): the quoted cell runs on "
                                f"to line {last_line}; close the quote, or remove it (plain cells need none)")
    return first


def _parse_row(path: Path, line: int, row: dict) -> VideoEntry:
    def fail(column: str, message: str) -> ManifestError:
        return ManifestError(f"{path}:{line}, column {column}: {message}")

    if None in row:  # csv puts surplus cells under the key None
        raise fail("(extra)", f"row has more cells than the header ({row[None]!r} beyond the last column)")
    values = {key: (value or "").strip() for key, value in row.items()}
    for column in REQUIRED_COLUMNS:
        if not values[column]:
            raise fail(column, "empty value")
    if values["split"] not in SPLITS:
        raise fail("split", f"unknown split {values['split']!r}; use one of {', '.join(SPLITS)}")
    start, end = (_parse_frame(values.get(column, ""), fail(column, "must be a non-negative integer"))
                  for column in ("start_frame", "end_frame"))
    if (start is None) != (end is None):
        raise fail("start_frame" if start is None else "end_frame",
                   "a segment needs both start_frame and end_frame")
    if start is not None and end < start:
        raise fail("end_frame", f"end_frame {end} is before start_frame {start} (end is inclusive)")
    video_id = values.get("video_id", "")
    if not video_id:
        if start is not None:
            raise fail("video_id", "segment rows (start_frame/end_frame) need an explicit video_id")
        video_id = default_video_id(values["path"])
    attrs = {key: value for key, value in values.items() if key not in KNOWN_COLUMNS}
    return VideoEntry(video_id=video_id, path=values["path"], label=values["label"], domain=values["domain"],
                      split=values["split"], start_frame=start, end_frame=end, attrs=attrs, line=line)


def _parse_frame(text: str, error: ManifestError) -> int | None:
    if not text:
        return None
    # ASCII digits only: str.isdigit() also accepts characters such as '²' that int() refuses.
    if not re.fullmatch(r"[0-9]+", text):
        raise error
    return int(text)
