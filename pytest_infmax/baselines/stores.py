"""Where baseline sets are kept, chosen by the ``--infmax-baselines`` value.

* a path: a directory of sets, one folder of JSON files per set
  (:class:`~pytest_infmax.baselines.store.BaselineStore`, the embedded default);
* a ``postgresql://`` URL: a shared PostgreSQL store
  (:class:`~pytest_infmax.baselines.pgstore.PostgresStore`), for runners that share no disk.

Both give a :class:`~pytest_infmax.baselines.store.BaselineSet`; :func:`migrate` copies JSON sets
into a store (``infmax baselines migrate DIR URL``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytest_infmax.baselines.pgstore import PostgresStore, is_store_url, safe_url, set_names
from pytest_infmax.baselines.store import (
    DEFAULT_HISTORY,
    BaselineError,
    BaselineRun,
    BaselineSet,
    BaselineStore,
    load_runs,
)

Location = str | os.PathLike[str]


def open_set(location: Location, set_name: str, *, history: int = DEFAULT_HISTORY) -> BaselineSet:
    """The set ``set_name`` at ``location`` (a directory of sets, or a postgresql:// URL)."""
    if is_store_url(location):
        return PostgresStore(str(location), set_name, history=history)
    return BaselineStore(Path(location) / set_name, history=history)


def has_set(location: Location, set_name: str) -> bool:
    """Whether ``location`` holds the set (a folder of it; a store: at least one baseline in it)."""
    if is_store_url(location):
        return set_name in set_names(str(location))
    return (Path(location) / set_name).is_dir()


def list_sets(location: Location) -> list[str]:
    """The sets at ``location``, sorted; BaselineError or OSError if it cannot be read."""
    if is_store_url(location):
        return set_names(str(location))
    directory = Path(location)
    return sorted(p.name for p in directory.iterdir() if p.is_dir()) if directory.is_dir() else []


def load_side(location: Location, set_name: str | None = None) -> dict[str, tuple[dict[str, Any], list[BaselineRun]]]:
    """Result key -> (testbed, runs) of one side of ``infmax compare``: a baseline file, a set's
    directory, an ``--infmax-json`` results file, or, with ``set_name``, that set of a
    directory of sets or of a ``postgresql://`` store."""
    store = is_store_url(location)
    if store and not set_name:
        raise BaselineError(
            f"{describe(location)} is a PostgreSQL store of baseline sets: name the set to compare with "
            f"(infmax compare --set SET; sets there: {', '.join(list_sets(location)) or 'none'})"
        )
    if set_name and (store or Path(location).is_dir()):
        sets = list_sets(location)  # one read of the store
        if set_name not in sets:
            raise BaselineError(
                f"no baseline set {set_name!r} in {describe(location)} (sets there: {', '.join(sets) or 'none'})"
            )
        if store:
            return {b.key: (b.testbed, b.runs) for b in open_set(location, set_name)}
        return load_runs(Path(location) / set_name)
    return load_runs(location)


def describe(location: Location) -> str:
    """``location`` for messages (a URL without its password)."""
    return safe_url(str(location)) if is_store_url(location) else str(location)


@dataclass
class MigrateReport:
    """What :func:`migrate` copied: runs added per (set, key), and the keys it refused."""

    added: dict[tuple[str, str], int] = field(default_factory=dict)
    refused: list[str] = field(default_factory=list)

    @property
    def runs_added(self) -> int:
        return sum(self.added.values())


def migrate(directory: Location, url: str, set_name: str | None = None) -> MigrateReport:
    """Copy a JSON set (a folder of baseline files) into the store at ``url``, as set ``set_name``
    (default: the folder's name). A folder of sets (no baseline files of its own) copies each set
    under its own name. Idempotent: runs the store already holds are not added again; a key the
    store holds from another testbed or workload is refused (listed, the rest still copied)."""
    if not is_store_url(url):
        raise BaselineError(f"{url!r} is not a postgresql:// URL: migrate copies into a PostgreSQL store")
    source = Path(directory)
    if not source.is_dir():
        raise BaselineError(f"{source} is not a directory of baseline files (a set, e.g. .infmax/baselines/main)")
    if any(source.glob("*.json")):
        sets = [(source, set_name or source.name)]
    elif set_name is not None:
        raise BaselineError(f"{source} holds no baseline files (*.json): name a set folder to copy it as {set_name!r}")
    else:
        sets = [(p, p.name) for p in sorted(source.iterdir()) if p.is_dir() and any(p.glob("*.json"))]
        if not sets:
            raise BaselineError(f"{source} holds no baseline files (*.json) and no set folders with them")
    report = MigrateReport()
    for folder, name in sets:
        for baseline in BaselineStore(folder):  # a corrupt file raises, naming it: nothing half-read is copied
            store = PostgresStore(url, name, history=baseline.history)
            try:
                report.added[(name, baseline.key)] = store.merge(baseline)
            except BaselineError as exc:
                report.refused.append(f"{name}/{baseline.key}: {exc}")
    return report
