"""Bad input, property-based (issue 8): random SLA expressions, settings and marker arguments.

No input may reach the user as a traceback from inside the plugin, or hang: each is
either accepted or refused with the module's own error, whose message names the
input, its value and what is allowed. Valid SLA expressions round-trip through
their canonical text.

* SLA grammar (:mod:`pytest_infmax.measure.sla`): ``parse``, ``parse_all``, ``SLA(...)`` (the
  API and ``@pytest.mark.sla`` form), goodput limits as text and as a mapping, and
  frontier SLAs; errors are :class:`SLASyntaxError` (or ``TypeError`` for a value of
  the wrong type, as documented).
* Every :data:`pytest_infmax.settings.SETTINGS` entry, from the command line, the
  environment and the ini file; errors are :class:`SettingError`.
* ``@pytest.mark.sla``, ``infmax_server`` and ``infmax_price`` through the plugin's
  own collection hook; errors are ``pytest.UsageError`` naming the test and marker.
"""

from __future__ import annotations

import dataclasses
import math
import os
import textwrap
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pytest_infmax import plugin
from pytest_infmax import settings as config_mod
from pytest_infmax.measure.cost import TIERS, price_marker_options
from pytest_infmax.measure.metrics import GoodputLimits
from pytest_infmax.measure.registry import METRICS
from pytest_infmax.measure.sla import (
    UNITS,
    Objective,
    SLASyntaxError,
    parse,
    parse_all,
    parse_goodput_limits,
    split_expressions,
    units_for,
)
from pytest_infmax.measure.verdicts import SLA
from pytest_infmax.run.sweep import FrontierObjective
from pytest_infmax.servers import engines
from pytest_infmax.servers.config import MAPPING_KEYS, ServerConfig, config_from_mapping

PROPERTY = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]
)

# -- strategies: SLA expressions -------------------------------------------------------------------

_SPACE = st.sampled_from(["", " ", "  ", "\t"])
_VALID_STATS = ["mean", "median", "std", "min", "max", "p50", "p90", "p99", "p99.9", "p100", "P95"]
_BAD_STATS = ["p0", "p101", "p-1", "avg", "p", "pp99", "p99.9.9", "percentile99", "p1e2"]
_BAD_METRICS = ["ttf", "throughput_per_cpu", "latency", "tpot2", "goodput_rate", "x"]
_BAD_OPS = ["=", "==", "!=", "=>", "=<", "<>", "<<", "", "~"]
_BAD_NUMBERS = ["", "-5", "-0.5", "abc", "1e999", "nan", "inf", "five", "0x10", "1k5", "5 5", "--1"]
_UNKNOWN_UNITS = ["msec", "tokens/s", "sec", "hz", "ms/tok", "tok", "%%", "Msec", "req/min", "gpu"]
_TAILS = [" and p99(ttft) < 5ms", " < 5ms", " extra", " (ms)", "ms ms"]


def _number_for(draw: st.DrawFn, info: Any, unit: str) -> str:
    """A non-negative number, as written, in range for the metric and unit."""
    if info.dimension == "ratio":
        top = 100.0 if unit == "%" else 1.0
        return draw(
            st.one_of(
                st.floats(min_value=0, max_value=top).map(repr),
                st.integers(min_value=0, max_value=int(top)).map(str),
                st.sampled_from(["0", ".5" if top == 1.0 else "5.", "1e-3", "+0.25"]),
            )
        )
    return draw(
        st.one_of(
            st.floats(min_value=0, max_value=1e12).map(repr),
            st.integers(min_value=0, max_value=10**9).map(str),
            st.integers(min_value=0, max_value=999).map(lambda n: f"{n}k"),
            st.integers(min_value=0, max_value=99).map(lambda n: f"{n}M"),
            st.sampled_from([".5", "5.", "1e3", "2.5E-2", "+7", "0"]),
        )
    )


@st.composite
def sla_expressions(draw: st.DrawFn, wrong: bool = False) -> tuple[str, bool]:
    """``(text, valid)``: an expression built from the grammar; with ``wrong=True``, one or more
    of its parts (statistic, metric, comparison, number, unit, tail) is replaced by a mistake."""
    name = draw(st.sampled_from(list(METRICS)))
    info = METRICS[name]
    parts = ("stat", "metric", "op", "number", "unit", "tail")
    broken = set(draw(st.sets(st.sampled_from(parts), min_size=1, max_size=2))) if wrong else set()

    metric_text = draw(st.sampled_from([name, name.upper()]))
    if "metric" in broken:
        metric_text = draw(st.sampled_from(_BAD_METRICS))
    if info.kind == "distribution":
        stat: str | None = draw(st.sampled_from(_VALID_STATS))
        if "stat" in broken:
            stat = draw(st.sampled_from([*_BAD_STATS, None]))  # None: a distribution needs one
    elif info.kind in ("histogram", "gauge"):  # the server's: only the statistics it has
        stat = draw(st.sampled_from(info.stats))
        if "stat" in broken:
            unsupported = [x for x in _VALID_STATS if x.lower() not in info.stats and x != "median"]
            stat = draw(st.sampled_from([*_BAD_STATS, *unsupported, None]))
    else:
        stat = draw(st.sampled_from(_VALID_STATS)) if "stat" in broken else None  # scalars take none
    lhs = f"{stat}{draw(_SPACE)}({draw(_SPACE)}{metric_text}{draw(_SPACE)})" if stat else metric_text

    op = draw(st.sampled_from(["<", "<=", ">", ">=", "≤", "≥"]))
    if "op" in broken:
        op = draw(st.sampled_from(_BAD_OPS))

    unit = draw(st.sampled_from(units_for(info)))
    if "unit" in broken:
        other = [u for u, (dim, _) in UNITS.items() if dim != info.dimension]
        qualified = [
            u for u in ("tok/s/gpu", "tok/s/user") if info.dimension == "tokens_per_second" and u not in units_for(info)
        ]
        bare = [""] if info.dimension not in ("ratio", "count") else []  # ratios and counts may be bare
        unit = draw(st.sampled_from(other + qualified + bare + _UNKNOWN_UNITS))

    number = _number_for(draw, info, unit if unit in UNITS or unit == "" else "")
    if "number" in broken:
        number = draw(st.sampled_from(_BAD_NUMBERS))
    if wrong and not broken & {"number", "unit"} and info.dimension == "ratio" and draw(st.booleans()):
        number, unit = ("150", "%") if unit == "%" else ("1.5", "")  # a ratio above 100%
        broken.add("number")

    tail = draw(st.sampled_from(_TAILS)) if "tail" in broken else ""
    text = f"{draw(_SPACE)}{lhs}{draw(_SPACE)}{op}{draw(_SPACE)}{number}{draw(_SPACE)}{unit}{tail}{draw(_SPACE)}"
    if draw(st.booleans()):
        text = text.upper()  # case-insensitive, and the suffixes K and M survive upper()
    return text, not broken


def _assert_names_expression(exc: SLASyntaxError, text: str) -> None:
    """The module's own error, naming the expression, what is wrong and a fix."""
    message = str(exc)
    assert exc.expression == text and repr(text) in message
    assert exc.problem and exc.hint, message
    if exc.column is not None:
        assert 1 <= exc.column <= len(exc.expression) + 1, (exc.column, message)


_ARBITRARY_TEXT = st.one_of(
    st.text(max_size=40),
    st.text(alphabet="pP0123456789.()<>=≤≥ ttftpoe2kMmsµ%/_-,;\n", max_size=30),
)

# -- (a) random and wrong SLA text: the module's own error, naming the expression ------------------


@PROPERTY
@given(_ARBITRARY_TEXT)
def test_random_text_is_an_sla_or_a_syntax_error_naming_it(text: str) -> None:
    try:
        objective = parse(text)
    except SLASyntaxError as exc:
        _assert_names_expression(exc, text)
    else:
        assert parse(str(objective)) == objective
    # The API and marker forms split on , ; and newlines, and name the piece that is wrong.
    try:
        sla = SLA(text)
    except SLASyntaxError as exc:
        assert exc.expression in split_expressions(text)
        assert repr(exc.expression) in str(exc)
    else:
        assert len(sla) == len(split_expressions(text))


@PROPERTY
@given(sla_expressions(wrong=True))
def test_structured_but_wrong_expressions_are_refused_with_a_fix(case: tuple[str, bool]) -> None:
    text, valid = case
    assert not valid
    with pytest.raises(SLASyntaxError) as info:
        parse(text)
    _assert_names_expression(info.value, text)
    # The same expression inside a list says where it is.
    with pytest.raises(SLASyntaxError) as in_list:
        parse_all(["p99(ttft) < 500ms", text])
    assert str(in_list.value).startswith("SLA #2 of 2: ")


@PROPERTY
@given(_ARBITRARY_TEXT)
def test_random_goodput_and_frontier_text_only_raise_syntax_errors(text: str) -> None:
    for parser in (parse_goodput_limits, GoodputLimits.parse, FrontierObjective.parse):
        try:
            parser(text)
        except SLASyntaxError as exc:
            assert repr(exc.expression) in str(exc) and exc.hint


_JUNK = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.integers(min_value=10**308, max_value=10**400),
        st.floats(),
        st.text(max_size=20),
        st.binary(max_size=6),
        st.sampled_from([*METRICS, "500ms", "< 5ms", "p99(ttft) < 5ms", "-1 s", "ttft < 5ms, tpot < 3ms"]),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.tuples(inner),
        st.frozensets(st.text(max_size=5), max_size=2),
        st.dictionaries(
            st.one_of(st.sampled_from(list(METRICS)), st.text(max_size=8), st.integers()), inner, max_size=3
        ),
    ),
    max_leaves=6,
)


@PROPERTY
@given(
    st.lists(_JUNK, max_size=3),
    st.dictionaries(st.sampled_from(["goodput", "goodput", "sla", "Goodput"]), _JUNK, max_size=2),
)
def test_sla_arguments_of_any_type_give_a_named_error(args: list[Any], kwargs: dict[str, Any]) -> None:
    """``SLA(*args, **kwargs)`` is what ``@pytest.mark.sla(...)`` and ``infmax.run(sla=...)`` build."""
    try:
        SLA(*args, **kwargs)
    except SLASyntaxError as exc:
        assert repr(exc.expression) in str(exc)
    except TypeError as exc:  # a value that is not an expression at all: say what it is
        message = str(exc)
        assert any(word in message for word in ("got", "argument")), message


@PROPERTY
@given(
    st.dictionaries(st.one_of(st.sampled_from(list(METRICS)), st.text(max_size=8), st.integers()), _JUNK, max_size=3)
)
def test_goodput_mapping_names_the_entry(spec: dict[Any, Any]) -> None:
    """The dict form ``goodput={"ttft": "500ms", "tpot": 0.05}``: a bad entry is named as written."""
    try:
        limits = parse_goodput_limits(spec)
    except SLASyntaxError as exc:
        message = str(exc)
        assert repr(exc.expression) in message and exc.hint, message
        if spec:
            assert any(exc.expression.startswith(f"{key}: ") for key in spec), message
    else:
        assert len(limits) == len(spec)
        assert parse_goodput_limits(", ".join(str(o) for o in limits)) == limits


# -- (b) valid expressions round-trip ---------------------------------------------------------------


@PROPERTY
@given(sla_expressions())
def test_valid_expressions_round_trip(case: tuple[str, bool]) -> None:
    text, valid = case
    assert valid
    objective = parse(text)
    canonical = str(objective)
    again = parse(canonical)
    assert again == objective and str(again) == canonical  # the canonical form is a fixed point
    assert objective.limit >= 0 and math.isfinite(objective.limit)
    assert Objective.parse(canonical) == objective


@PROPERTY
@given(st.lists(sla_expressions(), min_size=1, max_size=4))
def test_sla_round_trips_through_its_text(cases: list[tuple[str, bool]]) -> None:
    sla = SLA(*(text for text, _ in cases))
    assert SLA(str(sla)).objectives == sla.objectives
    assert SLA(*(str(o) for o in sla)).objectives == sla.objectives


@st.composite
def goodput_specs(draw: st.DrawFn) -> dict[str, Any]:
    names = draw(
        st.lists(st.sampled_from(["ttft", "tpot", "e2e", "interactivity"]), min_size=1, max_size=4, unique=True)
    )
    spec: dict[str, Any] = {}
    for name in names:
        info = METRICS[name]
        unit = draw(st.sampled_from(units_for(info)))
        number = _number_for(draw, info, unit)
        spec[name] = draw(
            st.one_of(
                st.just(f"{number} {unit}"),
                st.just(f"{'>=' if info.higher_is_better else '<'} {number}{unit}"),
                st.floats(min_value=0, max_value=1e6),
                st.integers(min_value=0, max_value=10**6),
            )
        )
    return spec


@PROPERTY
@given(goodput_specs())
def test_goodput_limits_round_trip_in_both_forms(spec: dict[str, Any]) -> None:
    limits = GoodputLimits.parse(spec)
    assert GoodputLimits.parse(str(limits)) == limits
    assert [o.metric for o in limits.limits] == list(spec)
    sla = SLA("p99(ttft) < 1s", goodput=spec)
    assert sla.goodput == limits


# -- (c) every setting, from every source ---------------------------------------------------------


class _FakeConfig:
    """What :func:`config.resolve` reads of a pytest config: options, ini values and two paths."""

    def __init__(self, options: dict[str, str], ini: dict[str, str], root: Path) -> None:
        self._options, self._ini = options, ini
        self.rootpath = root
        self.invocation_params = SimpleNamespace(dir=root)

    def getoption(self, name: str) -> Any:
        return self._options.get(name)

    def getini(self, name: str) -> Any:
        return self._ini.get(name, "")


_SPECIAL_VALUES = [
    "",
    " ",
    "0",
    "-1",
    "1",
    "1.5",
    "nan",
    "inf",
    "-inf",
    "1e400",
    "10" * 30,
    "1_0",
    "on",
    "off",
    "yes",
    "5%",
    "150%",
    "%",
    "50,90,99",
    "50,,0",
    "p99(ttft)",
    "p50(tpot), throughput",
    "median(e2e)",
    "vllm",
    "trtllm",
    "neocloud",
    "warn",
    "fail",
    "main",
    "a/b",
    "..",
    "'",
    '"',
    "a 'b",
    "{x}",
    "{port}",
    "{}",
    "srv --port {port}",
    "--profile b200/gpt-oss-120b",
    "http://127.0.0.1:8000",
    "https://h/v1",
    "localhost:8000",
    "http://",
    "http://[::1",
    "http://h:99999",
    "ftp://h",
    "/no/such/engine.yaml",
    "café",
    "tab\there",
    "new\nline",
    "\x1b[31m",
]
_RAW = st.one_of(st.sampled_from(_SPECIAL_VALUES), st.text(max_size=30))


def _source_label(setting: config_mod.Setting, source: str) -> str:
    return {"cli": setting.flag, "env": setting.env, "ini": setting.ini}[source]


def _render(value: Any) -> str:
    """A parsed setting value written back as text (for the round trip)."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return ",".join(v if isinstance(v, str) else repr(v) for v in value)
    if isinstance(value, float):
        return repr(value)
    return str(value)


@PROPERTY
@given(st.sampled_from(config_mod.SETTINGS), st.sampled_from(["cli", "env", "ini"]), _RAW)
def test_every_setting_is_accepted_or_refused_naming_itself_its_value_and_what_is_allowed(
    setting: config_mod.Setting, source: str, raw: str
) -> None:
    if source == "env" and "\x00" in raw:
        return  # no environment variable can hold a NUL
    root = Path("/nonexistent-infmax-root")
    options = {f"infmax_{setting.name}": raw} if source == "cli" else {}
    ini = {setting.ini: raw} if source == "ini" else {}
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFMAX_")}
    if source == "env":
        env[setting.env] = raw
    if source == "ini" and raw == "":
        return  # an empty ini value is "not set"
    label = _source_label(setting, source)
    with mock.patch.dict(os.environ, env, clear=True):
        try:
            resolved = config_mod.resolve(_FakeConfig(options, ini, root))
        except config_mod.SettingError as exc:
            message = str(exc)
            assert label in message and repr(raw) in message, message
            assert "must" in message, message  # ... and what is allowed
            return
        try:  # what pytest_configure does next: the server and the regression gate
            resolved.server_config()
            resolved.gate_settings(root)
        except config_mod.SettingError as exc:
            message = str(exc)
            # a combination the value makes impossible; the message points at the setting
            assert label in message or setting.flag in message or raw.strip() in message, message
            return
    value = getattr(resolved, setting.name)
    if setting.parse is not config_mod._text and value is not None and setting.name != "engine_config":
        expected = str(value) if isinstance(value, Path) else value
        assert setting.parse(_render(value)) == expected  # accepted values round-trip


@PROPERTY
@given(st.sampled_from([s for s in config_mod.SETTINGS if s.parse is not config_mod._text]), _RAW)
def test_setting_parsers_raise_only_value_errors_that_say_what_is_allowed(
    setting: config_mod.Setting, raw: str
) -> None:
    try:
        setting.parse(raw)
    except ValueError as exc:
        assert str(exc).startswith("must "), (setting.name, raw, str(exc))


# -- (d) marker arguments, through the plugin's collection hook -------------------------------------


class _FakeItem:
    def __init__(self, marks: list[pytest.Mark], path: Path) -> None:
        self._marks, self.path, self.nodeid = marks, path, "tests/test_perf.py::test_x"

    def iter_markers(self, name: str | None = None) -> Any:
        return (m for m in self._marks if name is None or m.name == name)

    def get_closest_marker(self, name: str) -> pytest.Mark | None:
        return next(self.iter_markers(name), None)


def _collect(marker: pytest.Mark) -> None:
    """Run the plugin's marker validation (pytest_collection_modifyitems) on one test with ``marker``."""
    config = SimpleNamespace(stash=pytest.Stash(), getini=lambda name: [])  # no marks of the project's own
    config.stash[plugin.STATE_KEY] = SimpleNamespace(settings=SimpleNamespace(server_config=ServerConfig))
    plugin.pytest_collection_modifyitems(config, [_FakeItem([marker], Path("/nonexistent/tests/test_perf.py"))])


def _mark(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> pytest.Mark:
    return pytest.Mark(name, args, kwargs, _ispytest=True)


def _check_marker(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """True when the marker was accepted; a refusal must be a UsageError naming test and marker."""
    try:
        _collect(_mark(name, args, kwargs))
    except pytest.UsageError as exc:
        message = str(exc)
        assert message.startswith(f"tests/test_perf.py::test_x: @pytest.mark.{name}: "), message
        assert len(message) > len(f"tests/test_perf.py::test_x: @pytest.mark.{name}: ") + 10, message
        return False
    return True


@PROPERTY
@given(
    st.lists(st.one_of(sla_expressions(wrong=True).map(lambda c: c[0]), _JUNK), max_size=3),
    st.dictionaries(st.sampled_from(["goodput", "sla", "limits", "gooput"]), _JUNK, max_size=2),
)
def test_sla_marker_arguments(args: list[Any], kwargs: dict[str, Any]) -> None:
    _check_marker("sla", tuple(args), kwargs)


_SERVER_KEYS = sorted(
    {f.name for f in dataclasses.fields(ServerConfig)}
    | set(MAPPING_KEYS)
    | set(engines.COMMON_OPTIONS)
    | {"port", "engine_opts", "timeout"}
)
_SERVER_VALUES = st.one_of(
    _JUNK,
    st.sampled_from(
        [
            "sim",
            "command",
            "endpoint",
            "vllm",
            "sglang",
            "trtllm",
            "http://127.0.0.1:8000",
            "localhost:8000",
            "--decode-step-ms 2",
            "'",
            "srv --port {port}",
            "{nope}",
            "model-x",
            "/no/such.yaml",
        ]
    ),
    st.floats(min_value=-10, max_value=1e4),
    st.integers(min_value=-2, max_value=16),
)


@PROPERTY
@given(st.lists(_JUNK, max_size=2), st.dictionaries(st.sampled_from(_SERVER_KEYS), _SERVER_VALUES, max_size=3))
def test_infmax_server_marker_arguments(args: list[Any], kwargs: dict[str, Any]) -> None:
    if not _check_marker("infmax_server", tuple(args), kwargs):
        return
    # Accepted: the configuration the fixture builds is usable as a pool key and describable.
    config = config_from_mapping(ServerConfig(), kwargs, base_dir=Path("/nonexistent/tests"))
    hash(config)
    assert isinstance(config.describe(), str) and config.gpus >= 1
    assert all(isinstance(a, str) for a in (*config.command, *config.sim_args, *config.extra_args))
    assert dict(config.env) is not None


@PROPERTY
@given(
    st.lists(_JUNK, max_size=2),
    st.dictionaries(
        st.sampled_from(["gpu_hour_usd", "tier", "usd_per_kwh", "price", "gpu_hour"]),
        st.one_of(_JUNK, st.sampled_from(list(TIERS)), st.floats(), st.integers()),
        max_size=3,
    ),
)
def test_infmax_price_marker_arguments(args: list[Any], kwargs: dict[str, Any]) -> None:
    if _check_marker("infmax_price", tuple(args), kwargs):
        options = price_marker_options(kwargs)
        assert all(math.isfinite(v) and v > 0 for k, v in options.items() if k != "price_tier")


def test_marker_mistakes_that_were_silently_ignored_or_crashed() -> None:
    """Found by the properties above: each was ignored, or a traceback at server start."""
    refused = [
        ("infmax_price", (3.5,), {}),  # positional: was ignored
        ("infmax_price", (), {"gpu_hour_usd": math.inf}),
        ("infmax_price", (), {"gpu_hour_usd": 10**400}),  # was OverflowError
        ("infmax_server", ({"sim_args": "--x"},), {}),  # positional: was ignored
        ("infmax_server", (), {"endpoint": "localhost:8000"}),  # was a ValueError inside urllib at setup
        ("infmax_server", (), {"env": "CUDA_VISIBLE_DEVICES=0"}),  # was a ValueError at server start
        ("infmax_server", (), {"model": ["a"]}),  # was unhashable: TypeError in the server pool
        ("infmax_server", (), {"command": [None]}),  # was AttributeError
        ("infmax_server", (), {"shutdown_grace": "soon"}),  # was a TypeError at teardown
        ("sla", (), {"goodput": {"ttft": 10**400}}),  # was OverflowError
        ("sla", ({"p99(ttft)": "< 5ms"},), {}),  # a dict: its keys were taken as expressions
        ("sla", (), {}),  # no objectives: passed, having checked nothing
        ("sla", (), {"goodput": "ttft < 1s"}),  # limits alone judge nothing
        ("slaa", ("p99(ttft) < 1ms",), {}),  # a typo: pytest only warned, the test ran without an SLA
        ("infmax_sever", (), {"sim_args": "--x"}),  # a typo: the test ran on the default server
        # two servers named: one was silently ignored
        ("infmax_server", (), {"command": "srv --port {port}", "endpoint": "http://127.0.0.1:9"}),
        ("infmax_server", (), {"sim_args": "--decode-step-ms 2", "endpoint": "http://127.0.0.1:9"}),
        ("infmax_server", (), {"engine": "vllm", "model": "m", "command": "srv --port {port}"}),
    ]
    for name, args, kwargs in refused:
        assert not _check_marker(name, args, kwargs), (name, args, kwargs)


# -- (e) through pytest, as users run it ---------------------------------------------------------


@pytest.mark.parametrize(
    ("files", "argv", "expected"),
    [
        (
            {
                "test_perf.py": """
        import pytest

        @pytest.mark.infmax_server(startup_timeout="fast", sim_args="--decode-step-ms 2")
        def test_x(infmax):
            infmax.run("1k1k-mini", concurrency=1, num_requests=1)
    """
            },
            [],
            "*test_x: @pytest.mark.infmax_server: startup_timeout must be a finite number of seconds > 0, got 'fast'*",
        ),
        (
            {"test_perf.py": "def test_x():\n    pass\n"},
            ["--infmax-request-timeout", "soon"],
            "*--infmax-request-timeout = 'soon' is not valid: must be a positive number*",
        ),
        (
            {
                "test_perf.py": "def test_x():\n    pass\n",
                "pytest.ini": "[pytest]\ninfmax_server_command = srv --port '{port}\n",
            },
            [],
            '*ini option infmax_server_command = "srv --port \'{port}" is not valid: must be a command template that split*',
        ),
        (
            {"test_perf.py": "def test_x():\n    pass\n"},
            ["--infmax-endpoint", "localhost:8000"],
            "*--infmax-endpoint = 'localhost:8000' is not valid: must be an http:// or https:// URL*",
        ),
    ],
    ids=["marker", "option", "ini", "endpoint"],
)
def test_bad_input_is_a_usage_error_without_a_traceback(
    pytester: pytest.Pytester, no_leaked_servers: None, files: dict[str, str], argv: list[str], expected: str
) -> None:
    for name, body in files.items():
        (pytester.path / name).write_text(textwrap.dedent(body))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", *argv, timeout=120)
    out = result.stdout.str() + "\n" + result.stderr.str()
    assert result.ret == pytest.ExitCode.USAGE_ERROR, out
    result.stderr.fnmatch_lines([expected])
    assert "Traceback" not in out and "INTERNALERROR" not in out, out
    assert "pytest_infmax/" not in out and "pytest_infmax\\" not in out, out  # no frame of ours
    assert not (pytester.path / ".infmax" / "logs").exists()  # refused before any server started
