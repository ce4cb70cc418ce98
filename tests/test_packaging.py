"""What `pip install -e '.[test]'` installs is enough to collect and run the suite.

tests/test_security.py and tests/test_workers.py once imported psutil, which only the
`integration` extra brought in: `pytest --co` stopped at collection in a venv made as the
README says. Every module the tests, examples and conftest files import at module level
must come from the package's own dependencies or its `test` extra.
"""

from __future__ import annotations

import ast
import sys
from importlib.metadata import packages_distributions, requires
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent


def _declared(extra: str) -> set[str]:
    """Distribution names (normalised) the core dependencies and ``extra`` declare, with the
    extras of this package that ``extra`` names (``pytest-infmax[postgres]`` in ``test``)."""
    names = set()
    for line in requires("pytest-infmax") or []:
        req = Requirement(line)
        marker = req.marker
        if marker is None or marker.evaluate({"extra": extra}) or marker.evaluate({"extra": ""}):
            name = req.name.lower().replace("_", "-")
            names.add(name)
            if name == "pytest-infmax":
                for inner in req.extras - {extra}:
                    names |= _declared(inner)
    return names


def _module_level_imports(path: Path) -> set[str]:
    """Top-level package names imported at module level (not inside functions: those may skip)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_everything_the_tests_import_is_declared_in_the_test_extra() -> None:
    declared = _declared("test") | {"pytest-infmax"}
    provided = packages_distributions()  # import name -> distributions that ship it
    files = [*ROOT.glob("tests/*.py"), *ROOT.glob("examples/*.py"), ROOT / "conftest.py"]
    local = {p.stem for p in files} | {"pytest_infmax", "_sim_helpers", "_hostile_server"}
    missing = {}
    for path in files:
        for name in _module_level_imports(path) - local - set(sys.stdlib_module_names):
            # Python 3.10's packages_distributions() misses some installs (uv's among them):
            # there the import name is taken as the distribution's, as it is for every miss seen
            dists = {d.lower().replace("_", "-") for d in provided.get(name) or [name]}
            if not dists & declared:
                missing.setdefault(name, []).append(path.relative_to(ROOT).as_posix())
    assert not missing, f"imported at module level but not declared in [test] or the dependencies: {missing}"
