"""The error every part of starting, reaching and stopping a server raises."""

from __future__ import annotations


class ServerError(RuntimeError):
    """The server under test could not be started, reached, or stopped."""
