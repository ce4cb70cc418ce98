"""Everything a server sends is bounded and checked: the plugin, as users run it, against
tests/_hostile_server.py (a scripted raw HTTP server) as ``--infmax-endpoint``.

A count the server reports is checked against what was asked; a body it sends is
bounded in size and in time; whatever it does, the session ends with an outcome and
no INTERNALERROR (issue 17).
"""

from __future__ import annotations

import pytest
from _hostile_client import HostileClient


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
            result = infmax.run("1k1k-mini", concurrency=2, num_requests=4, warmup=0)
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
