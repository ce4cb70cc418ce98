"""A fuzzer in the suite (issue #17, item 4): hypothesis mixes the hostile server's behaviours.

``tests/test_hostile_server.py`` checks each behaviour of ``tests/_hostile_server.py`` on its
own and all of them once together. Here hypothesis draws the mix: which behaviour each
request of a run gets (malformed SSE, lying usage, slow, huge and dripping bodies,
redirects, connections cut mid-body, good streams), how many run at once, and which
wire reads them (the C fast lane or the Python path); and, for the readiness check,
what ``/health`` and ``/v1/models`` do. The only outcomes allowed: a record per request,
ok or a typed error with a short message, within a bound of time, for the load
generator; a ready server or a :class:`ServerError` (the session's clear setup error)
for the readiness check. Anything else (an exception escaping, a record missing, a
run that does not end) fails. The examples are derandomized (the same every run, so CI
does not flake on a new draw) and bounded: a few dozen runs of at most a few seconds.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from _hostile_client import HostileClient
from _hostile_server import BEHAVIOURS
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

from pytest_infmax.load.generator import LoadGenerator, encode_body, run_coroutine
from pytest_infmax.load.plan import LoadConfig
from pytest_infmax.load.scenarios import Scenario, plan_request
from pytest_infmax.load.streamclient import WIRE_ENV
from pytest_infmax.records import ErrorKind
from pytest_infmax.servers.launch import ServerConfig, ServerError, connect_endpoint

SCENARIO = Scenario("fuzz", 16, 4)
MODEL = "hostile-model"
TIMEOUT = 1.0  # request_timeout of every run
SLACK = 2.0  # a loaded 2-core machine
MESSAGE_LIMIT = 1000  # an error message the user reads: a few hundred characters, never a body

# every behaviour the hostile server has (drawn half the time beside a good stream, so runs mix both)
POST_BEHAVIOURS = sorted(BEHAVIOURS)
GET_BEHAVIOURS = sorted(BEHAVIOURS)

FUZZ = settings(
    deadline=None,  # each example is bounded by the assertions below, not by hypothesis
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    # no explain phase: on a failure it reruns the failing example a dozen times (minutes)
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
)


@contextmanager
def _wire(python: bool) -> Iterator[None]:
    before = os.environ.get(WIRE_ENV)
    os.environ[WIRE_ENV] = "python" if python else ""
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(WIRE_ENV, None)
        else:
            os.environ[WIRE_ENV] = before


@pytest.mark.slow
@settings(FUZZ, max_examples=50)  # a few seconds: most runs end at once
@given(
    behaviours=st.lists(st.one_of(st.just("good"), st.sampled_from(POST_BEHAVIOURS)), min_size=1, max_size=8),
    concurrency=st.integers(1, 4),
    python_wire=st.booleans(),
)
def test_the_load_generator_survives_any_mix_of_hostile_responses(
    hostile_server: HostileClient, behaviours: list[str], concurrency: int, python_wire: bool
) -> None:
    n = len(behaviours)
    config = LoadConfig(SCENARIO, concurrency=concurrency, num_requests=n, warmup=0, request_timeout=TIMEOUT)
    script = {}
    for index, name in enumerate(behaviours):
        body = encode_body(plan_request(config.scenario, index, config.seed), MODEL, config)
        script[hashlib.sha256(body).hexdigest()] = name
    hostile_server.script(script)
    start = time.perf_counter()
    with _wire(python_wire):
        run = run_coroutine(LoadGenerator(hostile_server.base_url, MODEL).run(config))
    wall = time.perf_counter() - start
    assert sorted(r.index for r in run.records) == list(range(n))  # one record per request
    for rec in run.records:
        event(f"outcome: {rec.error_kind.value if rec.error_kind else 'ok'}")  # --hypothesis-show-statistics
        where = f"request {rec.index} ({behaviours[rec.index]}): {rec.error_kind} {rec.error_message!r}"
        if rec.ok:
            assert rec.error_message is None, where
            continue
        assert isinstance(rec.error_kind, ErrorKind) and rec.error_kind is not ErrorKind.CANCELLED, where
        assert rec.error_message and len(rec.error_message) <= MESSAGE_LIMIT, where
    for rec in run.records:
        if behaviours[rec.index] == "good":
            assert rec.ok, f"a good request failed beside hostile ones: {rec.error_kind} {rec.error_message!r}"
    # each worker's requests end within the request timeout each
    rounds = -(-n // concurrency)
    assert wall < rounds * TIMEOUT + SLACK, f"{n} requests at concurrency {concurrency} took {wall:.2f} s"


@pytest.mark.slow
@settings(FUZZ, max_examples=30)  # about 12 s: a third of the draws wait out the 0.5 s deadline
@given(health=st.sampled_from(GET_BEHAVIOURS), models=st.sampled_from(GET_BEHAVIOURS))
def test_the_readiness_check_answers_ready_or_a_clear_error(
    hostile_server: HostileClient, health: str, models: str
) -> None:
    hostile_server.script({"GET /health": health, "GET /v1/models": models})
    timeout = 0.5  # a good server answers in milliseconds; a slow one is a clear error either way
    start = time.perf_counter()
    try:
        server = connect_endpoint(ServerConfig(endpoint=hostile_server.base_url), timeout=timeout)
    except ServerError as exc:
        event("a setup error")
        message = str(exc)
        assert message and len(message) <= 2 * MESSAGE_LIMIT, message
    else:
        event("ready")
        assert server.base_url == hostile_server.base_url
    wall = time.perf_counter() - start
    assert wall < timeout + SLACK, f"/health {health}, /v1/models {models}: the check took {wall:.2f} s"
