"""Asking nginx itself which config it serves.

Every main file keter writes has a status server (``STATUS_HOST``) that
answers ``/generation`` with the config's generation number, and names the
worker process that answered in a header.
"""

from __future__ import annotations

import http.client

from keter.nginx.render import STATUS_HOST, STATUS_PATH, WORKER_HEADER

SOCKET_TIMEOUT = 0.25


def probe(host: str, port: int, timeout: float = SOCKET_TIMEOUT) -> tuple[str, int | None] | None:
    """(generation, pid of the worker that answered) from nginx's status server, or None."""
    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        connection.request("GET", STATUS_PATH, headers={"Host": STATUS_HOST, "Connection": "close"})
        response = connection.getresponse()
        body = response.read()
        worker = response.getheader(WORKER_HEADER)
    except (OSError, http.client.HTTPException):
        return None
    finally:
        connection.close()
    if response.status != 200:
        return None
    pid = int(worker) if worker and worker.isdigit() else None
    return body.decode(errors="replace").strip(), pid


def fetch_generation(host: str, port: int, timeout: float = SOCKET_TIMEOUT) -> str | None:
    """The generation nginx's status server reports, or None if it does not answer."""
    answer = probe(host, port, timeout)
    return answer[0] if answer is not None else None
