"""Result files: checked writable before any work starts, never left half-written, and for a
batch job written as it goes so that a killed job resumes (JobOutput).

An output is written to a temporary file beside it and renamed over it when complete, so an
earlier output is either kept whole or replaced whole; the temporary file is removed on any
exit the process sees (see workdir.partial_file).
"""
from __future__ import annotations

import json
import os
import tempfile

from ..core.errors import FlexGenError
from ..system.workdir import partial_file
from .records import public


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


class JobOutput:
    """The crash-safe output of a batch job at `path`, with two files beside it:

    - `PATH.manifest.json`: what makes the results reusable (model, weights identity, dtype,
      compression, generation parameters, the input's digest), written before the first row;
    - `PATH.partial`: the journal. Each finished block's records are appended as lines
      `<index>\\t<record JSON>` in one write, then flushed and fsynced, so after a kill at any
      byte every line but the last is whole; a torn last line is detected and cut on resume.

    When every request is done, the records are written to `path` in input order, atomically
    (temporary file + rename, so an earlier file at `path` is replaced whole or kept), the
    manifest is marked complete and the journal removed. A rerun with a matching manifest
    resumes from the journal; a mismatching one is refused."""

    def __init__(self, path: str, manifest: dict):
        self.path = os.path.abspath(path)
        self.manifest_path, self.journal_path = self.path + ".manifest.json", self.path + ".partial"
        self.manifest = manifest
        self.complete = False
        self.fd: int | None = None

    def start(self) -> dict[int, str]:
        """The records already written (index -> line); opens the journal for appending."""
        old = self._read_manifest()
        if old is not None:
            self._check_same_job(old)
            self.manifest["created"] = old.get("created", self.manifest.get("created"))
            self.complete = bool(old.get("complete")) and os.path.exists(self.path)
        if self.complete:
            return {}
        done = self._read_journal() if old is not None else {}
        if old is None:
            write_atomically(self.manifest_path, [json.dumps({**self.manifest, "complete": False}, sort_keys=True)])
            with open(self.journal_path, "w"):
                pass
        self.fd = os.open(self.journal_path, os.O_WRONLY | os.O_APPEND)
        return done

    def append(self, records: list[dict]) -> None:
        """Write these records whole, durably, before the job goes on."""
        if records:
            data = "".join(f"{r['_index']}\t{json.dumps(public(r))}\n" for r in records).encode()
            self._write(data)
            os.fsync(self.fd)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]

    def finish(self) -> None:
        """Write `path` in input order, atomically; then mark the job complete."""
        if self.complete:
            return
        os.close(self.fd)
        lines = self._read_journal()
        write_atomically(self.path, (lines[i] for i in sorted(lines)))
        write_atomically(self.manifest_path, [json.dumps({**self.manifest, "complete": True}, sort_keys=True)])
        os.remove(self.journal_path)
        self.complete = True

    def _read_manifest(self) -> dict | None:
        try:
            with open(self.manifest_path) as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise FlexGenError(f"{self.manifest_path} cannot be read ({e}); remove it to start the job again") from None

    def _check_same_job(self, old: dict) -> None:
        for key in sorted((set(old) | set(self.manifest)) - {"complete", "created"}):
            if old.get(key) != self.manifest.get(key):
                raise FlexGenError(f"--output {self.path} belongs to another job ({key} was {old.get(key)!r}, now "
                                   f"{self.manifest.get(key)!r}); choose another --output, or remove it and "
                                   f"{os.path.basename(self.manifest_path)} to start again")

    def _read_journal(self) -> dict[int, str]:
        """Whole lines of the journal (index -> record line); the file is cut after the last
        good line (a kill while writing leaves a torn one)."""
        try:
            with open(self.journal_path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return {}
        done, good = {}, 0
        for raw in data.split(b"\n")[:-1]:  # what follows the last newline is torn (or empty)
            parsed = _journal_line(raw)
            if parsed is None:
                break
            done.setdefault(*parsed)
            good += len(raw) + 1
        if good < len(data):
            os.truncate(self.journal_path, good)
        return done


def _journal_line(raw: bytes) -> tuple[int, str] | None:
    try:
        index, line = raw.decode("utf-8").split("\t", 1)
        json.loads(line)
        return int(index), line
    except ValueError:
        return None
