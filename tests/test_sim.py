"""The embedded simulator, exercised as a real subprocess over loopback.

Every check goes through real HTTP (the official ``openai`` SDK where it applies,
raw aiohttp where the test needs timestamps or exact bytes), because the simulator
exists to stand in for a real server under test.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from _sim_helpers import poll_stats_until

from pytest_infmax.servers.launch import ServerConfig, running_server, stop_process_group
from pytest_infmax.sim.engine import FINISH_LENGTH, Engine, EngineConfig, TokenDelivery

REPO_ROOT = Path(__file__).resolve().parents[1]
TOKEN_REGEX = re.compile(r"\w+|[^\w\s]")
STARTUP_TIMEOUT_S = 20.0
TEST_API_KEY = "sim-test-key"
KEY_ENV = "INFMAX_TEST_SIM_API_KEY"


# -- launching simulators ---------------------------------------------------------------


@dataclass
class SimProcess:
    process: subprocess.Popen[bytes]
    base_url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def _sim_env() -> dict[str, str]:
    """Make the subprocess import pytest_infmax from this working tree."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.pop("INFMAX_SIM_API_KEY", None)
    return env


def _sim_command(port_file: Path, extra_args: tuple[str, ...], parent_pid: int | None = None) -> list[str]:
    return [
        sys.executable, "-m", "pytest_infmax.sim",
        "--port", "0",
        "--port-file", str(port_file),
        "--parent-pid", str(os.getpid() if parent_pid is None else parent_pid),
        *extra_args,
    ]  # fmt: skip


def _http_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return None


def _wait_for_port(process: subprocess.Popen[bytes], port_file: Path, log_path: Path) -> int:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"simulator exited with {process.returncode}:\n{log_path.read_text()}")
        if port_file.exists():
            return int(port_file.read_text())
        time.sleep(0.01)
    pytest.fail(f"simulator wrote no port file within {STARTUP_TIMEOUT_S}s:\n{log_path.read_text()}")


@contextlib.contextmanager
def running_sim(workdir: Path, *extra_args: str, wait_healthy: bool = True) -> Iterator[SimProcess]:
    """A simulator started by the plugin's own launcher (as the fixtures start it).

    ``wait_healthy=False`` is for watching a simulator before it is ready: it only
    waits for the port, and still tears down through the launcher's group kill.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    if wait_healthy:
        config = ServerConfig(sim_args=extra_args, startup_timeout=STARTUP_TIMEOUT_S, api_key_env=KEY_ENV)
        with pytest.MonkeyPatch.context() as mp:  # the launcher's readiness probe needs the key
            if "--api-key" in extra_args:
                mp.setenv(KEY_ENV, extra_args[extra_args.index("--api-key") + 1])
            with running_server(config, workdir) as server:
                assert server.process is not None and server.log_path is not None
                yield SimProcess(server.process, server.base_url, server.log_path)
        return
    port_file = workdir / "port"
    log_path = workdir / "sim.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            _sim_command(port_file, extra_args),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=_sim_env(),
            start_new_session=True,
        )
    try:
        port = _wait_for_port(process, port_file, log_path)
        yield SimProcess(process, f"http://127.0.0.1:{port}", log_path)
    finally:
        stop_process_group(process, grace=10)


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Default simulator; fast steps so functional tests stay quick."""
    with running_sim(tmp_path_factory.mktemp("sim"), "--decode-step-ms", "1") as handle:
        yield handle.base_url


@pytest.fixture(scope="module")
def sim_interval4_with_key(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    args = ("--stream-interval", "4", "--api-key", TEST_API_KEY, "--decode-step-ms", "1")
    with running_sim(tmp_path_factory.mktemp("sim_interval4"), *args) as handle:
        yield handle.base_url


@pytest.fixture(scope="module")
def sim_load(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Per-sequence decode cost large enough that batch size clearly shows in TPOT."""
    args = ("--decode-step-ms", "2", "--decode-ms-per-seq", "0.5")
    with running_sim(tmp_path_factory.mktemp("sim_load"), *args) as handle:
        yield handle.base_url


# -- client helpers ---------------------------------------------------------------------


def _count_tokens(text: str) -> int:
    return len(TOKEN_REGEX.findall(text))


def _sync_client(base_url: str, api_key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=api_key, max_retries=0, timeout=30)


def _async_client(base_url: str, api_key: str = "unused") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key=api_key, max_retries=0, timeout=30)


@dataclass
class SseEvent:
    received_at: float  # time.perf_counter()
    data: str

    def json(self) -> dict[str, Any]:
        return json.loads(self.data)


async def _post_stream(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any], headers: dict[str, str] | None = None
) -> list[SseEvent]:
    async with session.post(url, json=body, headers=headers) as response:
        assert response.status == 200, await response.text()
        assert response.headers["Content-Type"].startswith("text/event-stream")
        return [SseEvent(time.perf_counter(), line[len("data: ") :]) async for line in _sse_data_lines(response)]


async def _sse_data_lines(response: aiohttp.ClientResponse) -> Any:
    async for raw_line in response.content:
        line = raw_line.decode().rstrip("\r\n")
        if line.startswith("data: "):
            yield line


def _content_events(events: list[SseEvent]) -> list[SseEvent]:
    """Completion events that carry output text (not [DONE], not the usage-only chunk)."""
    return [e for e in events if e.data != "[DONE]" and e.json()["choices"] and e.json()["choices"][0]["text"]]


def _post_json(url: str, body: bytes | dict[str, Any], headers: dict[str, str] | None = None) -> tuple[int, Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, headers={"Content-Type": "application/json", **(headers or {})}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


# -- basic endpoints --------------------------------------------------------------------


def test_health_and_models(sim: str) -> None:
    assert _http_status(f"{sim}/health") == 200
    models = _sync_client(sim).models.list()
    assert [m.id for m in models.data] == ["sim-model"]
    raw = _get_json(f"{sim}/v1/models")
    assert raw["object"] == "list" and raw["data"][0]["owned_by"] == "pytest-infmax"


# -- official SDK, sync -----------------------------------------------------------------


def test_sdk_sync_completion_token_ids(sim: str) -> None:
    prompt_ids = list(range(100, 137))
    completion = _sync_client(sim).completions.create(
        model="sim-model", prompt=prompt_ids, max_tokens=12, extra_body={"ignore_eos": True}
    )
    assert completion.object == "text_completion"
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == len(prompt_ids)
    assert completion.usage.completion_tokens == 12
    assert completion.usage.total_tokens == len(prompt_ids) + 12
    assert completion.choices[0].finish_reason == "length"
    assert _count_tokens(completion.choices[0].text) == 12


def test_sdk_sync_completion_stream(sim: str) -> None:
    prompt = "Hello, world! How are you?"
    stream = _sync_client(sim).completions.create(
        model="sim-model",
        prompt=prompt,
        max_tokens=9,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert _count_tokens(text) == 9
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens == _count_tokens(prompt) == 8
    assert chunks[-1].usage.completion_tokens == 9


def test_sdk_sync_chat(sim: str) -> None:
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": [{"type": "text", "text": "Say hi, please."}]},
    ]
    expected_prompt = (_count_tokens("You are terse.") + 3) + (_count_tokens("Say hi, please.") + 3)
    client = _sync_client(sim)
    chat = client.chat.completions.create(model="sim-model", messages=messages, max_completion_tokens=7)
    assert chat.object == "chat.completion"
    assert chat.choices[0].message.role == "assistant"
    assert _count_tokens(chat.choices[0].message.content or "") == 7
    assert chat.usage is not None
    assert (chat.usage.prompt_tokens, chat.usage.completion_tokens) == (expected_prompt, 7)

    stream = client.chat.completions.create(
        model="sim-model",
        messages=messages,
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert _count_tokens(text) == 6
    assert chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (expected_prompt, 6)


# -- official SDK, async ----------------------------------------------------------------


@pytest.mark.asyncio
async def test_sdk_async_completion_and_chat(sim: str) -> None:
    async with _async_client(sim) as client:
        completion = await client.completions.create(model="sim-model", prompt=[[5, 6, 7, 8]], max_tokens=5)
        assert completion.usage is not None
        assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (4, 5)

        stream = await client.completions.create(
            model="sim-model", prompt=["one two"], max_tokens=8, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        )  # fmt: skip
        text, usage = "", None
        async for chunk in stream:
            text += "".join(choice.text for choice in chunk.choices)
            usage = chunk.usage or usage
        assert _count_tokens(text) == 8
        assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (2, 8)

        chat_stream = await client.chat.completions.create(
            model="sim-model", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
            stream=True, stream_options={"include_usage": True},
        )  # fmt: skip
        text, usage = "", None
        async for chunk in chat_stream:
            text += "".join(choice.delta.content or "" for choice in chunk.choices)
            usage = chunk.usage or usage
        assert _count_tokens(text) == 4
        assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (1 + 3, 4)

        chat = await client.chat.completions.create(
            model="sim-model", messages=[{"role": "user", "content": "hi"}], max_tokens=3
        )
        assert chat.usage is not None and chat.usage.completion_tokens == 3


@pytest.mark.asyncio
async def test_continuous_usage_stats(sim: str) -> None:
    body = {
        "prompt": [1, 2, 3],
        "max_tokens": 5,
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    async with aiohttp.ClientSession() as session:
        events = await _post_stream(session, f"{sim}/v1/completions", body)
    assert events[-1].data == "[DONE]"
    usages = [e.json()["usage"] for e in events[:-1]]
    assert [u["completion_tokens"] for u in usages] == [1, 2, 3, 4, 5, 5]
    assert all(u["prompt_tokens"] == 3 for u in usages)


# -- stream_interval and auth -----------------------------------------------------------


@pytest.mark.asyncio
async def test_stream_interval_groups_tokens(sim_interval4_with_key: str) -> None:
    headers = {"Authorization": f"Bearer {TEST_API_KEY}"}
    body = {"prompt": "count me", "max_tokens": 10, "stream": True}
    async with aiohttp.ClientSession() as session:
        events = await _post_stream(session, f"{sim_interval4_with_key}/v1/completions", body, headers)
    content = _content_events(events)
    assert [_count_tokens(e.json()["choices"][0]["text"]) for e in content] == [4, 4, 2]
    assert [e.json()["choices"][0]["finish_reason"] for e in content] == [None, None, "length"]
    assert events[-1].data == "[DONE]"


def test_api_key_required(sim_interval4_with_key: str) -> None:
    url = f"{sim_interval4_with_key}/v1/completions"
    with pytest.raises(openai.AuthenticationError):
        _sync_client(sim_interval4_with_key, api_key="wrong-key").completions.create(
            model="sim-model", prompt="hi", max_tokens=1
        )
    status, body = _post_json(url, {"prompt": "hi"})
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    assert TEST_API_KEY not in json.dumps(body)
    completion = _sync_client(sim_interval4_with_key, api_key=TEST_API_KEY).completions.create(
        model="sim-model", prompt="hi", max_tokens=5
    )
    assert completion.usage is not None and completion.usage.completion_tokens == 5
    assert _http_status(f"{sim_interval4_with_key}/health") == 200  # health needs no key


# -- errors -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("completions", {"max_tokens": 3}, "prompt"),
        ("completions", {"prompt": "x", "max_tokens": "3"}, "max_tokens"),
        ("completions", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ("completions", {"prompt": [[1, 2], [3]]}, "prompt"),
        ("completions", {"prompt": ["a", "b"]}, "prompt"),
        ("completions", {"prompt": 42}, "prompt"),
        ("completions", {"prompt": "x", "n": 2}, "n"),
        ("completions", {"prompt": "x", "stream": "yes"}, "stream"),
        ("completions", {"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
        ("chat/completions", {"messages": "hi"}, "messages"),
        ("chat/completions", {"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
        ("chat/completions", {"messages": [{"content": "hi"}]}, "messages[0].role"),
        ("chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 1.5},
         "max_completion_tokens"),
    ],
)  # fmt: skip
def test_bad_request_names_the_field(sim: str, path: str, body: dict[str, Any], param: str) -> None:
    status, response = _post_json(f"{sim}/v1/{path}", body)
    assert status == 400
    assert response["error"]["type"] == "invalid_request_error"
    assert response["error"]["param"] == param
    assert param in response["error"]["message"]


def test_invalid_json_is_400(sim: str) -> None:
    status, response = _post_json(f"{sim}/v1/completions", b"{not json")
    assert status == 400 and "JSON" in response["error"]["message"]


def test_sdk_bad_request_raises(sim: str) -> None:
    with pytest.raises(openai.BadRequestError):
        _sync_client(sim).completions.create(model="sim-model", prompt=["a", "b"], max_tokens=2)


def test_unknown_model_is_404(sim: str) -> None:
    with pytest.raises(openai.NotFoundError):
        _sync_client(sim).completions.create(model="other-model", prompt="hi", max_tokens=1)
    status, response = _post_json(f"{sim}/v1/chat/completions", {"model": "x", "messages": []})
    assert status == 404 and response["error"]["code"] == "model_not_found"


def test_startup_delay_answers_503(tmp_path: Path) -> None:
    with running_sim(tmp_path, "--startup-delay", "30", wait_healthy=False) as handle:
        assert _http_status(f"{handle.base_url}/health") == 503
        status, response = _post_json(f"{handle.base_url}/v1/completions", {"prompt": "x"})
        assert status == 503 and "error" in response


# -- engine behaviour over HTTP ---------------------------------------------------------


async def _timed_stream(session: aiohttp.ClientSession, base_url: str, max_tokens: int) -> tuple[float, list[float]]:
    """(request start, arrival times of content events) for one streamed completion."""
    started = time.perf_counter()
    body = {"prompt": [1, 2, 3, 4], "max_tokens": max_tokens, "stream": True}
    events = await _post_stream(session, f"{base_url}/v1/completions", body)
    return started, [e.received_at for e in _content_events(events)]


def _tpot(arrivals: list[float]) -> float:
    return (arrivals[-1] - arrivals[0]) / (len(arrivals) - 1)


@pytest.mark.asyncio
async def test_tpot_grows_with_concurrency(sim_load: str) -> None:
    max_tokens = 30
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        _, single = await _timed_stream(session, sim_load, max_tokens)
        batch = await asyncio.gather(*(_timed_stream(session, sim_load, max_tokens) for _ in range(32)))
    tpot_single = _tpot(single)
    tpot_batch = statistics.median(_tpot(arrivals) for _, arrivals in batch)
    # Model: 2 ms + 0.5 ms/seq -> about 2.5 ms alone and 18 ms with 32 running.
    assert tpot_single >= 0.002
    assert tpot_batch > 3 * tpot_single, (tpot_single, tpot_batch)


@pytest.mark.asyncio
async def test_max_num_seqs_queues_requests(tmp_path: Path) -> None:
    args = ("--max-num-seqs", "2", "--decode-step-ms", "10", "--decode-ms-per-seq", "0")
    with running_sim(tmp_path, *args) as handle:
        async with aiohttp.ClientSession() as session:
            streams = [asyncio.ensure_future(_timed_stream(session, handle.base_url, 20)) for _ in range(4)]
            # both slots taken and two queued: the state that lasts while the first two stream
            # (~200 ms). "Two waiting" alone also matches a passing moment (one running, the
            # third and fourth arrived before the next step admits the second): a fresh-clone
            # run under load caught {running: 1, waiting: 2} so.
            saw_waiting = await poll_stats_until(
                session, handle.base_url, lambda s: s["waiting"] == 2 and s["running"] >= 2
            )
            results = await asyncio.gather(*streams)
    assert saw_waiting["running"] == 2
    ttfts = sorted(arrivals[0] - started for started, arrivals in results)
    durations = sorted(arrivals[-1] - started for started, arrivals in results)
    one_request = statistics.mean(durations[:2])  # about 20 steps of 10 ms
    assert ttfts[1] < 0.5 * one_request
    assert ttfts[2] - ttfts[1] > 0.7 * one_request, (ttfts, durations)


@pytest.mark.asyncio
async def test_client_disconnect_frees_the_slot(sim: str) -> None:
    async with aiohttp.ClientSession() as session:
        before = (await (await session.get(f"{sim}/sim/stats")).json())["requests_cancelled"]
        body = {"prompt": "x", "max_tokens": 100_000, "stream": True}
        async with session.post(f"{sim}/v1/completions", json=body) as response:
            await response.content.readline()  # first event arrived: it is running
        # Leaving the block without reading to the end closes the connection.
        stats = await poll_stats_until(session, sim, lambda s: s["running"] == 0 and s["requests_cancelled"] > before)
    assert stats["waiting"] == 0


# -- process lifecycle ------------------------------------------------------------------


@pytest.mark.asyncio
async def test_sigterm_closes_streams_and_exits_zero(tmp_path: Path) -> None:
    with running_sim(tmp_path) as handle:
        async with aiohttp.ClientSession() as session:
            body = {"prompt": "x", "max_tokens": 100_000, "stream": True}
            async with session.post(f"{handle.base_url}/v1/completions", json=body) as response:
                lines = _sse_data_lines(response)
                await lines.__anext__()
                os.kill(handle.process.pid, signal.SIGTERM)
                rest = [line async for line in lines]
        assert rest[-1] == "data: [DONE]"
        assert "error" in json.loads(rest[-2][len("data: ") :])
        assert handle.process.wait(timeout=10) == 0, handle.log()
        assert "serving sim-model on http://127.0.0.1:" in handle.log()


def _process_gone(pid: int) -> bool:
    """True once pid is dead or a zombie (reparented children may not be reaped at once)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def test_exits_when_parent_dies(tmp_path: Path) -> None:
    """The simulator's parent is a short-lived python process; when it exits, the
    simulator must notice (--parent-pid) and shut down by itself."""
    port_file = tmp_path / "port"
    intermediate_script = textwrap.dedent(
        f"""
        import os, subprocess, sys, time
        command = {_sim_command(port_file, ())!r}
        command[command.index("--parent-pid") + 1] = str(os.getpid())
        sim = subprocess.Popen(command, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + {STARTUP_TIMEOUT_S}
        while not os.path.exists({str(port_file)!r}) and time.monotonic() < deadline:
            time.sleep(0.01)
        print(sim.pid, flush=True)
        """
    )
    intermediate = subprocess.run(
        [sys.executable, "-c", intermediate_script], env=_sim_env(), capture_output=True, text=True, timeout=30
    )
    assert intermediate.returncode == 0, intermediate.stderr
    sim_pid = int(intermediate.stdout.strip())
    assert port_file.exists()
    deadline = time.monotonic() + 10
    try:
        while not _process_gone(sim_pid):
            assert time.monotonic() < deadline, "simulator outlived its parent"
            time.sleep(0.05)
    finally:
        if not _process_gone(sim_pid):
            os.killpg(sim_pid, signal.SIGKILL)


# -- engine unit checks -----------------------------------------------------------------


class _RecordingCostModel:
    """Zero-duration steps that remember their inputs, to check the scheduler's plan."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, int, int]] = []

    def step_seconds(self, num_decode: int, prefill_tokens: int, context_tokens: int) -> float:
        self.steps.append((num_decode, prefill_tokens, context_tokens))
        return 0.0


async def _drain(deliveries: asyncio.Queue[TokenDelivery]) -> list[TokenDelivery]:
    received = [await deliveries.get()]
    while received[-1].finish_reason is None:
        received.append(await deliveries.get())
    return received


@pytest.mark.asyncio
async def test_engine_chunks_long_prefill() -> None:
    cost = _RecordingCostModel()
    engine = Engine(EngineConfig(max_prefill_tokens_per_step=8192), cost)
    engine.start()
    try:
        request = engine.submit(prompt_tokens=20_000, max_tokens=2)
        deliveries = await _drain(request.deliveries)
    finally:
        await engine.stop()
    assert [(d.token_count, d.finish_reason) for d in deliveries] == [(1, None), (1, FINISH_LENGTH)]
    # Three prefill chunks; the third completes the prompt and yields token 1, then one decode.
    assert [(n, p) for n, p, _ in cost.steps] == [(0, 8192), (0, 8192), (0, 3616), (1, 0)]
    assert cost.steps[-1][2] == 20_001
    assert engine.stats().requests_finished == 1


@pytest.mark.asyncio
async def test_engine_admits_fcfs_up_to_max_num_seqs() -> None:
    cost = _RecordingCostModel()
    engine = Engine(EngineConfig(max_num_seqs=2, stream_interval=3), cost)
    engine.start()
    try:
        requests = [engine.submit(prompt_tokens=1, max_tokens=4) for _ in range(3)]
        assert engine.stats().waiting == 3  # admission happens at the next step
        results = [await _drain(r.deliveries) for r in requests]
    finally:
        await engine.stop()
    assert [[d.token_count for d in result] for result in results] == [[3, 1]] * 3
    assert all(result[-1].finish_reason == FINISH_LENGTH for result in results)
    assert results[2][0].emit_time >= results[0][-1].emit_time
    # The third request only ran after the first two finished: at most 2 decoding at once.
    assert max(n for n, _, _ in cost.steps) <= 2
    assert engine.stats().requests_finished == 3
