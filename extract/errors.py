"""Operating-system errors as messages a user can act on: the file, what happened, what to do.

Shared by the extraction (which adds what is safe and how much space it needs) and the CLI's error boundary.
"""
from __future__ import annotations

import errno
import re

OUT_OF_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})  # EFBIG: a file-size limit (ulimit -f)
NOT_PERMITTED = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})


def error_number(error: OSError) -> int | None:
    """The errno, also of h5py errors that carry it only in their text ('errno = 28')."""
    if error.errno:
        return error.errno
    match = re.search(r"errno = (\d+)", str(error))
    return int(match.group(1)) if match else None


def describe_os_error(error: OSError) -> str:
    """One sentence: ``<file>: <what happened>; <what to do>``."""
    number = error_number(error)
    files = " -> ".join(str(name) for name in (error.filename, error.filename2) if name is not None)
    what = error.strerror or str(error)
    if number in OUT_OF_SPACE:
        advice = "the disk (or your quota, or the file-size limit) is full: free space and run the command again"
    elif number in NOT_PERMITTED:
        advice = ("it is read-only or you may not write there: use a writable directory, or fix its permissions "
                  "or mount")
    elif number in (errno.ENOENT, errno.ENOTDIR):
        advice = "check the path"
    elif number == errno.EISDIR:
        advice = "a directory is where a file was expected: check the path"
    else:
        advice = "check the file and the disk"
    return f"{files + ': ' if files else ''}{what}; {advice}"
