"""JSON files that carry their own sha256 (store.json, index.json): a changed byte is found on reading, and a file
is replaced atomically, so a reader never sees half of one."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

NO_CHECKSUM = "has no checksum"


def digest(payload: dict) -> str:
    """sha256 of the canonical JSON of ``payload``: one changed byte in a value or key changes it."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def checked_json_text(payload: dict) -> str:
    return json.dumps({**payload, "sha256": digest(payload)}, indent=1, sort_keys=True)


def parse_checked_json(text: bytes) -> tuple[dict | None, str | None]:
    """(payload, None) for a JSON object whose embedded sha256 matches; else (payload or None, the problem)."""
    try:
        data = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        return None, f"damaged, not valid JSON ({error})"
    if not isinstance(data, dict):
        return None, f"damaged, a JSON {type(data).__name__} where an object belongs"
    recorded = data.pop("sha256", None)
    if recorded is None:
        return data, NO_CHECKSUM
    if recorded != digest(data):
        return data, "damaged: its checksum does not match its content (changed since it was written)"
    return data, None


def write_checked_json(path: Path, payload: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(checked_json_text(payload))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # left only when writing failed
