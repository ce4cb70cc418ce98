"""The results journal: every result as it arrives, one JSON line each, appended and fsynced.

``--infmax-json`` is written once, at the end of the session; a pytest that is SIGKILLed
(an OOM kill, a CI runner's hard stop) never gets there. The journal sits next to it
(``PATH.journal``) and takes each result the moment its test's report reaches the
controller, so a kill loses at most the test in flight. ``infmax report --from-journal
PATH.journal`` rebuilds the JSON and every other report from it through the one writer.

Lines, each a JSON object with ``kind``:

* ``journal``: the first line: the format, and the environment the run happened in;
* ``result``: one ``--infmax-json`` result (``LoadResult.to_dict()`` and its outcome);
* ``sweep``, ``check``: a sweep, a baseline comparison, as the JSON holds them.

Each line is redacted (:func:`pytest_infmax.redact.redact`) like every other file. A
line cut short by the kill (the last one, half written) is skipped when reading.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pytest_infmax.environment import environment
from pytest_infmax.redact import redact
from pytest_infmax.reports.document import results_document

FORMAT = "pytest-infmax-journal/1"
SUFFIX = ".journal"


class JournalError(ValueError):
    """The file is not a results journal."""


def journal_path(json_path: Path) -> Path:
    """Where the journal of the ``--infmax-json`` file ``json_path`` goes: ``PATH.journal``."""
    return json_path.with_name(json_path.name + SUFFIX)


def json_path_for(journal: Path) -> Path:
    """The ``--infmax-json`` file a journal belongs to (``perf.json.journal`` -> ``perf.json``)."""
    name = journal.name
    return journal.with_name(
        name[: -len(SUFFIX)] if name.endswith(SUFFIX) and len(name) > len(SUFFIX) else name + ".json"
    )


class Journal:
    """An append-only results journal; the file is made (anew) at the first line."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def _open(self) -> int:
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # a journal left by an earlier session of the same path is replaced, not continued
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o666)
            self._write({"kind": "journal", "format": FORMAT, "environment": environment()})
        return self._fd

    def _write(self, line: dict[str, Any]) -> None:
        assert self._fd is not None
        data = (redact(json.dumps(line, allow_nan=False)) + "\n").encode("utf-8")
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]
        os.fsync(self._fd)

    def append(self, kind: str, data: dict[str, Any]) -> None:
        """Append one line and make it durable (fsync) before returning."""
        self._open()
        self._write({"kind": kind, "data": data})

    def close(self, *, remove: bool) -> None:
        """Close the journal; ``remove``: delete it too (the JSON it backs up was written)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            if remove:
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass


def read_journal(path: Path) -> tuple[dict[str, Any], list[str]]:
    """The ``--infmax-json`` document a journal holds, and notes on what was skipped."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    notes: list[str] = []
    header: dict[str, Any] | None = None
    results: list[dict[str, Any]] = []
    sweeps: list[dict[str, Any]] = []
    checks: list[dict[str, Any]] = []
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
        kind = line.get("kind") if isinstance(line, dict) else None
        data = line.get("data") if isinstance(line, dict) else None
        if not isinstance(data, dict):
            raise JournalError(f"{path}: line {number} has no data object")
        {"result": results, "sweep": sweeps, "check": checks}.get(str(kind), []).append(data)
    if header is None:
        raise JournalError(f"{path}: empty: not a results journal")
    servers = list({repr(sv): sv for r in results if (sv := r.get("server")) is not None}.values())
    doc = results_document(results, servers)
    doc["environment"] = header.get("environment") or doc["environment"]
    doc["sweeps"] = sweeps
    doc["checks"] = checks
    return doc, notes
