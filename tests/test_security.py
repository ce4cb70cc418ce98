"""Security defaults: loopback binding, no shell, no pickle or unsafe YAML.

(API keys in artefacts: tests/test_reliability.py::test_api_key_appears_in_no_artefact and the
redactor's tests below;
shell metacharacters in a command template: tests/test_servers.py.)
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import psutil
import pytest
from _hostile_client import HostileClient

import pytest_infmax
from pytest_infmax import redact
from pytest_infmax.servers import engines
from pytest_infmax.servers.launch import ServerConfig, running_server

PACKAGE = Path(pytest_infmax.__file__).parent


def _sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_nothing_in_the_package_unpickles_evals_or_loads_unsafe_yaml_or_uses_a_shell() -> None:
    offences: list[str] = []
    for path in _sources():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            where = f"{path.relative_to(PACKAGE)}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                if any(n and n.split(".")[0] in ("pickle", "cPickle", "dill", "marshal", "shelve") for n in names):
                    offences.append(f"{where}: imports a pickle-like module")
            if isinstance(node, ast.Call):
                func = node.func
                name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                if name in ("eval", "exec") and isinstance(func, ast.Name):
                    offences.append(f"{where}: {name}()")
                if (
                    name in ("load", "load_all", "unsafe_load", "full_load")
                    and isinstance(func, ast.Attribute)
                    and getattr(func.value, "id", "") == "yaml"
                ):
                    offences.append(f"{where}: yaml.{name}() (use yaml.safe_load)")
                for kw in node.keywords:
                    if kw.arg == "shell" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False):
                        offences.append(f"{where}: shell= in a call")
    assert not offences, "\n".join(offences)


def test_servers_bind_loopback_unless_told_otherwise(tmp_path: Path) -> None:
    assert ServerConfig().host == "127.0.0.1"
    with running_server(ServerConfig(sim_args=("--decode-step-ms", "1")), tmp_path) as server:
        assert server.process is not None
        supervisor = psutil.Process(server.process.pid)  # the simulator is its child
        listening = [
            c.laddr
            for p in (supervisor, *supervisor.children(recursive=True))
            for c in p.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN
        ]
        assert listening and all(addr.ip == "127.0.0.1" for addr in listening), listening


@pytest.mark.parametrize("engine", ["trtllm", "vllm", "sglang"])
def test_engine_command_lines_carry_the_loopback_host(engine: str, tmp_path: Path) -> None:
    argv = engines.build_argv(engine, "m", {}, (), ServerConfig().host, 8000, tmp_path)
    assert argv[argv.index("--host") + 1] == "127.0.0.1"


# -- the API key never leaves the plugin (issue 17): one redactor for everything said ----------

KEY = "sk-redteam-5f3a9c0d1e2b"
LEAKY_SERVER = """
import sys
# What engines print: their arguments, the requests they log with headers, then a crash.
print(f"args: Namespace(api_key='{sys.argv[sys.argv.index('--api-key') + 1]}', port={sys.argv[2]})", flush=True)
for i in range(11):
    print(f"request {i}: headers={{'authorization': 'Bearer {sys.argv[sys.argv.index('--api-key') + 1]}'}}", flush=True)
print("proxy: Authorization: Bearer sk-another-token-not-ours", flush=True)
print("RuntimeError: CUDA error: out of memory", flush=True)
sys.exit(1)
"""


def test_the_key_is_masked_in_streamed_logs_the_start_up_error_and_junit(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: at -v the server's 11 log lines with `Bearer sk-...` were streamed as written, and
    the start-up error's log tail showed the key in the terminal and junit.xml while the command
    line beside it said --api-key '***'. Now every line goes through the one redactor."""
    monkeypatch.setenv("INFMAX_API_KEY", KEY)
    pytester.makepyfile(test_perf="def test_x(infmax):\n    pass\n")
    pytester.path.joinpath("leaky_server.py").write_text(LEAKY_SERVER)
    result = pytester.runpytest_subprocess(
        "-p",
        "no:cacheprovider",
        "-v",
        f"--infmax-server-command={sys.executable} leaky_server.py --port {{port}} --api-key {KEY}",
        "--junitxml",
        "j.xml",
        timeout=120,
    )
    result.assert_outcomes(errors=1)
    seen = result.stdout.str() + result.stderr.str()
    junit = (pytester.path / "j.xml").read_text()
    assert "server exited with code 1 before it was ready" in seen
    assert "CUDA error: out of memory" in seen and "CUDA error: out of memory" in junit  # the tail is there
    for where, text in (("terminal", seen), ("junit.xml", junit)):
        assert KEY not in text, f"the key leaked into the {where}"
        assert "sk-another-token-not-ours" not in text, f"a bearer token leaked into the {where}"
    streamed = [line for line in result.stdout.lines if line.startswith("[command ") and "request " in line]
    assert len(streamed) == 11 and all("Bearer ***" in line for line in streamed), streamed
    assert "api_key='***'" in junit and "--api-key '***'" in junit


def test_credentials_in_an_endpoint_url_are_never_printed(pytester: pytest.Pytester) -> None:
    """Before: `http://user:pass@host` was printed as given in the setup error and junit.xml."""
    pytester.makepyfile(test_perf="def test_x(infmax):\n    pass\n\ndef test_y(infmax):\n    pass\n")
    result = pytester.runpytest_subprocess(
        "-p",
        "no:cacheprovider",
        "--infmax-endpoint",
        "http://alice:pa55word-xyz@127.0.0.1:9",
        "--infmax-startup-timeout",
        "1",
        "--junitxml",
        "j.xml",
        timeout=120,
    )
    result.assert_outcomes(errors=2)
    text = result.stdout.str() + result.stderr.str() + (pytester.path / "j.xml").read_text()
    assert "endpoint http://***@127.0.0.1:9 did not answer" in text
    assert "pa55word-xyz" not in text and "alice:" not in text


def test_a_redirect_to_another_origin_never_carries_the_key(
    pytester: pytest.Pytester, hostile_server: HostileClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: a /health that answered 302 to another origin received the Authorization header
    there (urllib follows redirects with every header). Now the key is dropped on any hop to
    another origin (scheme, host or port); a redirect within the origin keeps it."""
    monkeypatch.setenv("INFMAX_API_KEY", KEY)
    hostile_server.script({"GET /health": "redirect_cross_origin", "GET /v1/models": "redirect_same_origin"})
    pytester.makepyfile(test_perf="def test_x(infmax_server):\n    assert infmax_server.model == 'hostile-model'\n")
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "--infmax-endpoint", hostile_server.base_url, timeout=120
    )
    result.assert_outcomes(passed=1)
    by_request = {(e["host"].split(":")[0], e["path"]): e["authorization"] for e in hostile_server.log()}
    assert by_request[("127.0.0.1", "/health")] == f"Bearer {KEY}"  # asked of the origin it was given for
    assert by_request[("localhost", "/health")] is None  # the other origin: no key
    assert by_request[("127.0.0.1", "/v1/models")] == f"Bearer {KEY}"
    assert by_request[("127.0.0.1", "/same/v1/models")] == f"Bearer {KEY}"  # same origin: kept


def test_the_redactor_masks_every_form_a_secret_takes() -> None:
    redact.add_secret(KEY)
    assert redact.redact(f"x {KEY} y") == "x *** y"
    assert redact.redact("Authorization: Bearer abc.def-123") == "Authorization: Bearer ***"
    assert redact.redact("GET http://bob:hunter2@host:8000/v1") == "GET http://***@host:8000/v1"
    assert redact.redact("vllm serve m --api-key abc123 --hf-token=xyz789 --port 8") == (
        "vllm serve m --api-key *** --hf-token=*** --port 8"
    )
    assert redact.redact("--api-key '***' --token-budget 5") == "--api-key '***' --token-budget 5"  # idempotent
