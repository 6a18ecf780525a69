"""``vidshift store pack STORE OUT.zip|OUT.tar``: a whole store as one file to hand over, read in place.

The archive holds the store's files at its top level (``store.json``, ``index.json``, ``README.md``,
``parts/...``), uncompressed (every chunk is compressed already, and stored members can be read at any
offset), so ``FeatureStore.open("OUT.zip")`` and URLs of it read it without unpacking:

- a zarr store packs into a ``.zip``: zip members can be read concurrently (zipfile guards its one handle
  with a lock), as zarr's async reads need; vidshift reads it through fsspec's zip filesystem, plain zarr
  with its own ``ZipStore`` (the card shows how);
- an HDF5 store packs into a ``.tar``: each part is one contiguous member, which h5py reads through a file
  object at any offset (a seek back inside a zip member re-reads it from its start, which HDF5's scattered
  metadata reads would do all the time).

Every part file is checked against the sha256 recorded when it was committed as it is copied in, so a
damaged store is never packed; ``index.json`` is written fresh (from the parts) and ``README.md`` is the
store's card (the existing one, licence filled in, if there is one). Like every copy here it is verified on
arrival with ``vidshift store verify OUT.zip``.
"""
from __future__ import annotations

import io
import os
import tarfile
import time
import zipfile
from pathlib import Path

from .card import store_card
from .location import PACK_SUFFIXES, HashingReader
from .part_writer import DIGESTS_SUFFIX
from .checked_json import checked_json_text
from .store import FeatureStore, StoreError

PACK_FOR_BACKEND = {"zarr": ".zip", "hdf5": ".tar"}


def pack_store(store: FeatureStore, out: Path) -> int:
    """Write ``store`` into the archive ``out``; return the number of files packed."""
    out = Path(out)
    wanted = PACK_FOR_BACKEND[store.backend]
    if out.suffix not in PACK_SUFFIXES:
        raise ValueError(f"{out}: a packed store ends in {wanted} (zarr stores pack to .zip, HDF5 stores to .tar)")
    if out.suffix != wanted:
        raise ValueError(f"{out}: {store.backend} stores pack to {wanted}, not {out.suffix} (zarr reads zip members "
                         f"concurrently; h5py reads a tar member at any offset)")
    if out.exists():
        raise StoreError(f"{out} exists; choose another name or delete it")
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with (_ZipWriter if wanted == ".zip" else _TarWriter)(tmp) as archive:
            count = _pack_into(store, archive)
        os.replace(tmp, out)  # a killed pack leaves no file that looks complete
    finally:
        tmp.unlink(missing_ok=True)
    return count


def _pack_into(store: FeatureStore, archive) -> int:
    index = store.index()  # fresh: rebuilt from the parts if index.json is stale
    card = store.files.read_bytes("README.md") or store_card(store).encode()
    metadata = {"store.json": store.files.read_bytes("store.json"),
                "index.json": checked_json_text(index).encode(), "README.md": card}
    for name, data in metadata.items():
        archive.add(name, io.BytesIO(data), len(data))
    count = len(metadata)
    for part in index["parts"]:
        recorded = store.recorded_digests(part)
        if recorded is None:
            raise StoreError(f"{store.root}/parts/{part} has no {DIGESTS_SUFFIX} (written by an older vidshift), so "
                             f"a packed copy could not be checked on arrival; re-extract it, or copy the directory")
        sidecar = store.files.read_bytes(f"parts/{part}{DIGESTS_SUFFIX}")
        archive.add(f"parts/{part}{DIGESTS_SUFFIX}", io.BytesIO(sidecar), len(sidecar))
        for name in sorted(recorded):
            member = f"parts/{part}" if name == "." else f"parts/{part}/{name}"
            with store.files.open_part_file(part, name) as handle:
                reader = HashingReader(handle)
                archive.add(member, reader, store.files.part_file_size(part, name))
            if reader.hexdigest() != recorded[name]:
                raise StoreError(f"{store.root}/parts/{part}: {name} does not match the sha256 recorded at commit; "
                                 f"the store is damaged, not packed: `vidshift store verify {store.root}` says what "
                                 f"to do")
            count += 1
    return count


class _ZipWriter:
    def __init__(self, path: Path) -> None:
        self.zip = zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True)

    def add(self, name: str, source, size: int) -> None:
        info = zipfile.ZipInfo(name, time.gmtime()[:6])
        info.file_size = size
        with self.zip.open(info, "w", force_zip64=size >= zipfile.ZIP64_LIMIT) as target:
            for block in iter(lambda: source.read(1 << 22), b""):
                target.write(block)

    def __enter__(self) -> "_ZipWriter":
        return self

    def __exit__(self, *exc_info) -> None:
        self.zip.close()


class _TarWriter:
    def __init__(self, path: Path) -> None:
        self.tar = tarfile.open(path, "w", format=tarfile.PAX_FORMAT)  # PAX: no size or name-length limits

    def add(self, name: str, source, size: int) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = size, int(time.time()), 0o644
        self.tar.addfile(info, source)

    def __enter__(self) -> "_TarWriter":
        return self

    def __exit__(self, *exc_info) -> None:
        self.tar.close()
