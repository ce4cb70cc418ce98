"""A measured figure in the docs is only as good as the command that reproduces it.

README.md and docs/*.md name the benchmark that made each figure, in ```console blocks
(which the docs machinery runs or flag-checks, tests/docs_support.py), but also in
```text blocks of a run's output and in the prose's inline code. These tests hold every
one of those mentions to the scripts as they are today:

* every ``benchmarks/NAME.py`` the documents name exists;
* every flag a document passes to a benchmark, wherever it is written, is one the
  script's ``--help`` lists (a renamed or dropped flag fails here, naming the line);
* every benchmark script has at least one command in a ```console block, so that its
  figures come with a command a reader can copy.

It reads the documents and asks each script for its ``--help`` (all at once): a few
seconds, not a benchmark run.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from docs_support import ROOT, missing_flags, normalise, parse_console, prefetch_help

BENCHMARKS = ROOT / "benchmarks"
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SCRIPTS = {p.name for p in BENCHMARKS.glob("*.py")}
# The benchmarks a reader runs (the others, _wire_capture.py, are helpers they start).
RUNNABLE = sorted(name for name in SCRIPTS if not name.startswith("_"))

_FENCE = re.compile(r"^(?P<fence>`{3,})(?P<lang>[\w-]*)[^\n]*\n(?P<body>.*?)^(?P=fence)[ \t]*$", re.M | re.S)
_SPAN = re.compile(r"(?P<ticks>`+)(?P<code>[^`\n].*?)(?P=ticks)")
_SCRIPT = re.compile(r"(?<![\w/.-])(?P<dir>benchmarks/)?(?P<name>[A-Za-z_]\w*\.py)\b")
_FLAG = re.compile(r"--?[A-Za-z][\w-]*")
_END_OF_COMMAND = re.compile(r"\s#|\||;|&&|>")


@dataclass(frozen=True)
class Mention:
    where: str  # document:line
    script: str  # the name under benchmarks/
    named_as: str  # as written: benchmarks/NAME.py or NAME.py
    flags: tuple[str, ...]
    text: str  # the snippet it was found in

    def argv(self) -> tuple[str, ...]:
        return ("python", f"benchmarks/{self.script}", *self.flags)


def snippets(path: Path) -> Iterator[tuple[int, str]]:
    """(line, code) for every line of every fenced block and every inline code span."""
    text = path.read_text()
    for block in _FENCE.finditer(text):
        first = text.count("\n", 0, block.start("body")) + 1
        for offset, line in enumerate(block.group("body").splitlines()):
            yield first + offset, line
    # The prose: each block blanked to its newlines, so that the line numbers stay.
    rest = _FENCE.sub(lambda block: "\n" * block.group().count("\n"), text)
    for span in _SPAN.finditer(rest):
        yield rest.count("\n", 0, span.start()) + 1, span.group("code")


def flags_after(command: str) -> tuple[str, ...]:
    """The flags of the command that ``command`` starts: up to a comment, a pipe or ``--``
    (what follows ``--`` is handed on to another program, as lateness.py's simulator flags)."""
    command = _END_OF_COMMAND.split(command, maxsplit=1)[0]
    try:
        words = shlex.split(command)
    except ValueError:
        words = command.split()
    if "--" in words:
        words = words[: words.index("--")]
    return tuple(f for f in (w.split("=", 1)[0] for w in words) if _FLAG.fullmatch(f))


def mentions() -> list[Mention]:
    found = []
    for path in DOCUMENTS:
        for line, code in snippets(path):
            for match in _SCRIPT.finditer(code):
                name = match.group("name")
                if match.group("dir") is None and name not in SCRIPTS:
                    continue  # some other file (setup.py, plugin.py, ...)
                where = f"{path.relative_to(ROOT)}:{line}"
                found.append(Mention(where, name, match.group(), flags_after(code[match.end() :]), code.strip()))
    return found


def test_every_benchmark_the_docs_name_exists() -> None:
    found = mentions()
    assert len({m.script for m in found}) >= 10, (
        "the documents name fewer benchmarks than they did: is the parser broken?"
    )
    missing = [f"{m.where}: {m.named_as} (in `{m.text}`)" for m in found if m.script not in SCRIPTS]
    assert not missing, (
        "the documents name benchmarks that are not in benchmarks/; fix the name or drop the figure:\n"
        + "\n".join(missing)
    )


def test_every_flag_the_docs_pass_a_benchmark_is_in_its_argparse() -> None:
    with_flags = [m for m in mentions() if m.flags and m.script in SCRIPTS]
    assert len(with_flags) >= 15, "fewer documented benchmark commands than there were: is the parser broken?"
    prefetch_help([m.argv() for m in with_flags], ROOT)
    problems = [
        f"{m.where}: `{m.text}`: {problem}"
        for m in with_flags
        if (problem := missing_flags(m.argv(), ROOT)) is not None
    ]
    assert not problems, (
        "a documented benchmark command no longer matches the script; change the document "
        "(or give the script the flag back):\n" + "\n".join(problems)
    )


def test_every_benchmark_has_a_command_in_a_console_block() -> None:
    commanded = set()
    for path in DOCUMENTS:
        text = path.read_text()
        for block in _FENCE.finditer(text):
            if block.group("lang") != "console":
                continue
            for command in parse_console(block.group("body")):
                words = normalise(command.argv)
                if words[0] == "python" and len(words) > 1 and words[1].startswith("benchmarks/"):
                    commanded.add(words[1].removeprefix("benchmarks/"))
    without = [name for name in RUNNABLE if name not in commanded]
    assert not without, (
        "benchmarks whose figures have no command a reader can copy: give each a ```console block "
        f"next to its figures (and a flags-only rule in tests/docs_support.py POLICY if it is long): {without}"
    )


def test_the_parser_finds_commands_in_prose_text_blocks_and_console_blocks(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text(
        "Run `benchmarks/soak.py --quick` or `regression_error_rates.py --simulator`; not `setup.py --x`.\n"
        "\n"
        "```text\n"
        "$ .venv/bin/python benchmarks/lateness.py --runs 3 -- --profile b200/x   # the sim's flags\n"
        "```\n"
        "\n"
        "```console\n"
        "python benchmarks/startup.py --runs=15 | tee out  # and a comment --not-a-flag\n"
        "```\n"
        "Then `benchmarks/ray_start.py`.\n"
    )
    found = {(line, code.strip()) for line, code in snippets(doc)}
    assert (4, "$ .venv/bin/python benchmarks/lateness.py --runs 3 -- --profile b200/x   # the sim's flags") in found
    assert (1, "benchmarks/soak.py --quick") in found and (1, "setup.py --x") in found
    assert (10, "benchmarks/ray_start.py") in found  # prose after blocks keeps its line numbers
    got = {code: flags_after(code[m.end() :]) for _, code in found if (m := _SCRIPT.search(code))}
    assert got["benchmarks/soak.py --quick"] == ("--quick",)
    assert got["regression_error_rates.py --simulator"] == ("--simulator",)
    assert got["$ .venv/bin/python benchmarks/lateness.py --runs 3 -- --profile b200/x   # the sim's flags"] == (
        "--runs",
    )
    assert got["python benchmarks/startup.py --runs=15 | tee out  # and a comment --not-a-flag"] == ("--runs",)
