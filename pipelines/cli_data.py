"""Data commands of the ``vidshift`` CLI: ``vidshift manifest NAME`` (benchmark manifests from a dataset copy and
its official split files) and ``vidshift store import KIND`` / ``vidshift store export`` (shared pooled features).

The objects here are attached to the main CLI (``main.add_command(manifest)``, ``store.add_command(import_,
"import")``, ``store.add_command(export)``). Input problems raise ValueError / FileNotFoundError / StoreError /
ManifestError, which the main CLI reports as exit code 1; an import in which some videos failed exits with 2.
"""
from __future__ import annotations

import sys
from pathlib import Path

import click

from data_manifests.common import Build, available_class_maps, count_report, write_manifest
from data_manifests.epic_kitchens import (DEFAULT_LAYOUT, DOMAINS, build_epic_kitchens,
                                          build_epic_kitchens_dg_from_lists)
from data_manifests.generic import build_generic
from data_manifests.multiview import APN_VAL_FRACTION, build_ntu_views, build_pku_views
from data_manifests.releases import EPIC100_MODALITIES, Release, epic100_release, read_class_names, ta3n_release
from data_manifests.ucf_hmdb import (build_ucf_hmdb, build_ucf_hmdb_dg, build_ucf_hmdb_dg_from_lists,
                                     build_ucf_olympic)
from extract.importers import DEFAULT_JOBS, EXPORT_FORMATS, export_store, import_pooled
from extract.manifest import SPLITS, read_manifest
from extract.store import FeatureStore

FOLDER = click.Path(exists=True, file_okay=False, path_type=Path)
FILE = click.Path(exists=True, dir_okay=False, path_type=Path)


# ---- vidshift manifest NAME ---------------------------------------------------------------------------------

@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def manifest() -> None:
    """Write the manifest of one of the seeds' benchmarks from your copy of the dataset and its official split
    files, and compare its per-domain, per-split counts with the papers' (docs/datasets.md)."""


def output_options(command):
    command = click.option("--root", type=click.Path(file_okay=False, path_type=Path), default=None,
                           help="Write paths relative to ROOT (pass the same --root to extract) "
                                "[default: the manifest's folder].")(command)
    return click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
                        help="Manifest CSV to write.")(command)


def epic_recording_options(command):
    """--frames, --layout and --domain: where the EPIC-Kitchens recordings are, and which domains to build."""
    command = click.option("--domain", "domains", multiple=True, type=click.Choice(list(DOMAINS)),
                           help="Domains to include [default: all three].")(command)
    command = click.option("--layout", default=DEFAULT_LAYOUT, show_default=True,
                           help="Recording path under --frames; {split} {domain} {participant} {video_id}.")(command)
    return click.option("--frames", required=True, type=FOLDER, help="Folder the --layout starts from.")(command)


def _finish(build: Build, out: Path, root: Path | None) -> None:
    write_manifest(build.entries, out, root)
    click.echo(count_report(build))
    click.echo(f"wrote {out}")


def _ucf_hmdb_command(benchmark: str, summary: str):
    @manifest.command(benchmark, help=summary)
    @click.option("--ucf", required=True, type=FOLDER, help="UCF-101 folder (<Class>/<video>.avi).")
    @click.option("--ucf-splits", required=True, type=FOLDER, help="ucfTrainTestlist folder.")
    @click.option("--hmdb", required=True, type=FOLDER, help="HMDB51 folder (<class>/<video>.avi).")
    @click.option("--hmdb-splits", required=True, type=FOLDER, help="testTrainMulti_7030_splits folder.")
    @output_options
    def command(ucf: Path, ucf_splits: Path, hmdb: Path, hmdb_splits: Path, out: Path, root: Path | None) -> None:
        _finish(build_ucf_hmdb(benchmark, ucf, ucf_splits, hmdb, hmdb_splits), out, root)

    return command


_ucf_hmdb_command("ucf-hmdb-full", "TA3N's UCF-HMDB_full: 12 classes, official split 1 ('val' = official test).")
_ucf_hmdb_command("ucf-hmdb-small", "UCF-HMDB_small: 5 classes, official split 1 ('val' = official test).")


@manifest.command("ucf-olympic")
@click.option("--ucf", required=True, type=FOLDER, help="UCF-101 folder (<Class>/<video>.avi).")
@click.option("--ucf-splits", required=True, type=FOLDER, help="ucfTrainTestlist folder.")
@click.option("--olympic", required=True, type=FOLDER, help="Olympic Sports folder (<class>/<video>.<ext>).")
@click.option("--olympic-splits", required=True, type=FOLDER, help="Folder with train/<class>.txt, test/<class>.txt.")
@output_options
def ucf_olympic(ucf: Path, ucf_splits: Path, olympic: Path, olympic_splits: Path, out: Path, root: Path | None) -> None:
    """UCF-Olympic: 6 classes; UCF101 split 1 and Olympic Sports' own train/test lists."""
    _finish(build_ucf_olympic(ucf, ucf_splits, olympic, olympic_splits), out, root)


@manifest.command("ucf-hmdb-dg")
@click.option("--source", required=True, type=click.Choice(["ucf", "hmdb"]), help="Source domain (train/val).")
@click.option("--ucf", required=True, type=FOLDER, help="UCF-101 folder (<Class>/<video>.avi).")
@click.option("--hmdb", required=True, type=FOLDER, help="HMDB51 folder (<class>/<video>.avi).")
@click.option("--seed", default=0, show_default=True, help="Seed of the 80/20 split (without --lists).")
@click.option("--lists", type=FOLDER,
              help="VideoDG/STDN list folder ({ucf,hmdb}_{train,val}.txt): their exact videos and splits.")
@output_options
def ucf_hmdb_dg(source: str, ucf: Path, hmdb: Path, seed: int, lists: Path | None, out: Path,
                root: Path | None) -> None:
    """VideoDG/STDN UCF-HMDB DG: the source re-split 80/20, the other domain is the target test set."""
    build = (build_ucf_hmdb_dg_from_lists(source, lists, ucf, hmdb) if lists is not None
             else build_ucf_hmdb_dg(source, ucf, hmdb, seed))
    _finish(build, out, root)


@manifest.command("epic-kitchens")
@click.option("--splits", required=True, type=FOLDER, help="Folder with MM-SADA's D1_train.pkl ... D3_test.pkl.")
@epic_recording_options
@output_options
def epic_kitchens(splits: Path, frames: Path, layout: str, domains: tuple[str, ...], out: Path,
                  root: Path | None) -> None:
    """EPIC-Kitchens D1/D2/D3 (P08/P01/P22; MM-SADA splits, used by STDN and STCDA) as segment rows."""
    _finish(build_epic_kitchens(splits, frames, layout, domains or tuple(DOMAINS)), out, root)


@manifest.command("epic-kitchens-dg")
@click.option("--source", required=True, type=click.Choice(list(DOMAINS)), help="Source domain (train/val).")
@click.option("--lists", required=True, type=FOLDER,
              help="STDN's EPIC-KITCHENS-55-DG-list folder (epic_kitchens_55_da_D1_trainlist.txt ...).")
@epic_recording_options
@output_options
def epic_kitchens_dg(source: str, lists: Path, frames: Path, layout: str, domains: tuple[str, ...], out: Path,
                     root: Path | None) -> None:
    """STDN's EPIC-Kitchens-DG lists: the source's train/val lists, the other domains' full lists as test."""
    _finish(build_epic_kitchens_dg_from_lists(source, lists, frames, layout, domains or tuple(DOMAINS)), out, root)


@manifest.command("ntu-views")
@click.option("--videos", required=True, type=FOLDER, help="NTU RGB+D RGB videos (S001C001P001R001A001_rgb.avi).")
@click.option("--source", required=True, help="Source camera: C001, C002 or C003.")
@click.option("--val-fraction", default=APN_VAL_FRACTION, show_default=True)
@click.option("--seed", default=0, show_default=True)
@output_options
def ntu_views(videos: Path, source: str, val_fraction: float, seed: int, out: Path, root: Path | None) -> None:
    """NTU RGB+D cross-view DG (APN §5.5): domain = camera id in the file name."""
    _finish(build_ntu_views(videos, source, val_fraction, seed), out, root)


@manifest.command("pku-views")
@click.option("--videos", required=True, type=FOLDER, help="PKU-MMD RGB_VIDEO folder (0002-L.avi).")
@click.option("--labels", required=True, type=FOLDER, help="PKU-MMD label folder (0002-L.txt).")
@click.option("--source", required=True, type=click.Choice(["L", "M", "R"]), help="Source view.")
@click.option("--val-fraction", default=APN_VAL_FRACTION, show_default=True)
@click.option("--seed", default=0, show_default=True)
@output_options
def pku_views(videos: Path, labels: Path, source: str, val_fraction: float, seed: int, out: Path,
              root: Path | None) -> None:
    """PKU-MMD cross-view DG (APN §5.5): domain = view (L/M/R), each labelled action a segment row."""
    _finish(build_pku_views(videos, labels, source, val_fraction, seed), out, root)


@manifest.command("generic")
@click.argument("dataset", type=FOLDER)
@click.option("--pattern", default="{domain}/*/*", show_default=True,
              help="Where videos are, relative to DATASET; {domain} names the domain folder, the label is "
                   "each video's parent folder.")
@click.option("--val-fraction", default=0.2, show_default=True)
@click.option("--test-fraction", default=0.0, show_default=True)
@click.option("--seed", default=0, show_default=True)
@output_options
def generic(dataset: Path, pattern: str, val_fraction: float, test_fraction: float, seed: int, out: Path,
            root: Path | None) -> None:
    """Any folder tree: domain from a path pattern, label from the parent folder, seeded stratified splits."""
    _finish(build_generic(dataset, pattern, val_fraction, test_fraction, seed), out, root)


# ---- vidshift store import KIND / export ------------------------------------------------------------------------

@click.group("import", context_settings={"help_option_names": ["-h", "--help"]})
def import_() -> None:
    """Import pooled features released by others into a store, and write a manifest matching it."""


def store_options(default_stream: str | None):
    def decorate(command):
        command = click.option("--manifest", "manifest_path", type=click.Path(dir_okay=False, path_type=Path),
                               help="Manifest to write or extend [default: STORE/manifest.csv].")(command)
        stream_help = "Stream name in the store" + ("." if default_stream else " [default: the modality, lower-case].")
        command = click.option("--stream", default=default_stream, show_default=bool(default_stream),
                               help=stream_help)(command)
        command = click.option("--format", "store_format", type=click.Choice(["zarr", "hdf5"]), default="zarr",
                               show_default=True)(command)
        command = click.option("--jobs", type=click.IntRange(min=1), default=DEFAULT_JOBS, show_default=True,
                               help="Worker processes, each loading and writing parts of its own (TA3N's files; default "
                                    "twice the cores, up to 8; 1: in this process).")(command)
        return click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
                            help="Store directory (created, or extended).")(command)
    return decorate


def _import(release: Release, out: Path, store_format: str, stream: str, manifest_path: Path | None,
            jobs: int) -> None:
    """Import, write (or extend) the manifest with the rows of the videos now in the store, report, and exit."""
    if release.missing:
        click.echo(f"{len(release.missing)} listed video(s) not found in your copy, e.g. {release.missing[0]}",
                   err=True)
    summary = import_pooled(release.sources, out, store_format, stream, release.features, release.part_info, jobs,
                            processes=release.loads_files)
    with FeatureStore.open(out) as store:
        stored = store.videos(stream)
    path = manifest_path or out / "manifest.csv"
    rows = {entry.video_id: entry for entry in read_manifest(path)} if path.is_file() else {}
    rows.update((source.entry.video_id, source.entry) for source in release.sources
                if source.entry.video_id in stored)
    write_manifest(list(rows.values()), path, path.parent)
    for line in summary.lines():
        click.echo(line)
    click.echo(f"wrote {path}")
    sys.exit(summary.exit_code)


def _parse_list_spec(spec: str) -> tuple[str, str, Path]:
    domain_split, _, path = spec.partition("=")
    domain, _, split = domain_split.partition(":")
    if not (domain and split in SPLITS and path):
        raise ValueError(f"--list {spec!r}: expected DOMAIN:SPLIT=FILE, e.g. ucf:train=list_ucf101_train.txt "
                         f"(SPLIT is one of {', '.join(SPLITS)})")
    return domain, split, Path(path)


@import_.command("ta3n")
@click.argument("release", type=FOLDER)
@click.option("--list", "list_specs", multiple=True, required=True,
              help="DOMAIN:SPLIT=FILE, a TA3N list (<feature folder> <num_frames> <class_id>); repeatable.")
@click.option("--classes", default=None,
              help=f"Class names by id: a class map ({', '.join(available_class_maps())}) or a classInd file "
                   f"[default: the id itself].")
@store_options("rgb")
def import_ta3n(release: Path, list_specs: tuple[str, ...], classes: str | None, out: Path, store_format: str,
                stream: str, manifest_path: Path | None, jobs: int) -> None:
    """TA3N's released features (RELEASE/.../<video>/img_00001.t7): one step per frame, pooled only."""
    lists = [_parse_list_spec(spec) for spec in list_specs]
    _import(ta3n_release(release, lists, read_class_names(classes)), out, store_format, stream, manifest_path, jobs)


@import_.command("epic100")
@click.argument("features_file", type=FILE)
@click.option("--modality", default="RGB", show_default=True, type=click.Choice([*EPIC100_MODALITIES, "ALL"]),
              help="ALL: the three concatenated, as the official TA3N baseline does.")
@click.option("--domain", required=True, help="Domain name for these segments, e.g. source or target.")
@click.option("--split", required=True, type=click.Choice(SPLITS))
@click.option("--labels", type=FILE, help="EPIC_100_uda_*.pkl annotations (labels, recordings, frames).")
@click.option("--label-column", default="verb_class", show_default=True, help="Annotation column used as label.")
@store_options(None)
def import_epic100(features_file: Path, modality: str, domain: str, split: str, labels: Path | None,
                   label_column: str, out: Path, store_format: str, stream: str | None,
                   manifest_path: Path | None, jobs: int) -> None:
    """EPIC-KITCHENS-100 UDA features (a pickle of features[modality] [N, 25, C] and narration_ids)."""
    release = epic100_release(features_file, modality, domain, split, labels, label_column)
    _import(release, out, store_format, stream or modality.lower(), manifest_path, jobs)


@click.command("export")
@click.argument("store_path", type=FOLDER)
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--format", "export_format", type=click.Choice(EXPORT_FORMATS), default="npy", show_default=True)
@click.option("--stream", default="rgb", show_default=True)
def export(store_path: Path, out: Path, export_format: str, stream: str) -> None:
    """Write a store's pooled features as one .npy (with .steps.npy) or .h5 per video, plus index.csv."""
    with FeatureStore.open(store_path) as store:
        count = export_store(store, out, export_format, stream)
    click.echo(f"exported {count} videos to {out} ({export_format})")
