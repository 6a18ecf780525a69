"""The store card (``vidshift store info --card``): ``STORE/README.md`` for whoever receives the store.

What the features are and how they were made (each stream's provenance), what the store holds (videos and
steps per domain and split, failures), a licence line for the sender to fill, and how to read the features
with plain zarr or h5py, without vidshift. ``tests/test_sharing.py`` runs that recipe exactly as written here.
"""
from __future__ import annotations

from collections import Counter

from .store import FeatureStore
from .summary import human_bytes, store_summary

LICENCE_PLACEHOLDER = "LICENCE: (to fill in: the licence of these features, and of the videos they come from)"

ZARR_RECIPE = '''import json
import zarr                               # pip install "zarr>=3.1"

store = "."                               # this directory
stream, video = {stream!r}, {video!r}
index = json.load(open(f"{{store}}/index.json"))
row = index["videos"][stream][video]      # part, offset, n_steps, sha256, attrs (label, domain, split, ...)
part = zarr.open_group(f"{{store}}/parts/{{row['part']}}", mode="r")
rows = slice(row["offset"], row["offset"] + row["n_steps"])
{arrays}'''

HDF5_RECIPE = '''import json
import h5py
import hdf5plugin                         # registers the zstd filter the parts are compressed with

store = "."                               # this directory
stream, video = {stream!r}, {video!r}
index = json.load(open(f"{{store}}/index.json"))
row = index["videos"][stream][video]      # part, offset, n_steps, sha256, attrs (label, domain, split, ...)
part = h5py.File(f"{{store}}/parts/{{row['part']}}", "r")
rows = slice(row["offset"], row["offset"] + row["n_steps"])
{arrays}'''

ARRAY_LINES = {"maps": 'maps = part[f"{stream}/maps"][rows]        # [T, H, W, C] {dtype}, channels last',
               "pooled": 'pooled = part[f"{stream}/pooled"][rows]    # [T, C] float32: spatial mean of the maps',
               "steps": 'steps = part[f"{stream}/steps"][rows]      # [T, 2] int32: first, last source frame'}


def store_card(store: FeatureStore) -> str:
    """The card's Markdown text."""
    summary = store_summary(store)
    lines = [f"# Feature store: {', '.join(store.streams)}", "",
             f"Cached video features written by vidshift ({summary['backend']} parts, created "
             f"{summary['created']}): {summary['parts']} part(s), {human_bytes(summary['disk_bytes'])}.", "",
             LICENCE_PLACEHOLDER, ""]
    for stream, info in summary["streams"].items():
        lines += _stream_section(store, stream, info)
    derived = store.meta.get("derived_from")
    if derived:
        lines += ["## Made from", "", f"`vidshift store {derived['operation']}` of:", ""]
        lines += [f"- {source['store']} (store.json sha256 {source['store_json_sha256']})"
                  for source in derived["sources"]] + [""]
    lines += _reading_section(store)
    return "\n".join(lines)


def _stream_section(store: FeatureStore, stream: str, info: dict) -> list[str]:
    features, software = info["provenance"]["features"], info["provenance"].get("software", {})
    lines = [f"## Stream `{stream}`", "",
             f"{info['videos']} videos, {info['steps']} time steps, {info['partial']} kept partial (decodable "
             f"prefix), {len(info['failures'])} failed.", "", "How the features were made:", ""]
    lines += [f"- {key}: `{value}`" for key, value in sorted(features.items())]
    if software:
        lines += ["", "Software: " + ", ".join(f"{key} {value}" for key, value in sorted(software.items()))]
    counts = Counter((record.attrs.get("domain", "?"), record.attrs.get("split", "?"))
                     for record in store.videos(stream).values())
    lines += ["", "| domain | split | videos |", "|---|---|---|"]
    lines += [f"| {domain} | {split} | {count} |" for (domain, split), count in sorted(counts.items())]
    if info["failures"]:
        lines += ["", "Failed videos (not in the store):", ""]
        lines += [f"- `{f['video_id']}` [{f['stage']}] {f['path']}: {f['reason']}" for f in info["failures"]]
    return lines + [""]


def _reading_section(store: FeatureStore) -> list[str]:
    stream = store.streams[0]
    videos = store.videos(stream)
    video = min(videos) if videos else "VIDEO_ID"
    features = store.provenance(stream)["features"]
    names = ("maps", "pooled", "steps") if features.get("map_shape") else ("pooled", "steps")
    arrays = "\n".join(ARRAY_LINES[name].replace("{dtype}", features.get("dtype", "")) for name in names)
    recipe = (ZARR_RECIPE if store.backend == "zarr" else HDF5_RECIPE).format(stream=stream, video=video,
                                                                             arrays=arrays)
    packed = ("a packed `STORE.zip` reads the same with `zarr.open_group(zarr.storage.ZipStore(\"STORE.zip\", "
              "mode=\"r\"), path=f\"parts/{row['part']}\", mode=\"r\")`" if store.backend == "zarr" else
              "a packed `STORE.tar` is a plain tar: extract it, or pass `tarfile.open(...).extractfile(member)` "
              "to `h5py.File`")
    return ["## Reading the features without vidshift", "",
            "`index.json` maps each video to its part and rows; each part holds, per stream, `maps`, `pooled` and "
            "`steps` (the concatenated rows of its videos). Run this in the store's directory:", "",
            "```python", recipe, "```", "",
            f"With vidshift: `FeatureStore.open(\".\").read({video!r}, \"maps\")`. `vidshift store verify .` checks "
            f"every byte against the recorded checksums; {packed}.", ""]
