"""Testbed versus treatment: which server options say *where* numbers were measured, and
which say *what was done to it*.

A baseline is keyed by its testbed (GPU, driver, engine, model and the server's options),
and a comparison across testbeds is refused. Some options are not the testbed but the
change under test: the simulator's ``--slowdown`` (a regression of known size) and its
timing-noise flags (``--start-jitter`` ...) make every start slower or noisier, which is
exactly what the gate is there to measure. Those are *treatment* options: they are left
out of the testbed's ``server_options`` and kept with each saved run instead, so
``--infmax-save main`` followed by ``--infmax-compare main --infmax-sim-args "--slowdown 1.3"``
compares the two and reports the regression.

A project declares its own treatment options with ``--infmax-treatment-option`` (ini
``infmax_treatment_option``, env ``INFMAX_TREATMENT_OPTION``), e.g.
``--infmax-treatment-option=--enable-chunked-prefill,--max-num-seqs``.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence

#: the simulator's option groups whose flags are treatment, not testbed
_SIM_TREATMENT_GROUPS = ("noise",)
#: further simulator flags that are treatment
_SIM_TREATMENT_FLAGS = ("--slowdown",)


@functools.cache
def sim_treatment_flags() -> frozenset[str]:
    """The simulator's treatment flags: ``--slowdown`` and every flag of its noise group,
    read from its own parser (so a new noise flag is treatment without a second list)."""
    from pytest_infmax.sim import build_parser  # argparse only: the server is not imported

    flags = set(_SIM_TREATMENT_FLAGS)
    for group in build_parser()._action_groups:
        if group.title in _SIM_TREATMENT_GROUPS:
            for action in group._group_actions:
                flags.update(s for s in action.option_strings if s.startswith("--"))
    return frozenset(flags)


def parse_treatment_options(text: str) -> tuple[str, ...]:
    """``"--enable-chunked-prefill, max-num-seqs"`` -> ``("--enable-chunked-prefill", "--max-num-seqs")``.

    Names are split at commas and white space; a name without leading dashes gets ``--``
    (so ``--infmax-treatment-option max-num-seqs`` needs no ``=``). ValueError says what
    is allowed."""
    names = [n for n in text.replace(",", " ").split() if n]
    out = []
    for name in names:
        flag = name if name.startswith("-") else f"--{name}"
        bare = flag.lstrip("-")
        if not bare or "=" in flag or not all(c.isalnum() or c in "-_." for c in bare):
            raise ValueError(
                "must be server option names separated by commas, e.g. --enable-chunked-prefill,--max-num-seqs; "
                f"{name!r} is not one (a value is never part of the name)"
            )
        out.append(flag)
    return tuple(out)


def split_treatment(argv: Sequence[str], flags: Iterable[str]) -> tuple[list[str], list[str]]:
    """``(testbed options, treatment options)`` of a server command line.

    A treatment flag is taken out with its value: ``--flag=value``, or ``--flag value`` where
    the next argument is not itself an option (``-1`` and ``-0.5`` are values); a flag
    followed by an option, or last, is a switch and goes alone."""
    wanted = frozenset(flags)
    keep: list[str] = []
    treatment: list[str] = []
    i = 0
    while i < len(argv):
        arg = str(argv[i])
        name, eq, _ = arg.partition("=")
        if name not in wanted:
            keep.append(arg)
            i += 1
            continue
        treatment.append(arg)
        i += 1
        if not eq and i < len(argv) and _is_value(str(argv[i])):
            treatment.append(str(argv[i]))
            i += 1
    return keep, treatment


def _is_value(arg: str) -> bool:
    if not arg.startswith("-"):
        return True
    try:
        float(arg)
    except ValueError:
        return False
    return True


def treatment_flags_for(kind: str | None, declared: Iterable[str] = ()) -> frozenset[str]:
    """The treatment flags of a server of ``kind``: the simulator's own where it is the
    simulator, and those the project declared (``--infmax-treatment-option``) for any."""
    return (sim_treatment_flags() if kind == "sim" else frozenset()) | frozenset(declared)
