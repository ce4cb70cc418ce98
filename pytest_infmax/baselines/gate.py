"""The regression gate for one test: compare its results with stored baselines, then save.

Plain and importable: the plugin calls :func:`gate_results` after a test body
(on the worker that ran it, so a regression fails that test), and sends the
outcomes to the reports as plain dicts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytest_infmax.baselines.compare import CompareOptions, ComparisonReport, compare_stored
from pytest_infmax.baselines.sequential import SequentialComparison
from pytest_infmax.baselines.store import BaselineError, BaselineSet, build_testbed, gpu_testbed, result_keys, runs_of
from pytest_infmax.baselines.stores import has_set, open_set
from pytest_infmax.run.results import LoadResult


@dataclass(frozen=True)
class GateSettings:
    """What the gate does this session (from --infmax-baselines, -compare, -save, -update...)."""

    directory: Path
    compare_set: str | None = "default"  # None: no comparison
    save_set: str | None = None  # append this run to that set's history
    update: bool = False  # replace the compared set's baselines with this run
    fail_on_unsure: bool = False
    force: bool = False  # compare across testbeds anyway
    options: CompareOptions = field(default_factory=CompareOptions)
    store_url: str | None = None  # a postgresql:// store instead of the directory

    @property
    def active(self) -> bool:
        return bool(self.compare_set or self.save_set or self.update)

    def open_set(self, name: str) -> BaselineSet:
        """The set ``name``: a folder of ``directory``, or a set of the PostgreSQL store."""
        return open_set(self.store_url or self.directory, name)

    def has_set(self, name: str) -> bool:
        """Whether the set exists; True where the store cannot be asked (the gate then says why)."""
        try:
            return has_set(self.store_url or self.directory, name)
        except BaselineError:
            return True


@dataclass
class GateOutcome:
    """One result's comparison and what was stored."""

    key: str
    report: ComparisonReport | None = None
    note: str = ""  # e.g. "no baseline yet", "saved to main", an error
    error: str | None = None  # a baseline problem the user must fix (corrupt file, other testbed)

    @property
    def failed(self) -> bool:
        return self.error is not None or (self.report is not None and self.report.regressed)

    def fails(self, settings: GateSettings) -> bool:
        return self.failed or (settings.fail_on_unsure and self.report is not None and self.report.verdict == "unsure")

    def message(self) -> str:
        if self.error:
            return f"{self.key}: {self.error}"
        if self.report is None:
            return f"{self.key}: {self.note}"
        return self.report.summary_line() + (f"; {self.note}" if self.note else "")

    def to_check(self, settings: GateSettings) -> dict[str, Any]:
        """The dict the Markdown/HTML reports list under checks."""
        return {
            "name": f"baseline {self.key}",
            "passed": not self.fails(settings),
            "message": self.message(),
            "verdict": None if self.report is None else self.report.verdict,
            "comparison": None if self.report is None else self.report.to_dict(),
        }


def testbed_for(result: LoadResult) -> dict[str, Any]:
    """The testbed a result's baseline is keyed by. The simulator runs the same anywhere,
    so GPU facts of the machine are left out for it."""
    extra = {} if result.server.get("kind") == "sim" else gpu_testbed()
    return build_testbed(result.server, extra)


def gate_results(
    results: list[LoadResult], settings: GateSettings, *, owners: dict[str, str] | None = None, test: str = ""
) -> list[GateOutcome]:
    """Compare each result with its baseline (if any), then save as asked.

    ``owners`` (baseline key -> the test whose it is, kept over a session) refuses a key that
    another test already used: two tests with the same ``name=`` would share one history and
    be compared with each other's runs."""
    if not settings.active:
        return []
    if (
        settings.compare_set
        and not settings.save_set
        and not settings.update
        and not settings.has_set(settings.compare_set)
    ):
        return []  # nobody uses baselines here: nothing to compare, nothing to say
    compare_store = settings.open_set(settings.compare_set) if settings.compare_set else None
    save_store = settings.open_set(settings.save_set) if settings.save_set else None
    outcomes = []
    for key, result in zip(result_keys([r.name for r in results]), results):
        outcome = GateOutcome(key)
        owner = owners.setdefault(key, test) if owners is not None else test
        if owner != test:
            outcome.error = (
                f"{owner} already has the baseline {key!r} in this session: two tests would share one "
                f"history and be compared with each other's runs; give each its own name= in infmax.run()"
            )
            outcomes.append(outcome)
            continue
        runs = runs_of(result)  # --infmax-repeat N: N runs (fresh starts), compared and saved as such
        testbed = testbed_for(result)
        if result.repeats is not None and not result.repeats.fresh_starts:
            outcome.note = f"{len(result.repeats)} repeats on one server start, merged into one run"
        try:
            if compare_store is not None and not settings.update:
                outcome.report = compare_stored(
                    compare_store, key, runs, testbed, options=settings.options, force=settings.force
                )
                if outcome.report is None:
                    outcome.note = "; ".join(
                        filter(
                            None,
                            [outcome.note, f"no baseline in {compare_store.where} yet (recorded, not a failure)"],
                        )
                    )
            if settings.update and compare_store is not None:
                compare_store.save(key, runs, testbed, mode="replace")
                outcome.note = "; ".join(filter(None, [outcome.note, f"baseline rewritten in {compare_store.where}"]))
            # A regressed run is not added to a history: it would widen the spread the gate learns.
            if save_store is not None and not outcome.failed:
                save_store.save(key, runs, testbed)
                saved = f"saved to {save_store.where}" + (f" ({len(runs)} runs)" if len(runs) > 1 else "")
                outcome.note = "; ".join(filter(None, [outcome.note, saved]))
        except BaselineError as exc:
            outcome.error = str(exc)
        outcomes.append(outcome)
    return outcomes


class RegressionFailed(AssertionError):
    """A test's results regressed against their baselines (or a baseline is unusable)."""

    from_marker = False  # the plugin sets it where the tables are the whole report (no traceback)

    def __init__(self, outcomes: list[GateOutcome]) -> None:
        self.outcomes = outcomes
        super().__init__("\n".join([o.message() for o in outcomes] + [self.tables()]))

    def tables(self) -> str:
        """Each comparison's table (metric, baseline, current, change, interval, p, verdict, method)."""
        return "\n\n".join(o.report.format_table() for o in self.outcomes if o.report is not None)


def sequential_for(
    settings: GateSettings, gate: str = "p50(tpot)"
) -> Callable[[str, int | None], SequentialComparison | None]:
    """A factory ``(result name, request cap) -> SequentialComparison | None`` for --infmax-sequential.

    None (run to the cap as usual) where there is no baseline to compare with, or it
    cannot be read (the gate after the run reports that).
    """

    def make(name: str, cap: int | None) -> SequentialComparison | None:
        if not settings.compare_set or settings.update or not cap:
            return None
        try:
            baseline = settings.open_set(settings.compare_set).load(name)
        except BaselineError:
            return None
        if baseline is None or not baseline.runs:
            return None
        return SequentialComparison(
            baseline.runs, gate, alpha=settings.options.alpha, min_effect=settings.options.min_effect, max_requests=cap
        )

    return make
