"""Where a store's files are: a local directory (read and written in place) or, read-only, anything fsspec opens.

``open_location`` takes a directory, a packed store (``STORE.zip`` of a zarr store, ``STORE.tar`` of an HDF5
store; the archive holds the store's files at its top level) or a URL of either: ``https://``, ``s3://``
(needs s3fs), ``gs://`` (needs gcsfs), ``file://``, ``memory://``. Remote and packed stores are read-only:

- Opening one reads ``store.json`` and ``index.json`` (the store's consolidated metadata: every part and
  video), two requests however many parts there are; a zarr part then opens with one request too (its
  metadata is consolidated into its root ``zarr.json`` at commit, research/store.md §1.5).
- zarr parts are read through zarr's ``FsspecStore``, HDF5 parts through h5py on an fsspec file with a block
  cache (PyPI h5py has no S3 driver; research/store.md §2.7), so HDF5's small metadata reads hit the cache.
- ``cache=DIR`` keeps a local copy of each part file (of a packed store: of the archive) on first read, so
  later epochs read locally; ``store.json`` and ``index.json`` are always fetched fresh, since a store that
  grows changes them, while a committed part never changes.
- Parts are not listed remotely (plain HTTP cannot list a directory): the parts are those of ``index.json``.
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import BinaryIO

import fsspec
from fsspec.implementations.asyn_wrapper import AsyncFileSystemWrapper
from fsspec.implementations.cached import WholeFileCacheFileSystem

from ..manifest import file_sha256, stream_sha256

URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
PACK_SUFFIXES = {".zip": "zip", ".tar": "tar"}
HDF5_BLOCK_BYTES = 2 << 20   # fsspec block cache of remote HDF5 parts: HDF5 metadata is many small reads


def is_url(location: str | os.PathLike) -> bool:
    return isinstance(location, str) and bool(URL.match(location))


class LocalFiles:
    """A store directory on this machine (the only kind that can be written)."""

    writable = True

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.display = self.root

    def read_bytes(self, name: str) -> bytes | None:
        try:
            return (self.root / name).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None

    def list_parts(self, suffix: str) -> list[str]:
        return sorted(path.name for path in (self.root / "parts").glob(f"part-*{suffix}"))

    def part_files(self, part: str) -> list[str]:
        """Files of a part, by their path inside it ("." for an HDF5 part's single file)."""
        path = self.root / "parts" / part
        if not path.is_dir():
            return ["."]
        return sorted(f.relative_to(path).as_posix() for f in path.rglob("*") if f.is_file())

    def open_part_file(self, part: str, name: str) -> BinaryIO:
        path = self.root / "parts" / part
        return open(path if name == "." else path / name, "rb")

    def part_file_size(self, part: str, name: str) -> int:
        path = self.root / "parts" / part
        return (path if name == "." else path / name).stat().st_size

    def file_digests(self, part: str, recorded: dict[str, str]) -> dict[str, str]:
        del recorded  # every file on disk is hashed: an extra file counts as a change
        path = self.root / "parts" / part
        return {name: file_sha256(path if name == "." else path / name) for name in self.part_files(part)}

    def part_bytes(self, part: str) -> int:
        path = self.root / "parts" / part
        return sum(f.stat().st_size for f in (path.rglob("*") if path.is_dir() else [path]) if f.is_file())

    def zarr_source(self, part: str) -> str:
        return str(self.root / "parts" / part)

    def hdf5_source(self, part: str) -> Path:
        return self.root / "parts" / part

    def close(self) -> None:
        pass


class FsspecFiles:
    """A store read through fsspec: a remote directory, or a packed store (local or remote). Read-only.

    Pickles as its URL and cache directory, so DataLoader workers open their own connections.
    """

    writable = False

    def __init__(self, url: str, cache: Path | None = None, display: str | None = None) -> None:
        self.url, self.cache = url, cache
        self.display = display or url
        self._archive = None
        self._open()

    def _open(self) -> None:
        fs, path = fsspec.url_to_fs(self.url)
        data_fs = WholeFileCacheFileSystem(fs=fs, cache_storage=str(self.cache)) if self.cache else fs
        kind = PACK_SUFFIXES.get(Path(path).suffix)
        if kind:  # the archive's members are the store's files: one fsspec filesystem over the (cached) archive
            self._archive = data_fs.open(path, "rb", block_size=HDF5_BLOCK_BYTES, cache_type="blockcache")
            fs = data_fs = fsspec.filesystem(kind, fo=self._archive)
            path = ""
        self.fs, self.data_fs, self.root = fs, data_fs, path.rstrip("/")
        self._async_fs = None

    def __getstate__(self) -> dict:
        return {"url": self.url, "cache": self.cache, "display": self.display}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def _path(self, *names: str) -> str:
        return "/".join(name for name in (self.root, *names) if name and name != ".")

    def read_bytes(self, name: str) -> bytes | None:
        try:
            return self.fs.cat_file(self._path(name))
        except (FileNotFoundError, IsADirectoryError):
            return None

    def list_parts(self, suffix: str) -> list[str]:
        """Only when index.json is missing or damaged; plain HTTP servers may not list (then: [])."""
        try:
            names = self.fs.ls(self._path("parts"), detail=False)
        except (FileNotFoundError, NotImplementedError, ValueError):
            return []
        names = (name.rstrip("/").rsplit("/", 1)[-1] for name in names)
        return sorted(name for name in names if name.startswith("part-") and name.endswith(suffix))

    def part_files(self, part: str) -> list[str]:
        """Files of a part, by their path inside it ("." for an HDF5 part's single file); needs listing."""
        path = self._path("parts", part)
        if self.fs.isfile(path):
            return ["."]
        return sorted(name[len(path) + 1:] for name in self.fs.find(path))

    def open_part_file(self, part: str, name: str) -> BinaryIO:
        return self.data_fs.open(self._path("parts", part, name), "rb")

    def part_file_size(self, part: str, name: str) -> int:
        return int(self.fs.size(self._path("parts", part, name)))

    def file_digests(self, part: str, recorded: dict[str, str]) -> dict[str, str]:
        """sha256 of each file the part's digests name; a file that is missing is left out (so it differs)."""
        digests = {}
        for name in recorded:
            try:
                with self.open_part_file(part, name) as handle:
                    digests[name] = stream_sha256(handle)
            except FileNotFoundError:
                pass
        return digests

    def part_bytes(self, part: str) -> int:
        return int(self.fs.du(self._path("parts", part)))

    def zarr_source(self, part: str):
        from zarr.storage import FsspecStore

        if self._async_fs is None:  # zarr reads through an async filesystem; sync ones (zip, cache) are wrapped
            fs = self.data_fs
            self._async_fs = fs if fs.async_impl and fs.asynchronous else AsyncFileSystemWrapper(fs, asynchronous=True)
        return FsspecStore(self._async_fs, read_only=True, path=self._path("parts", part))

    def hdf5_source(self, part: str) -> BinaryIO:
        return self.data_fs.open(self._path("parts", part), "rb", block_size=HDF5_BLOCK_BYTES,
                                 cache_type="blockcache")

    def close(self) -> None:
        if self._archive is not None:
            self._archive.close()


def open_location(location: str | os.PathLike, cache: str | os.PathLike | None = None) -> LocalFiles | FsspecFiles:
    """The files of the store at ``location`` (see the module docstring)."""
    if cache is None:
        cache = os.environ.get("VIDSHIFT_STORE_CACHE") or None
    cache = Path(cache) if cache else None
    if is_url(location):
        return FsspecFiles(str(location), cache)
    if Path(location).suffix in PACK_SUFFIXES and Path(location).is_file():
        return FsspecFiles(Path(location).resolve().as_uri(), None, str(location))  # local: nothing to cache
    return LocalFiles(Path(location))


class HashingReader:
    """A binary file that hashes what is read from it: a copy checks its bytes against a recorded digest
    without reading them twice."""

    def __init__(self, handle: BinaryIO) -> None:
        self.handle, self.digest = handle, hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        block = self.handle.read(size)
        self.digest.update(block)
        return block

    def hexdigest(self) -> str:
        return self.digest.hexdigest()
