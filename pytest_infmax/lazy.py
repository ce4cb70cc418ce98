"""Heavy third-party modules, imported where they are first used, not where they are named.

pytest imports the plugin in every session, perf tests or not, and the plugin imports the
settings, the gate and what they name; numpy, scipy, aiohttp, prometheus_client and yaml
would cost most of a second there (docs/performance.md has the measurement). So a module
of the package names them like this::

    if TYPE_CHECKING:
        import numpy as np
    else:
        np = lazy_module("numpy")

mypy reads the real import; at run time ``np`` is a stand-in that imports numpy at its
first attribute read (``np.asarray``) and keeps what it read, so a later read costs what
a module attribute's does. The stand-in is not put in ``sys.modules``: ``"numpy" in
sys.modules`` stays false until something uses numpy, which tests/test_startup.py holds
for a session without perf tests. A name imported from a heavy module
(``from scipy.interpolate import PchipInterpolator``) becomes an attribute read of its
module's stand-in where it is used (``interpolate.PchipInterpolator``).
"""

from __future__ import annotations

import importlib
import os
import sys
import types
from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any

#: Third-party modules that cost tens of milliseconds to seconds to import, none of which a
#: session without perf tests needs: tests/test_startup.py holds that, benchmarks/startup.py
#: reports it.
HEAVY_MODULES = (
    "numpy",
    "scipy",
    "matplotlib",
    "openai",
    "prometheus_client",
    "aiohttp",
    "msgspec",
    "yaml",
    "uvloop",
    "httptools",
    "pynvml",
    "ray",  # seconds: only a run with ray= (--infmax-ray) imports it
)


class LazyModule(types.ModuleType):
    """Stands in for the module named ``name`` until an attribute of it is read."""

    def __getattr__(self, attr: str) -> Any:
        # Called only for what is not yet on the stand-in: the first read of each attribute.
        value = getattr(importlib.import_module(self.__name__), attr)
        setattr(self, attr, value)
        return value

    def __repr__(self) -> str:
        return f"<lazy module {self.__name__!r}>"


def lazy_module(name: str) -> Any:
    """A stand-in for the module ``name`` (``"numpy"``, ``"scipy.stats"``), imported at first use."""
    return LazyModule(name)


def lazy_attributes(namespace: dict[str, Any], names: Mapping[str, Sequence[str]]) -> tuple[Any, Any]:
    """A package's ``__getattr__`` and ``__dir__`` (PEP 562) for public names that live in its
    modules, ``names`` = {module: (name, ...)}: each module is imported when one of its names is
    first read (``from pytest_infmax import Infmax`` reads it), and the name is then kept in the
    package's ``namespace`` (its ``globals()``), found there directly from then on."""
    where = {name: module for module, listed in names.items() for name in listed}
    package = namespace["__name__"]

    def __getattr__(name: str) -> Any:
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *where})

    return __getattr__, __dir__


#: OpenBLAS (numpy's BLAS) reads this once, when numpy loads it: how long an idle BLAS thread
#: spins before it sleeps, 2^N CPU cycles (N from 4 to 30; its default, 28, is ~0.1 s).
BLAS_SPIN_ENV = "OPENBLAS_THREAD_TIMEOUT"
BLAS_SPIN_QUIET = "4"


def quiet_blas_threads(env: MutableMapping[str, str] | None = None) -> None:
    """Idle OpenBLAS threads sleep at once instead of spinning: sets ``OPENBLAS_THREAD_TIMEOUT=4``
    in ``env`` (a child's environment) or, where ``env`` is None, in this process's before it
    imports numpy. A value already set, the user's, is kept.

    Why: at numpy's import, and after each threaded BLAS call, OpenBLAS's threads spin ~0.1 s
    on the other cores before they sleep. A run uses no BLAS, so that is a core's CPU taken
    from the server under test when both share a host, as in CI: measured here (2 cores),
    ``import numpy`` costs 0.18 CPU-s with the spin and 0.06 without, and a pytest run of
    128 requests at 64 streams 0.93 against 0.82 CPU-s (docs/performance.md, "At
    InferenceMAX's own run length, and the BLAS threads"). The threads stay:
    BLAS calls are as parallel as before, and wake them from sleep instead of a spin."""
    if env is None:
        if "numpy" in sys.modules:
            return  # OpenBLAS has read its setting already
        env = os.environ
    env.setdefault(BLAS_SPIN_ENV, BLAS_SPIN_QUIET)
