"""The components the supervisor owns, as it sees them: an inbox and a lifecycle."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from keter.messages import Component


class Teller(Protocol):
    """What the supervisor needs of a component: an inbox and a lifecycle."""

    component: Component

    def tell(self, message: object) -> None: ...
    def start(self) -> None: ...
    def restart(self) -> None: ...
    def join(self, timeout: float | None = None) -> None: ...


@dataclass(kw_only=True)
class Components:
    """The components the supervisor owns (real actors, or fakes in tests)."""

    watcher: Teller
    unpacker: Teller
    monitor: Teller
    nginx: Teller
    postgres: Teller
    backups: Teller
    status: Teller | None = None
    stats: Teller | None = None  # traffic statistics (keter.stats); None with traffic-stats off
    switch: Teller | None = None  # None: reload mode, drains end after drain-seconds
    acme: Teller | None = None  # certificates for ssl: acme (keter.acme)

    def all(self) -> list[Teller]:
        parts = [self.watcher, self.unpacker, self.monitor, self.nginx, self.postgres, self.backups]
        optional = (self.status, self.stats, self.switch, self.acme)
        return [*parts, *(c for c in optional if c is not None)]
