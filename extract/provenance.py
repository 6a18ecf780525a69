"""Software provenance recorded with every store part and run: what produced these numbers."""
from __future__ import annotations

import importlib.metadata
import platform
import subprocess
from pathlib import Path

LIBRARIES = ("torch", "torchvision", "numpy", "zarr", "h5py", "hdf5plugin", "decord", "av", "pillow",
             "opencv-contrib-python-headless")  # OpenCV: TV-L1 optical flow


def git_commit() -> str:
    """The commit of the vidshift checkout, with ``-dirty`` for local changes; ``unknown`` outside git."""
    source = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=source, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=source,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


def software_versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "vidshift": _version("vidshift"), "git_commit": git_commit()}
    versions.update({name: _version(name) for name in LIBRARIES})
    return versions


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"
