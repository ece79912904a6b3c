"""Switching versions without reloading nginx: stable addresses the kernel re-points.

- ``nft``: this ROOT's nftables table (names, scripts, running nft);
- ``nfnetlink``: changing the table's map by netlink, as every switch does;
- ``actor``: the ``Switch`` component (owns the table, confirms switches, watches drains);
- ``StablePorts``: the supervisor's allocator of stable ports (pure).
"""

from __future__ import annotations

from keter.switch.actor import Switch
from keter.switch.nft import Table


class NoStablePort(Exception):
    pass


class StablePorts:
    """Hands out stable ports on the switch address, one per web app, round-robin.

    Nothing listens on that address, so every port is free; round-robin makes a
    port just released (whose old connections may linger) the last to come back.
    """

    LOW, HIGH = 1024, 65535

    def __init__(self) -> None:
        self._in_use: set[int] = set()
        self._next = self.LOW

    def allocate(self) -> int:
        size = self.HIGH - self.LOW + 1
        for i in range(size):
            port = self.LOW + (self._next - self.LOW + i) % size
            if port not in self._in_use:
                self._in_use.add(port)
                self._next = port + 1
                return port
        raise NoStablePort("every stable port is in use")

    def release(self, port: int) -> None:
        self._in_use.discard(port)

    def __contains__(self, port: int) -> bool:
        return port in self._in_use


__all__ = ["NoStablePort", "StablePorts", "Switch", "Table"]
