"""pytest-infmax: LLM inference SLA regression testing as pytest cases.

Data flows one way: server (``servers``) -> load (``load``) -> records
(``records``) -> metrics (``metrics``) -> verdicts (``sla``) -> reports
(``reports``). ``runner.Infmax`` ties them together; ``plugin`` only wires
pytest to it.
"""

__version__ = "0.1.0"

from .load import LoadConfig, LoadConfigError  # noqa: E402
from .metrics import Distribution, GoodputLimits, Metrics, compute_metrics  # noqa: E402
from .records import ErrorKind, RequestRecord, TokenSource  # noqa: E402
from .results import LoadResult  # noqa: E402
from .runner import Infmax  # noqa: E402
from .scenarios import PRESETS, Scenario, get_scenario  # noqa: E402
from .servers import Server, ServerConfig, ServerError, running_server  # noqa: E402
from .sla import SLA, Objective, SLAFailed, SLASyntaxError, Verdict  # noqa: E402

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
    "ServerError",
    "TokenSource",
    "Verdict",
    "compute_metrics",
    "get_scenario",
    "running_server",
]
