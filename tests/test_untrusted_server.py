"""Everything a server sends is bounded and checked: the plugin, as users run it, against
tests/_hostile_server.py (a scripted raw HTTP server) as ``--infmax-endpoint``.

A count the server reports is checked against what was asked; a body it sends is
bounded in size and in time; whatever it does, the session ends with an outcome and
no INTERNALERROR (issue 17).
"""

from __future__ import annotations

import asyncio
import time
import tracemalloc
import xml.etree.ElementTree as ET
from collections.abc import Callable

import pytest
from _hostile_client import HostileClient

from pytest_infmax import boundedhttp
from pytest_infmax.measure import energy, servermetrics
from pytest_infmax.servers import launch

MIB = 1 << 20
SLACK = 2.0  # a loaded 2-core machine


def _write(pytester: pytest.Pytester, body: str) -> None:
    pytester.makepyfile(test_perf=body)


def _run_against(pytester: pytest.Pytester, server: HostileClient, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "--infmax-endpoint", server.base_url, *args, timeout=120
    )


@pytest.mark.parametrize(
    ("behaviour", "message"),
    [
        ("usage_huge", "usage.completion_tokens=1000000000000000 exceeds the limit max_tokens="),
        ("usage_negative", "usage.completion_tokens=-5 but content arrived: the limit is >= 1"),
        ("usage_zero", "usage.completion_tokens=0 but content arrived: the limit is >= 1"),
        ("prompt_huge", "usage.prompt_tokens=1000000000000000 exceeds the limit"),
    ],
)
def test_usage_that_cannot_be_true_is_a_protocol_error_never_a_crash_or_an_ok(
    pytester: pytest.Pytester, hostile_server: HostileClient, behaviour: str, message: str
) -> None:
    """Before: completion_tokens 10**15 was an INTERNALERROR MemoryError (records.py's per-token
    expansion), a negative count a negative throughput on records marked ok, zero an ok request
    with 0 tokens. Now each request is a protocol_error whose message names field, value and limit."""
    hostile_server.script({"*": behaviour})
    _write(
        pytester,
        f"""
        from pytest_infmax.records import ErrorKind

        def test_x(infmax):
            # every request fails, on purpose: the test's own error_rate SLA replaces the 5 % rule
            result = infmax.run("1k1k-mini", concurrency=2, num_requests=4, warmup=0, sla="error_rate <= 100%")
            records = [r for r in result.records if not r.warmup]
            assert len(records) == 4
            assert result.metrics.num_ok == 0
            for r in records:
                assert r.error_kind is ErrorKind.PROTOCOL, (r.error_kind, r.error_message)
                assert {message!r} in r.error_message, r.error_message
            assert result.metrics.output_throughput >= 0
        """,
    )
    result = _run_against(pytester, hostile_server)
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()
    result.assert_outcomes(passed=1)


# -- every byte a server controls is bounded in size and in time (boundedhttp) ----------------


def test_readiness_has_a_total_deadline_a_dripping_models_page_cannot_stretch(
    pytester: pytest.Pytester, hostile_server: HostileClient
) -> None:
    """/v1/models answers one byte every 0.5 s. Before: each read had its own 2 s timeout, so
    the probe hung until the server gave up (20 s) whatever --infmax-startup-timeout said.
    Now the setup error comes at the startup timeout, naming the cause."""
    hostile_server.script({"GET /v1/models": "drip"})
    _write(pytester, "def test_x(infmax):\n    pass\n")
    result = _run_against(pytester, hostile_server, "--infmax-startup-timeout", "3", "--junitxml", "junit.xml")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*did not answer GET /v1/models with 200 within 3 s*no answer within*"])
    # The test's own time (setup included; pytest's start and collection left out, which a loaded
    # machine stretches): before, the probe alone hung 20 s.
    case = ET.parse(pytester.path / "junit.xml").getroot().find(".//testcase")
    assert case is not None and float(case.get("time", "inf")) < 3 + 7, case.attrib


def test_an_endless_models_page_is_cut_at_the_size_limit(pytester: pytest.Pytester, hostile_server) -> None:
    """/v1/models never ends. Before: resp.read() read it all (MemoryError). Now the body is cut at
    boundedhttp.DEFAULT_MAX_BYTES and the probe says so; the session ends with a setup error."""
    hostile_server.script({"GET /v1/models": "endless_body"})
    _write(pytester, "def test_x(infmax):\n    pass\n")
    result = _run_against(pytester, hostile_server, "--infmax-startup-timeout", "3")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines([f"*the body exceeded the limit of {boundedhttp.DEFAULT_MAX_BYTES} bytes*"])
    assert "INTERNALERROR" not in result.stdout.str()


def _peak_mib(fn: Callable[[], object]) -> tuple[object, float]:
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        out = fn()
        return out, (tracemalloc.get_traced_memory()[1] - base) / MIB
    finally:
        tracemalloc.stop()


def test_probe_memory_and_time_stay_bounded(hostile_server: HostileClient) -> None:
    """In this process: the readiness probe against an endless page (memory) and a dripping
    page (time); before, the first grew without limit and the second took 20 s."""
    hostile_server.script({"GET /v1/models": "endless_body"})
    (model, _), peak = _peak_mib(lambda: launch._probe(hostile_server.base_url, None, "K", 5.0))
    assert model is None
    assert peak < 3 * boundedhttp.DEFAULT_MAX_BYTES / MIB, f"the probe peaked at {peak:.0f} MiB"
    hostile_server.script({"GET /v1/models": "drip"})
    start = time.monotonic()
    model, why = launch._probe(hostile_server.base_url, None, "K", 1.0)
    assert model is None and "no answer within 1 s" in why
    assert time.monotonic() - start < 1.0 + SLACK


@pytest.mark.parametrize("path", ["/health", "/v1/models"])
def test_a_close_delimited_body_dripping_every_10_ms_cannot_stretch_the_deadline(
    hostile_server: HostileClient, path: str
) -> None:
    """Found by tests/test_fuzz_hostile.py: a body without length ('Connection: close'), one byte
    every 10 ms. http.client hands such a connection's socket to the response, so the deadline's
    shutdown found no socket and each read returned a byte in time: the probe took 20 s (until
    the server gave up) with a 1 s timeout. Now the socket is kept for the deadline."""
    hostile_server.script({f"GET {path}": "slowloris"})
    start = time.monotonic()
    model, why = launch._probe(hostile_server.base_url, None, "K", 1.0)
    assert model is None and "no answer within 1 s" in why
    assert time.monotonic() - start < 1.0 + SLACK


def test_an_endless_metrics_page_costs_a_bounded_amount_of_memory(hostile_server: HostileClient) -> None:
    """The Prometheus scrape during the measured run: an endless /metrics cost 1.7 GB before
    (aiohttp read the whole body within its 3 s); now it is cut at METRICS_MAX_BYTES, the
    metrics are 'unavailable' with the reason, and the run is untouched."""
    hostile_server.script({"GET /metrics": "endless_body"})
    scraper = servermetrics.Scraper(f"{hostile_server.base_url}/metrics", timeout=3.0)

    async def go() -> servermetrics.ServerMetrics:
        await scraper.open()
        return await scraper.finish()

    result, peak = _peak_mib(lambda: asyncio.run(asyncio.wait_for(go(), timeout=20)))
    assert isinstance(result, servermetrics.ServerMetrics)
    assert not result.available
    assert f"the body exceeded the limit of {servermetrics.METRICS_MAX_BYTES} bytes" in result.reason
    assert peak < 3 * servermetrics.METRICS_MAX_BYTES / MIB, f"the scrape peaked at {peak:.0f} MiB"


def test_the_power_reader_is_bounded_too(hostile_server: HostileClient) -> None:
    hostile_server.script({"GET /sim/power": "endless_body"})
    source = energy.HttpPowerSource(f"{hostile_server.base_url}/sim/power", timeout=3.0)
    with pytest.raises(energy.EnergyUnavailable, match="exceeded the limit"):
        source.open()
    hostile_server.script({"GET /sim/power": "drip"})
    start = time.monotonic()
    with pytest.raises(energy.EnergyUnavailable, match="no answer within 1 s"):
        energy.HttpPowerSource(f"{hostile_server.base_url}/sim/power", timeout=1.0).open()
    assert time.monotonic() - start < 1.0 + SLACK


def test_the_metrics_scrape_never_carries_the_key_to_another_origin(hostile_server: HostileClient) -> None:
    """The scraper's GET (boundedhttp.aget, in the event loop) follows the same redirect rule as
    the readiness check: the key goes only to the origin it was given for. (aiohttp's own
    redirects did this before too; this guards the rule now that boundedhttp follows them.)"""
    hostile_server.script({"GET /metrics": "redirect_cross_origin"})
    scraper = servermetrics.Scraper(f"{hostile_server.base_url}/metrics", api_key="sk-scrape-7e1d", timeout=3.0)

    async def go() -> None:
        try:
            with pytest.raises(servermetrics.ScrapeError, match="HTTP 404"):  # where it was sent: not found
                await scraper.fetch()
        finally:
            await scraper.close()

    asyncio.run(asyncio.wait_for(go(), timeout=20))
    sent = {e["host"].split(":")[0]: e["authorization"] for e in hostile_server.log() if e["path"] == "/metrics"}
    assert sent == {"127.0.0.1": "Bearer sk-scrape-7e1d", "localhost": None}
