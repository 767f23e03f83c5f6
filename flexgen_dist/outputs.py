"""Result files: checked writable before any work starts, and never left half-written.

An output is written to a temporary file beside it and renamed over it when complete, so an
earlier output is either kept whole or replaced whole; the temporary file is removed on any
exit the process sees (see workdir.partial_file).
"""
from __future__ import annotations

import os
import tempfile

from .errors import FlexGenError
from .workdir import partial_file


def check_writable(path: str, what: str) -> None:
    """Fail now, in one line, if `path` could not be written at the end of the run."""
    path = os.path.abspath(path)
    directory = os.path.dirname(path)
    if os.path.isdir(path):
        raise FlexGenError(f"{what} {path} is a directory")
    if not os.path.isdir(directory):
        raise FlexGenError(f"{what} {path}: directory {directory} does not exist")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise FlexGenError(f"{what} {path} is not writable")
    try:  # the directory must take a new file: the temporary one renamed over the output
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".flexgen-check-"):
            pass
    except OSError as e:
        raise FlexGenError(f"{what} {path}: cannot create files in {directory} ({e.strerror})") from None


def write_atomically(path: str, lines) -> None:
    """Write `lines` (strings without newlines) to `path` through a temporary file and a rename."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    with partial_file(tmp), os.fdopen(fd, "w") as f:
        for line in lines:
            f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())
        os.replace(tmp, path)


def append_line(path: str, line: str) -> None:
    """Append one line (a metrics record) whole, in a single write."""
    with open(path, "a") as f:
        f.write(line + "\n")
