"""The plugin as users run it: a pytest session in a subprocess, against the simulator."""

from __future__ import annotations

import json
import os
import sys
import textwrap
import time

import pytest

from pytest_infmax.servers.launch import ServerConfig, running_server
from pytest_infmax.sidecar import load_results

pytestmark = pytest.mark.usefixtures("no_leaked_servers")

# A quick, fast simulator: 2 ms steps, so a 6-request run takes well under a second.
FAST_SIM = "--decode-step-ms 2 --decode-ms-per-seq 0.01"


def _write(pytester: pytest.Pytester, body: str) -> None:
    pytester.makepyfile(test_perf=textwrap.dedent(body))
    pytester.makeini(f"[pytest]\ninfmax_sim_args = {FAST_SIM}\nasyncio_default_fixture_loop_scope = function\n")


def test_help_lists_every_option(pytester: pytest.Pytester) -> None:
    # argparse %-formats help texts: one bare "%" (e.g. "5%" in --infmax-min-effect's) crashed
    # `pytest --help` for every project in the venv. Each flag is named with its env variable.
    from pytest_infmax.settings import SETTINGS

    result = pytester.runpytest_subprocess("--help")
    assert result.ret == 0, result.stderr.str()
    out = result.stdout.str()
    for setting in SETTINGS:
        assert setting.flag in out and setting.env in out, setting.flag
    assert "e.g. 5% [env INFMAX_MIN_EFFECT" in " ".join(out.split())  # printed as written, not as %%


def test_evaluate_only_looks_it_changes_no_outcome_and_no_cell(pytester: pytest.Pytester) -> None:
    # Issue 15: r.evaluate(...) turned the table's SLA cell and JUnit's infmax_sla to FAIL
    # while the test passed. A look is not an assertion: check() and sla= are.
    pytester.makepyfile(
        test_perf="""
        def test_looks(infmax):
            r = infmax.run("1k1k-mini", concurrency=1, num_requests=2, warmup=0)
            (verdict,) = r.evaluate("p99(ttft) < 0.001ms")
            assert not verdict.passed and r.passed is None
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--junitxml", "junit.xml")
    result.assert_outcomes(passed=1)
    row = next(line for line in result.outlines if line.startswith("test_perf.py::test_looks "))
    assert row.split()[-1].rstrip("*") == "-" and "FAIL" not in row, row  # "*": client-bound under load
    junit = (pytester.path / "junit.xml").read_text()
    assert 'name="infmax_sla"' not in junit or 'name="infmax_sla" value="FAIL"' not in junit


def test_sla_that_holds_passes_and_prints_table(pytester: pytest.Pytester) -> None:
    _write(
        pytester,
        """
        import pytest

        @pytest.mark.sla("p99(ttft) < 5s", "error_rate < 1%", "throughput_per_gpu > 10 tok/s")
        def test_quick(infmax):
            result = infmax.run("1k1k-mini", concurrency=2, num_requests=6, warmup=2)
            assert result.metrics.num_ok == 6
    """,
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        [
            "*infmax results*",
            "test*scenario*load*reqs*TTFT p50 ms*TTFT p99 ms*TPOT p50 ms*tok/s/user*tok/s/GPU*errors*verdict*",
            "*test_quick*1k1k-mini*c=2*6*PASS*",
        ]
    )


def test_sla_that_cannot_hold_fails_with_measured_value(pytester: pytest.Pytester) -> None:
    _write(
        pytester,
        """
        import pytest

        @pytest.mark.sla("p50(tpot) < 0.001ms", "error_rate < 1%")
        def test_too_strict(infmax):
            infmax.run("1k1k-mini", concurrency=2, num_requests=6, warmup=0)
    """,
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    assert "p50(tpot)" in out and "measured" in out
    assert "6 requests" in out  # how many requests the figure rests on
    result.stdout.fnmatch_lines(["*test_too_strict*FAIL*"])


def test_sla_in_run_fails_with_every_violation(pytester: pytest.Pytester) -> None:
    _write(
        pytester,
        """
        def test_run_sla(infmax):
            infmax.run("1k1k-mini", concurrency=2, num_requests=4, warmup=0,
                       sla=["p99(ttft) < 0.001ms", "p50(tpot) < 0.001ms", "error_rate < 50%"])
    """,
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    assert "p99(ttft)" in out and "p50(tpot)" in out


def test_malformed_marker_is_usage_error_before_any_server(pytester: pytest.Pytester) -> None:
    _write(
        pytester,
        """
        import pytest

        @pytest.mark.sla("p99(ttft) < 500")
        def test_bad(infmax):
            infmax.run("1k1k-mini", concurrency=1, num_requests=1)
    """,
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*test_bad*p99(ttft) < 500*"])
    # Nothing was started: no server log exists.
    assert not (pytester.path / ".infmax" / "logs").exists()


def test_malformed_sla_in_run_raises_before_load(pytester: pytest.Pytester) -> None:
    _write(
        pytester,
        """
        import json, urllib.request
        import pytest
        from pytest_infmax.measure.sla import SLASyntaxError

        def test_bad_expression(infmax, infmax_server):
            with pytest.raises(SLASyntaxError, match="p99.ttft. < fast"):
                infmax.run("1k1k-mini", concurrency=1, num_requests=1, sla=["p99(ttft) < fast"])
            with urllib.request.urlopen(infmax_server.base_url + "/sim/stats") as resp:
                assert json.load(resp)["requests_received"] == 0
    """,
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


def test_json_has_records_and_environment(pytester: pytest.Pytester) -> None:
    _write(
        pytester,
        """
        def test_json(infmax):
            infmax.run("1k1k-mini", concurrency=2, num_requests=5, warmup=2, sla=["p99(ttft) < 10s"])
    """,
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--infmax-json", "out/results.json")
    result.assert_outcomes(passed=1)
    raw = (pytester.path / "out" / "results.json").read_text()
    assert "chunk_times" not in raw and (pytester.path / "out" / "results.chunks.npz").is_file()
    doc = load_results(pytester.path / "out" / "results.json")  # the stamps from the sidecar beside it
    assert doc["environment"]["plugin_version"]
    (res,) = doc["results"]
    assert res["name"].endswith("test_json")
    assert res["server"]["kind"] == "sim" and res["server"]["num_gpus"] == 1
    records = res["records"]
    assert len(records) == 7
    assert sum(r["warmup"] for r in records) == 2
    measured = [r for r in records if not r["warmup"]]
    for r in measured:
        assert r["error_kind"] is None
        assert r["output_tokens"] == r["requested_output_tokens"]
        assert r["output_tokens_source"] == "usage"
        assert r["input_tokens"] == r["requested_input_tokens"]
        assert len(r["chunk_times"]) == r["output_tokens"]  # one token per SSE event by default (the sidecar's)
        assert r["send_time"] < r["first_token_time"] <= r["end_time"]
    assert res["metrics"]["num_requests"] == 5
    assert res["sla"][0]["passed"] is True
    assert res["passed"] is True
    assert not list((pytester.path / "out").glob(".*.tmp"))  # atomic write leaves no temp file


def _server_pid_test(action: str) -> str:
    return f"""
        import os, signal

        def test_dies(infmax, infmax_server):
            with open("server.pid", "w") as f:
                f.write(str(infmax_server.pid))
            infmax.run("1k1k-mini", concurrency=1, num_requests=1, warmup=0)
            {action}
    """


def _group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.parametrize(
    "action, expected",
    [
        ("raise RuntimeError('boom in the middle')", pytest.ExitCode.TESTS_FAILED),
        # Ctrl-C as at a terminal, even where SIGINT was inherited ignored (background CI jobs).
        (
            "signal.signal(signal.SIGINT, signal.default_int_handler); os.kill(os.getpid(), signal.SIGINT)",
            pytest.ExitCode.INTERRUPTED,
        ),
        ("os.kill(os.getpid(), signal.SIGTERM)", pytest.ExitCode.INTERRUPTED),
    ],
    ids=["test-error", "ctrl-c", "sigterm"],
)
def test_server_process_group_is_gone_after_session(pytester: pytest.Pytester, action, expected) -> None:
    _write(pytester, _server_pid_test(action))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    assert result.ret == expected
    pgid = int((pytester.path / "server.pid").read_text())
    assert _group_gone(pgid)


def test_error_in_fixture_setup_still_stops_server(pytester: pytest.Pytester) -> None:
    _write(
        pytester,
        """
        import pytest

        @pytest.fixture
        def broken(infmax_server):
            with open("server.pid", "w") as f:
                f.write(str(infmax_server.pid))
            raise RuntimeError("setup failed")

        def test_x(broken):
            pass
    """,
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(errors=1)
    assert _group_gone(int((pytester.path / "server.pid").read_text()))


def test_openai_sdk_fixtures(pytester: pytest.Pytester) -> None:
    _write(
        pytester,
        """
        import asyncio

        def test_sync(infmax_openai):
            out = infmax_openai.completions.create(model="sim-model", prompt="hello world", max_tokens=5)
            assert out.usage.completion_tokens == 5
            chat = infmax_openai.chat.completions.create(
                model="sim-model", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
            assert chat.choices[0].message.content

        def test_async(infmax_async_openai):
            async def go():
                stream = await infmax_async_openai.chat.completions.create(
                    model="sim-model", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                    stream=True, stream_options={"include_usage": True})
                chunks = [c async for c in stream]
                await infmax_async_openai.close()
                return chunks
            chunks = asyncio.run(go())
            assert chunks[-1].usage.completion_tokens == 4
    """,
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)


def test_arun_with_pytest_asyncio(pytester: pytest.Pytester) -> None:
    _write(
        pytester,
        """
        import pytest

        @pytest.mark.asyncio
        async def test_async_run(infmax):
            result = await infmax.arun("1k1k-mini", rate=50, num_requests=4)
            assert result.metrics.num_ok == 4
            with pytest.raises(RuntimeError, match="arun"):
                infmax.run("1k1k-mini", concurrency=1, num_requests=1)
    """,
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "asyncio")
    result.assert_outcomes(passed=1)


def test_endpoint_option_uses_running_server(pytester: pytest.Pytester, tmp_path) -> None:
    _write(
        pytester,
        """
        def test_remote(infmax, infmax_server):
            assert infmax_server.config.kind == "endpoint"
            assert infmax_server.process is None
            result = infmax.run("1k1k-mini", concurrency=2, num_requests=4, warmup=0)
            assert result.metrics.num_ok == 4
            assert result.metrics.num_gpus == 8
    """,
    )
    config = ServerConfig(sim_args=("--decode-step-ms", "2", "--api-key", "sk-secret-123"))
    env_key = {"INFMAX_API_KEY": "sk-secret-123"}
    os.environ.update(env_key)
    try:
        with running_server(config, tmp_path) as server:
            result = pytester.runpytest_subprocess(
                "-p",
                "no:cacheprovider",
                "--infmax-endpoint",
                server.base_url,
                "--infmax-gpus",
                "8",
                "--infmax-json",
                "r.json",
            )
    finally:
        os.environ.pop("INFMAX_API_KEY")
    result.assert_outcomes(passed=1)
    artefacts = (pytester.path / "r.json").read_text() + result.stdout.str() + result.stderr.str()
    assert "sk-secret-123" not in artefacts


def test_dead_endpoint_is_a_clear_error(pytester: pytest.Pytester) -> None:
    _write(
        pytester,
        """
        def test_remote(infmax):
            pass
    """,
    )
    result = pytester.runpytest_subprocess(
        "-p",
        "no:cacheprovider",
        "--infmax-endpoint",
        "http://127.0.0.1:9",
        "--infmax-startup-timeout",
        "2",
        timeout=120,
    )
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*endpoint http://127.0.0.1:9 did not answer*"])


def test_command_template_server_and_startup_crash(pytester: pytest.Pytester) -> None:
    _write(
        pytester,
        """
        import sys
        import pytest

        SIM = [sys.executable, "-m", "pytest_infmax.sim", "--host", "{host}", "--port", "{port}",
               "--decode-step-ms", "2"]

        @pytest.mark.infmax_server(command=SIM)
        def test_command(infmax, infmax_server):
            assert infmax_server.config.kind == "command"
            assert infmax.run("1k1k-mini", concurrency=1, num_requests=2, warmup=0).metrics.num_ok == 2

        @pytest.mark.infmax_server(
            command=[sys.executable, "-c", "import sys; print('no GPU found'); sys.exit(3)", "{port}"]
        )
        def test_crash(infmax):
            pass
    """,
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*server exited with code 3 before it was ready*", "*no GPU found*"])


def test_bad_setting_is_usage_error(pytester: pytest.Pytester) -> None:
    _write(pytester, "def test_x():\n    pass\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--infmax-gpus", "zero")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--infmax-gpus*'zero'*"])


@pytest.mark.slow
def test_xdist_workers_get_their_own_servers(pytester: pytest.Pytester) -> None:
    _write(
        pytester,
        """
        import pytest

        @pytest.mark.parametrize("i", range(4))
        def test_parallel(infmax, i):
            assert infmax.run("1k1k-mini", concurrency=2, num_requests=4, warmup=0).metrics.num_ok == 4
    """,
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2", "--infmax-json", "x.json")
    result.assert_outcomes(passed=4)
    doc = json.loads((pytester.path / "x.json").read_text())
    assert len(doc["results"]) == 4
    assert len({r["server"]["base_url"] for r in doc["results"]}) == 2  # one server per worker
    result.stdout.fnmatch_lines(["*infmax results*"])


def test_junit_properties(pytester: pytest.Pytester) -> None:
    _write(
        pytester,
        """
        def test_j(infmax):
            infmax.run("1k1k-mini", concurrency=1, num_requests=2, warmup=0)
    """,
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--junitxml", "j.xml")
    result.assert_outcomes(passed=1)
    xml = (pytester.path / "j.xml").read_text()
    assert 'name="infmax_ttft_p99_ms"' in xml and 'name="infmax_throughput_per_gpu"' in xml


def test_console_script_table(pytester: pytest.Pytester) -> None:
    _write(
        pytester,
        """
        def test_t(infmax):
            infmax.run("1k1k-mini", concurrency=1, num_requests=2, warmup=0)
    """,
    )
    pytester.runpytest_subprocess("-p", "no:cacheprovider", "--infmax-json", "t.json").assert_outcomes(passed=1)
    proc = pytester.run(sys.executable, "-m", "pytest_infmax.cli", "table", "t.json")
    assert proc.ret == 0
    proc.stdout.fnmatch_lines(["*test_t*1k1k-mini*c=1*"])


def test_chat_endpoint_and_duration_bound(pytester: pytest.Pytester) -> None:
    _write(
        pytester,
        """
        def test_chat(infmax):
            result = infmax.run("1k1k-mini", concurrency=2, duration=1.0, warmup=0, endpoint="chat")
            m = result.metrics
            assert m.num_requests >= 2 and m.num_ok == m.num_requests
            # No new request starts after the duration; the last ones finish within one request time.
            assert m.duration < 1.0 + 2.0
            assert {r.input_tokens_source.value for r in result.records} == {"usage"}
            assert all(r.output_tokens == r.requested_output_tokens for r in result.records)
    """,
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


@pytest.mark.slow
def test_sweep_frontier_sla_through_the_plugin(pytester: pytest.Pytester) -> None:
    _write(
        pytester,
        """
        import pytest
        from pytest_infmax.run.sweep import FrontierSLAFailed

        def test_sweep(infmax):
            sweep = infmax.sweep("1k1k-mini", concurrency=[1, 8], num_requests=8, warmup=0)
            assert [r.config.concurrency for r in sweep.results] == [1, 8]
            lo, hi = sweep.frontier().x_range
            with pytest.raises(FrontierSLAFailed, match="outside the measured range"):
                sweep.check(f"throughput_per_gpu@interactivity={hi * 2:.0f} > 1 tok/s")
            # Full precision: under CPU load one point may dominate the other (lo == hi).
            sweep.check(f"throughput_per_gpu@interactivity={(lo + hi) / 2!r} > 1 tok/s")
    """,
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*test_sweep?c=1?*c=1*", "*test_sweep?c=8?*c=8*"])


def test_html_markdown_plots_and_step_summary(pytester: pytest.Pytester, monkeypatch) -> None:
    _write(
        pytester,
        """
        def test_r(infmax):
            infmax.run("1k1k-mini", concurrency=2, num_requests=4, warmup=0, sla=["error_rate < 1%"])
    """,
    )
    summary = pytester.path / "step_summary.md"
    summary.write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    result = pytester.runpytest_subprocess(
        "-p",
        "no:cacheprovider",
        "--infmax-json",
        "out/r.json",
        "--infmax-plots",
        "on",
        "--infmax-html",
        "out/r.html",
        "--infmax-markdown",
        "out/r.md",
    )
    result.assert_outcomes(passed=1)
    out = pytester.path / "out"
    for name in ("r.json", "r-frontier.png", "r-latency.png", "r-throughput.png", "r.html", "r.md"):
        assert (out / name).stat().st_size > 200, name
        result.stdout.fnmatch_lines([f"infmax: wrote *{name}"])
    assert (out / "r-frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (out / "r.html").read_text()
    assert "data:image/png;base64," in html and "test_r" in html
    text = summary.read_text()
    assert text.startswith("earlier step\n")  # appended, as GitHub expects
    assert "| `test_perf.py::test_r` |" in text and "PASS" in text


def test_bad_on_off_setting_is_usage_error(pytester: pytest.Pytester) -> None:
    _write(pytester, "def test_x():\n    pass\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--infmax-plots", "maybe")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--infmax-plots*'maybe'*must be on or off*"])


@pytest.mark.slow
def test_price_marker_and_setting(pytester: pytest.Pytester) -> None:
    _write(
        pytester,
        """
        import pytest

        @pytest.mark.infmax_price(gpu_hour_usd=3.6)
        def test_priced(infmax):
            r = infmax.run("1k1k-mini", concurrency=2, num_requests=4, warmup=0)
            # $3.6/GPU-hour x 1 GPU / (tokens/s x 3600) x 1e6 = 1000 / (tokens/s) $ per million tokens
            assert abs(r.cost.total - 1000 / r.metrics.throughput) < 1e-9
            assert r.price.source == "user-set (@pytest.mark.infmax_price)"  # the marker set it

        def test_session_price(infmax):
            assert infmax.run("1k1k-mini", concurrency=1, num_requests=2, warmup=0).price.usd_per_gpu_hour == 2.0
    """,
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--infmax-gpu-hour-usd", "2")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*$/Mtok*"])
    bad = pytester.makepyfile(
        test_bad="""
        import pytest

        @pytest.mark.infmax_price(gpu_hour=3)
        def test_x(infmax):
            pass
    """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", str(bad))
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*infmax_price: unknown option(s) gpu_hour*"])


def test_bad_run_options_are_clear_errors_through_the_plugin(pytester: pytest.Pytester) -> None:
    """Before: run(concurency=2) was a TypeError naming the private _plan(); request_timeout=0
    was silently 600 s; a command template without {port} waited out the startup timeout."""
    _write(
        pytester,
        """
        import pytest
        from pytest_infmax import LoadConfigError

        def test_x(infmax):
            with pytest.raises(LoadConfigError, match=r"infmax.run[(][)] has no argument concurency=2; did you mean concurrency=[?]"):
                infmax.run("1k1k-mini", concurency=2)
            with pytest.raises(LoadConfigError, match=r"infmax.sweep[(][)] has no argument num_request=4; did you mean num_requests="):
                infmax.sweep("1k1k-mini", concurrency=[1], num_request=4)
            with pytest.raises(LoadConfigError, match="request_timeout must be > 0 seconds"):
                infmax.run("1k1k-mini", concurrency=1, request_timeout=0)
    """,
    )
    pytester.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(passed=1)
    started = time.monotonic()
    no_port = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", f"--infmax-server-command={sys.executable} -m http.server", timeout=120
    )
    assert no_port.ret == pytest.ExitCode.USAGE_ERROR
    no_port.stderr.fnmatch_lines(
        ["*--infmax-server-command = * is not valid: must be a command template with {port} in it*"]
    )
    assert time.monotonic() - started < 60  # at once, not after the 600 s startup timeout


def test_a_run_of_failed_requests_fails_its_test_unless_the_test_sets_an_error_rate_sla(
    pytester: pytest.Pytester,
) -> None:
    # Issue 17, "silence is a failure": a run with 0 of 6 requests ok passed a test without an
    # SLA. More than --infmax-max-error-rate (5 %, InferenceMAX's rule) fails the test, naming
    # the run, the rate, the limit, the error kinds and the way out; a test's own error_rate
    # objective (marker or run(sla=...)) is its word on errors.
    _write(
        pytester,
        """
        import pytest

        SERVER = pytest.mark.infmax_server(sim_args="--decode-step-ms 2 --fault-status 503")

        @SERVER
        def test_silent(infmax):
            infmax.run("1k1k-mini", concurrency=2, num_requests=6, warmup=0)

        @SERVER
        @pytest.mark.sla("error_rate <= 100%")
        def test_own_marker(infmax):
            infmax.run("1k1k-mini", concurrency=2, num_requests=6, warmup=0)

        @SERVER
        def test_own_run_sla(infmax):
            infmax.run("1k1k-mini", concurrency=2, num_requests=6, warmup=0, sla="error_rate <= 100%")

        def test_healthy(infmax):
            infmax.run("1k1k-mini", concurrency=2, num_requests=6, warmup=0)
    """,
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--junitxml", "junit.xml")
    result.assert_outcomes(failed=1, passed=3)
    result.stdout.fnmatch_lines(
        [
            "*too many failed requests (--infmax-max-error-rate):",
            "*test_perf.py::test_silent c=2: 6 of 6 requests failed (6 http_error): error rate 100.0% > 5.0%;"
            " the first error: HTTP 503*",
            "*error_rate SLA of your own*--infmax-max-error-rate off*",
        ]
    )
    rows = {line.split()[0]: line for line in result.outlines if line.startswith("test_perf.py::test_")}
    assert "FAIL (errors)" in rows["test_perf.py::test_silent"], rows
    assert "FAIL" not in rows["test_perf.py::test_own_marker"] and "FAIL" not in rows["test_perf.py::test_healthy"]
    # "*" follows where the run was client-bound (a loaded machine): the verdict is the same
    assert 'name="infmax_verdict" value="FAIL (errors)' in (pytester.path / "junit.xml").read_text()

    off = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--infmax-max-error-rate", "off")
    off.assert_outcomes(passed=4)
    looser = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-k", "silent", "--infmax-max-error-rate", "100%")
    looser.stderr.fnmatch_lines(["*--infmax-max-error-rate = *100%* is not valid: must be between 0 and 100%*"])


def test_a_server_that_died_in_one_test_is_started_afresh_for_the_next(pytester: pytest.Pytester) -> None:
    # Issue 17: the pool handed a dead server to the next test, whose requests all failed with
    # "Connection refused" and no word of the exit code or the log. The test in which it died
    # names both; the next test gets a fresh start and a warning saying why.
    _write(
        pytester,
        """
        import pytest

        SERVER = pytest.mark.infmax_server(sim_args="--decode-step-ms 2 --crash-after 2")

        @SERVER
        def test_crashes(infmax, infmax_server):
            try:
                infmax.run("1k1k-mini", concurrency=1, num_requests=6, warmup=0)
            finally:
                infmax_server.process.wait(timeout=30)  # the crash is over before the next test

        @SERVER
        def test_next(infmax, infmax_server):
            r = infmax.run("1k1k-mini", concurrency=1, num_requests=2, warmup=0)
            assert r.metrics.num_ok == 2, r.metrics.errors_by_kind
    """,
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1, passed=1)
    result.stdout.fnmatch_lines(
        [
            "*the server died during the run:",
            "*test_perf.py::test_crashes c=1: the run stopped after * requests (* failed): the server exited with code 1: *",
            "*last lines of *server-*.log:",
            "*injected crash (--crash-after 2)*",
        ]
    )
    result.stdout.fnmatch_lines(
        [
            "*warnings summary*",
            "test_perf.py::test_next",
            "*ServerDiedWarning: the server exited with code 1: *",
            "*it was started afresh for this test",
        ]
    )


DIES_MID_RUN = """
import pytest

@pytest.mark.infmax_server(sim_args="--decode-step-ms 2 --crash-after 20")
def test_long(infmax):
    infmax.run("1k1k-mini", concurrency=2, duration=120, warmup=0)
"""


def test_a_server_that_dies_mid_run_stops_the_run_and_is_named(pytester: pytest.Pytester) -> None:
    # Before: the closed loop went on for the whole duration against nothing, each request
    # refused at once (vLLM with its EngineCore killed: 127,919 failed requests in 22 s), and
    # the test failed on its error rate. Now the run stops when the server is seen dead.
    _write(pytester, DIES_MID_RUN)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--infmax-json", "r.json")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*the server died during the run:",
            "*test_long c=2: the run stopped after * requests (* failed): the server exited with code 1: *",
            "*injected crash (--crash-after 20)*",
        ]
    )
    (res,) = json.loads((pytester.path / "r.json").read_text())["results"]
    assert "the server exited with code 1" in res["server_died"]
    assert res["metrics"]["duration"] < 30  # stopped within a moment, not after 120 s of refusals
    result.stdout.fnmatch_lines(["*test_long*FAIL (server died)*"])


def test_an_endpoint_that_stops_accepting_connections_stops_the_run(pytester: pytest.Pytester, tmp_path) -> None:
    """An endpoint is not ours to watch: every request refused for 2 s says it is gone."""
    with running_server(ServerConfig(sim_args=("--decode-step-ms", "2", "--crash-after", "20")), tmp_path) as server:
        _write(
            pytester,
            """
            def test_long(infmax):
                infmax.run("1k1k-mini", concurrency=2, duration=120, warmup=0)
            """,
        )
        result = pytester.runpytest_subprocess(
            "-p", "no:cacheprovider", "--infmax-endpoint", server.base_url, "--infmax-json", "r.json"
        )
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        ["*test_long c=2: the run stopped after * requests (* failed): every request for 2.* s failed to connect*"]
    )
    (res,) = json.loads((pytester.path / "r.json").read_text())["results"]
    assert res["metrics"]["duration"] < 30 and "failed to connect" in res["server_died"]


@pytest.mark.parametrize(
    ("mark", "expected"),
    [
        ("sla()", "*test_x: @pytest.mark.sla: has no objectives, so it would check nothing; give at least one*"),
        ("sla(goodput='ttft < 1s')", "*test_x: @pytest.mark.sla: has no objectives*"),
        (
            "slaa('p99(ttft) < 1ms')",
            "*test_x: @pytest.mark.slaa: there is no such mark; did you mean @pytest.mark.sla?*",
        ),
        ("infmax_sever(sim_args='--x')", "*@pytest.mark.infmax_sever: *did you mean @pytest.mark.infmax_server?*"),
        ("SLA('p99(ttft) < 1ms')", "*@pytest.mark.SLA: *did you mean @pytest.mark.sla?*"),
    ],
    ids=["empty-sla", "goodput-only", "slaa", "infmax_sever", "SLA"],
)
def test_an_empty_sla_mark_or_a_misspelt_mark_of_ours_is_a_usage_error(
    pytester: pytest.Pytester, mark: str, expected: str
) -> None:
    # Issue 17: each passed silently (pytest only warns of an unknown mark): the test ran with no
    # SLA, or on the default server. No server starts and no request is sent.
    pytester.makepyfile(test_perf=f"import pytest\n\n@pytest.mark.{mark}\ndef test_x():\n    pass\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR, result.stdout.str()
    result.stderr.fnmatch_lines([expected])
    assert "Traceback" not in result.stderr.str()


def test_a_registered_mark_close_to_ours_is_the_projects_own(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_perf="import pytest\n\n@pytest.mark.slab\n@pytest.mark.slow\ndef test_x():\n    pass\n")
    pytester.makeini("[pytest]\nmarkers =\n    slab: a mark of the project's own\n    slow: slow tests\n")
    pytester.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(passed=1)


def test_a_server_marker_naming_two_servers_is_a_usage_error(pytester: pytest.Pytester) -> None:
    # Issue 17: command= and endpoint= (or sim_args= and endpoint=) were both accepted and the
    # endpoint silently won: the test measured another server than one of its arguments said.
    pytester.makepyfile(
        test_perf="""
        import pytest

        @pytest.mark.infmax_server(sim_args="--decode-step-ms 2", endpoint="http://127.0.0.1:9")
        def test_x(infmax):
            infmax.run("1k1k-mini", concurrency=1, num_requests=1)
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR, result.stdout.str()
    result.stderr.fnmatch_lines(
        [
            "*test_x: @pytest.mark.infmax_server: endpoint= (a server already running) and "
            "sim_args= (the embedded simulator) name different servers; give one of them"
        ]
    )
