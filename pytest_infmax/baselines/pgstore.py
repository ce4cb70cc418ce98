"""A shared baseline store on PostgreSQL: the same histories as the JSON directory, for a CI fleet.

Selected by URL (``--infmax-baselines postgresql://user@host/db``, see
:mod:`pytest_infmax.baselines.stores`). Two tables, made by the first save (reading
needs only the right to read them; a store without them holds no set):

* ``infmax_baselines``: one row per (set, result key): its testbed and history cap;
* ``infmax_runs``: one row per run (:meth:`BaselineRun.to_dict`, as ``jsonb``), oldest first by ``id``.

The semantics are the JSON directory's (:class:`~pytest_infmax.baselines.store.BaselineStore`):
``append`` refuses another testbed or workload, ``replace`` starts a new history, the
oldest runs are dropped beyond the cap (the runs of one save are all kept). A save is one
transaction that locks its baseline's row (``SELECT ... FOR UPDATE``), so runners saving
at once are serialised per key and no run is lost; a failed save changes nothing.

The driver is psycopg 3, the ``postgres`` extra (``pip install 'pytest-infmax[postgres]'``),
imported only when a store is opened. The URL may carry a password: it is registered with
:mod:`pytest_infmax.redact` and every message names the store by its redacted URL.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit

from pytest_infmax.baselines.store import (
    DEFAULT_HISTORY,
    FORMAT,
    HOLLOW,
    Baseline,
    BaselineError,
    BaselineRun,
    Mode,
    _plain,
    _sorted,
)
from pytest_infmax.redact import add_secret, redact

if TYPE_CHECKING:
    import psycopg

URL_SCHEMES = ("postgresql://", "postgres://")
#: seconds a connection attempt may take before the store is reported unreachable
CONNECT_TIMEOUT = 10

_SCHEMA = """
CREATE TABLE IF NOT EXISTS infmax_baselines (
    set_name   text        NOT NULL,
    key        text        NOT NULL,
    testbed    jsonb       NOT NULL,
    history    integer     NOT NULL CHECK (history >= 1),
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (set_name, key)
);
CREATE TABLE IF NOT EXISTS infmax_runs (
    id       bigserial PRIMARY KEY,
    set_name text      NOT NULL,
    key      text      NOT NULL,
    run      jsonb     NOT NULL,
    FOREIGN KEY (set_name, key) REFERENCES infmax_baselines (set_name, key) ON DELETE CASCADE
);
CREATE INDEX IF NOT EXISTS infmax_runs_by_key ON infmax_runs (set_name, key, id);
"""
# one lock id for schema creation: CREATE TABLE IF NOT EXISTS races with itself across sessions
_SCHEMA_LOCK = 0x1AF4A7


def is_store_url(location: object) -> bool:
    """Whether a ``--infmax-baselines`` value names a PostgreSQL store (else it is a directory)."""
    return isinstance(location, str) and location.lower().startswith(URL_SCHEMES)


def safe_url(url: str) -> str:
    """The URL as messages show it: the password (and any userinfo) masked."""
    return redact(url)


def register_secrets(url: str) -> None:
    """Register the URL's password (userinfo or ``?password=``) so that no output shows it."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return
    add_secret(unquote(password) if password else None)
    for value in parse_qs(parts.query).get("password", []):
        add_secret(value)


def _psycopg() -> Any:
    try:
        import psycopg
    except ImportError:
        raise BaselineError(
            "a postgresql:// baselines store needs the PostgreSQL driver psycopg 3, which is not installed: "
            "pip install 'pytest-infmax[postgres]' (or point --infmax-baselines at a directory)"
        ) from None
    return psycopg


class PostgresStore:
    """One baseline set in a PostgreSQL database; the interface of :class:`BaselineStore`."""

    def __init__(self, url: str, set_name: str, *, history: int = DEFAULT_HISTORY) -> None:
        if isinstance(history, bool) or not isinstance(history, int) or history < 1:
            raise ValueError(f"history must be a whole number >= 1, got {history!r}")
        if not is_store_url(url):
            raise ValueError(f"not a postgresql:// URL: {safe_url(url)}")
        register_secrets(url)
        self.url = url
        self.set_name = set_name
        self.history = history

    @property
    def where(self) -> str:
        """The store and set, for messages (no password)."""
        return f"{safe_url(self.url)} set {self.set_name!r}"

    def __repr__(self) -> str:
        return f"PostgresStore({self.where})"

    # -- reading --------------------------------------------------------------------------

    def load(self, key: str) -> Baseline | None:
        """The baseline of ``key``; None when there is none; BaselineError if unusable."""
        with connect(self.url) as conn:
            return self._load(conn, key) if _has_tables(conn) else None

    def keys(self) -> list[str]:
        with connect(self.url) as conn:
            return self._keys(conn)

    def _keys(self, conn: psycopg.Connection[Any]) -> list[str]:
        if not _has_tables(conn):
            return []
        rows = conn.execute(
            "SELECT key FROM infmax_baselines WHERE set_name = %s ORDER BY key", (self.set_name,)
        ).fetchall()
        return [row[0] for row in rows]

    def __iter__(self) -> Iterator[Baseline]:
        """Every baseline of the set, by key (an unusable one raises)."""
        with connect(self.url) as conn:
            baselines = [self._load(conn, key) for key in self._keys(conn)]
        yield from (b for b in baselines if b is not None)

    def _load(self, conn: psycopg.Connection[Any], key: str) -> Baseline | None:
        row = conn.execute(
            "SELECT testbed, history FROM infmax_baselines WHERE set_name = %s AND key = %s", (self.set_name, key)
        ).fetchone()
        if row is None:
            return None
        runs = [
            r[0]
            for r in conn.execute(
                "SELECT run FROM infmax_runs WHERE set_name = %s AND key = %s ORDER BY id", (self.set_name, key)
            ).fetchall()
        ]
        if not runs:
            return None  # the row of a save in progress (never committed without runs)
        doc = {"format": FORMAT, "key": key, "testbed": row[0], "history": row[1], "runs": runs}
        try:
            return Baseline.from_dict(doc)
        except ValueError as exc:
            raise BaselineError(
                f"the baseline of {key!r} in {self.where} is unusable: {exc}. Rewrite it with --infmax-update"
            ) from None

    # -- writing ---------------------------------------------------------------------------

    def save(
        self,
        key: str,
        runs: BaselineRun | Sequence[BaselineRun],
        testbed: Mapping[str, Any],
        *,
        mode: Mode = "append",
    ) -> Baseline:
        """Add runs to the history of ``key`` (``append``) or start it anew (``replace``), in one
        transaction; the same refusals as :meth:`BaselineStore.save`."""
        new_runs = [runs] if isinstance(runs, BaselineRun) else list(runs)
        if not new_runs:
            raise ValueError("save() needs at least one run")
        if mode not in ("append", "replace"):
            raise ValueError(f"mode must be 'append' or 'replace', got {mode!r}")
        if any(not any(run.samples.values()) for run in new_runs):
            raise BaselineError(f"{key}: not saved: {HOLLOW}")
        return self._save(key, new_runs, testbed, mode)[0]

    def merge(self, baseline: Baseline) -> int:
        """Append the runs of ``baseline`` (a file's) that this set does not hold yet; the number
        added. Idempotent: merging the same baseline again adds nothing. Refuses another testbed
        or workload like an ``append`` save."""
        return self._save(baseline.key, baseline.runs, baseline.testbed, "append", only_new=True)[1]

    def _save(
        self, key: str, new_runs: list[BaselineRun], testbed: Mapping[str, Any], mode: Mode, *, only_new: bool = False
    ) -> tuple[Baseline, int]:
        plain_testbed: dict[str, Any] = _sorted(_plain(dict(testbed)))
        with (
            connect(self.url, create=True) as conn,
            _failing_as(f"{key}: not saved to {self.where}"),
            conn.transaction(),
        ):
            conn.execute(
                "INSERT INTO infmax_baselines (set_name, key, testbed, history) VALUES (%s, %s, %s, %s) "
                "ON CONFLICT (set_name, key) DO NOTHING",
                (self.set_name, key, _jsonb(plain_testbed), self.history),
            )
            # the row lock serialises every save of this key until the transaction ends
            conn.execute(
                "SELECT 1 FROM infmax_baselines WHERE set_name = %s AND key = %s FOR UPDATE", (self.set_name, key)
            )
            current = None if mode == "replace" else self._load(conn, key)
            if current is None:
                conn.execute("DELETE FROM infmax_runs WHERE set_name = %s AND key = %s", (self.set_name, key))
                baseline = Baseline(key, plain_testbed, [], self.history)
            else:
                current.check(plain_testbed, new_runs[0].workload)
                baseline = Baseline(key, current.testbed, current.runs, self.history)
                if only_new:
                    stored = [_canonical(run.to_dict()) for run in current.runs]
                    new_runs = [run for run in new_runs if _canonical(run.to_dict()) not in stored]
            if not new_runs:
                return baseline, 0
            baseline = baseline.with_runs(new_runs)
            conn.execute(
                "UPDATE infmax_baselines SET testbed = %s, history = %s, updated_at = now() "
                "WHERE set_name = %s AND key = %s",
                (_jsonb(baseline.testbed), self.history, self.set_name, key),
            )
            with conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO infmax_runs (set_name, key, run) VALUES (%s, %s, %s)",
                    [(self.set_name, key, _jsonb(_sorted(run.to_dict()))) for run in new_runs],
                )
            conn.execute(  # the history cap: the oldest runs go (those of this save all stay)
                "DELETE FROM infmax_runs WHERE set_name = %s AND key = %s AND id NOT IN "
                "(SELECT id FROM infmax_runs WHERE set_name = %s AND key = %s ORDER BY id DESC LIMIT %s)",
                (self.set_name, key, self.set_name, key, len(baseline.runs)),
            )
        return baseline, len(new_runs)

    # -- sets --------------------------------------------------------------------------------

    def exists(self) -> bool:
        """Whether the set holds any baseline."""
        return self.set_name in set_names(self.url)


def set_names(url: str) -> list[str]:
    """The sets a store holds (those with at least one baseline)."""
    with connect(url) as conn:
        if not _has_tables(conn):
            return []
        return [r[0] for r in conn.execute("SELECT DISTINCT set_name FROM infmax_baselines ORDER BY 1").fetchall()]


@contextmanager
def connect(url: str, *, create: bool = False) -> Iterator[psycopg.Connection[Any]]:
    """A connection (``create``: with the tables made if missing; reading needs no more than the
    right to read them). A failure to connect, or of a statement inside, is a BaselineError naming
    the store (password masked) and the fix."""
    psycopg = _psycopg()
    register_secrets(url)
    try:
        conn = psycopg.connect(url, connect_timeout=CONNECT_TIMEOUT, autocommit=True)
    except psycopg.Error as exc:
        raise BaselineError(
            f"cannot connect to the baselines store {safe_url(url)}: {redact(str(exc)).strip()}. Check the URL, "
            "that the server is up and reachable, and the credentials (a password may come from PGPASSWORD "
            "or ~/.pgpass instead of the URL)"
        ) from None
    try:
        with _failing_as(f"the baselines store {safe_url(url)} failed"):
            if create:
                _ensure_schema(conn)
            yield conn
    finally:
        conn.close()


def _has_tables(conn: psycopg.Connection[Any]) -> bool:
    """Whether the store's tables exist (a store nobody saved to yet has none)."""
    row = conn.execute(
        "SELECT to_regclass('infmax_runs') IS NOT NULL AND to_regclass('infmax_baselines') IS NOT NULL"
    ).fetchone()
    return bool(row and row[0])


def _ensure_schema(conn: psycopg.Connection[Any]) -> None:
    if _has_tables(conn):
        return
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
        conn.execute(_SCHEMA)


@contextmanager
def _failing_as(what: str) -> Iterator[None]:
    """A database error inside as a BaselineError: ``what: the server's message`` (redacted)."""
    psycopg = _psycopg()
    try:
        yield
    except psycopg.Error as exc:
        raise BaselineError(f"{what}: {redact(str(exc)).strip()}; the store is unchanged") from None


def _jsonb(value: Any) -> Any:
    """``value`` (already through ``_sorted``: non-finite floats are null, as in the files) as jsonb."""
    from psycopg.types.json import Jsonb

    return Jsonb(value, dumps=_dumps)


def _dumps(value: Any) -> str:
    return json.dumps(value, allow_nan=False)


def _canonical(value: Any) -> Any:
    """A run as the store gives it back (JSON types only), to tell a run already stored."""
    return json.loads(_dumps(_sorted(value)))
