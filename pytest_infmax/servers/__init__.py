"""The server under test: what to test (:mod:`.config`), starting and stopping it
(:mod:`.launch`), its processes (:mod:`.processes`, under :mod:`.supervisor`), whether it is
ready (:mod:`.readiness`), engine command lines (:mod:`.engines`), the model's vocabulary
(:mod:`.vocab`), and the GPUs it runs on (:mod:`.telemetry`)."""

from pytest_infmax.servers.config import ServerConfig, command_from_template, config_from_mapping
from pytest_infmax.servers.errors import ServerError
from pytest_infmax.servers.launch import (
    PortInUse,
    Server,
    ServerPool,
    connect_endpoint,
    require_gpus_released,
    restart_server,
    running_server,
    start_server,
)

__all__ = [
    "PortInUse",
    "Server",
    "ServerConfig",
    "ServerError",
    "ServerPool",
    "command_from_template",
    "config_from_mapping",
    "connect_endpoint",
    "require_gpus_released",
    "restart_server",
    "running_server",
    "start_server",
]
