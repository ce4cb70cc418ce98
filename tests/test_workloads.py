"""Multi-turn sessions, shared prefixes and Mooncake trace replay (load.workloads), planned and
run against the simulator with its prefix cache on."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_infmax.load.plan import LoadConfig, LoadConfigError
from pytest_infmax.load.scenarios import Scenario, TokenWindow, request_body
from pytest_infmax.load.workloads import Sessions, Trace, WorkloadError, parse_trace
from pytest_infmax.run.runner import Infmax
from pytest_infmax.servers.launch import Server, ServerConfig, running_server

ROOT = Path(__file__).resolve().parent.parent
TRACE = ROOT / "examples" / "traces" / "conversations.jsonl"
SMALL_VOCAB = TokenWindow.for_vocabulary(5000)
TURN = Scenario("turn", 32, 8, range_ratio=1.0)


# -- planning ----------------------------------------------------------------------------


def test_each_turn_repeats_the_whole_history_and_adds_new_tokens() -> None:
    plans = Sessions(turns=3).plan(TURN, session=4, seed=1, tokens=SMALL_VOCAB)
    assert [p.turn for p in plans] == [1, 2, 3] and {p.session for p in plans} == {4}
    for before, after in zip(plans, plans[1:]):
        assert before.token_ids is not None and after.token_ids is not None
        assert after.token_ids[: before.input_len] == before.token_ids  # the history is its prefix
        assert after.input_len == before.input_len + 8 + 32  # + the answer's stand-in + new user tokens
        assert after.shared_prefix_tokens == before.input_len
    assert plans[0].shared_prefix_tokens == 0
    ids = [i for p in plans for i in p.token_ids or ()]
    assert min(ids) >= SMALL_VOCAB.low and max(ids) < 5000  # inside the served vocabulary


def test_shared_prefixes_are_shared_by_groups_of_sessions() -> None:
    sessions = Sessions(turns=1, prefixes=2, prefix_len=100)
    firsts = [sessions.plan(TURN, s, seed=0, tokens=SMALL_VOCAB)[0] for s in range(5)]
    prefix = [p.token_ids[:100] for p in firsts if p.token_ids is not None]
    assert prefix[0] == prefix[2] == prefix[4] and prefix[1] == prefix[3] and prefix[0] != prefix[1]
    # the first session on each prefix designs no reuse; every later one reuses the prefix
    assert [p.shared_prefix_tokens for p in firsts] == [0, 0, 100, 100, 100]


def test_chat_sessions_send_the_conversation_as_messages() -> None:
    plans = Sessions(turns=2, prefixes=1, prefix_len=5).plan(TURN.with_endpoint("chat"), 0, 0, SMALL_VOCAB)
    body = request_body(plans[1], "m", "chat")
    roles = [m["role"] for m in body["messages"]]
    assert roles == ["system", "user", "assistant", "user"]
    assert [len(m["content"].split()) for m in body["messages"]] == [5, 32, 8, 32]
    assert plans[1].input_len == 5 + 32 + 8 + 32


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"turns": 0}, r"turns=\) must be a whole number"),
        ({"prefixes": 2}, "give both"),
        ({"think_time": -1}, r"think_time=\) must be seconds"),
    ],
)
def test_bad_sessions_say_what_is_wrong(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(WorkloadError, match=message):
        Sessions(**kwargs)  # type: ignore[arg-type]


def test_sessions_take_users_or_a_session_rate_and_round_requests_to_whole_sessions() -> None:
    with pytest.raises(LoadConfigError, match="give concurrency=N"):
        LoadConfig(TURN, num_requests=4, workload=Sessions(turns=2))
    with pytest.raises(LoadConfigError, match="needs an end"):
        LoadConfig(TURN, rate=1.0, workload=Sessions(turns=2))
    config = LoadConfig(TURN, concurrency=2, num_requests=5, warmup=1, workload=Sessions(turns=3))
    assert (config.effective_num_requests, config.effective_warmup) == (6, 3)
    assert config.to_dict()["workload"]["turns"] == 3


def test_trace_lines_are_checked_with_their_line_number() -> None:
    good = '{"timestamp": 0, "input_length": 600, "output_length": 4, "hash_ids": [1, 2]}'
    assert next(parse_trace([good])).hash_ids == (1, 2)
    with pytest.raises(WorkloadError, match="line 2: 'input_length' must be a whole number"):
        list(parse_trace([good, '{"timestamp": 1, "input_length": -3, "output_length": 4}'], "t.jsonl"))
    with pytest.raises(WorkloadError, match="line 1: not JSON"):
        list(parse_trace(["{"]))


def test_trace_hash_ids_become_shared_blocks_and_timestamps_scale_with_speedup() -> None:
    lines = [
        '{"timestamp": 0, "input_length": 700, "output_length": 4, "hash_ids": [1, 2]}',
        '{"timestamp": 1000, "input_length": 1100, "output_length": 4, "hash_ids": [1, 2, 3]}',
        '{"timestamp": 3000, "input_length": 600, "output_length": 4, "hash_ids": [1, 9]}',
    ]
    trace = Trace(tuple(parse_trace(lines)), speedup=4.0)
    assert trace.offsets().tolist() == [0.0, 0.25, 0.75]
    a, b, c = (trace.plan(j, j, 0, "completions", SMALL_VOCAB) for j in range(3))
    assert a.token_ids is not None and b.token_ids is not None and c.token_ids is not None
    assert (a.input_len, b.input_len, c.input_len) == (700, 1100, 600)
    assert b.token_ids[:700] == a.token_ids  # a's whole prompt: block 1 and 188 tokens of block 2
    assert c.token_ids[:512] == a.token_ids[:512] and c.token_ids[512:] != b.token_ids[512:600]
    # b shares what a covered of block 2 (188 tokens), not the whole block; c shares block 1
    assert [p.shared_prefix_tokens for p in (a, b, c)] == [0, 700, 512]


def test_the_shipped_trace_is_the_generators_output(tmp_path: Path) -> None:
    out = tmp_path / "t.jsonl"
    subprocess.run(
        [sys.executable, str(ROOT / "examples" / "traces" / "generate.py"), "--out", str(out)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    assert out.read_text() == TRACE.read_text()
    assert all(
        set(json.loads(line)) == {"timestamp", "input_length", "output_length", "hash_ids"} for line in out.open()
    )


def test_a_trace_replay_takes_neither_concurrency_nor_rate() -> None:
    trace = Trace.load(TRACE)
    with pytest.raises(LoadConfigError, match="leave out concurrency= and rate="):
        LoadConfig(TURN, concurrency=2, workload=trace)
    config = LoadConfig(TURN, num_requests=10, workload=trace)
    assert (config.effective_num_requests, config.effective_warmup, config.label) == (10, 0, "trace x1")


# -- against the simulator's prefix cache ----------------------------------------------------


@pytest.fixture(scope="module")
def cached_sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # a prefill cost that dominates TTFT, so a cached prefix shows in it
    config = ServerConfig(sim_args=("--enable-prefix-caching", "--prefill-ms-per-1k-tokens", "100"))
    with running_server(config, tmp_path_factory.mktemp("cached_sim")) as server:
        yield server


def _within(measured: float | None, designed: float, points: float) -> bool:
    return measured is not None and abs(measured - designed) <= points / 100


def test_later_turns_are_faster_and_the_hit_rate_matches_the_designed_reuse(cached_sim: Server) -> None:
    # each session opens with a 512-token document of its own (no prefix shared between
    # sessions): turn 1 prefills it all, later turns only what the history added
    sessions = Sessions(turns=3, think_time=0.01, prefixes=1000, prefix_len=512)
    result = Infmax(cached_sim).run(TURN, concurrency=2, num_requests=12, warmup=0, workload=sessions)
    m = result.metrics
    assert m.num_ok == 12 and [t.num_requests for t in m.turns] == [4, 4, 4]
    first, second, third = (m.turn(k).ttft.percentile(50) for k in (1, 2, 3))
    assert second < first / 2 and third < first / 2, (first, second, third)
    assert m.turn(1).designed_prefix_reuse == 0.0 and m.turn(3).designed_prefix_reuse > 0.8
    assert _within(m.prefix_cache_hit_rate, m.designed_prefix_reuse, 3), (m.prefix_cache_hit_rate, m)
    row = result.to_dict(include_records=False)
    assert [t["turn"] for t in row["metrics"]["turns"]] == [1, 2, 3]
    assert row["metrics"]["turns"][0]["ttft"]["p50"] is not None
    assert result.evaluate("prefix_cache_hit_rate > 50%")[0].passed


def test_shared_prefixes_on_the_chat_endpoint_hit_the_cache(cached_sim: Server) -> None:
    # two shared system prompts; the two warm-up sessions (0 and 1) compute them, so every
    # measured first turn finds its prefix cached
    sessions = Sessions(turns=2, prefixes=2, prefix_len=480)
    result = Infmax(cached_sim).run(
        TURN.with_endpoint("chat"), concurrency=2, num_requests=8, warmup=4, workload=sessions
    )
    m = result.metrics
    assert m.num_ok == 8 and m.turn(1).designed_prefix_reuse > 0.9
    # the chat template's tokens (roles, separators) are in the server's count, not the design
    assert _within(m.prefix_cache_hit_rate, m.designed_prefix_reuse, 5), (m.prefix_cache_hit_rate, m)


def test_a_trace_replay_reuses_exactly_the_traces_prefixes(cached_sim: Server) -> None:
    # one request in flight at a time: none arrives while the prompt it repeats is still being
    # prefilled (it would miss, as on a real server), so the cache finds all the trace designed
    trace = Trace.load(TRACE, speedup=8.0)
    result = Infmax(cached_sim).run(TURN, workload=trace, num_requests=16, max_concurrency=1)
    m = result.metrics
    assert m.num_ok == 16 and m.designed_prefix_reuse > 0.5
    assert _within(m.prefix_cache_hit_rate, m.designed_prefix_reuse, 3), (m.prefix_cache_hit_rate, m)


def test_a_trace_is_sent_at_its_timestamps_over_the_speedup(cached_sim: Server) -> None:
    trace = Trace.load(TRACE, speedup=4.0)
    result = Infmax(cached_sim).run(TURN, workload=trace, num_requests=8)
    assert result.metrics.num_ok == 8
    start = result.run.measured_start
    scheduled = [r.scheduled_time - start for r in result.records if r.scheduled_time is not None]
    assert scheduled == pytest.approx(trace.offsets()[:8].tolist(), abs=1e-6)
    assert all(0 <= r.send_lag < 0.05 for r in result.records if r.send_lag is not None)


def test_a_fallen_prefix_cache_hit_rate_is_a_regression_against_the_baseline() -> None:
    from pytest_infmax.baselines.compare import CompareOptions, compare_runs, parse_gates
    from pytest_infmax.baselines.store import BaselineRun

    def run(hit_rate: float) -> BaselineRun:
        scalars = {"prefix_cache_hit_rate": hit_rate, "designed_prefix_reuse": 0.9}
        return BaselineRun(name="t::a", samples={}, scalars=scalars, workload={"concurrency": 4})

    options = CompareOptions(gates=tuple(parse_gates(["prefix_cache_hit_rate", "designed_prefix_reuse"])))
    report = compare_runs([run(0.88), run(0.89), run(0.88)], [run(0.45)], options=options)
    rows = {r.label: r for r in report.rows}
    assert rows["prefix_cache_hit_rate"].verdict == "regressed"  # a lower hit rate is worse
    assert rows["designed_prefix_reuse"].verdict != "regressed"  # the same workload


def test_open_loop_sessions_arrive_at_the_rate_and_each_turn_is_due_after_the_think_time(cached_sim: Server) -> None:
    sessions = Sessions(turns=3, think_time=0.05)
    result = Infmax(cached_sim).run(TURN, rate=20.0, num_requests=12, workload=sessions, seed=3)
    m = result.metrics
    assert m.num_ok == 12 and [t.num_requests for t in m.turns] == [4, 4, 4]
    by_session: dict[int, list] = {}
    for r in result.records:
        by_session.setdefault(r.session, []).append(r)
    for turns in by_session.values():
        turns.sort(key=lambda r: r.turn)
        assert [r.turn for r in turns] == [1, 2, 3]
        for before, after in zip(turns, turns[1:]):
            # the next turn is scheduled think_time after the previous response ended, never sent early
            assert after.scheduled_time == pytest.approx(before.end_time + 0.05, abs=1e-6)
            assert after.send_time >= after.scheduled_time


def test_a_duration_ends_closed_loop_sessions_before_any_next_turn(cached_sim: Server) -> None:
    sessions = Sessions(turns=50, think_time=0.02)
    result = Infmax(cached_sim).run(TURN, concurrency=2, duration=0.4, warmup=0, workload=sessions)
    records = result.records
    assert records and all(r.ok for r in records)
    start = result.run.measured_start
    # no turn is sent once the duration is over (a turn already sent runs to its end)
    assert max(r.send_time for r in records) - start < 0.4 + 0.02
    assert {r.session for r in records} == {0, 1} and max(r.turn or 0 for r in records) < 50


def test_every_report_shows_each_turn_of_a_multi_turn_run(pytester: pytest.Pytester) -> None:
    """A multi-turn run's per-turn figures (TTFT falling once the history is cached) reach the
    terminal, Markdown and HTML, one line a turn; a run without turns adds no such section."""
    pytester.makepyfile(
        test_turns="""
        import pytest

        from pytest_infmax import Scenario, Sessions

        TURN = Scenario("turn", isl=64, osl=16, range_ratio=1.0)


        @pytest.mark.infmax_server(sim_args="--enable-prefix-caching --prefill-ms-per-1k-tokens 100")
        def test_turns(infmax):
            sessions = Sessions(turns=3, think_time=0.02, prefixes=1000, prefix_len=512)
            infmax.run(TURN, concurrency=2, num_requests=6, warmup=0, workload=sessions)


        def test_plain(infmax):
            infmax.run(TURN, concurrency=2, num_requests=2, warmup=0)
        """
    )
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "--infmax-markdown", "s.md", "--infmax-html", "r.html"
    )
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(
        [
            "*- infmax turns -*",
            "test *load*turn*reqs*TTFT p50 ms*TTFT p99 ms*E2E p50 ms*mean prompt tokens*designed prefix reuse",
            "*test_turns*c=2 3-turn*1*2*",
            "*test_turns*c=2 3-turn*2*2*",
            "*test_turns*c=2 3-turn*3*2*",
        ]
    )
    turn_lines = [line for line in result.stdout.lines if "3-turn" in line and line.split()[-1].endswith("%")]
    assert len(turn_lines) == 3  # one a turn; test_plain has none
    markdown = (pytester.path / "s.md").read_text()
    assert "### Turns" in markdown
    for k in (1, 2, 3):
        assert f"| `test_turns.py::test_turns` | c=2 3-turn | {k} | 2 |" in markdown
    html = (pytester.path / "r.html").read_text()
    assert '<h2 id="turns">Turns</h2>' in html and html.count("c=2 3-turn</td>") >= 3
