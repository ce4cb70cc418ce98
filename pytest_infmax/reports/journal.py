"""The results journal: every run as it ends, one JSON line each, appended and fsynced.

``--infmax-json`` is written once, at the end of the session; a pytest that is SIGKILLed
(an OOM kill, a CI runner's hard stop) never gets there. The journal sits next to it
(``PATH.journal``) and takes each *run* the moment it ends, in the process that ran it,
so a kill loses at most the run in flight, not the test: a test may run several loads
(``infmax.run`` twice, a sweep, ``repeat=``). ``infmax report --from-journal
PATH.journal`` rebuilds the JSON and every other report from it through the one writer.

Under pytest-xdist each worker appends to a journal of its own beside the controller's,
``PATH.journal.gw0``, ``PATH.journal.gw1``, ... (a *shard*); the reader merges them. Why
shards and not one file shared by every process: ``O_APPEND`` makes each ``write`` land
whole at the end, but a run's line holds its records (megabytes), which a single
``write`` call need not take whole (it may return short, and the rest then follows
another process's line); and a shard is written by one process only, so a kill tears at
most its last line. Every file of a session carries the session's id in its first line,
so a shard left by an earlier session of the same path is never merged (and is removed
when the next session starts).

Lines, each a JSON object with ``kind``:

* ``journal``: the first line of each file: the format, the session's id, who writes
  it (``main`` or the xdist worker's id), and the environment the run happened in;
* ``run``: one run, the moment it ended: ``test`` (the pytest node id) and ``data``, the
  ``--infmax-json`` result as ``LoadResult.to_dict()`` makes it (with the outcome known
  then: the test has not finished, so its verdicts are not all in);
* ``result``: the controller's, once the test's report arrives: ``test`` and the
  complete result (SLA verdicts, baseline check, the test's outcome). Every result of a
  test comes on its one report, so a ``result`` line for a test completes all of its
  ``run`` lines: the reader keeps the ``result`` lines, and the runs of a test that has
  none, flagged ``"unfinished": true`` (its row says ``FAIL (unfinished)``: the test
  never finished, so it is never counted as passed);
* ``sweep``, ``check``: a sweep, a baseline comparison, as the JSON holds them.

A line's records keep their per-chunk stamps where ``--infmax-json`` keeps them (in
binary, ``pytest_infmax/sidecar.py``): each journal file has a stamps file beside it,
``PATH.journal-stamps`` (``PATH.journal.gw0-stamps``), append-only, and the line says
where its block is (``"stamps": {"at": byte offset, "records", "times", "tokens"}``: the
per-record counts, then the stamps, little-endian int64 and float64). The block is
fsynced before its line is written, so a line never names a block that is not whole; a
test's ``result`` line names the block its ``run`` line wrote where the stamps are the
same, byte for byte (a run's 512k stamps are 8 MB, written once);
the reader puts the stamps back into the records, so every report reads the same data.

Each line is redacted (:func:`pytest_infmax.redact.redact`) like every other file. A
line cut short by the kill (the last one of a file, half written) is skipped when reading.
"""

from __future__ import annotations

import json
import os
import re
import threading
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pytest_infmax import sidecar
from pytest_infmax.environment import environment
from pytest_infmax.lazy import lazy_module
from pytest_infmax.redact import redact
from pytest_infmax.reports.document import results_document

if TYPE_CHECKING:
    import numpy as np
else:  # imported at first use, not with this module (pytest_infmax/lazy.py): the plugin imports it
    np = lazy_module("numpy")

FORMAT = "pytest-infmax-journal/1"
SUFFIX = ".journal"
MAIN = "main"  # the writer of PATH.journal: the controller (or the only process)
STAMPS = "-stamps"  # a journal file's per-chunk stamps: PATH.journal-stamps, PATH.journal.gw0-stamps
_WORKER = re.compile(r"[A-Za-z0-9_]+")  # an xdist worker's id (gw0): what a shard's name ends in
# the binary block of one line's stamps, in this order: per record counts, then the stamps
_BLOCK = (
    ("time_counts", "<i8", "records"),
    ("token_counts", "<i8", "records"),
    ("times", "<f8", "times"),
    ("tokens", "<i8", "tokens"),
)


class JournalError(ValueError):
    """The file is not a results journal."""


def journal_path(json_path: Path) -> Path:
    """Where the journal of the ``--infmax-json`` file ``json_path`` goes: ``PATH.journal``."""
    return json_path.with_name(json_path.name + SUFFIX)


def shard_path(journal: Path, worker: str) -> Path:
    """The journal an xdist worker writes beside ``journal``: ``PATH.journal.gw0``."""
    return journal.with_name(f"{journal.name}.{worker}")


def shards(journal: Path) -> list[Path]:
    """The worker journals beside ``journal`` (of any session), in name order."""
    prefix = journal.name + "."
    try:
        return sorted(
            p
            for p in journal.parent.iterdir()
            if p.name.startswith(prefix) and _WORKER.fullmatch(p.name[len(prefix) :]) and p.is_file()
        )
    except OSError:  # no such directory, or a file where it should be: no shards there
        return []


def stamps_path(journal: Path) -> Path:
    """Where a journal file's per-chunk stamps go: ``PATH.journal-stamps``."""
    return journal.with_name(journal.name + STAMPS)


def json_path_for(journal: Path) -> Path:
    """The ``--infmax-json`` file a journal belongs to (``perf.json.journal`` -> ``perf.json``)."""
    name = journal.name
    return journal.with_name(
        name[: -len(SUFFIX)] if name.endswith(SUFFIX) and len(name) > len(SUFFIX) else name + ".json"
    )


def new_session() -> str:
    """A session's id, in the first line of each of its journal files."""
    return uuid.uuid4().hex


class Journal:
    """An append-only results journal; the file is made (anew) at the first line.

    ``session``: the id every file of one session carries; ``writer``: ``main`` for
    ``PATH.journal``, the xdist worker's id for its shard.
    """

    def __init__(self, path: Path, *, session: str | None = None, writer: str = MAIN) -> None:
        self.path = path
        self.session = session or new_session()
        self.writer = writer
        self._fd: int | None = None
        self._stamps_fd: int | None = None
        self._stamps_at = 0  # the stamps file's size: where the next block goes
        # the blocks the lines of the latest test wrote: its ``result`` line names the block of
        # its ``run`` line where the stamps are the same, not a second copy (see _write_stamps)
        self._blocks: tuple[str | None, list[tuple[list[np.ndarray], dict[str, int]]]] = (None, [])
        self._lock = threading.Lock()

    def open(self) -> None:
        """Make the file and write its first line now (the controller's, at the session's start:
        the reader finds the session's id there even if no line follows)."""
        with self._lock:
            self._open()

    def _open(self) -> int:
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # a journal left by an earlier session of the same path is replaced, not continued
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o666)
            self._write(
                {
                    "kind": "journal",
                    "format": FORMAT,
                    "session": self.session,
                    "writer": self.writer,
                    "environment": environment(),
                }
            )
        return self._fd

    def _write(self, line: dict[str, Any]) -> None:
        assert self._fd is not None
        _write_all(self._fd, (redact(json.dumps(line, allow_nan=False)) + "\n").encode("utf-8"))

    def _write_stamps(self, arrays: dict[str, np.ndarray], test: str | None) -> dict[str, int]:
        """Append one line's stamps to the stamps file, fsynced before the line that names them
        is written: a line never names a block that is not whole. A block the same, byte for
        byte, as one an earlier line of the same test wrote (a test's ``result`` line holds the
        records its ``run`` line did) is named again, not written twice."""
        if self._stamps_fd is None:
            self._stamps_fd = os.open(
                stamps_path(self.path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o666
            )
            self._stamps_at = 0
            self._blocks = (None, [])
        parts = [np.ascontiguousarray(arrays[name], dtype=dtype) for name, dtype, _ in _BLOCK]
        owner, blocks = self._blocks
        if owner != test:  # a new test's lines: the blocks of the last one are not needed again
            blocks = []
            self._blocks = (test, blocks)
        for earlier, where in blocks:  # the counts first: a block of other records differs there
            # bit for bit, as 8-byte integers (every array of a block is 8 bytes an item): a float
            # NaN equals itself, -0.0 does not equal 0.0
            if all(
                a.shape == b.shape and np.array_equal(a.view(np.int64), b.view(np.int64))
                for a, b in zip(parts, earlier)
            ):
                return dict(where)
        for part in parts:  # each array's own bytes, written as they are: no copy of them joined first
            _write_all(self._stamps_fd, part.data.cast("B"), sync=False)
        os.fsync(self._stamps_fd)
        size = sum(part.nbytes for part in parts)
        where = {
            "at": self._stamps_at,
            "records": int(arrays["time_counts"].size),
            "times": int(arrays["times"].size),
            "tokens": int(arrays["tokens"].size),
        }
        self._stamps_at += size
        blocks.append((parts, where))
        return dict(where)

    def append(self, kind: str, data: dict[str, Any], *, test: str | None = None) -> None:
        """Append one line (of the pytest test ``test``, where there is one) and make it
        durable (fsync) before returning."""
        line: dict[str, Any] = {"kind": kind}
        if test is not None:
            line["test"] = test
        with self._lock:
            self._open()
            if isinstance(data.get("records"), list):  # the records' stamps: binary, as in the sidecar
                doc, arrays = sidecar.split({"results": [data]})
                if arrays is not None:
                    line["stamps"] = self._write_stamps(arrays, test)
                    data = doc["results"][0]
            line["data"] = data
            self._write(line)

    def close(self, *, remove: bool) -> None:
        """Close the journal; ``remove``: delete it too (the JSON it backs up was written)."""
        with self._lock:
            for fd in (self._fd, self._stamps_fd):
                if fd is not None:
                    os.close(fd)
            self._fd = self._stamps_fd = None
            self._blocks = (None, [])
            if remove:
                for path in (self.path, stamps_path(self.path)):
                    try:
                        os.unlink(path)
                    except FileNotFoundError:
                        pass


def _write_all(fd: int, data: bytes | memoryview, *, sync: bool = True) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    if sync:
        os.fsync(fd)


class _Stamps:
    """A journal file's stamps file, read once, on the first line that needs it."""

    def __init__(self, journal: Path) -> None:
        self.path = stamps_path(journal)
        self._data: bytes | None = None

    def data_of(self, line: dict[str, Any]) -> dict[str, Any]:
        """The line's ``data`` with its records' stamps put back (in place)."""
        where = line.get("stamps")
        if where is None:
            return line["data"]
        if self._data is None:
            try:
                self._data = self.path.read_bytes()
            except FileNotFoundError:
                raise JournalError(f"{self.path} is missing: the records' per-chunk stamps are there") from None
        at = int(where["at"])
        arrays = {}
        for name, dtype, count in _BLOCK:
            n = int(where[count])
            size = n * np.dtype(dtype).itemsize
            if at < 0 or n < 0 or at + size > len(self._data):
                raise JournalError(f"{self.path}: the stamps of a line run past its end ({len(self._data)} bytes)")
            arrays[name] = np.frombuffer(self._data, dtype=dtype, count=n, offset=at)
            at += size
        return sidecar.attach({"results": [line["data"]]}, arrays, str(self.path))["results"][0]


def remove_shards(journal: Path) -> None:
    """Delete the worker journals beside ``journal``: at a session's start (an earlier
    session's), and at its end once the JSON holds what they did."""
    for shard in shards(journal):
        for path in (shard, stamps_path(shard)):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


def _read_lines(path: Path, notes: list[str]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A journal file's header and its lines; a last line cut short is skipped with a note."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    header: dict[str, Any] | None = None
    out: list[dict[str, Any]] = []
    stamps = _Stamps(path)
    for number, text in enumerate(lines, 1):
        if not text.strip():
            continue
        try:
            line = json.loads(text)
        except ValueError:
            last = number == len(lines) or not any(t.strip() for t in lines[number:])
            if last:  # the line the kill cut short
                notes.append(f"{path}: skipped the last line, cut short ({len(text)} characters)")
                continue
            raise JournalError(f"{path}: line {number} is not JSON") from None
        if header is None:
            if not isinstance(line, dict) or line.get("kind") != "journal" or line.get("format") != FORMAT:
                raise JournalError(f"{path}: not a results journal (its first line is not a {FORMAT} header)")
            header = line
            continue
        if not isinstance(line, dict) or not isinstance(line.get("data"), dict):
            raise JournalError(f"{path}: line {number} has no data object")
        try:
            line["data"] = stamps.data_of(line)
        except (KeyError, TypeError, ValueError) as exc:  # SidecarError and JournalError are ValueErrors
            raise JournalError(f"{path}: line {number}: {exc}") from None
        out.append(line)
    if header is None:
        raise JournalError(f"{path}: empty: not a results journal")
    return header, out


def unfinished(entry: dict[str, Any]) -> dict[str, Any]:
    """A run's result whose test never finished (the session was killed first), flagged so."""
    entry = dict(entry)
    entry["unfinished"] = True
    return entry


# a run line's start, as Journal.append writes it (json.dumps keeps the keys' order)
_RUN_LINE = re.compile(r'\{"kind": "run", "test": ("(?:[^"\\]|\\.)*")')


def unfinished_runs(journal: Path, session: str, finished: set[str]) -> tuple[list[dict[str, Any]], list[str]]:
    """The runs the worker journals of ``session`` hold for tests not in ``finished`` (their
    reports never came: the worker crashed), flagged unfinished; and notes on what was skipped.
    Lines of finished tests are matched by their start, not parsed."""
    out: list[dict[str, Any]] = []
    notes: list[str] = []
    for shard in shards(journal):
        try:
            with open(shard, encoding="utf-8") as f:
                try:
                    header = json.loads(f.readline())
                except ValueError:
                    header = None
                if not isinstance(header, dict) or header.get("session") != session:
                    continue  # not this session's (its start removed those left before; a racing one)
                stamps = _Stamps(shard)
                for text in f:
                    match = _RUN_LINE.match(text)
                    if match is None or json.loads(match.group(1)) in finished:
                        continue
                    try:
                        out.append(unfinished(stamps.data_of(json.loads(text))))
                    except (ValueError, KeyError, TypeError) as exc:
                        notes.append(f"{shard}: skipped a line ({len(text)} characters): {exc}")
        except OSError as exc:
            notes.append(f"could not read the worker journal {shard}: {exc}")
    return sorted(out, key=lambda r: r.get("started_at") or 0.0), notes


def read_journal(path: Path) -> tuple[dict[str, Any], list[str]]:
    """The ``--infmax-json`` document a journal and its session's worker journals hold, and
    notes on what was skipped."""
    notes: list[str] = []
    header, lines = _read_lines(path, notes)
    session = header.get("session")
    for shard in shards(path):
        try:
            shard_header, shard_lines = _read_lines(shard, notes)
        except (OSError, JournalError) as exc:
            notes.append(f"skipped {shard}: {exc}")
            continue
        if session is None or shard_header.get("session") != session:
            notes.append(f"skipped {shard}: a worker journal of another session (not {session})")
            continue
        lines.extend(shard_lines)
    results: list[dict[str, Any]] = []
    sweeps: list[dict[str, Any]] = []
    checks: list[dict[str, Any]] = []
    runs: list[tuple[str | None, dict[str, Any]]] = []
    for line in lines:
        kind, data = line.get("kind"), line["data"]
        if kind == "run":
            runs.append((line.get("test"), data))
        else:
            {"result": results, "sweep": sweeps, "check": checks}.get(str(kind), []).append(data)
    finished = {line.get("test") for line in lines if line.get("kind") == "result"}
    left = [unfinished(data) for test, data in runs if test not in finished]
    if left:
        tests = sorted({str(test) for test, _ in runs if test not in finished})
        notes.append(f"{len(left)} run(s) of test(s) that never finished, kept flagged unfinished: {', '.join(tests)}")
    results += sorted(left, key=lambda r: r.get("started_at") or 0.0)
    servers = list({repr(sv): sv for r in results if (sv := r.get("server")) is not None}.values())
    doc = results_document(results, servers)
    doc["environment"] = header.get("environment") or doc["environment"]
    doc["sweeps"] = sweeps
    doc["checks"] = checks
    return doc, notes
