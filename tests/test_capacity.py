"""Capacity as an assertion (issue 19, item 6): ``infmax.capacity(...)`` finds the largest load
that meets the SLAs, by bracketing then PCHIP on the SLA margin (or bisection), as vLLM's
``bench sweep serve_sla`` does; against the simulator the answer is known from ``simulate()``."""

from __future__ import annotations

import json
import math
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_infmax import LoadConfigError, cli
from pytest_infmax.measure.sla import parse
from pytest_infmax.measure.verdicts import Verdict
from pytest_infmax.reports.markdown import sweep_to_dict
from pytest_infmax.reports.rows import VerdictTally, failed_verdicts, result_row
from pytest_infmax.run.capacity import Grid, Probe, margin, search
from pytest_infmax.run.runner import Infmax
from pytest_infmax.servers.launch import Server, ServerConfig, ServerError, running_server
from pytest_infmax.sim import build_parser, config_from_args
from pytest_infmax.sim.engine import simulate

# -- the search, on loads whose answer is known exactly --------------------------------------


def _measure_with(capacity: float, *, smooth: bool = True, calls: list[float] | None = None):
    """A load meets the SLAs up to ``capacity``; its margin is linear in the load (smooth) or a step."""

    def measure(load: float) -> Probe:
        if calls is not None:
            calls.append(load)
        m = (load - capacity) / capacity if smooth else (-1.0 if load <= capacity else 1.0)
        return Probe(load, load <= capacity, m if load != capacity else -1e-9)

    return measure


@pytest.mark.parametrize("method", ["pchip", "bisect"])
@pytest.mark.parametrize("answer", [1, 2, 37, 500, 1023])
def test_concurrency_search_finds_the_exact_answer(method: str, answer: int) -> None:
    for smooth in (True, False):
        probes = search(_measure_with(answer + 0.5, smooth=smooth), Grid.of("concurrency", 1, 1024, None), method)
        met = max(p.load for p in probes if p.met)
        missed = min(p.load for p in probes if not p.met)
        assert (met, missed) == (answer, answer + 1), (method, smooth, [p.load for p in probes])
        assert len({p.load for p in probes}) == len(probes)  # no load measured twice
        assert len(probes) <= 11 + 2 * 10, probes  # bracketing, then at most twice bisection's


def test_pchip_needs_fewer_points_than_bisection_on_a_smooth_margin() -> None:
    counts = {}
    for method in ("pchip", "bisect"):
        counts[method] = len(search(_measure_with(300.5), Grid.of("concurrency", 1, 1024, None), method))
    assert counts["pchip"] < counts["bisect"], counts


def test_rate_search_ends_within_one_step() -> None:
    grid = Grid.of("rate", 0.5, 64.0, 0.25)
    probes = search(_measure_with(12.34), grid, "pchip")
    met = max(p.load for p in probes if p.met)
    missed = min(p.load for p in probes if not p.met)
    assert met <= 12.34 < missed and missed - met <= 0.25


def test_bracket_ends_at_lo_or_hi() -> None:
    grid = Grid.of("concurrency", 4, 64, None)
    below = search(_measure_with(2.5), grid)
    assert [(p.load, p.met) for p in below] == [(4, False)]  # lo missed: nothing more to measure
    above = search(_measure_with(100.5), grid)
    assert [p.load for p in above] == [4, 8, 16, 32, 64] and all(p.met for p in above)  # hi met: capped
    odd = search(_measure_with(100.5), Grid.of("concurrency", 3, 50, None))
    assert [p.load for p in odd] == [3, 6, 12, 24, 48, 50]  # hi is measured last


def test_noisy_loads_never_make_a_missed_load_the_answer() -> None:
    """A load that met the SLAs above one that missed them is not the capacity."""
    pattern = {1: True, 2: True, 4: False, 8: True, 16: False, 3: True}

    def measure(load: float) -> Probe:
        ok = pattern[int(load)]
        return Probe(load, ok, -0.5 if ok else 0.5)

    probes = search(measure, Grid.of("concurrency", 1, 16, None), "bisect")
    assert [p.load for p in probes] == [1, 2, 4, 3]  # doubling stopped at the first miss


def test_margin_is_the_worst_objective_s_relative_distance() -> None:
    def v(expr: str, measured: float | None) -> Verdict:
        return Verdict(parse(expr), measured, False, 1, "")

    assert margin([v("p99(ttft) < 100ms", 0.05)]) == pytest.approx(-0.5)
    assert margin([v("p99(ttft) < 100ms", 0.15), v("p50(interactivity) > 50 tok/s/user", 60)]) == pytest.approx(0.5)
    assert margin([v("p50(interactivity) > 50 tok/s/user", 25)]) == pytest.approx(0.5)
    assert margin([v("error_rate <= 0%", 0.02)]) == pytest.approx(0.02)  # limit 0: the absolute distance
    assert margin([v("p99(ttft) < 100ms", None)]) == math.inf  # not measured: cannot guide a guess


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("qps", 1, 8, None), "over must be 'concurrency' or 'rate'"),
        (("concurrency", 8, 4, None), "hi=4 is below lo=8"),
        (("concurrency", 1.5, 4, None), "lo must be a whole number >= 1"),
        (("concurrency", 1, 4, 0), "step must be a whole number >= 1"),
        (("rate", 1.0, math.inf, None), "hi must be a finite number > 0"),
        (("concurrency", 1, 10**6, None), "more than the 100000 streams"),
    ],
)
def test_bad_search_bounds_are_refused(args: tuple, message: str) -> None:
    with pytest.raises(LoadConfigError, match=message):
        Grid.of(*args)


# -- against the simulator: the answer known from simulate() ---------------------------------

# 6 sequences at most: a 7th concurrent request waits for a whole request (~130 ms) before its
# first token, so p99(ttft) jumps from ~9 ms at c=6 to ~130 ms at c=7 (a wide margin for a
# contended machine's scheduling noise)
SIM_ARGS = ("--max-num-seqs", "6", "--decode-step-ms", "5", "--decode-ms-per-seq", "0.5")
ISL, OSL = 32, 16
SLA_TEXT = "p99(ttft) < 60ms"
NUM_REQUESTS = 12


def _expected_capacity(hi: int) -> int:
    """The largest concurrency whose simulated p99 TTFT meets the SLA (same engine, no clock)."""
    config = config_from_args(build_parser().parse_args(list(SIM_ARGS)))
    best = 0
    for c in range(1, hi + 1):
        sim = simulate(config.engine, config.cost_model, [(ISL, OSL)] * (2 * c + NUM_REQUESTS), concurrency=c)
        if sim.percentile("ttft", 99) < 0.060:
            best = c
        else:
            break
    return best


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running_server(ServerConfig(sim_args=SIM_ARGS, startup_timeout=30.0), tmp_path_factory.mktemp("cap")) as s:
        yield s


def test_capacity_over_concurrency_matches_simulate(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    expected = _expected_capacity(16)
    assert expected == 6  # the scheduler's limit, as designed
    sweeps: list = []
    infmax = Infmax(server, name="test_cap", on_sweep=sweeps.append)
    cap = infmax.capacity(isl=ISL, osl=OSL, range_ratio=1.0, sla=SLA_TEXT, lo=1, hi=16, num_requests=NUM_REQUESTS)
    assert abs(cap.concurrency - expected) <= 1, cap  # within one search step
    assert cap.met and not cap.capped
    assert cap.missed_at == cap.concurrency + 1  # narrowed to one step
    loads = [p.load for p in cap.probes]
    assert loads[:4] == [1, 2, 4, 8]  # bracketing by doubling
    assert [r.name for r in cap.results] == [f"test_cap[c={int(x)}]" for x in loads]  # every point kept
    assert [r.config.concurrency for r in cap.results] == loads
    assert all(r.capacity_probe for r in cap.results) and infmax.results == cap.results

    # the reports: each point a row that met or missed the SLA (a miss fails nothing), and the answer
    rows = [result_row(r.to_dict(include_records=False)) for r in cap.results]
    assert [row["verdict"] for row in rows] == ["met" if p.met else "missed" for p in cap.probes]
    assert VerdictTally(rows).failed == 0
    assert failed_verdicts([r.to_dict(include_records=False) for r in cap.results]) == []  # no "Failed SLAs"
    doc = json.loads(json.dumps(sweep_to_dict(sweeps[0], name="test_cap")))
    summary = doc["capacity"]
    assert summary["over"] == "concurrency" and summary["capacity"] == cap.concurrency
    assert summary["sla"] == ["p99(ttft) < 60 ms"] and summary["method"] == "pchip"
    assert [p["load"] for p in summary["probes"]] == loads and doc["points"] == [r.name for r in cap.results]
    assert f"c={cap.concurrency} meets p99(ttft) < 60 ms (c={cap.concurrency + 1} misses it)" in summary["text"]
    assert "c=1 met, c=2 met, c=4 met, c=8 missed" in repr(cap)  # what a failed assert shows

    # infmax table reads it back from the JSON
    results = [r.to_dict(include_records=False) for r in cap.results]
    path = tmp_path / "out.json"
    path.write_text(json.dumps({"results": results, "sweeps": [doc]}))
    assert cli.main(["table", str(path)]) == 0
    out = capsys.readouterr().out
    assert "ISL/OSL" in out and f"test_cap: {summary['text']}" in out


def test_capacity_over_rate_stays_below_the_saturation_rate(server: Server) -> None:
    config = config_from_args(build_parser().parse_args(list(SIM_ARGS)))
    full = simulate(config.engine, config.cost_model, [(ISL, OSL)] * 60, concurrency=6)
    saturation = len(full.requests) / full.duration  # requests/s the server completes at most
    cap = Infmax(server).capacity(
        isl=ISL, osl=OSL, range_ratio=1.0, sla=SLA_TEXT, over="rate", lo=8.0, hi=128.0, step=8.0, duration=1.0
    )
    assert cap.met and not cap.capped, cap
    assert cap.rate <= saturation * 1.1, (cap, saturation)
    assert cap.missed_at is not None and cap.missed_at - cap.rate <= 8.0
    assert [r.config.rate for r in cap.results] == [p.load for p in cap.probes]
    with pytest.raises(AttributeError, match="searched over rate: read cap.rate"):
        cap.concurrency  # noqa: B018


def test_capacity_arguments_are_checked_before_any_load(server: Server) -> None:
    infmax = Infmax(server)
    with pytest.raises(LoadConfigError, match="capacity\\(\\) needs sla="):
        infmax.capacity("1k1k-mini", sla=[])
    with pytest.raises(LoadConfigError, match="capacity\\(\\) needs sla="):
        infmax.capacity("1k1k-mini")
    with pytest.raises(LoadConfigError, match="infmax.capacity\\(\\) chooses concurrency= itself"):
        infmax.capacity("1k1k-mini", sla="p99(ttft) < 1s", concurrency=4)
    with pytest.raises(LoadConfigError, match="has no argument hii=8; did you mean hi="):
        infmax.capacity("1k1k-mini", sla="p99(ttft) < 1s", hii=8)
    with pytest.raises(LoadConfigError, match="an open-loop run needs an end"):
        infmax.capacity("1k1k-mini", sla="p99(ttft) < 1s", over="rate")
    with pytest.raises(LoadConfigError, match="method must be 'pchip' or 'bisect'"):
        infmax.capacity("1k1k-mini", sla="p99(ttft) < 1s", method="newton")  # type: ignore[arg-type]
    assert infmax.results == []


# -- through the plugin: an assertion a test makes, and the reports it fills ------------------


@pytest.mark.usefixtures("no_leaked_servers")
def test_capacity_assertion_in_a_pytest_session(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_perf=textwrap.dedent(
            f"""
            import pytest

            SIM = {" ".join(SIM_ARGS)!r}

            @pytest.mark.infmax_server(sim_args=SIM)
            @pytest.mark.sla("p99(ttft) < 60ms")  # a marker SLA judges run()s, not the capacity's loads
            def test_capacity(infmax):
                cap = infmax.capacity(isl={ISL}, osl={OSL}, range_ratio=1.0, sla="p99(ttft) < 60ms",
                                      lo=4, hi=8, num_requests={NUM_REQUESTS})
                assert cap.concurrency >= 5

            @pytest.mark.infmax_server(sim_args=SIM)
            def test_too_little(infmax):
                cap = infmax.capacity(isl={ISL}, osl={OSL}, sla="p99(ttft) < 60ms", lo=1, hi=2, num_requests=4)
                assert cap.concurrency >= 64
            """
        )
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--infmax-json", "out.json", timeout=240)
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*assert 2 >= 64",
            "*where 2 = CapacityResult(c=2 meets p99(ttft) < 60 ms, the most searched (hi=2)*",
            "*- infmax capacity -*",
            "test_perf.py::test_capacity: c=* meets p99(ttft) < 60 ms (c=* misses it); * points: c=4 met, c=8 missed*",
            "test_perf.py::test_too_little: c=2 meets p99(ttft) < 60 ms, the most searched (hi=2)*",
        ]
    )
    out = result.stdout.str()
    assert "test_perf.py::test_capacity[c=8]" in out and "missed" in out  # a row per load
    doc = json.loads(Path(pytester.path, "out.json").read_text())
    (cap,) = [s["capacity"] for s in doc["sweeps"] if s["name"] == "test_perf.py::test_capacity"]
    loads = [p["load"] for p in cap["probes"]]
    assert abs(cap["capacity"] - 6) <= 1 and loads[:2] == [4, 8]  # simulate()'s 6, within one step
    assert cap["missed_at"] == cap["capacity"] + 1 and {cap["capacity"], cap["missed_at"]} <= set(loads)
    probes = [r for r in doc["results"] if r["name"].startswith("test_perf.py::test_capacity[")]
    assert len(probes) == len(loads) and all(r["capacity_probe"] for r in probes)


def test_a_server_that_dies_ends_the_search(tmp_path: Path) -> None:
    """Every load after it would measure a dead server: the search stops, saying so."""
    config = ServerConfig(sim_args=("--decode-step-ms", "1", "--crash-after", "10"), startup_timeout=30.0)
    with running_server(config, tmp_path) as dying:
        infmax = Infmax(dying, name="t")
        with pytest.raises(ServerError, match=r"t: the server died during the capacity search, at c=4: "):
            infmax.capacity(isl=16, osl=4, sla="p99(ttft) < 10s", lo=1, hi=64, num_requests=4, warmup=0)
    assert [r.config.concurrency for r in infmax.results] == [1, 2, 4]
    assert infmax.results[-1].server_died is not None
