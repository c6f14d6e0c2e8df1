"""Connections accepted after start-up have Nagle's algorithm off, even on a listener bound like Streamlit binds."""

from __future__ import annotations

import os
import socket

from clawdbot.tcp_nodelay import disable_nagle_on_listeners, listening_tcp_sockets


def _nodelay(sock: socket.socket) -> int:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


def test_a_connection_accepted_after_the_fix_has_tcp_nodelay() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:  # protocol 0, as Streamlit binds it
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        with socket.create_connection(listener.getsockname()) as _before, listener.accept()[0] as accepted:
            assert _nodelay(accepted) == 0  # what asyncio leaves on such a listener's connections
        assert listener.fileno() in listening_tcp_sockets()

        assert disable_nagle_on_listeners() >= 1
        with socket.create_connection(listener.getsockname()) as _after, listener.accept()[0] as accepted:
            assert _nodelay(accepted) == 1


def test_connected_sockets_are_not_taken_for_listeners() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        with socket.create_connection(listener.getsockname()) as client, listener.accept()[0] as accepted:
            found = listening_tcp_sockets()
            assert listener.fileno() in found
            assert client.fileno() not in found and accepted.fileno() not in found


def test_no_descriptor_is_left_open_behind() -> None:
    """A leaked duplicate of a pipe kept the Playwright driver waiting for end of file: the suite hung."""
    read_end, write_end = os.pipe()
    try:
        before = sorted(os.listdir("/proc/self/fd"))
        listening_tcp_sockets()
        disable_nagle_on_listeners()
        assert sorted(os.listdir("/proc/self/fd")) == before
    finally:
        os.close(read_end)
        os.close(write_end)
