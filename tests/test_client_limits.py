"""The load generator knows its own limits: send lag, event-loop lag, client CPU.

Against the real simulator. Blocking the client's event loop on purpose (time.sleep
inside the loop) is what these tests are about; nothing here sleeps to synchronise.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterator

import pytest

from pytest_infmax.load.clientstats import ClientStats, LoopLagMonitor
from pytest_infmax.load.generator import LoadGenerator
from pytest_infmax.load.plan import LoadConfig, LoadConfigError, RunRecords
from pytest_infmax.load.scenarios import Scenario
from pytest_infmax.records import RequestRecord
from pytest_infmax.servers.launch import Server, ServerConfig, running_server

SCENARIO = Scenario("tiny", 32, 16)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    config = ServerConfig(sim_args=("--decode-step-ms", "2"))
    with running_server(config, tmp_path_factory.mktemp("client_limits")) as s:
        yield s


def _run(server: Server, config: LoadConfig, on_record=None) -> RunRecords:
    async def go() -> RunRecords:
        return await LoadGenerator(server.base_url, server.model).run(config, on_record=on_record)

    return asyncio.run(go())


def test_a_quiet_run_is_not_client_bound(server: Server) -> None:
    run = _run(server, LoadConfig(SCENARIO, concurrency=4, num_requests=24, warmup=4))
    client = run.client
    assert client is not None
    assert all(r.ok for r in run.records)
    assert not run.client_bound, client.reason
    d = client.to_dict()
    assert d["client_bound"] is False and d["reason"] is None
    assert d["send_lag"]["n"] == 24  # one per measured request, warm-up left out
    assert d["loop_lag"]["n"] > 0
    assert d["threshold_ms"] == pytest.approx(10.0)
    assert 0 < d["cpu_seconds"] and 0 < d["cpu_utilisation"] < 1.5
    assert d["wall_seconds"] == pytest.approx(run.measured_end - run.measured_start, abs=1e-5)
    for r in run.records:
        assert r.ready_time is not None and r.send_lag is not None and 0 <= r.send_lag < 0.01
        assert r.ttft_from_schedule == r.ttft  # closed loop: no schedule


def test_a_starved_client_is_marked_client_bound_with_the_reason(server: Server) -> None:
    def block(rec: RequestRecord) -> None:
        if not rec.warmup:
            time.sleep(0.03)  # the loop can do nothing else meanwhile

    run = _run(server, LoadConfig(SCENARIO, concurrency=4, num_requests=24, warmup=4), on_record=block)
    client = run.client
    assert client is not None and run.client_bound
    assert client.reason is not None and client.reason.startswith("client-bound: ")
    assert "event-loop lag p99" in client.reason and "> 10 ms" in client.reason
    # closed loop: a blocking callback delays that worker's next request, and it shows
    assert "send lag p99" in client.reason
    assert client.to_dict()["loop_lag"]["max_ms"] >= 20
    # a looser threshold accepts the same kind of run
    loose = _run(
        server,
        LoadConfig(SCENARIO, concurrency=4, num_requests=8, warmup=0, client_lag_threshold=5.0),
        on_record=block,
    )
    assert loose.client is not None and not loose.client_bound


def test_open_loop_latency_from_the_schedule_includes_the_send_delay(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """All requests are due at once (rate=inf); building the first one blocks the
    loop for 150 ms, before any of them can be written."""
    block_s = 0.15
    from pytest_infmax.load import generator as load

    real_plan = load.plan_request
    blocked: list[bool] = []

    def slow_plan(*args, **kwargs):
        if not blocked:
            blocked.append(True)
            time.sleep(block_s)  # the client is slow exactly when the requests are due
        return real_plan(*args, **kwargs)

    monkeypatch.setattr(load, "plan_request", slow_plan)
    config = LoadConfig(SCENARIO, rate=math.inf, num_requests=8, warmup=0)
    run = _run(server, config)
    assert len(run.records) == 8 and all(r.ok for r in run.records)
    for r in run.records:
        assert r.scheduled_time is not None and r.ready_time == r.scheduled_time
        lag = r.send_time - r.scheduled_time
        assert r.send_lag == pytest.approx(lag) and lag >= block_s
        assert r.ttft is not None and r.ttft_from_schedule is not None
        assert r.ttft_from_schedule - r.ttft == pytest.approx(lag, abs=1e-9)
        assert r.e2e_from_schedule - r.e2e == pytest.approx(lag, abs=1e-9)  # type: ignore[operator]
        assert r.tpot is not None  # unchanged: it does not depend on the start
    client = run.client
    assert client is not None and run.client_bound
    assert "send lag p99" in (client.reason or "")
    assert client.to_dict()["send_lag"]["p50_ms"] >= block_s * 1000


def test_open_loop_without_blocking_keeps_to_its_schedule(server: Server) -> None:
    run = _run(server, LoadConfig(SCENARIO, rate=200.0, num_requests=20, warmup=0))
    assert all(r.ok for r in run.records)
    assert run.client is not None
    send_lag = run.client.to_dict()["send_lag"]
    assert send_lag["n"] == 20 and send_lag["p50_ms"] < 5 and send_lag["max_ms"] < 50
    for r in run.records:
        assert r.send_lag is not None and r.send_lag >= 0
        assert r.ttft_from_schedule - r.ttft == pytest.approx(r.send_lag, abs=1e-9)  # type: ignore[operator]


def test_records_keep_ready_time_through_json() -> None:
    rec = RequestRecord(
        index=3, scheduled_time=10.0, ready_time=10.5, send_time=10.75, first_token_time=11.0, end_time=12.0
    )
    back = RequestRecord.from_dict(rec.to_dict(t0=10.0), t0=10.0)
    assert back == rec
    assert back.send_lag == pytest.approx(0.25)
    assert back.ttft == pytest.approx(0.25) and back.ttft_from_schedule == pytest.approx(1.0)
    assert back.e2e_from_schedule == pytest.approx(2.0)
    old = rec.to_dict(t0=10.0)
    del old["ready_time"]  # a report written before the field existed
    legacy = RequestRecord.from_dict(old, t0=10.0)
    assert legacy.ready_time is None and legacy.send_lag == pytest.approx(0.75)  # from the schedule


def test_client_stats_summary_and_threshold() -> None:
    quiet = ClientStats(send_lags=[0.001] * 100, loop_lags=[0.0005] * 100, cpu_seconds=0.5, wall_seconds=2.0)
    assert not quiet.client_bound and quiet.reason is None and quiet.cpu_utilisation == 0.25
    busy = ClientStats(send_lags=[0.001] * 90 + [0.05] * 10, loop_lags=[0.0] * 10)
    assert busy.client_bound and busy.reasons == ["send lag p99 50.0 ms > 10 ms (max 50.0 ms over 100 samples)"]
    assert ClientStats(send_lags=[0.05] * 10, threshold=0.1).reason is None
    empty = ClientStats().to_dict()
    assert empty["send_lag"] == {"n": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}
    assert empty["cpu_utilisation"] is None and empty["client_bound"] is False
    with pytest.raises(LoadConfigError, match="client_lag_threshold"):
        LoadConfig(SCENARIO, concurrency=1, client_lag_threshold=0)


def test_loop_lag_monitor_counts_a_block_at_the_end_of_the_phase() -> None:
    async def go() -> tuple[LoopLagMonitor, float, float]:
        monitor = LoopLagMonitor(interval=0.005)
        monitor.start()
        await asyncio.sleep(0)  # let it take its first reading
        start = time.perf_counter()
        time.sleep(0.05)
        end = time.perf_counter()
        await asyncio.sleep(0)
        while not monitor.samples:
            await asyncio.sleep(0)
        await monitor.stop()
        return monitor, start, end

    monitor, start, end = asyncio.run(go())
    lags = monitor.lags_between(start, end)
    assert lags and max(lags) >= 0.04


def test_the_lag_sampler_wakes_an_idle_loop_at_most_twenty_times_a_second() -> None:
    """Each lag sample is a timer that wakes the loop, idle between a stream's events, and an
    idle wake-up costs tens of microseconds of CPU: at the old 10 ms (100 a second) it was 8 %
    of the client's CPU at 256 streams (benchmarks/client_overhead.py --wakeups). A block of
    the loop is still caught (the test above, and the client-bound tests)."""

    async def go() -> int:
        monitor = LoopLagMonitor()
        monitor.start()
        loop = asyncio.get_running_loop()
        watched = loop.create_future()
        loop.call_later(0.5, watched.set_result, None)  # half a second of an otherwise idle loop
        await watched
        await monitor.stop()
        return len(monitor.samples)

    assert asyncio.run(go()) <= 10


@pytest.mark.slow
def test_plugin_warns_or_fails_on_a_client_bound_run(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_starved="""
        import time
        from pytest_infmax import Scenario

        def test_starved(infmax):
            # A test that burns the event loop while its run goes on: the client falls behind.
            import pytest_infmax.load.generator as load
            original = load.ResponseAccumulator.on_event

            def slow(self, data, t):
                time.sleep(0.02)
                return original(self, data, t)

            load.ResponseAccumulator.on_event = slow
            try:
                infmax.run(Scenario("tiny", 16, 32), concurrency=2, num_requests=4, warmup=0)
            finally:
                load.ResponseAccumulator.on_event = original
    """
    )
    pytester.makeini("[pytest]\ninfmax_sim_args = --decode-step-ms 2\nasyncio_default_fixture_loop_scope = function\n")
    warned = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    warned.assert_outcomes(passed=1, warnings=1)
    warned.stdout.fnmatch_lines(
        [
            "*ClientBoundWarning: latencies are upper bounds*lag p99*",
            "*test_starved.py::test_starved*-[*]*",
            "[*] client-bound: the load generator fell behind*",
        ]
    )
    failed = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--infmax-client-bound", "fail")
    failed.assert_outcomes(failed=1)
    failed.stdout.fnmatch_lines(["*the load generator fell behind, so the measurement is not the server's*"])
