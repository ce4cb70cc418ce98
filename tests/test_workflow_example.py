"""The example GitHub workflow users copy (.github/workflows/perf-example.yml): valid YAML, valid
shell, main autosaves, pull requests compare with at most 3 server starts per run."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

WORKFLOW = Path(__file__).resolve().parent.parent / ".github" / "workflows" / "perf-example.yml"


def _workflow() -> dict:
    doc = yaml.safe_load(WORKFLOW.read_text(encoding="utf-8"))
    assert isinstance(doc, dict) and "jobs" in doc
    return doc


def _step(name: str) -> dict:
    steps = _workflow()["jobs"]["perf"]["steps"]
    return next(s for s in steps if s.get("name") == name)


def test_the_example_workflow_is_valid_yaml_with_valid_shell() -> None:
    doc = _workflow()
    assert {"pull_request", "push"} <= set(doc[True] if True in doc else doc["on"])  # YAML 1.1 reads `on:` as True
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("bash is not installed")
    for step in doc["jobs"]["perf"]["steps"]:
        if "run" in step:
            check = subprocess.run([bash, "-n"], input=step["run"], text=True, capture_output=True, timeout=30)
            assert check.returncode == 0, f"{step.get('name')}: {check.stderr}"


def _pytest_args(event: str, ref: str, url: str, have_main: bool, tmp_path: Path) -> list[str]:
    """The arguments the 'Perf tests' step gives pytest, with `python` standing for an echo."""
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("bash is not installed")
    script = _step("Perf tests")["run"].replace("python -m pytest", "printf '%s\\n' pytest")
    tmp_path.mkdir(parents=True, exist_ok=True)
    if have_main:
        (tmp_path / ".infmax/baselines/main").mkdir(parents=True, exist_ok=True)
    env = {
        "PATH": "/usr/bin:/bin",
        "EVENT": event,
        "REF": ref,
        "KIND": "sim",
        "RESULTS": "results/perf",
        "BASELINES": ".infmax/baselines",
        "BASELINES_URL": url,
        "REPEATS": _workflow()["jobs"]["perf"]["env"]["REPEATS"],
        "PERF_TESTS": "examples",
    }
    done = subprocess.run([bash, "-c", script], cwd=tmp_path, env=env, text=True, capture_output=True, timeout=30)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    return lines[lines.index("pytest") + 1 :]


def test_pull_requests_compare_with_at_most_3_starts_and_main_autosaves(tmp_path: Path) -> None:
    pr = _pytest_args("pull_request", "refs/pull/7/merge", "", True, tmp_path)
    assert pr[pr.index("--infmax-compare") + 1] == "main"
    assert 1 <= int(pr[pr.index("--infmax-repeat") + 1]) <= 3
    assert "--infmax-save" not in pr and "--infmax-autosave" not in pr
    main = _pytest_args("push", "refs/heads/main", "", True, tmp_path)
    assert main[main.index("--infmax-compare") + 1] == "main" and "--infmax-autosave" in main
    # the first pull request before main saved anything compares nothing, and says so
    first = _pytest_args("pull_request", "refs/pull/7/merge", "", False, tmp_path / "empty")
    assert first[first.index("--infmax-compare") + 1] == "off"


def test_a_shared_store_url_comes_from_a_secret_and_never_reaches_the_command_line(tmp_path: Path) -> None:
    env = _workflow()["jobs"]["perf"]["env"]
    assert env["BASELINES_URL"] == "${{ secrets.INFMAX_BASELINES_URL }}"
    url = "postgresql://ci:s3cret@db.example.invalid/perf"
    pr = _pytest_args("pull_request", "refs/pull/7/merge", url, False, tmp_path)
    assert pr[pr.index("--infmax-compare") + 1] == "main"  # the store has main's history: no local folder needed
    assert not any("s3cret" in a for a in pr)
    script = _step("Perf tests")["run"]
    assert re.search(r'export INFMAX_BASELINES="\$BASELINES_URL"', script)
