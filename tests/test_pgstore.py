"""The PostgreSQL baselines store against a real PostgreSQL server (tests/_postgres.py starts it):
the JSON directory's semantics, concurrent savers, migrate, the user's flow, and no password in any output."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
from _postgres import PASSWORD, Postgres
from test_baselines import SERVER, make_result

from pytest_infmax.baselines.compare import compare_stored
from pytest_infmax.baselines.pgstore import PostgresStore, is_store_url
from pytest_infmax.baselines.store import BaselineError, BaselineMismatch, BaselineRun, BaselineStore, build_testbed
from pytest_infmax.baselines.stores import has_set, list_sets, migrate, open_set
from pytest_infmax.cli import main as cli_main
from pytest_infmax.redact import redact

TESTBED = build_testbed(SERVER)
FAST = "--decode-step-ms 2 --decode-ms-per-seq 0.01"


@pytest.fixture
def pg(postgres: Postgres, request: pytest.FixtureRequest) -> Postgres:
    """The session's server with empty tables for this test."""
    with psycopg.connect(postgres.socket_url, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS infmax_runs, infmax_baselines")
    return postgres


def _run(key: str = "t::a", seed: int = 0, concurrency: int = 4) -> BaselineRun:
    return BaselineRun.from_result(make_result(key, seed=seed, concurrency=concurrency))


def _stored_runs(pg: Postgres, set_name: str, key: str) -> int:
    with psycopg.connect(pg.socket_url) as conn:
        row = conn.execute("SELECT count(*) FROM infmax_runs WHERE set_name = %s AND key = %s", (set_name, key))
        return int(row.fetchone()[0])  # type: ignore[index]


# -- the same semantics as the JSON directory --------------------------------------------------------


def test_url_selects_the_store_and_a_path_the_directory(pg: Postgres, tmp_path: Path) -> None:
    assert is_store_url(pg.url) and is_store_url("POSTGRES://h/db") and not is_store_url(str(tmp_path))
    assert isinstance(open_set(pg.url, "main"), PostgresStore)
    assert isinstance(open_set(tmp_path, "main"), BaselineStore)
    assert PASSWORD not in open_set(pg.url, "main").where
    assert open_set(pg.url, "main").where.endswith("set 'main'")


def test_round_trip_matches_the_json_directory(pg: Postgres, tmp_path: Path) -> None:
    runs = [_run(seed=1), _run(seed=2)]
    files = BaselineStore(tmp_path / "main")
    store = PostgresStore(pg.url, "main")
    assert store.load("t::a") is None and not has_set(pg.url, "main")
    from_files = files.save("t::a", runs, TESTBED)
    from_store = store.save("t::a", runs, TESTBED)
    loaded = store.load("t::a")
    assert loaded is not None
    for got in (from_store, loaded):
        assert got.testbed == from_files.testbed
        assert [r.to_dict() for r in got.runs] == [r.to_dict() for r in from_files.runs]
    assert store.keys() == ["t::a"] and [b.key for b in store] == ["t::a"]
    assert has_set(pg.url, "main") and list_sets(pg.url) == ["main"]
    assert PostgresStore(pg.url, "other").load("t::a") is None  # sets are apart
    # what the gate compares is the same from either store
    current = [_run(seed=3)]
    a = compare_stored(files, "t::a", current, TESTBED)
    b = compare_stored(store, "t::a", current, TESTBED)
    assert a is not None and b is not None and a.to_dict() == b.to_dict()


def test_other_testbed_or_workload_is_refused_and_replace_starts_anew(pg: Postgres) -> None:
    store = PostgresStore(pg.url, "main")
    store.save("t::a", _run(), TESTBED)
    other = dict(TESTBED, model="another-model")
    with pytest.raises(BaselineMismatch, match="model: baseline 'sim-model', current 'another-model'"):
        store.save("t::a", _run(seed=1), other)
    with pytest.raises(BaselineMismatch, match="concurrency: baseline 4, current 8"):
        store.save("t::a", _run(seed=1, concurrency=8), TESTBED)
    assert _stored_runs(pg, "main", "t::a") == 1  # a refused save changed nothing
    replaced = store.save("t::a", _run(seed=2), other, mode="replace")
    assert replaced.testbed["model"] == "another-model" and len(replaced.runs) == 1
    loaded = store.load("t::a")
    assert loaded is not None and loaded.testbed["model"] == "another-model" and len(loaded.runs) == 1


def test_history_cap_drops_the_oldest_and_keeps_one_save_whole(pg: Postgres) -> None:
    store = PostgresStore(pg.url, "main", history=3)
    for seed in range(5):
        store.save("t::a", _run(seed=seed), TESTBED)
    loaded = store.load("t::a")
    assert loaded is not None and loaded.history == 3
    expected = [_run(seed=s).to_dict()["samples"] for s in (2, 3, 4)]
    assert [r.to_dict()["samples"] for r in loaded.runs] == expected
    assert _stored_runs(pg, "main", "t::a") == 3
    store.save("t::a", [_run(seed=s) for s in range(10, 14)], TESTBED)  # one save of 4 > cap: all kept
    assert _stored_runs(pg, "main", "t::a") == 4


def test_reading_creates_nothing_and_a_refused_read_is_a_clear_error(pg: Postgres) -> None:
    store = PostgresStore(pg.url, "main")
    assert store.load("t::a") is None and store.keys() == [] and list(store) == [] and list_sets(pg.url) == []
    with psycopg.connect(pg.socket_url) as conn:  # reads made no table: a read-only user can compare
        assert conn.execute("SELECT to_regclass('infmax_runs')").fetchone() == (None,)
    store.save("t::a", _run(), TESTBED)
    with psycopg.connect(pg.socket_url, autocommit=True) as conn:
        conn.execute("DROP ROLE IF EXISTS reader")
        conn.execute("CREATE ROLE reader LOGIN")  # no right to read the tables
    reader = pg.socket_url.replace("postgres@", "reader@")
    with pytest.raises(BaselineError, match="store .* failed: permission denied for table infmax_baselines"):
        PostgresStore(reader, "main").load("t::a")


def test_a_hollow_run_is_refused(pg: Postgres) -> None:
    run = _run()
    run.samples = {k: [] for k in run.samples}
    with pytest.raises(BaselineError, match="no samples"):
        PostgresStore(pg.url, "main").save("t::a", run, TESTBED)


def _save_many(url: str, worker: int, count: int, barrier: multiprocessing.synchronize.Barrier) -> None:
    store = PostgresStore(url, "main", history=1000)
    barrier.wait(timeout=60)
    for i in range(count):
        store.save("t::shared", _run(key="t::shared", seed=worker * 100 + i), TESTBED)
        store.save(f"t::own{worker}-{i % 2}", _run(seed=i), TESTBED)


@pytest.mark.slow
def test_concurrent_savers_lose_no_run(pg: Postgres) -> None:
    """3 processes, released at once, each save 10 runs to one shared key (and some of their own)."""
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(3)
    procs = [ctx.Process(target=_save_many, args=(pg.url, w, 10, barrier)) for w in range(3)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(timeout=120)
        assert [p.exitcode for p in procs] == [0, 0, 0]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=10)
    loaded = PostgresStore(pg.url, "main").load("t::shared")
    assert loaded is not None and len(loaded.runs) == 30
    assert len({json.dumps(r.samples, sort_keys=True) for r in loaded.runs}) == 30  # 30 distinct runs
    assert _stored_runs(pg, "main", "t::own0-0") == 5


# -- migrate -------------------------------------------------------------------------------------------


def test_migrate_copies_a_json_set_and_is_idempotent(
    pg: Postgres, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = BaselineStore(tmp_path / "main", history=5)
    files.save("t::a", [_run(seed=1), _run(seed=2)], TESTBED)
    files.save("t::b", _run("t::b", seed=3), TESTBED)
    assert cli_main(["baselines", "migrate", str(tmp_path / "main"), pg.url]) == 0
    first = capsys.readouterr()
    assert "3 run(s) added" in first.out and PASSWORD not in first.out + first.err
    store = PostgresStore(pg.url, "main")
    for baseline in files:
        copied = store.load(baseline.key)
        assert copied is not None and copied.history == 5 and copied.testbed == baseline.testbed
        assert [r.to_dict() for r in copied.runs] == [r.to_dict() for r in baseline.runs]
    assert cli_main(["baselines", "migrate", str(tmp_path / "main"), pg.url]) == 0  # again: nothing new
    assert "0 run(s) added" in capsys.readouterr().out
    assert _stored_runs(pg, "main", "t::a") == 2
    files.save("t::a", _run(seed=4), TESTBED)  # the file history grew: only the new run is copied
    assert migrate(tmp_path / "main", pg.url).runs_added == 1
    assert _stored_runs(pg, "main", "t::a") == 3
    # a folder of sets copies each set; --set names the set of a single folder
    assert migrate(tmp_path, pg.url).runs_added == 0
    assert migrate(tmp_path / "main", pg.url, "copy").runs_added == 4 and list_sets(pg.url) == ["copy", "main"]


def test_migrate_refuses_another_testbed_and_bad_input(
    pg: Postgres, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    PostgresStore(pg.url, "main").save("t::a", _run(), dict(TESTBED, model="another-model"))
    BaselineStore(tmp_path / "main").save("t::a", _run(seed=1), TESTBED)
    assert cli_main(["baselines", "migrate", str(tmp_path / "main"), pg.url]) == 1
    err = capsys.readouterr().err
    assert "refused main/t::a" in err and "model: baseline 'another-model', current 'sim-model'" in err
    assert cli_main(["baselines", "migrate", str(tmp_path / "nowhere"), pg.url]) == 2
    assert "is not a directory of baseline files" in capsys.readouterr().err
    assert cli_main(["baselines", "migrate", str(tmp_path / "main"), str(tmp_path)]) == 2
    assert "not a postgresql:// URL" in capsys.readouterr().err


# -- secrets and errors --------------------------------------------------------------------------------


def test_redactor_masks_postgres_passwords() -> None:
    assert redact("postgresql://ci:hunter2x@db:5432/perf") == "postgresql://***@db:5432/perf"
    assert redact("postgres://db/perf?sslmode=require&password=hunter2x") == (
        "postgres://db/perf?sslmode=require&password=***"
    )
    assert redact("host=db password='a b' user=ci") == "host=db password=*** user=ci"


def test_unreachable_store_is_a_clear_error_without_the_password(pg: Postgres, tmp_path: Path) -> None:
    wrong_password = pg.url.replace(PASSWORD, "not-the-Passw0rd")
    with pytest.raises(BaselineError) as info:
        PostgresStore(wrong_password, "main").load("t::a")
    message = str(info.value)
    assert "cannot connect to the baselines store postgresql://***@127.0.0.1" in message
    assert "password authentication failed" in message and "not-the-Passw0rd" not in message
    closed = f"postgresql://postgres:{PASSWORD}@127.0.0.1:1/postgres"
    with pytest.raises(BaselineError, match="cannot connect") as info:
        PostgresStore(closed, "main").save("t::a", _run(), TESTBED)
    assert PASSWORD not in str(info.value)


def test_infmax_compare_on_an_unreachable_store_names_it_without_its_password(
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = f"postgresql://ci:{PASSWORD}@127.0.0.1:1/perf"
    assert cli_main(["compare", url, "results.json", "--set", "main"]) == 2
    err = capsys.readouterr().err
    assert "postgresql://***@127.0.0.1:1/perf" in err and "cannot connect" in err and PASSWORD not in err


def test_missing_driver_names_the_extra(pg: Postgres) -> None:
    code = (
        "import sys; sys.modules['psycopg'] = None\n"
        "from pytest_infmax.baselines.pgstore import PostgresStore\n"
        f"PostgresStore({pg.url!r}, 'main').load('k')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 1
    assert "pip install 'pytest-infmax[postgres]'" in proc.stderr and PASSWORD not in proc.stderr


# -- the user's flow: pytest sessions against the store -----------------------------------------------------

PERF = """
def test_one(infmax):
    infmax.run("1k1k-mini", concurrency=2, num_requests=8, warmup=0)
"""


def _project(path: Path) -> None:
    (path / "test_perf.py").write_text(PERF)
    (path / "pytest.ini").write_text(
        f"[pytest]\ninfmax_sim_args = {FAST}\nasyncio_default_fixture_loop_scope = function\n"
    )


@pytest.mark.slow
def test_save_then_compare_through_the_store(pg: Postgres, pytester: pytest.Pytester) -> None:
    _project(pytester.path)
    missing = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "--infmax-compare", "main", "--infmax-baselines", pg.url
    )
    assert missing.ret == pytest.ExitCode.USAGE_ERROR
    missing.stderr.fnmatch_lines(["*no baseline set 'main' in postgresql://***@127.0.0.1:*"])
    saved = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "--infmax-save", "main", "--infmax-baselines", pg.url, "--infmax-compare", "off"
    )
    saved.assert_outcomes(passed=1)
    saved.stdout.fnmatch_lines(["*saved to postgresql://***@127.0.0.1:*/postgres set 'main'*"])
    assert list_sets(pg.url) == ["main"] and _stored_runs(pg, "main", "test_perf.py::test_one") == 1
    compared = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "--infmax-compare", "main", "--infmax-baselines", pg.url
    )
    compared.assert_outcomes(passed=1)
    compared.stdout.fnmatch_lines(["ok * test_perf.py::test_one: * (1 baseline vs 1 current runs)*"])
    assert not (pytester.path / ".infmax" / "baselines").exists()  # nothing went to the JSON directory
    for result in (missing, saved, compared):
        assert PASSWORD not in "\n".join(result.outlines + result.errlines)
    # infmax compare reads the store too: a results file against the set kept there
    current = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--infmax-json", "out.json")
    current.assert_outcomes(passed=1)
    cli = [sys.executable, "-m", "pytest_infmax.cli", "compare", pg.url, "out.json"]
    unnamed = subprocess.run(cli, cwd=pytester.path, capture_output=True, text=True, timeout=120)
    assert unnamed.returncode == 2 and "name the set to compare with (infmax compare --set SET; sets there: main)" in (
        unnamed.stderr
    ), unnamed.stderr
    other = subprocess.run([*cli, "--set", "nightly"], cwd=pytester.path, capture_output=True, text=True, timeout=120)
    assert other.returncode == 2 and "no baseline set 'nightly' in postgresql://***@" in other.stderr
    assert "(sets there: main)" in other.stderr
    ok = subprocess.run([*cli, "--set", "main"], cwd=pytester.path, capture_output=True, text=True, timeout=120)
    assert ok.returncode in (0, 1), ok.stderr  # compared: same, improved, unsure or regressed
    assert "test_perf.py::test_one" in ok.stdout and "p50(tpot)" in ok.stdout, ok.stdout
    for proc in (unnamed, other, ok):
        assert PASSWORD not in proc.stdout + proc.stderr


@pytest.mark.slow
def test_a_refused_login_fails_the_save_naming_the_store_not_the_password(
    pg: Postgres, pytester: pytest.Pytester
) -> None:
    _project(pytester.path)
    wrong = pg.url.replace(PASSWORD, "Wrong-Passw0rd-x")
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "--infmax-save", "main", "--infmax-compare", "off", "--infmax-baselines", wrong
    )
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        ["*test_perf.py::test_one: cannot connect to the baselines store postgresql://***@127.0.0.1:*"
         "password authentication failed*"]
    )  # fmt: skip
    output = "\n".join(result.outlines + result.errlines)
    assert "Wrong-Passw0rd-x" not in output and PASSWORD not in output


@pytest.mark.slow
def test_three_sessions_saving_at_once_lose_no_run(pg: Postgres, tmp_path: Path) -> None:
    """Three pytest sessions, started together, each append a run to the same baseline."""
    _project(tmp_path)
    argv = [
        sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q",
        "--infmax-save", "main", "--infmax-compare", "off", "--infmax-baselines", pg.url,
    ]  # fmt: skip
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    procs = [
        subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(3)
    ]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=180)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate(timeout=30)
    assert [p.returncode for p in procs] == [0, 0, 0], "\n".join(outputs)
    assert all(PASSWORD not in out for out in outputs)
    loaded = PostgresStore(pg.url, "main").load("test_perf.py::test_one")
    assert loaded is not None and len(loaded.runs) == 3
