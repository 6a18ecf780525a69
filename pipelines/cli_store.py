"""Sharing commands of the ``vidshift store`` group: ``merge``, ``diff``, ``subset`` and ``pack``
(``extract/store/sharing.py``, ``extract/store/pack.py``). Every STORE may be a directory, a packed ``.zip`` or
``.tar``, or an fsspec URL (``https://``, ``s3://``, ``gs://``, ``file://``); ``--cache DIR`` keeps local copies
of remote parts. Attached to the main CLI with ``store.add_command(...)``; errors are reported by its boundary.
"""
from __future__ import annotations

import sys
from contextlib import ExitStack
from pathlib import Path

import click

from extract.manifest import file_sha256, read_manifest
from extract.store import FeatureStore
from extract.store.pack import pack_store
from extract.store.sharing import diff_stores, merge_stores, subset_store

STORE = click.Path(path_type=str)  # a directory, an archive or a URL: FeatureStore.open says which is wrong
NEW_DIR = click.Path(file_okay=False, path_type=Path)


def cache_option(command):
    return click.option("--cache", type=click.Path(file_okay=False, path_type=Path), default=None,
                        help="Keep local copies of remote parts here [default: $VIDSHIFT_STORE_CACHE, else none].")(
        command)


@click.command()
@click.argument("out", type=NEW_DIR)
@click.argument("stores", nargs=-1, required=True, type=STORE)
@cache_option
def merge(out: Path, stores: tuple[str, ...], cache: Path | None) -> None:
    """Join STORES (same provenance) into the new store OUT; a video in several is taken once."""
    with ExitStack() as stack:
        sources = [stack.enter_context(FeatureStore.open(path, cache=cache)) for path in stores]
        report = merge_stores(sources, out)
    click.echo(report.line())


@click.command()
@click.argument("a", type=STORE)
@click.argument("b", type=STORE)
@cache_option
def diff(a: str, b: str, cache: Path | None) -> None:
    """Provenance and content of two stores; exit 0 only when compatible (same provenance, no video differs)."""
    with FeatureStore.open(a, cache=cache) as first, FeatureStore.open(b, cache=cache) as second:
        result = diff_stores(first, second)
    for line in result.lines():
        click.echo(line)
    sys.exit(0 if result.compatible else 1)


@click.command()
@click.argument("store_path", type=STORE)
@click.argument("out", type=NEW_DIR)
@click.option("--manifest", "manifest_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Keep the videos of this manifest.")
@click.option("--domain", "domains", multiple=True, help="Keep videos of this domain (repeatable).")
@click.option("--split", "splits", multiple=True, help="Keep videos of this split (repeatable).")
@cache_option
def subset(store_path: str, out: Path, manifest_path: Path | None, domains: tuple[str, ...],
           splits: tuple[str, ...], cache: Path | None) -> None:
    """A new store OUT with only some videos of STORE (e.g. one domain for a collaborator)."""
    ids = [entry.video_id for entry in read_manifest(manifest_path)] if manifest_path else None
    with FeatureStore.open(store_path, cache=cache) as source:
        report = subset_store(source, out, ids, domains, splits)
        if ids is not None:
            missing = set(ids) - {vid for stream in source.streams for vid in source.videos(stream)}
            if missing:
                click.echo(f"{len(missing)} video(s) of {manifest_path} are not in {store_path}, e.g. {min(missing)}",
                           err=True)
    click.echo(report.line())


@click.command()
@click.argument("store_path", type=STORE)
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@cache_option
def pack(store_path: str, out: Path, cache: Path | None) -> None:
    """STORE as one file OUT: .zip for zarr stores, .tar for HDF5; read it in place, verify it on arrival."""
    with FeatureStore.open(store_path, cache=cache) as store:
        count = pack_store(store, out)
    click.echo(f"wrote {out}: {count} files, sha256 {file_sha256(out)}; the receiver checks it with "
               f"`vidshift store verify {out.name}`")
