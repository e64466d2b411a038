"""Connections: what a crowd of idle or slow clients can cost, bounded.

Each connection holds a file descriptor, a process has a limited number (1,024 soft by default), and
uvicorn keeps a connection that never sends a request open for ever: 1,100 idle connections made the
service deaf, its own health checks included. So, at start, the soft limit is raised to the hard one;
a connection that has not sent a complete request head within the idle timeout is closed; and the
connections are capped below the file limit (room is left for the store, the HTTP clients and the
log), the oldest connection still waiting for its request head making room for a new one. Between
requests on a kept-alive connection, uvicorn's own keep-alive timeout applies.

This bounds what reaches the process; the ingress in front should still limit connections per client
and time out slow bodies (docs/operations.md).
"""

from __future__ import annotations

import asyncio
import logging
import resource

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger("service.connections")

# Descriptors kept for everything but client connections: the store, its WAL and lock, the HTTP
# clients' pools, the log, the sandbox in development.
RESERVED = 64
# When the hard limit is unlimited, the soft one is raised this far (what the kernel allows by default).
UNLIMITED_TARGET = 65536


def raise_file_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard one; the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = UNLIMITED_TARGET if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit", extra={"soft": soft, "detail": str(exc)})
    return soft


def connection_cap(file_limit: int) -> int:
    return max(file_limit - RESERVED, 16)


def bounded_protocol(idle_timeout: float, cap: int) -> type[HttpToolsProtocol]:
    """uvicorn's HTTP/1.1 protocol with an idle timeout for the first request head and a cap.

    httptools' parser (C) rather than h11's (pure Python): h11 was about a fifth of the event
    loop's time on the ack path under load (see BENCHMARKS.md); both come with `uvicorn[standard]`.
    """
    waiting: dict[HttpToolsProtocol, asyncio.TimerHandle] = {}  # insertion order: oldest first

    class Bounded(HttpToolsProtocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > cap:
                oldest = next(iter(waiting), None)
                if oldest is None:
                    # Every connection is busy with a request: this one cannot be served now.
                    transport.close()
                    return
                waiting.pop(oldest).cancel()  # now, not at its connection_lost: it is going
                oldest.transport.close()
            waiting[self] = self.loop.call_later(idle_timeout, transport.close)

        def on_headers_complete(self) -> None:
            self._started()  # a request head has arrived
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._started()
            super().connection_lost(exc)

        def _started(self) -> None:
            timer = waiting.pop(self, None)
            if timer is not None:
                timer.cancel()

    return Bounded
