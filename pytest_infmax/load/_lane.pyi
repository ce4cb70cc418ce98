# The C extension's interface (_lane.c); mypy cannot read a compiled module.
from collections.abc import Callable

class LaneError(ValueError): ...

class Lane:
    def __init__(
        self,
        on_event: Callable[[bytes, float], object],
        on_block: Callable[[bytes, float], object],
        on_raw: Callable[[bytes, float], object],
        max_event_bytes: int,
        sink: object | None = None,
    ) -> None: ...
    @property
    def done(self) -> bool: ...
    def feed(self, data: bytes, t: float, /) -> int: ...
    def take_rest(self) -> bytes: ...
    def attach(
        self,
        on_end: Callable[[int, int, float], object],
        on_error: Callable[[Exception], object],
        clock: Callable[[], float],
        /,
    ) -> None: ...
    def data_received(self, data: bytes, /) -> None: ...
    @property
    def content_events(self) -> int: ...
