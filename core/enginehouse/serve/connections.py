"""Connections: how long a client may take to send a request's headers, and how many may be
open at once (uvicorn has neither: 1100 half-sent requests under a 1024-descriptor limit made
the server unreachable). The body's own deadline is kept by the app (`_Gate`), which reads it.

`guarded_protocol` wraps uvicorn's own HTTP protocol class: a connection that has not sent a
request's complete headers within `header_timeout` seconds of opening (or of its last answer,
when kept alive) is closed, and a connection beyond `max_connections` gets a 503 and is closed
at once, so that descriptors stay free for the rest of the server.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
from typing import Any

from uvicorn.protocols.http.auto import AutoHTTPProtocol

log = logging.getLogger(__name__)

_RESERVED_DESCRIPTORS = 128  # files, pipes and sockets the server needs besides connections


def _busy_answer(limit: int) -> bytes:
    body = json.dumps(
        {
            "error": {
                "message": f"this server holds {limit} connections already "
                "(--max-connections); try again shortly",
                "type": "server_error",
                "param": None,
                "code": None,
            }
        }
    ).encode()
    head = (
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


def guarded_protocol(header_timeout: float, max_connections: int) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol (h11 or httptools), with a header deadline and a connection
    cap."""
    busy = _busy_answer(max_connections)

    class GuardedProtocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                log.warning(
                    "refused a connection: %d are open (--max-connections)", max_connections
                )
                transport.write(busy)
                transport.close()
                return
            self._await_headers()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._await_headers()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            super().connection_lost(exc)

        def _await_headers(self) -> None:
            """Close the connection unless a new request's headers are complete in time."""
            if self._header_timer is not None:
                self._header_timer.cancel()
            waiting = self.cycle  # a complete request makes a new cycle

            def check() -> None:
                idle = self.cycle is None or self.cycle.response_complete
                if self.cycle is waiting and idle and not self.transport.is_closing():
                    self.transport.close()

            self._header_timer = self.loop.call_later(header_timeout, check)

    return GuardedProtocol


def raise_descriptor_limit(target: int = 65535) -> int:
    """Raise this process's soft limit on open files towards `target` (as far as the hard limit
    allows), as vLLM's server does; returns the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = target if hard == resource.RLIM_INFINITY else min(target, hard)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):
            pass
    return soft


def connection_cap(max_connections: int) -> int:
    """`max_connections`, lowered where this process may not open that many descriptors."""
    soft = raise_descriptor_limit()
    if soft == resource.RLIM_INFINITY:
        return max_connections
    room = max(1, soft - _RESERVED_DESCRIPTORS)
    if room < max_connections:
        log.warning(
            "--max-connections %d lowered to %d: this process may open %d files (ulimit -n)",
            max_connections,
            room,
            soft,
        )
    return min(max_connections, room)
