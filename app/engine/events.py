"""What the engine reports as it works, for a transport to count (app.api.metrics implements it).

The engine knows no Prometheus: it calls these hooks, and NoEvents ignores them.
"""

from __future__ import annotations

from typing import Protocol

from app.bundle.format import Bundle


class Events(Protocol):
    def model_ready(self, bundle: Bundle, method: str) -> None:
        """A model (first or reloaded) serves from now on, `method` by default."""

    def reload_finished(self, succeeded: bool) -> None: ...

    def queue_depth(self, admitted: int) -> None:
        """Scoring requests admitted and not yet answered."""

    def rejected(self) -> None:
        """A request refused because the queue was full."""

    def timed_out(self) -> None:
        """A request that ran past the time limit."""

    def merged(self, rows: int, waited: list[float]) -> None:
        """A coalesced batch of `rows` rows, and how long each of its requests waited (s)."""


class NoEvents:
    """Events nobody counts: the command line, tests, a library user."""

    def model_ready(self, bundle: Bundle, method: str) -> None:
        pass

    def reload_finished(self, succeeded: bool) -> None:
        pass

    def queue_depth(self, admitted: int) -> None:
        pass

    def rejected(self) -> None:
        pass

    def timed_out(self) -> None:
        pass

    def merged(self, rows: int, waited: list[float]) -> None:
        pass
