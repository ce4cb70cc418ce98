"""pytest-infmax: LLM inference SLA regression testing as pytest cases.

Data flows one way, and the packages follow it: the server under test
(``servers``) -> load against it (``load``) -> request records (``records``) ->
metrics and SLA verdicts (``measure``) -> one run end to end (``run``, whose
``runner.Infmax`` ties them together) -> baselines and the regression gate
(``baselines``) -> reports (``reports``). ``settings`` reads the configuration;
``plugin`` wires pytest to it all and ``cli`` is the ``infmax`` command. Each layer
imports only the layers below it (tests/test_architecture.py holds that).
"""

from pytest_infmax.environment import __version__ as __version__
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
