"""``vidshift store verify``: everything of a store that can change on disk, checked (``FeatureStore.verify``)."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .part_writer import DIGESTS_SUFFIX, VideoHasher, digests_path
from .store import BACKEND_READ_ERRORS, REEXTRACT, VERIFY_BLOCK_STEPS, FeatureStore, StoreError


def verify_store(store: FeatureStore, progress: Callable[[], None] | None = None) -> list[str]:
    """Check everything that can change on disk; return one line per problem, naming the video where a
    video is affected and the file otherwise. ``progress()`` is called after each video.

    store.json and index.json are checked against their embedded sha256 (a damaged index is rebuilt);
    every part's video table is read, every chunk re-read (each has a checksum) and every video's content
    hash recomputed; a part whose videos all read back intact is still compared with the digests of its
    files taken at commit, which catches a changed byte in metadata or unused space.
    """
    problems = []
    if store.meta_problem:
        problems.append(f"store.json: {store.meta_problem}; its provenance cannot be trusted: restore store.json "
                        f"from a copy of the store")
    index, index_problem = store._index_on_disk()
    if index_problem not in (None, "missing"):
        try:
            store.rebuild_index()
            repair = "rebuilt it from the parts, nothing was lost"
        except StoreError:
            repair = "cannot rebuild it while a part's video table is unreadable (see below)"
        problems.append(f"index.json: {index_problem}; {repair}")
    seen = {}
    for part in store.part_names():
        try:
            table = store._reader(part).table()
        except BACKEND_READ_ERRORS as error:  # a damaged part must not hide the others' problems
            problems.append(f"part {part}: video table unreadable ({type(error).__name__}: {error}); "
                            f"{_videos_of(index, part)}; {REEXTRACT}")
            continue
        part_problems = []
        for row in table["videos"]:
            key = (table["stream"], row["video_id"])
            if key in seen:
                problems.append(f"video {row['video_id']}: stored twice ({seen[key]} and {part})")
            seen[key] = part
            part_problems += _verify_video(store, part, table["stream"], row)
            if progress:
                progress()
        changed = _changed_files(store, part)
        if changed and not part_problems:
            videos = ", ".join(row["video_id"] for row in table["videos"])
            part_problems.append(
                f"part {part}: {', '.join(changed)} differs from the digest recorded at commit in "
                f"{digests_path(Path(part)).name} (one of the two changed since); every video's data still reads "
                f"back intact ({videos}), but to be safe {REEXTRACT}")
        problems += part_problems
    return problems



def _changed_files(store: FeatureStore, part: str) -> list[str]:
    """Files of a part whose sha256 differs from the one recorded at commit ([] for parts without digests)."""
    try:
        recorded = store.recorded_digests(part)
    except ValueError:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return [f"{part}{DIGESTS_SUFFIX}"]
    if recorded is None:
        return []  # written by a vidshift that recorded no file digests
    actual = store.files.file_digests(part, recorded)
    return [f"{part}/{name}" if name != "." else part
            for name in sorted(recorded.keys() | actual.keys()) if recorded.get(name) != actual.get(name)]

def _verify_video(store: FeatureStore, part: str, stream: str, row: dict) -> list[str]:
    reader, hasher = store._reader(part), VideoHasher()
    try:
        for name in ("maps", "pooled", "steps"):
            if not reader.has(stream, name):
                continue
            for start in range(0, row["n_steps"], VERIFY_BLOCK_STEPS):
                stop = min(start + VERIFY_BLOCK_STEPS, row["n_steps"])
                hasher.update(name, reader.read(stream, name, row["offset"] + start, row["offset"] + stop))
    except BACKEND_READ_ERRORS as error:
        return [f"video {row['video_id']} ({part}): checksum or read error: {type(error).__name__}: {error}"]
    if hasher.hexdigest() != row["sha256"]:
        return [f"video {row['video_id']} ({part}): content hash mismatch (data changed since it was written)"]
    return []


def _videos_of(index: dict | None, part: str) -> str:
    """The videos a damaged part held, from an intact index.json."""
    if index is None:
        return "its videos are unknown (index.json is missing or damaged too)"
    videos = sorted(vid for rows in index["videos"].values() for vid, row in rows.items() if row["part"] == part)
    return f"its videos: {', '.join(videos)}" if videos else "it held no videos"
