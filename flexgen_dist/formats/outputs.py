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
    resumes from the journal; a mismatching one is refused. A finished output whose tail is torn
    (a kill inside a write, a full disk) is repaired as a journal is: its whole lines go back into
    the journal and the requests of the rest run again.

    A new job's two files appear at its first `append` (the job's error records, even none, then
    each block's), so a job refused before any work (a bad request under --strict) leaves none."""

    def __init__(self, path: str, manifest: dict):
        self.path = os.path.abspath(path)
        self.manifest_path, self.journal_path = self.path + ".manifest.json", self.path + ".partial"
        self.manifest = manifest
        self.complete = False
        self.new = True  # no manifest of this job yet: nothing of it is on disk
        self.notes: list[str] = []  # what a resume repaired, for the user
        self.fd: int | None = None

    @classmethod
    def finished(cls, path: str) -> dict | None:
        """The manifest of the job whose output `path` is, with `records` (the lines it holds), if
        that job is finished and its output whole; else None."""
        out = cls(path, {})
        try:
            old = out._read_manifest()
        except FlexGenError:
            return None
        if not (old and old.get("complete") and os.path.exists(out.path)):
            return None
        lines, whole = out._output_lines()
        return {**old, "records": len(lines)} if whole else None

    def _output_lines(self) -> tuple[list[str], bool]:
        """The finished output's whole record lines, and whether nothing else follows them."""
        with open(self.path, "rb") as f:
            data = f.read()
        lines, good = _whole_lines(data, _record_line)
        return lines, good == len(data)

    def start(self) -> dict[int, str]:
        """The records already written (index -> line)."""
        old = self._read_manifest()
        if old is not None:
            self._check_same_job(old)
            self.new = False
            self.manifest["created"] = old.get("created", self.manifest.get("created"))
            self.complete = bool(old.get("complete")) and os.path.exists(self.path)
        if self.complete and self._reopen_if_torn():
            self.complete = False
        if self.complete or self.new:
            return {}
        done = self._read_journal()
        self._open()
        return done

    def _open(self) -> None:
        """The journal open for appending; a new job's manifest and empty journal written first."""
        if self.fd is not None:
            return
        if self.new:
            self._write_manifest(complete=False)
            with open(self.journal_path, "w"):
                pass
            self.new = False
        self.fd = os.open(self.journal_path, os.O_WRONLY | os.O_APPEND)

    def _write_manifest(self, complete: bool) -> None:
        write_atomically(self.manifest_path, [json.dumps({**self.manifest, "complete": complete}, sort_keys=True)])

    def _reopen_if_torn(self) -> bool:
        """A finished output that does not end in a whole JSON line goes back to being a journal:
        its whole lines (line k is request k's record: the output holds one per request, in input
        order), the job marked unfinished. Whether it did."""
        lines, whole = self._output_lines()
        if whole:
            return False
        write_atomically(self.journal_path, [f"{k}\t{line}" for k, line in enumerate(lines)])
        self._write_manifest(complete=False)
        self.notes.append(f"{self.path} ended in a torn line (an interrupted write): cut it, kept the "
                          f"{len(lines)} whole records; the other requests run again")
        return True

    def append(self, records: list[dict]) -> None:
        """Write these records whole, durably, before the job goes on."""
        self._open()
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
        self._open()
        os.close(self.fd)
        lines = self._read_journal()
        write_atomically(self.path, (lines[i] for i in sorted(lines)))
        self._write_manifest(complete=True)
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
        lines, good = _whole_lines(data, _journal_line)
        if good < len(data):
            os.truncate(self.journal_path, good)
            self.notes.append(f"{self.journal_path} ended in a torn line (an interrupted write): cut it")
        done = {}
        for index, line in lines:
            done.setdefault(index, line)
        return done


def _whole_lines(data: bytes, parse) -> tuple[list, int]:
    """`parse(raw)` of each line of `data` up to the first one that is not whole (no newline after
    it, or `parse` raises ValueError), and the bytes those whole lines take."""
    out, good = [], 0
    for raw in data.split(b"\n")[:-1]:  # what follows the last newline is torn (or empty)
        try:
            out.append(parse(raw))
        except ValueError:
            break
        good += len(raw) + 1
    return out, good


def _record_line(raw: bytes) -> str:
    """An output line, checked to be one whole JSON record; ValueError if it is not."""
    json.loads(raw)
    return raw.decode("utf-8")


def _journal_line(raw: bytes) -> tuple[int, str]:
    """(request index, record line) of a journal line; ValueError if it is not whole."""
    index, line = raw.decode("utf-8").split("\t", 1)
    json.loads(line)
    return int(index), line
