"""The server under test: starting, probing and stopping it (:mod:`.launch`), engine
command lines and configuration (:mod:`.engines`), and the GPUs it runs on (:mod:`.telemetry`)."""

from pytest_infmax.servers.launch import (
    PortInUse,
    Server,
    ServerConfig,
    ServerError,
    ServerPool,
    command_from_template,
    config_from_mapping,
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
