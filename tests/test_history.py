"""Creeping regressions: change points over a baseline set's history, with the commit at each
(``infmax history``), on synthetic histories whose steps are known."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pytest_infmax.baselines.history import format_history, history_of
from pytest_infmax.baselines.store import BaselineRun, BaselineStore, build_testbed
from pytest_infmax.cli import main as cli_main

pytest.importorskip("otava", reason="change points need Apache Otava: pip install 'pytest-infmax[history]'")

from pytest_infmax.baselines.changepoints import change_points  # noqa: E402

STEPS = (1.0, 1.10, 0.95, 1.20)  # +10 %, -13.6 %, +26.3 %: three steps, 15 runs apart
SERVER = {"kind": "sim", "model": "sim-model", "num_gpus": 1, "command": ["python", "-m", "pytest_infmax.sim"]}


def _stepped(seed: int, per_level: int = 15, sd: float = 0.02, levels: tuple[float, ...] = STEPS) -> list[float]:
    """Run values with a lognormal per-run noise of ``sd`` (2 %: between server starts)."""
    rng = np.random.default_rng(seed)
    return [float(v) for level in levels for v in level * np.exp(rng.normal(0, sd, per_level))]


def _found_all_three(points: list[int]) -> bool:
    return len(points) == 3 and all(any(abs(p - t) <= 1 for p in points) for t in (15, 30, 45))


def test_three_steps_are_all_found_where_they_are() -> None:
    found = change_points(_stepped(0))
    assert [cp.index for cp in found] == [15, 30, 45]
    changes = [cp.change for cp in found]
    assert changes == pytest.approx([0.10, 0.95 / 1.10 - 1, 1.20 / 0.95 - 1], abs=0.02)
    assert all(cp.p_value < 0.001 for cp in found)
    # over many noisy histories: all three found (within a run) nearly always
    hits = sum(_found_all_three([cp.index for cp in change_points(_stepped(seed))]) for seed in range(20))
    assert hits >= 18, f"all three steps found in {hits} of 20 histories"


def test_a_flat_noisy_history_has_no_change_point() -> None:
    for seed in range(20):
        flat = _stepped(100 + seed, per_level=60, levels=(1.0,))
        assert change_points(flat) == [], f"seed {100 + seed}"
    # and a small creep below the noise is not called a step either
    assert change_points(_stepped(7, levels=(1.0, 1.0, 1.0, 1.0))) == []


def test_min_change_drops_small_steps_and_short_series_have_none() -> None:
    small = _stepped(3, sd=0.005, levels=(1.0, 1.02, 1.02, 1.20))
    assert [cp.index for cp in change_points(small)] == [15, 45]
    assert [cp.index for cp in change_points(small, min_change=0.05)] == [45]
    assert change_points([1.0, 2.0, 3.0]) == []
    with pytest.raises(ValueError, match="finite"):
        change_points([1.0, float("nan"), 1.0, 1.0])


def _history_set(tmp_path: Path) -> Path:
    """A 'main' set whose test_x history steps three times; run i measured commit c00i..."""
    store = BaselineStore(tmp_path / "main", history=100)
    rng = np.random.default_rng(5)
    for i, value in enumerate(_stepped(0)):
        tpot = value * 0.0045 * rng.lognormal(0, 0.01, 40)
        run = BaselineRun(
            name="perf/test_perf.py::test_x",
            samples={"ttft": list(tpot * 3), "tpot": list(tpot), "e2e": list(tpot * 20)},
            scalars={"throughput_per_gpu": 3400.0 / value},
            workload={"concurrency": 4},
            environment={
                "git": {"commit": f"{i:04d}" + "a" * 36, "branch": "main", "source": "git"},
                "saved_at": f"2026-12-{1 + i // 3:02d}T10:00:00Z",
            },
        )
        store.save(run.name, run, build_testbed(SERVER))
    return tmp_path


def test_history_of_a_stored_set_names_the_commit_at_each_change_point(tmp_path: Path) -> None:
    store = BaselineStore(_history_set(tmp_path) / "main", history=100)
    (baseline,) = list(store)
    history = history_of(baseline, "p50(tpot)")
    assert [cp.index for cp in history.change_points] == [15, 30, 45]
    assert [history.points[cp.index].short_commit for cp in history.change_points] == [
        "0015aaaaaa",
        "0030aaaaaa",
        "0045aaaaaa",
    ]
    text = format_history(history)
    assert "change point at run 15 (commit 0015aaaaaa, branch main" in text
    # throughput moves the other way, by the same steps
    assert [cp.index for cp in history_of(baseline, "throughput_per_gpu").change_points] == [15, 30, 45]


def test_infmax_history_prints_the_trend_plots_it_and_writes_json(tmp_path: Path, capsys) -> None:
    root = _history_set(tmp_path)
    png, doc = tmp_path / "trend.png", tmp_path / "history.json"
    code = cli_main(["history", "main", "test_x", "--baselines", str(root), "--plot", str(png), "--json", str(doc)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "perf/test_perf.py::test_x: p50(tpot) over 60 runs" in out
    assert "<- change point: +10." in out and "commit 0045aaaaaa" in out
    assert "3 change points in 1 histories" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(doc.read_text())
    (h,) = data["histories"]
    assert [cp["commit"][:4] for cp in h["change_points"]] == ["0015", "0030", "0045"]
    # a test that is not in the set, or a set that is not there, is a clear error (exit 2)
    assert cli_main(["history", "main", "test_nope", "--baselines", str(root)]) == 2
    assert "no baseline in" in capsys.readouterr().err
    assert cli_main(["history", "nightly", "--baselines", str(root)]) == 2
    assert "there is no baseline set 'nightly'" in capsys.readouterr().err


def test_infmax_history_reads_a_postgresql_store_without_showing_its_password(
    postgres, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from _postgres import PASSWORD

    from pytest_infmax.baselines.stores import open_set

    store = open_set(postgres.url, "history-main", history=100)
    for baseline in BaselineStore(_history_set(tmp_path) / "main", history=100):
        store.save(baseline.key, baseline.runs, baseline.testbed, mode="replace")
    assert cli_main(["history", "history-main", "test_x", "--baselines", postgres.url]) == 0
    captured = capsys.readouterr()
    assert "change point at run 45 (commit 0045aaaaaa, branch main" in captured.out
    assert PASSWORD not in captured.out + captured.err
    assert cli_main(["history", "history-nightly", "--baselines", postgres.url]) == 2
    err = capsys.readouterr().err
    assert "there is no baseline set 'history-nightly'" in err and PASSWORD not in err
