"""A real PostgreSQL server for the tests, started and always stopped by them.

:func:`running_postgres` runs ``initdb`` into a fresh temporary directory, starts ``postgres``
on 127.0.0.1 (a free port, password authentication) and on a unix socket in that directory
(trusted), waits until it accepts connections (with a deadline), and on exit stops it with
``pg_ctl stop -m fast`` and kills whatever of its process group is left. The server refuses to
run as root: as root, every PostgreSQL program runs as the ``postgres`` user (``runuser``),
and the directory is handed to that user.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from glob import glob
from pathlib import Path

#: the password of the server's superuser on 127.0.0.1 (a test secret: it must never be printed)
PASSWORD = "s3cret-pg-Passw0rd"
START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0


class PostgresUnavailable(Exception):
    """The binaries (or a user to run them as) are missing: the tests that need them are skipped."""


@dataclass(frozen=True)
class Postgres:
    directory: Path
    port: int
    user: str = "postgres"

    @property
    def url(self) -> str:
        """TCP on 127.0.0.1 with the password in the URL (what a CI secret looks like)."""
        return f"postgresql://{self.user}:{PASSWORD}@127.0.0.1:{self.port}/postgres"

    @property
    def socket_url(self) -> str:
        """The unix socket in the server's directory, no password (trusted)."""
        return f"postgresql://{self.user}@/postgres?host={self.directory}&port={self.port}"


def bindir() -> Path:
    """Where initdb, postgres and pg_ctl are (``$INFMAX_PG_BINDIR``, the PATH, Debian's layout)."""
    candidates = [os.environ.get("INFMAX_PG_BINDIR", "")]
    on_path = shutil.which("initdb")
    candidates.append(str(Path(on_path).parent) if on_path else "")
    candidates += sorted(glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name), reverse=True)
    for c in candidates:
        if c and all((Path(c) / tool).is_file() for tool in ("initdb", "postgres", "pg_ctl")):
            return Path(c)
    raise PostgresUnavailable(
        "no PostgreSQL server binaries (initdb, postgres, pg_ctl): install PostgreSQL (Debian: apt-get install "
        "postgresql) or set INFMAX_PG_BINDIR"
    )


def _as_server_user() -> tuple[list[str], pwd.struct_passwd | None]:
    """The argv prefix that runs a program as a user the server accepts, and that user (None: us)."""
    if os.geteuid() != 0:
        return [], None
    try:
        user = pwd.getpwnam("postgres")
    except KeyError:
        raise PostgresUnavailable("running as root and there is no 'postgres' user to run the server as") from None
    runuser = shutil.which("runuser")
    if runuser is None:
        raise PostgresUnavailable("running as root and there is no runuser to run the server as 'postgres'")
    return [runuser, "-u", "postgres", "--"], user


def check_available() -> None:
    """Raise :class:`PostgresUnavailable` (saying what is missing) where no server can be run."""
    bindir()
    _as_server_user()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


@contextlib.contextmanager
def running_postgres() -> Iterator[Postgres]:
    bins = bindir()
    prefix, user = _as_server_user()
    directory = Path(tempfile.mkdtemp(prefix="infmax-pg-"))
    proc: subprocess.Popen[bytes] | None = None
    try:
        data = directory / "data"
        pwfile = directory / "pwfile"
        pwfile.write_text(PASSWORD + "\n")
        if user is not None:
            for path in (directory, pwfile):
                os.chown(path, user.pw_uid, user.pw_gid)
        os.chmod(directory, 0o700)
        init = _run(
            [
                *prefix,
                str(bins / "initdb"),
                "-D",
                str(data),
                "-U",
                "postgres",
                "--pwfile",
                str(pwfile),
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "-E",
                "UTF8",
                "--no-sync",
            ],
            timeout=120,
        )
        if init.returncode != 0:
            raise RuntimeError(f"initdb failed ({init.returncode}): {init.stderr[-2000:]}")
        port = _free_port()
        log = open(directory / "postgres.log", "wb")  # closed below, once the server holds it
        try:
            proc = subprocess.Popen(
                [
                    *prefix,
                    str(bins / "postgres"),
                    "-D",
                    str(data),
                    "-k",
                    str(directory),
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(port),
                    "-c",
                    "fsync=off",
                    "-c",
                    "max_connections=50",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: killed whole if a fast stop fails
            )
        finally:
            log.close()
        server = Postgres(directory, port)
        _wait_ready(server, proc, directory / "postgres.log")
        yield server
    finally:
        if proc is not None:
            _stop(proc, prefix, bins, directory / "data")
        shutil.rmtree(directory, ignore_errors=True)


def _wait_ready(server: Postgres, proc: subprocess.Popen[bytes], log: Path) -> None:
    import psycopg

    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            with psycopg.connect(server.socket_url, connect_timeout=2):
                return
        except psycopg.OperationalError as exc:
            last = exc
        try:  # the pause between tries also notices a server that exited
            code = proc.wait(timeout=0.1)
        except subprocess.TimeoutExpired:
            code = None
        if code is not None:
            raise RuntimeError(
                f"postgres exited ({code}) before it was ready: {log.read_text(errors='replace')[-2000:]}"
            )
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"postgres not ready after {START_TIMEOUT:.0f} s ({last}): {log.read_text(errors='replace')[-2000:]}"
            )


def _stop(proc: subprocess.Popen[bytes], prefix: list[str], bins: Path, data: Path) -> None:
    """pg_ctl stop -m fast, then kill the process group of whatever is left."""
    if proc.poll() is None:
        with contextlib.suppress(subprocess.TimeoutExpired, OSError):
            _run(
                [
                    *prefix,
                    str(bins / "pg_ctl"),
                    "stop",
                    "-D",
                    str(data),
                    "-m",
                    "fast",
                    "-w",
                    "-t",
                    str(int(STOP_TIMEOUT)),
                ],
                timeout=STOP_TIMEOUT + 5,
            )
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=STOP_TIMEOUT)
    if proc.poll() is None:  # still up: kill its group, the server and any backend left behind
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=STOP_TIMEOUT)
