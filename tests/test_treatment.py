"""Testbed versus treatment, and what each saved run records about where it came from."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from pytest_infmax.baselines.provenance import git_info, run_provenance
from pytest_infmax.baselines.store import build_testbed
from pytest_infmax.baselines.treatment import parse_treatment_options, sim_treatment_flags, split_treatment
from pytest_infmax.settings import SettingError, resolve

ROOT = Path(__file__).resolve().parent.parent
SIM = ["/venv/bin/python", "-m", "pytest_infmax.sim", "--port", "0", "--model", "sim-model"]


def _sim(*flags: str) -> dict:
    return {"kind": "sim", "command": [*SIM, *flags], "model": "sim-model", "num_gpus": 1}


def test_slowdown_and_noise_flags_are_treatment_not_testbed() -> None:
    plain = build_testbed(_sim())
    treated = build_testbed(_sim("--slowdown", "1.3", "--start-jitter=0.02", "--step-jitter", "0.03"))
    assert treated == plain
    # an engine option is testbed: it still keys the baseline
    assert build_testbed(_sim("--max-num-seqs", "64"))["server_options"][-2:] == ["--max-num-seqs", "64"]
    # the noise group is read from the simulator's own parser
    assert {"--slowdown", "--start-jitter", "--step-jitter", "--stall-rate", "--step-drift"} <= sim_treatment_flags()
    # another engine's --slowdown is its own business: only the simulator's flags are known
    other = {"kind": "command", "command": ["my-server", "--slowdown", "2"]}
    assert build_testbed(other)["server_options"] == ["my-server", "--slowdown", "2"]
    assert build_testbed(other, treatment=["--slowdown"])["server_options"] == ["my-server"]


def test_declared_treatment_options_take_their_values_or_go_alone() -> None:
    argv = ["srv", "--a", "1", "--b", "--c", "-1", "--d=x", "--keep", "v"]
    keep, treatment = split_treatment(argv, ["--a", "--b", "--c", "--d"])
    assert keep == ["srv", "--keep", "v"]
    assert treatment == ["--a", "1", "--b", "--c", "-1", "--d=x"]
    assert parse_treatment_options("--enable-chunked-prefill, max-num-seqs") == (
        "--enable-chunked-prefill",
        "--max-num-seqs",
    )
    with pytest.raises(ValueError, match="^must be server option names.*'--max-num-seqs=64' is not one"):
        parse_treatment_options("--max-num-seqs=64")


def test_treatment_option_is_a_setting_from_flag_env_and_ini(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("INFMAX_TREATMENT_OPTION", raising=False)
    pytester.makeini("[pytest]\ninfmax_treatment_option = --from-ini\n")
    assert resolve(pytester.parseconfig()).treatment_option == ("--from-ini",)
    flag = resolve(pytester.parseconfig("--infmax-treatment-option", "max-num-seqs"))
    assert flag.treatment_option == ("--max-num-seqs",)
    monkeypatch.setenv("INFMAX_TREATMENT_OPTION", "--a,--b")
    from_env = resolve(pytester.parseconfig())
    assert from_env.treatment_option == ("--a", "--b")
    assert from_env.gate_settings(pytester.path).treatment == ("--a", "--b")
    monkeypatch.setenv("INFMAX_TREATMENT_OPTION", "--a=1")
    with pytest.raises(SettingError, match="INFMAX_TREATMENT_OPTION"):
        resolve(pytester.parseconfig())


def test_git_commit_and_branch_come_from_ci_first_then_git(tmp_path: Path) -> None:
    ci = {"GITHUB_SHA": "abc123", "GITHUB_REF_NAME": "42/merge", "GITHUB_HEAD_REF": "fix-tpot"}
    assert git_info(tmp_path, ci) == {"commit": "abc123", "branch": "fix-tpot", "source": "GITHUB_SHA"}
    assert git_info(tmp_path, {"GITHUB_SHA": "abc", "GITHUB_REF_NAME": "main"})["branch"] == "main"
    assert git_info(tmp_path, {}) == {"commit": None, "branch": None, "source": None}  # no repository
    git = shutil.which("git")
    if git is None:
        pytest.skip("git is not installed")
    env = {"GIT_CONFIG_NOSYSTEM": "1", "HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    for args in (
        ["init", "-q", "-b", "perf-branch"],
        ["-c", "user.name=t", "-c", "user.email=t@example.invalid", "commit", "-q", "--allow-empty", "-m", "x"],
    ):
        subprocess.run([git, *args], cwd=tmp_path, check=True, env=env, timeout=30)
    head = subprocess.run(
        [git, "rev-parse", "HEAD"], cwd=tmp_path, check=True, capture_output=True, text=True, timeout=30
    ).stdout.strip()
    info = run_provenance(tmp_path / "not" / "made" / "yet", {})  # the nearest existing folder is asked
    assert info["git"] == {"commit": head, "branch": "perf-branch", "source": "git"}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", info["saved_at"])


def _readme_recipe() -> list[list[str]]:
    """The README's "Try it on the simulator" commands, as written there."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = text.split("Try it on the simulator", 1)[1].split("```console\n", 1)[1].split("```", 1)[0]
    return [shlex.split(line) for line in block.splitlines() if line.strip()]


@pytest.mark.slow
def test_the_readme_regression_recipe_works_as_written(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_perf="""
        from pytest_infmax import Scenario

        def test_x(infmax):
            infmax.run(Scenario("tiny", 32, 16), concurrency=2, num_requests=8, warmup=2)
        """
    )
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    save, compare = _readme_recipe()
    assert save[0] == compare[0] == "pytest" and "--slowdown 1.3" in compare
    saved = pytester.runpytest_subprocess("-p", "no:cacheprovider", *save[1:])
    saved.assert_outcomes(passed=1)
    out = saved.stdout.str()
    assert "default" not in out.split("infmax baselines", 1)[1]  # saving to main says nothing of 'default'
    saved.stdout.fnmatch_lines(["ok * saved to *main (3 runs)*"])
    (doc,) = [json.loads(p.read_text()) for p in (pytester.path / ".infmax/baselines/main").glob("*.json")]
    run = doc["runs"][0]
    assert run["environment"]["treatment"] == [] and "git" in run["environment"] and run["environment"]["saved_at"]
    regressed = pytester.runpytest_subprocess("-p", "no:cacheprovider", *compare[1:], "--infmax-json", "r.json")
    regressed.assert_outcomes(failed=1)
    out = regressed.stdout.str()
    assert "different testbed" not in out and "--infmax-compare-force" not in out
    regressed.stdout.fnmatch_lines(["*p50(tpot)*REGRESSED*", "*FAIL (regression)*"])


@pytest.mark.slow
def test_a_treated_run_that_is_saved_keeps_its_treatment(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_perf="""
        from pytest_infmax import Scenario

        def test_x(infmax):
            infmax.run(Scenario("tiny", 32, 16), concurrency=2, num_requests=6, warmup=0)
        """
    )
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "--infmax-save", "jitter", "--infmax-sim-args=--start-jitter 0.02"
    )
    result.assert_outcomes(passed=1)
    (doc,) = [json.loads(p.read_text()) for p in (pytester.path / ".infmax/baselines/jitter").glob("*.json")]
    assert doc["runs"][0]["environment"]["treatment"] == ["--start-jitter", "0.02"]
    assert "--start-jitter" not in doc["testbed"]["server_options"]
