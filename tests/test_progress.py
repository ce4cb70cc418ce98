"""Progress lines: quiet for short runs, periodic with counts and live throughput for long ones."""

import pytest

from pytest_infmax.load.progress import Progress
from pytest_infmax.records import ErrorKind, RequestRecord


def test_progress_lines_by_hand() -> None:
    now = [100.0]
    lines: list[str] = []
    p = Progress(lines.append, "t.py::test", "c=8", total=10, interval=5.0, clock=lambda: now[0])
    ok = RequestRecord(index=0, input_tokens=100, output_tokens=50)
    for t in (101.0, 102.0, 104.0):  # within the first 5 s: quiet
        now[0] = t
        p.on_record(ok)
    assert lines == []
    now[0] = 106.0  # 6 s since the start: 3 x 150 tokens over 6 s = 75 tok/s
    p.on_record(RequestRecord(index=1, error_kind=ErrorKind.HTTP))
    assert lines == ["infmax: t.py::test c=8: 4/10 requests, 1 errors, 75 tok/s, 6 s"]
    now[0] = 110.0  # 4 s after the last line: quiet
    p.on_record(ok)
    now[0] = 111.0  # 5 s after it: 300 tokens over 5 s
    p.on_record(ok)
    assert lines[1:] == ["infmax: t.py::test c=8: 6/10 requests, 1 errors, 60 tok/s, 11 s"]


@pytest.mark.slow
def test_plugin_shows_progress_without_s(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_long="""
        from pytest_infmax import Scenario

        def test_long(infmax):
            infmax.run(Scenario("long", 16, 300, range_ratio=1.0), concurrency=2, num_requests=4, warmup=0)
    """
    )
    pytester.makeini("[pytest]\ninfmax_sim_args = --decode-step-ms 10\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")  # capture on, as users run it
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["infmax: test_long.py::test_long c=2: */4 requests, * tok/s, * s"])
