"""TCP_NODELAY for the server's connections, which Streamlit's own socket binding leaves off.

Why: Streamlit 1.67 binds its listening socket itself (`socket.socket(AF_INET, SOCK_STREAM)`, protocol 0) and
hands it to uvicorn; asyncio turns Nagle's algorithm off only for sockets whose protocol is IPPROTO_TCP, so the
accepted connections keep it on. A response written in two parts (headers, then body) then waits for the client's
delayed ACK: about 40 ms on every request after the first on a keep-alive connection, which is how API clients
(the `openai` client, monitors polling /health) talk. On Linux an accepted connection inherits TCP_NODELAY from
its listening socket, so setting it on the listeners once at start-up fixes every later connection.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from pathlib import Path

log = logging.getLogger(__name__)

_FD_DIR = Path("/proc/self/fd")


def listening_tcp_sockets() -> list[int]:
    """File descriptors of this process's bound, unconnected TCP sockets (listeners); empty where /proc is not."""
    found = []
    try:
        descriptors = [int(name) for name in os.listdir(_FD_DIR)]
    except OSError:
        return []
    for fd in descriptors:
        probe = _socket_of(fd)
        if probe is None:
            continue
        with probe:
            if probe.family not in (socket.AF_INET, socket.AF_INET6) or probe.type != socket.SOCK_STREAM:
                continue
            try:
                probe.getpeername()
                continue  # connected: not a listener
            except OSError:
                pass
            with contextlib.suppress(OSError):
                if probe.getsockname()[1]:
                    found.append(fd)
    return found


def _socket_of(fd: int) -> socket.socket | None:
    """A socket object over a duplicate of `fd` (closing it leaves `fd` open); None when `fd` is no socket.

    The duplicate is closed on every path: a leaked copy of, say, a pipe's write end would keep that pipe open
    and the process at its other end waiting for an end of file that never comes.
    """
    try:
        duplicate = os.dup(fd)
    except OSError:
        return None  # closed meanwhile
    try:
        return socket.socket(fileno=duplicate)
    except OSError:
        os.close(duplicate)
        return None


def disable_nagle_on_listeners() -> int:
    """Set TCP_NODELAY on every listening TCP socket of this process; returns how many were set."""
    count = 0
    for fd in listening_tcp_sockets():
        listener = _socket_of(fd)
        if listener is None:
            continue
        try:
            with listener:
                listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            count += 1
        except OSError as exc:
            log.warning("could not turn off Nagle's algorithm on a listening socket: %s", exc)
    return count
