"""Security defaults: loopback binding, no shell, no pickle or unsafe YAML.

(API keys in artefacts: tests/test_reliability.py::test_api_key_appears_in_no_artefact;
shell metacharacters in a command template: tests/test_servers.py.)
"""

from __future__ import annotations

import ast
from pathlib import Path

import psutil
import pytest

import pytest_infmax
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
        listening = [
            c.laddr
            for c in psutil.Process(server.process.pid).net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN
        ]
        assert listening and all(addr.ip == "127.0.0.1" for addr in listening), listening


@pytest.mark.parametrize("engine", ["trtllm", "vllm", "sglang"])
def test_engine_command_lines_carry_the_loopback_host(engine: str, tmp_path: Path) -> None:
    argv = engines.build_argv(engine, "m", {}, (), ServerConfig().host, 8000, tmp_path)
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
