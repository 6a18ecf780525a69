"""What `vidshift store info` reports: provenance, counts, sizes, compression, failures."""
from __future__ import annotations

import numpy as np

from .store import FeatureStore


def store_summary(store: FeatureStore) -> dict:
    disk = store.disk_bytes()
    streams = {}
    raw_stored = raw_float32 = 0
    tables = store.part_tables()
    for stream in store.streams:
        videos = store.videos(stream)
        steps = sum(record.n_steps for record in videos.values())
        features = store.provenance(stream)["features"]
        map_values = int(np.prod(features["map_shape"])) if features.get("map_shape") else 0
        channels = features["map_shape"][-1] if map_values else features.get("channels", 0)
        itemsize = np.dtype(features.get("dtype", "float32")).itemsize
        # per step: maps in the stored dtype, pooled float32, steps 2 x int32
        raw_stored += steps * (map_values * itemsize + channels * 4 + 8)
        raw_float32 += steps * (map_values * 4 + channels * 4 + 8)
        streams[stream] = {"videos": len(videos), "steps": steps, "failures": store.failures(stream),
                           "partial": _count_partial(tables, videos, stream),
                           "provenance": store.provenance(stream)}
    return {"path": str(store.root), "backend": store.backend, "created": store.meta["created"],
            "parts": len(store.part_names()), "disk_bytes": disk, "raw_bytes_stored_dtype": raw_stored,
            "raw_bytes_float32": raw_float32,
            "compression_ratio": raw_stored / disk if disk else None,
            "ratio_vs_float32": raw_float32 / disk if disk else None, "streams": streams}


def _count_partial(tables: dict[str, dict], videos: dict, stream: str) -> int:
    """Stored videos flagged partial (--keep-partial); the flag is in the part's table, beside the counts."""
    return sum(1 for part, table in tables.items() if table["stream"] == stream for row in table["videos"]
               if row.get("partial") and row["video_id"] in videos and videos[row["video_id"]].part == part)


def human_bytes(n: float) -> str:
    unit = 0
    while n >= 1024 and unit < 4:
        n, unit = n / 1024, unit + 1
    return f"{n:.1f} {('B', 'KiB', 'MiB', 'GiB', 'TiB')[unit]}"


def format_summary(summary: dict) -> str:
    lines = [f"store      {summary['path']} ({summary['backend']}, created {summary['created']})",
             f"parts      {summary['parts']}, {human_bytes(summary['disk_bytes'])} on disk"]
    if summary["compression_ratio"]:
        lines.append(f"compression {summary['compression_ratio']:.2f}x vs raw stored dtype, "
                     f"{summary['ratio_vs_float32']:.2f}x vs raw float32 ({human_bytes(summary['raw_bytes_float32'])})")
    for stream, info in summary["streams"].items():
        features = info["provenance"]["features"]
        software = info["provenance"].get("software", {})
        lines.append(f"stream {stream}: {info['videos']} videos, {info['steps']} steps, {info['partial']} partial, "
                     f"{len(info['failures'])} failed")
        lines += [f"  {key:16} {value}" for key, value in sorted(features.items())]
        lines += [f"  {key:16} {value}" for key, value in sorted(software.items())]
        lines += [f"  FAILED {f['video_id']} [{f['stage']}] {f['path']}: {f['reason']}" for f in info["failures"]]
    return "\n".join(lines)
