"""One grammar for SLA expressions (judging a run against them is :mod:`pytest_infmax.measure.verdicts`).

An SLA is a list of objectives, each one line of text::

    p99(ttft) < 500ms            median(tpot) <= 20 ms       p99.9(itl) < 100ms
    p50(interactivity) > 50 tok/s/user                       mean(e2e) < 2s
    throughput_per_gpu >= 5000 tok/s/gpu                     output_throughput > 1.2k tok/s
    error_rate < 0.1%            goodput_ratio >= 95%        request_throughput > 2 req/s
    cost_per_mtok < $0.05        output_cost_per_mtok < 0.20 $/Mtok
    energy_per_token < 0.3 J     tokens_per_mw > 1M tok/s/MW power < 900 W
    mean(server_ttft) < 200ms    max(server_kv_cache_usage) < 90%

Grammar (whitespace-insensitive; statistics, metric names and units are
case-insensitive)::

    objective := [STAT '(' METRIC ')' | METRIC] OP ['$'] NUMBER [UNIT]
    STAT      := mean | median | std | min | max | pNN[.N]      (0 < NN <= 100)
    OP        := < | <= | > | >=                               (also ≤ and ≥)
    NUMBER    := decimal, optional exponent, optional suffix k (1e3) or M (1e6)
    UNIT      := us | µs | ms | s                    for times
               | tok/s | tok/s/gpu | tok/s/user      for token rates
               | req/s                               for request rates
               | % | (none)                          for ratios
               | $/Mtok  (or a leading $: $0.05)     for costs
               | J | J/token                         for energy per token
               | tok/s/MW                            for tokens per second per MW
               | W | kW | W/gpu | kW/gpu            for power
               | (none)                              for counts (server_running)

Per-request distributions (ttft, tpot, itl, e2e, interactivity) need a
statistic; so do the server's histograms (``mean``, ``p50`` or ``p99`` of
``server_ttft`` ...) and gauges (``mean`` or ``max`` of ``server_running`` ...).
Run-level scalars take none. ``tok/s/gpu`` and ``W/gpu`` are accepted only on
``*_per_gpu`` metrics and ``tok/s/user`` only on interactivity (all also take the
plain unit). Times, rates, costs, energies and powers must carry a unit, because a
bare ``500`` in an SLA file is a misreading waiting to happen; ratios may be bare
fractions (``0.001``) or percentages (``0.1%``). A unit is matched before a number
suffix, so ``5Ms`` is 5 ms and ``1M tok/s/MW`` is 10^6 tok/s/MW; the mega suffix is
upper-case ``M`` only.

Every registered figure can be an objective (:data:`~pytest_infmax.measure.registry.METRICS`).
One that was not measured (no price, no energy, no server metrics) fails, saying
why and how to measure it.

Limits are stored canonically (seconds, per second, fraction) in
``Objective.limit``; the number as written (``Objective.value``) and its unit are
kept for display, so messages speak the SLA author's units.

Goodput limits (``"ttft <= 500ms, tpot < 50ms"``) use the same grammar without a
statistic: they bound every request, see :func:`parse_goodput_limits`.

Adding a metric of a new dimension takes a ``METRICS`` entry in
:mod:`pytest_infmax.measure.registry` and its units in :data:`UNITS` here.
"""

from __future__ import annotations

import difflib
import math
import numbers
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, NamedTuple

from pytest_infmax.measure.registry import GOODPUT_METRICS, METRICS, NAMED_STATS, OPS, MetricInfo, parse_stat

__all__ = [
    "UNITS",
    "Objective",
    "SLASyntaxError",
    "format_quantity",
    "parse",
    "parse_all",
    "parse_goodput_limits",
    "split_expressions",
    "unit_divisor",
    "units_for",
]

#: unit spelling (as displayed; matched case-insensitively) -> (dimension, divisor taking
#: the written number to canonical). Divisors rather than factors: ``95 / 100`` is
#: exactly 0.95, ``95 * 0.01`` is not.
UNITS: dict[str, tuple[str, float]] = {
    "us": ("time", 1e6),
    "ms": ("time", 1e3),
    "s": ("time", 1.0),
    "tok/s": ("tokens_per_second", 1.0),
    "tok/s/gpu": ("tokens_per_second", 1.0),
    "tok/s/user": ("tokens_per_second", 1.0),
    "req/s": ("requests_per_second", 1.0),
    "%": ("ratio", 100.0),
    "$/Mtok": ("cost", 1.0),
    "J/token": ("energy_per_token", 1.0),
    "J": ("energy_per_token", 1.0),
    "tok/s/MW": ("tokens_per_second_per_mw", 1.0),
    "W": ("power", 1.0),
    "kW": ("power", 1e-3),
    "W/gpu": ("power", 1.0),
    "kW/gpu": ("power", 1e-3),
}
_UNIT_LOOKUP = {unit.lower(): unit for unit in UNITS}
_UNIT_ALIASES = {"µs": "us", "μs": "us", "j/tok": "J/token"}  # µ: micro sign, Greek mu
#: units that only fit metrics whose own display unit carries the same qualifier
_QUALIFIERS = {"tok/s/gpu": "/gpu", "W/gpu": "/gpu", "kW/gpu": "/gpu", "tok/s/user": "/user"}
_SUFFIXES = {"k": 1e3, "K": 1e3, "M": 1e6}
COST_UNIT = "$/Mtok"  # also written as a leading '$': '$0.05' is 0.05 $/Mtok

_DIMENSION_PHRASE = {
    "time": "a time",
    "tokens_per_second": "a token rate",
    "requests_per_second": "a request rate",
    "ratio": "a ratio",
    "cost": "a cost",
    "energy_per_token": "an energy per token",
    "tokens_per_second_per_mw": "a token rate per MW",
    "power": "a power draw",
    "count": "a count",
}
#: dimensions whose limits may be bare numbers
_BARE_DIMENSIONS = frozenset({"ratio", "count"})

_EXAMPLE = "e.g. 'p99(ttft) < 500ms' or 'throughput > 5000 tok/s'"
_GOODPUT_EXAMPLE = "e.g. 'ttft <= 500ms, tpot < 50ms'"

_WS = re.compile(r"\s*")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")
_OP = re.compile(r"<=|>=|<|>|≤|≥")
_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_OP_ALIASES = {"≤": "<=", "≥": ">="}
_SPLIT = re.compile(r"[,;\n]")


# -- errors ---------------------------------------------------------------------


class SLASyntaxError(ValueError):
    """An SLA expression that cannot be parsed or does not make sense.

    The message names the whole expression, what is wrong (and at which
    column, for syntax errors) and a concrete fix. Attributes keep the parts
    for tools: ``expression``, ``problem``, ``hint``, ``column`` (1-based or
    None), ``index`` (position in a list of expressions, 0-based, or None).
    """

    def __init__(
        self,
        expression: str,
        problem: str,
        hint: str | None = None,
        *,
        column: int | None = None,
        what: str = "SLA",
        index: int | None = None,
        total: int | None = None,
    ) -> None:
        self.expression = expression
        self.problem = problem
        self.hint = hint
        self.column = column
        self.what = what
        self.index = index
        self.total = total
        super().__init__(self._render())

    def _render(self) -> str:
        where = f" at column {self.column}" if self.column is not None else ""
        hint = ""
        if self.hint:
            hint = (", " if self.hint.startswith("e.g.") else "; ") + self.hint
        prefix = ""
        if self.index is not None and self.total is not None and self.total > 1:
            prefix = f"{self.what} #{self.index + 1} of {self.total}: "
        return f"{prefix}invalid {self.what} {self.expression!r}{where}: {self.problem}{hint}"

    def at_index(self, index: int, total: int) -> SLASyntaxError:
        """The same error, placed in a list of ``total`` expressions."""
        return SLASyntaxError(
            self.expression,
            self.problem,
            self.hint,
            column=self.column,
            what=self.what,
            index=index,
            total=total,
        )


# -- numbers and units ---------------------------------------------------------------


def _fmt_exact(value: float) -> str:
    """Shortest spelling of ``value`` that parses back to the same float."""
    value = float(value) + 0.0  # -0.0 -> 0.0
    if value.is_integer() and abs(value) < 1e16:
        return str(int(value))
    if 1e-4 <= abs(value) < 1e16:
        return format(Decimal(repr(value)), "f")
    return repr(value)


def _fmt_measured(value: float) -> str:
    """A measured figure at sensible precision: 812.3, 12.35, 0.01234, 51234."""
    if value != value or math.isinf(value):
        return str(value)
    if abs(value) >= 1000:
        return f"{value:.0f}"
    return f"{value:.4g}"


def _unit_sep(unit: str) -> str:
    return "" if unit in ("", "%") else " "


def _with_unit(number: str, unit: str) -> str:
    """A number in its unit as the grammar writes it: '500 ms', '0.1%', '$0.05/Mtok'."""
    if unit == COST_UNIT:
        return f"${number}/Mtok"
    return f"{number}{_unit_sep(unit)}{unit}"


def unit_divisor(unit: str) -> float:
    """How many ``unit`` make one canonical unit (``ms`` -> 1000, ``%`` -> 100).

    Written numbers are divided by it; canonical values are multiplied by it
    for display. A bare number ('') is already canonical.
    """
    return UNITS[unit][1] if unit else 1.0


def format_quantity(value: float, unit: str) -> str:
    """A canonical value in ``unit`` for display: (0.8123, 'ms') -> '812.3 ms'."""
    return _with_unit(_fmt_measured(value * unit_divisor(unit)), unit)


def _normalise_unit(compact: str) -> str:
    """The unit's display spelling ('MS' -> 'ms', 'tok/s/mw' -> 'tok/s/MW'); unknown ones lower-cased."""
    low = compact.lower()
    return _UNIT_ALIASES.get(low) or _UNIT_LOOKUP.get(low, low)


def units_for(info: MetricInfo) -> list[str]:
    """The unit spellings a metric accepts ('' meaning a bare number)."""
    units = [
        u
        for u, (dim, _) in UNITS.items()
        if dim == info.dimension and (u not in _QUALIFIERS or info.unit.endswith(_QUALIFIERS[u]))
    ]
    if info.dimension in _BARE_DIMENSIONS:
        units.append("")
    return units


def _suggest(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}? " if close else ""


def _or_list(items: list[str]) -> str:
    items = [i for i in items if i]
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " or " + items[-1]


# -- objectives ----------------------------------------------------------------------


@dataclass(frozen=True)
class Objective:
    """One parsed SLA expression (or, with ``stat=None`` on a distribution
    metric, one per-request goodput limit).

    ``limit`` is canonical (seconds, per second, fraction); ``value`` is the
    number as written in ``unit`` (suffixes applied), kept so messages and
    ``str()`` speak the author's units. ``text`` is the original expression
    and takes no part in equality: ``parse(str(o)) == o``.
    """

    metric: str
    stat: str | None
    op: str
    limit: float
    unit: str = ""
    value: float | None = None
    text: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"op must be one of {', '.join(OPS)}, got {self.op!r}")
        if self.value is None:
            object.__setattr__(self, "value", self.limit * unit_divisor(self.unit))
        if not self.text:
            object.__setattr__(self, "text", str(self))

    @classmethod
    def parse(cls, text: str) -> Objective:
        """Parse one SLA expression; raises SLASyntaxError."""
        return parse(text)

    @property
    def info(self) -> MetricInfo:
        return METRICS[self.metric]

    @property
    def lhs(self) -> str:
        """The left-hand side: 'p99(ttft)' or 'throughput'."""
        return f"{self.stat}({self.metric})" if self.stat else self.metric

    @property
    def limit_text(self) -> str:
        """The limit in the author's unit: '500 ms', '0.1%', '5000 tok/s', '$0.05/Mtok'."""
        assert self.value is not None
        return _with_unit(_fmt_exact(self.value), self.unit)

    def holds(self, measured: float) -> bool:
        return OPS[self.op](measured, self.limit)

    def __str__(self) -> str:
        return f"{self.lhs} {self.op} {self.limit_text}"


class _Parts(NamedTuple):
    """The syntactic pieces of an expression, before any meaning is checked."""

    stat: str | None
    stat_col: int
    metric: str
    metric_col: int
    op: str
    number: str
    number_col: int
    unit: str  # the rest of the text, whitespace removed
    unit_col: int
    dollar: bool  # the number was written with a leading '$' (a cost)


class _Parser:
    """Parses one expression; ``per_request`` switches to the goodput-limit form."""

    def __init__(self, text: str, *, per_request: bool = False) -> None:
        self.text = text
        self.pos = 0
        self.per_request = per_request
        self.what = "goodput limit" if per_request else "SLA"
        self.example = _GOODPUT_EXAMPLE if per_request else _EXAMPLE

    # -- error helpers

    def fail(self, problem: str, hint: str | None = None, *, col: int | None = None) -> SLASyntaxError:
        return SLASyntaxError(self.text, problem, hint, column=col, what=self.what)

    def _skip_ws(self) -> None:
        self.pos = _WS.match(self.text, self.pos).end()  # type: ignore[union-attr]

    def _take(self, pattern: re.Pattern[str]) -> str | None:
        self._skip_ws()
        match = pattern.match(self.text, self.pos)
        if match is None or not match.group():
            return None
        self.pos = match.end()
        return match.group()

    def _col(self) -> int:
        return self.pos + 1

    # -- syntax

    def parts(self) -> _Parts:
        if not self.text.strip():
            raise self.fail("empty expression", f"write one, {self.example}")
        stat, stat_col, metric, metric_col = self._lhs()
        op = self._op(stat, metric)
        self._skip_ws()
        dollar = self.text.startswith("$", self.pos)
        if dollar:
            self.pos += 1
            self._skip_ws()
        number_col = self._col()
        number = self._take(_NUMBER)
        if number is None:
            raise self.fail(
                f"expected a number after {op!r}",
                self.example,
                col=number_col,
            )
        self._skip_ws()
        unit_col = self._col()
        rest = self.text[self.pos :]
        if any(c in rest for c in "<>=≤≥"):
            raise self.fail(
                "one comparison per expression",
                f"split it into separate objectives, {self.example}",
                col=unit_col,
            )
        compact = "".join(rest.split())
        return _Parts(stat, stat_col, metric, metric_col, op, number, number_col, compact, unit_col, dollar)

    def _lhs(self) -> tuple[str | None, int, str, int]:
        self._skip_ws()
        first_col = self._col()
        first = self._take(_IDENT)
        if first is None:
            if _NUMBER.match(self.text, self.pos):
                raise self.fail(
                    "expected a metric name first",
                    f"the limit goes on the right, {self.example}",
                    col=first_col,
                )
            raise self.fail("expected a metric name or STAT(metric)", self.example, col=first_col)
        self._skip_ws()
        if not self.text.startswith("(", self.pos):
            return None, 0, first, first_col
        self.pos += 1
        self._skip_ws()
        metric_col = self._col()
        metric = self._take(_IDENT)
        if metric is None:
            raise self.fail(
                f"expected a metric name inside {first}( )",
                f"e.g. '{first}(ttft) < 500ms'",
                col=metric_col,
            )
        self._skip_ws()
        if not self.text.startswith(")", self.pos):
            raise self.fail(
                f"expected ')' after {metric!r}",
                f"e.g. '{first}({metric}) < …'",
                col=self._col(),
            )
        self.pos += 1
        return first, first_col, metric, metric_col

    def _op(self, stat: str | None, metric: str) -> str:
        self._skip_ws()
        col = self._col()
        op = self._take(_OP)
        if op is not None:
            return _OP_ALIASES.get(op, op)
        lhs = f"{stat}({metric})" if stat else metric
        following = _IDENT.match(self.text, self.pos)
        if stat is None and following and _is_stat(metric):
            fixed = f"{metric}({following.group()})"
            raise self.fail(
                "a statistic takes its metric in parentheses",
                f"write '{fixed} < …'",
                col=col,
            )
        if self.text.startswith(("=", "!"), self.pos):
            raise self.fail(
                "equality is not an SLA comparison; expected <, <=, > or >=",
                f"e.g. '{lhs} <= …'",
                col=col,
            )
        raise self.fail(
            f"expected a comparison (<, <=, > or >=) after {lhs!r}",
            self.example,
            col=col,
        )

    # -- meaning

    def objective(self) -> Objective:
        p = self.parts()
        info = self._metric(p)
        stat = self._stat(p, info)
        value, unit = self._quantity(p, info, stat)
        divisor = unit_divisor(unit)
        return Objective(
            metric=info.name,
            stat=stat,
            op=p.op,
            limit=value / divisor,
            unit=unit,
            value=value,
            text=self.text,
        )

    def _metric(self, p: _Parts) -> MetricInfo:
        name = p.metric.lower()
        known = GOODPUT_METRICS if self.per_request else tuple(METRICS)
        if name in known:
            return METRICS[name]
        if self.per_request and name in METRICS:
            raise self.fail(
                f"{name} is not a per-request metric; goodput limits bound each request",
                f"use {_or_list(list(GOODPUT_METRICS))}, {self.example}",
                col=p.metric_col,
            )
        raise self.fail(
            f"unknown metric {p.metric!r}",
            f"{_suggest(name, known)}known metrics: {', '.join(known)}",
            col=p.metric_col,
        )

    def _stat(self, p: _Parts, info: MetricInfo) -> str | None:
        rhs = f"{p.op} {'$' if p.dollar else ''}{p.number}{_unit_sep(p.unit)}{p.unit}"
        if self.per_request:
            if p.stat is not None:
                raise self.fail(
                    "a goodput limit bounds every request, so it takes no statistic",
                    f"write '{info.name} {rhs}'",
                    col=p.stat_col,
                )
            return None
        example_stat = info.stats[-1] if info.stats else "p99"
        if p.stat is None:
            if info.kind == "distribution":
                raise self.fail(
                    f"{info.name} is a per-request distribution; say which statistic",
                    f"e.g. 'p99({info.name}) {rhs}'",
                )
            if info.takes_stat:
                raise self.fail(
                    f"{info.name} is the server's {info.kind}; say which statistic ({_or_list(list(info.stats))})",
                    f"e.g. '{example_stat}({info.name}) {rhs}'",
                )
            return None
        if not info.takes_stat:
            raise self.fail(
                f"{info.name} is a run-level figure, so it takes no statistic",
                f"write '{info.name} {rhs}'",
                col=p.stat_col,
            )
        try:
            stat = parse_stat(p.stat)
        except ValueError as exc:
            raise self.fail(
                str(exc),
                f"{_suggest(p.stat.lower(), info.stats or NAMED_STATS)}e.g. '{example_stat}({info.name}) {rhs}'",
                col=p.stat_col,
            ) from None
        if stat == "median" and "p50" in info.stats:
            stat = "p50"  # the same statistic, as the server's histogram names it
        if info.stats and stat not in info.stats:
            raise self.fail(
                f"the server's {info.kind} {info.name} gives {_or_list(list(info.stats))} only, not {stat}",
                f"e.g. '{example_stat}({info.name}) {rhs}'",
                col=p.stat_col,
            )
        return stat

    def _quantity(self, p: _Parts, info: MetricInfo, stat: str | None) -> tuple[float, str]:
        """The written number (suffix applied) and its normalised unit."""
        unit, multiplier, shown = self._split_unit(p)
        lhs = f"{stat}({info.name})" if stat else info.name
        self._check_unit(unit, info, lhs, p, shown)
        value = float(p.number) * multiplier + 0.0
        if not math.isfinite(value):
            raise self.fail("the limit is not a finite number", self.example, col=p.number_col)
        if value < 0:
            raise self.fail("a limit cannot be negative", self.example, col=p.number_col)
        if info.dimension == "ratio" and value / unit_divisor(unit) > 1:
            hint = "a ratio is at most 100% (or 1)"
            if not unit and value <= 100:
                hint += f"; did you mean '{lhs} {p.op} {shown}%'?"
            raise self.fail(f"{info.name} is a ratio above 100%", hint, col=p.number_col)
        return value, unit

    def _split_unit(self, p: _Parts) -> tuple[str, float, str]:
        """(unit, multiplier, number as shown): a unit wins over a suffix (5Ms is 5 ms)."""
        if p.dollar:  # '$0.05' or '$0.05/Mtok' (and '$1.5k', should anyone need it)
            rest, multiplier, shown = p.unit, 1.0, "$" + p.number
            if rest[:1] in _SUFFIXES:
                rest, multiplier, shown = rest[1:], _SUFFIXES[rest[0]], shown + rest[0]
            if rest.lower() not in ("", "/mtok"):
                raise self.fail(
                    f"after a $ amount only '/Mtok' may follow, not {p.unit!r}",
                    "e.g. 'cost_per_mtok < $0.05' or 'cost_per_mtok < 0.05 $/Mtok'",
                    col=p.unit_col,
                )
            return COST_UNIT, multiplier, shown
        unit = _normalise_unit(p.unit)
        if unit in UNITS or unit == "":
            return unit, 1.0, p.number
        if p.unit[:1] in _SUFFIXES:
            rest = _normalise_unit(p.unit[1:])
            if rest in UNITS or rest == "":
                return rest, _SUFFIXES[p.unit[0]], p.number + p.unit[0]
        return unit, 1.0, p.number  # unknown: _check_unit reports it

    def _check_unit(self, unit: str, info: MetricInfo, lhs: str, p: _Parts, shown: str) -> None:
        allowed = units_for(info)
        if unit in allowed:
            return
        fix = f"'{lhs} {p.op} {_example_limit(info, shown.lstrip('$'))}'"
        phrase = _DIMENSION_PHRASE.get(info.dimension, f"measured in {info.unit}")
        col = p.unit_col
        if p.dollar:
            raise self.fail(
                f"{info.name} is {phrase}, not a cost: '$' prices costs only",
                f"use {_or_list(allowed)}, e.g. {fix}",
                col=p.number_col - 1,
            )
        shown_allowed = [*allowed, "a leading $"] if info.dimension == "cost" else allowed
        if unit == "":
            raise self.fail(
                f"{info.name} is {phrase}; give a unit ({_or_list(shown_allowed)})",
                f"e.g. {fix}",
                col=col,
            )
        if unit in UNITS and UNITS[unit][0] == info.dimension:  # a qualified unit on the wrong metric
            raise self.fail(self._qualified_problem(unit, info), f"use {_or_list(allowed)}, e.g. {fix}", col=col)
        if unit in UNITS:
            raise self.fail(
                f"{info.name} is {phrase}, but {unit!r} is {_DIMENSION_PHRASE[UNITS[unit][0]]}",
                f"use {_or_list(allowed)}, e.g. {fix}",
                col=col,
            )
        raise self.fail(
            f"unknown unit {p.unit!r} for {info.name}",
            f"{_suggest(unit, [u for u in allowed if u])}{info.name} takes {_or_list(allowed)}, e.g. {fix}",
            col=col,
        )

    @staticmethod
    def _qualified_problem(unit: str, info: MetricInfo) -> str:
        if _QUALIFIERS.get(unit) == "/gpu":
            per_gpu = f"{info.name}_per_gpu"
            also = f" (or did you mean {per_gpu}?)" if per_gpu in METRICS else ""
            return f"{unit!r} only applies to *_per_gpu metrics, not {info.name}{also}"
        if unit == "tok/s/user":
            return f"'tok/s/user' only applies to interactivity, not {info.name}"
        return f"{unit!r} does not apply to {info.name}"


def _example_limit(info: MetricInfo, number: str) -> str:
    """``number`` in the unit to suggest in a fix: '500ms', '5000 tok/s', '95%', '$0.05', '0.3 J'."""
    if info.dimension == "time":
        return f"{number}ms"
    if info.dimension == "cost":
        return f"${number}"
    if info.dimension == "energy_per_token":
        return f"{number} J"
    unit = "%" if info.dimension == "ratio" else info.unit
    return f"{number}{_unit_sep(unit)}{unit}"


def _is_stat(word: str) -> bool:
    try:
        parse_stat(word)
    except ValueError:
        return False
    return True


def parse(text: str) -> Objective:
    """Parse one SLA expression into an Objective; raises SLASyntaxError."""
    if not isinstance(text, str):
        raise TypeError(f"an SLA expression is a str, got {type(text).__name__}")
    return _Parser(text).objective()


def split_expressions(text: str) -> list[str]:
    """Split 'a, b; c' or one-per-line text into expressions (blank ones dropped).

    Safe because no valid expression contains ',', ';' or a newline.
    """
    return [piece.strip() for piece in _SPLIT.split(text) if piece.strip()]


def parse_all(exprs: Iterable[str | Objective]) -> list[Objective]:
    """Parse several expressions, raising on the first bad one.

    When there are several, the error says which (``SLA #2 of 3: ...``).
    Objectives pass through unchanged.
    """
    items = list(exprs)
    out: list[Objective] = []
    for i, item in enumerate(items):
        if isinstance(item, Objective):
            out.append(item)
            continue
        try:
            out.append(parse(item))
        except SLASyntaxError as exc:
            raise exc.at_index(i, len(items)) from None
    return out


# -- goodput limits ---------------------------------------------------------------------


def parse_goodput_limits(spec: str | Mapping[str, str | float | int]) -> tuple[Objective, ...]:
    """Per-request limits for goodput, as Objectives with ``stat=None``.

    A string holds comma- (or ';'/newline-) separated ``METRIC OP NUMBER UNIT``
    limits. In a mapping, a number is in the base unit (seconds for times,
    tok/s for interactivity) and a string carries its unit; the comparison is
    ``<=`` for lower-is-better metrics and ``>=`` for interactivity, unless the
    string starts with its own (``{"ttft": "< 500ms"}``).
    """
    if isinstance(spec, str):
        texts = split_expressions(spec)
    elif isinstance(spec, Mapping):
        texts = [_limit_text(key, val) for key, val in spec.items()]
    else:
        raise TypeError(
            f"goodput limits are a str or a mapping, got {type(spec).__name__} {_short_repr(spec)}; {_GOODPUT_EXAMPLE}"
        )
    if not texts:
        raise SLASyntaxError(str(spec), "no limits given", _GOODPUT_EXAMPLE, what="goodput limit")
    entries = [f"{key}: {val!r}" for key, val in spec.items()] if isinstance(spec, Mapping) else texts
    out = []
    for i, (text, entry) in enumerate(zip(texts, entries)):
        try:
            out.append(_Parser(text, per_request=True).objective())
        except SLASyntaxError as exc:
            if entry != text:  # a mapping entry: name it as the user wrote it
                exc = SLASyntaxError(entry, exc.problem, exc.hint, what=exc.what)
            raise exc.at_index(i, len(texts)) from None
    return tuple(out)


def _limit_text(key: Any, val: Any) -> str:
    """Turn one mapping entry into limit text, so one parser judges both forms."""
    metric = str(key).strip().lower()
    info = METRICS.get(metric)
    op = ">=" if info is not None and info.higher_is_better else "<="
    if isinstance(val, bool) or not isinstance(val, (str, numbers.Real)):
        raise SLASyntaxError(
            f"{key}: {val!r}",
            "a limit is a number or a string with a unit",
            _GOODPUT_EXAMPLE,
            what="goodput limit",
        )
    if isinstance(val, str):
        stripped = val.strip()
        return f"{metric} {stripped}" if _OP.match(stripped) else f"{metric} {op} {stripped}"
    try:
        number = float(val)
    except OverflowError:  # an int too large for a float
        number = math.inf
    if not math.isfinite(number):
        raise SLASyntaxError(
            f"{key}: {val!r}", "the limit is not a finite number", _GOODPUT_EXAMPLE, what="goodput limit"
        )
    base = "s" if info is None or info.dimension == "time" else info.unit
    return f"{metric} {op} {number!r} {base}"


def _short_repr(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
