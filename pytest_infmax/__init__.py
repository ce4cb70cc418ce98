"""pytest-infmax: LLM inference SLA regression testing as pytest cases.

Data flows one way, and the packages follow it: the server under test
(``servers``) -> load against it (``load``) -> request records (``records``) ->
metrics and SLA verdicts (``measure``) -> one run end to end (``run``, whose
``runner.Infmax`` ties them together) -> baselines and the regression gate
(``baselines``) -> reports (``reports``). ``settings`` reads the configuration;
``plugin`` wires pytest to it all and ``cli`` is the ``infmax`` command. Each layer
imports only the layers below it (tests/test_architecture.py holds that).
"""

from typing import TYPE_CHECKING

from pytest_infmax.environment import __version__ as __version__
from pytest_infmax.lazy import lazy_attributes

if TYPE_CHECKING:
    from pytest_infmax.load.plan import LoadConfig, LoadConfigError
    from pytest_infmax.load.scenarios import PRESETS, Scenario, get_scenario
    from pytest_infmax.load.workloads import Sessions, Trace, WorkloadError
    from pytest_infmax.measure.metrics import Distribution, GoodputLimits, Metrics, compute_metrics
    from pytest_infmax.measure.sla import Objective, SLASyntaxError
    from pytest_infmax.measure.verdicts import SLA, SLAFailed, Verdict
    from pytest_infmax.records import ErrorKind, RequestRecord, TokenSource
    from pytest_infmax.run.results import LoadResult
    from pytest_infmax.run.runner import Infmax
    from pytest_infmax.servers import Server, ServerConfig, ServerError, running_server

# Each public name is imported from the module that defines it at its first use, not here:
# pytest imports this package in every session, for the plugin, and the runner's modules bring
# numpy, scipy and aiohttp (docs/performance.md).
if not TYPE_CHECKING:  # mypy reads the imports above; a name not listed is an error there too
    __getattr__, __dir__ = lazy_attributes(
        globals(),
        {
            "pytest_infmax.load.plan": ("LoadConfig", "LoadConfigError"),
            "pytest_infmax.load.scenarios": ("PRESETS", "Scenario", "get_scenario"),
            "pytest_infmax.load.workloads": ("Sessions", "Trace", "WorkloadError"),
            "pytest_infmax.measure.metrics": ("Distribution", "GoodputLimits", "Metrics", "compute_metrics"),
            "pytest_infmax.measure.sla": ("Objective", "SLASyntaxError"),
            "pytest_infmax.measure.verdicts": ("SLA", "SLAFailed", "Verdict"),
            "pytest_infmax.records": ("ErrorKind", "RequestRecord", "TokenSource"),
            "pytest_infmax.run.results": ("LoadResult",),
            "pytest_infmax.run.runner": ("Infmax",),
            "pytest_infmax.servers": ("Server", "ServerConfig", "ServerError", "running_server"),
        },
    )

__all__ = [
    "PRESETS",
    "SLA",
    "Distribution",
    "ErrorKind",
    "GoodputLimits",
    "Infmax",
    "LoadConfig",
    "LoadConfigError",
    "LoadResult",
    "Metrics",
    "Objective",
    "RequestRecord",
    "SLAFailed",
    "SLASyntaxError",
    "Scenario",
    "Server",
    "ServerConfig",
    "Sessions",
    "Trace",
    "WorkloadError",
    "ServerError",
    "TokenSource",
    "Verdict",
    "compute_metrics",
    "get_scenario",
    "running_server",
]
