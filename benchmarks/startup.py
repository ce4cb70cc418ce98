"""What does the plugin add to a pytest session that has no perf tests?

pytest loads the plugin (its ``pytest11`` entry point) in every session of a project that
installs it, perf tests or not. This runs ``python -m pytest --co -q`` on a directory of
plain tests, ``-p no:infmax`` (the plugin off) and with the plugin, interleaved, each a
fresh interpreter, and prints the median wall time and CPU time (the child's user + system)
of each, with the spread (min-max) and what the plugin adds. Then one session of each under
``python -X importtime``: the modules only the plugin's session imports, with their own
import time, heaviest first, and whether any heavy module (numpy, scipy, aiohttp...) is
among them.

``--against DIR`` adds a third row: the plugin from another checkout (e.g. a
``git worktree`` of an older commit), put first on ``PYTHONPATH``, so a change is measured
before and after in one run.

    .venv/bin/python benchmarks/startup.py              # 15 interleaved runs of each, ~30 s
    .venv/bin/python benchmarks/startup.py --runs 5     # quicker
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pytest_infmax.lazy import HEAVY_MODULES as HEAVY  # the one list; lazy.py imports nothing heavy

PLAIN_TESTS = """
import pytest


def test_addition():
    assert 1 + 1 == 2


@pytest.mark.parametrize("n", range(20))
def test_parametrized(n):
    assert n >= 0


class TestStrings:
    def test_upper(self):
        assert "a".upper() == "A"
"""


def _session(cmd: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, float]:
    """One fresh interpreter running ``cmd``: (wall seconds, CPU seconds of the child)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def _import_times(cmd: list[str], cwd: Path, env: dict[str, str]) -> dict[str, int]:
    """Module -> its own import time in microseconds, from ``python -X importtime``."""
    proc = subprocess.run(
        [cmd[0], "-X", "importtime", *cmd[1:]], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )
    times: dict[str, int] = {}
    for line in proc.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+\d+ \|\s*(\S+)", line)
        if m:
            times[m.group(2)] = times.get(m.group(2), 0) + int(m.group(1))
    return times


def _spread(values: list[float]) -> str:
    ms = [v * 1000 for v in values]
    return f"{statistics.median(ms):7.0f} ({min(ms):.0f}-{max(ms):.0f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=15, help="interleaved runs of each session (default 15)")
    parser.add_argument("--python", default=sys.executable, help="the interpreter whose pytest and plugin to run")
    parser.add_argument(
        "--against", type=Path, metavar="DIR", help="also run the plugin from this checkout (first on PYTHONPATH)"
    )
    parser.add_argument("--top", type=int, default=12, help="modules to list from -X importtime (default 12)")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    if args.against is not None and not (args.against / "pytest_infmax" / "plugin.py").is_file():
        parser.error(f"--against {args.against}: no pytest_infmax/plugin.py there; give a checkout of the project")

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "INFMAX_"))}
    env.pop("PYTHONPATH", None)
    with tempfile.TemporaryDirectory(prefix="infmax-startup-") as tmp:
        cwd = Path(tmp)
        (cwd / "test_plain.py").write_text(PLAIN_TESTS)
        (cwd / "pytest.ini").write_text("[pytest]\n")  # its own rootdir: no project's ini applies
        base = [args.python, "-m", "pytest", "--co", "-q", "-p", "no:cacheprovider"]
        variants: dict[str, tuple[list[str], dict[str, str]]] = {
            "-p no:infmax": ([*base, "-p", "no:infmax"], env),
            "with the plugin": (base, env),
        }
        if args.against is not None:
            variants[f"plugin from {args.against}"] = (base, {**env, "PYTHONPATH": str(args.against.resolve())})
        for cmd, venv in variants.values():  # warm: compiled bytecode, the page cache
            _session(cmd, cwd, venv)
        walls: dict[str, list[float]] = {name: [] for name in variants}
        cpus: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.runs):
            for name, (cmd, venv) in variants.items():
                wall, cpu = _session(cmd, cwd, venv)
                walls[name].append(wall)
                cpus[name].append(cpu)
        plain_cmd, plain_env = variants["-p no:infmax"]
        plugin_cmd, plugin_env = variants["with the plugin"]
        plain_imports = _import_times(plain_cmd, cwd, plain_env)
        plugin_imports = _import_times(plugin_cmd, cwd, plugin_env)

    version = subprocess.run(
        [args.python, "-c", "import pytest; print(pytest.__version__)"], capture_output=True, text=True, timeout=60
    ).stdout.strip()
    print(
        f"pytest {version} --co on {2 + 20} plain tests, {args.runs} interleaved runs of each "
        f"(Python {platform.python_version()}, {os.cpu_count()} CPUs, {platform.machine()})"
    )
    print(f"{'session':<28} {'wall ms median (min-max)':>26} {'CPU ms median (min-max)':>26}")
    for name in variants:
        print(f"{name:<28} {_spread(walls[name]):>26} {_spread(cpus[name]):>26}")
    ref_wall = statistics.median(walls["-p no:infmax"])
    ref_cpu = statistics.median(cpus["-p no:infmax"])
    for name in list(variants)[1:]:
        wall = statistics.median(walls[name])
        cpu = statistics.median(cpus[name])
        print(
            f"added by the {name.removeprefix('with the ')}: {1000 * (wall - ref_wall):+.0f} ms wall "
            f"(x{wall / ref_wall:.2f}), {1000 * (cpu - ref_cpu):+.0f} ms CPU (x{cpu / ref_cpu:.2f})"
        )
    added = {m: us for m, us in plugin_imports.items() if m not in plain_imports}
    total = sum(added.values())
    print(
        f"-X importtime: the plugin's session imports {len(added)} modules more, "
        f"{total / 1000:.0f} ms of their own import time; the heaviest:"
    )
    for module, us in sorted(added.items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"  {us / 1000:7.1f} ms  {module}")
    heavy = sorted({m.split(".")[0] for m in added if m.split(".")[0] in HEAVY})
    print(f"heavy modules the plugin's session imports: {', '.join(heavy) if heavy else 'none'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
