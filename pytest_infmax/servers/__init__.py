"""The server under test: what to test (:mod:`.config`), starting and stopping it
(:mod:`.launch`), its processes (:mod:`.processes`, under :mod:`.supervisor`), whether it is
ready (:mod:`.readiness`), engine command lines (:mod:`.engines`), the model's vocabulary
(:mod:`.vocab`), and the GPUs it runs on (:mod:`.telemetry`)."""

from typing import TYPE_CHECKING

from pytest_infmax.lazy import lazy_attributes

if TYPE_CHECKING:
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

# imported at first use, not with the package: its config and engines are read at every pytest
# start (the settings), its launcher only where a server starts (pytest_infmax/lazy.py)
if not TYPE_CHECKING:  # mypy reads the imports above; a name not listed is an error there too
    __getattr__, __dir__ = lazy_attributes(
        globals(),
        {
            "pytest_infmax.servers.config": ("ServerConfig", "command_from_template", "config_from_mapping"),
            "pytest_infmax.servers.errors": ("ServerError",),
            "pytest_infmax.servers.launch": (
                "PortInUse",
                "Server",
                "ServerPool",
                "connect_endpoint",
                "require_gpus_released",
                "restart_server",
                "running_server",
                "start_server",
            ),
        },
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
