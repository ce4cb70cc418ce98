"""Root conftest: pytester for the plugin's tests; README.md and docs/*.md as tests (Sybil)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest

# pytester drives the plugin the way users run it: a pytest run in a subprocess.
pytest_plugins = ["pytester"]


def _load_docs_support() -> Any:
    """tests/docs_support.py, under the name the tests import it by (tests/ is on their sys.path)."""
    if "docs_support" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "docs_support", Path(__file__).parent / "tests" / "docs_support.py"
        )
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["docs_support"] = module
        spec.loader.exec_module(module)
    return sys.modules["docs_support"]


try:
    _docs = _load_docs_support()
except ModuleNotFoundError as exc:
    # Sybil comes with the test extra. `pip install -e .` then `pytest examples` (the README's
    # way without make) needs only the package: the documents are then not collected, and a
    # run that asks for them (a bare `pytest` takes them from testpaths) is told what to install.
    _docs, _missing = None, exc.name

    def pytest_configure(config: pytest.Config) -> None:
        wanted = [a for a in config.args if Path(a.split("::")[0]).suffix == ".md" or Path(a).name == "docs"]
        if wanted:
            raise pytest.UsageError(
                f"{', '.join(wanted)}: the documents run as tests through {_missing}, which is not "
                "installed: pip install -e '.[test]' (or make test)"
            )
else:
    # Every ```python and ```console block of README.md and docs/*.md is a test (tests/docs_support.py).
    pytest_collect_file = _docs.make_sybil(Path(__file__).parent).pytest()


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """Under -n (--dist load), keep each document's examples together on one worker."""
    if _docs is not None and config.getvalue("dist") == "load":
        return _docs.document_scheduler(config, log)
    return None
