"""A real HTTP server on 127.0.0.1 for the tool tests, and a sales workbook built as `Document`s.

The server records every request it receives, so a test of a refused call can show that nothing was sent.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from clawdbot.documents import Document, Table

SALES_ROWS: list[list[Any]] = [
    ["Berlin", "2025-01", 1200.5],
    ["Munich", "2025-01", 3400],
    ["Hamburg", "2025-01", "2,100"],
    ["Cologne", "2025-01", 800],
    ["Berlin", "2025-02", 1500],
    ["Munich", "2025-02", 2900],
    ["Hamburg", "2025-02", 2500],
    ["Cologne", "2025-02", 950],
    ["Frankfurt", "2025-02", 3000],
    ["Frankfurt", "2025-03", 1900],
    ["Stuttgart", "2025-03", None],
    ["Stuttgart", "2025-03", 400],
]
"""Totals: Munich 6300, Frankfurt 4900, Hamburg 4600, Berlin 2700.5, Cologne 1750, Stuttgart 400."""
TOP_THREE = ["Munich", "Frankfurt", "Hamburg"]


def sales_document(name: str = "sales.xlsx") -> Document:
    return Document(
        name=name,
        sha256="0" * 64,
        kind="xlsx",
        pages=["City Month Sales"],
        tables=[
            Table("Sales", ["City", "Month", "Sales"], [list(r) for r in SALES_ROWS]),
            Table("Notes", ["Note"], [["prices in EUR"]]),
        ],
    )


@dataclass
class Received:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes


@dataclass
class ToolServer:
    """What the server received, and its port."""

    port: int
    received: list[Received] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _answer(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in {"Content-Type": "application/json", **(headers or {})}.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _handle(self) -> None:
        parts = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        self.server.state.received.append(
            Received(
                self.command,
                parts.path,
                parse_qs(parts.query),
                {k.lower(): v for k, v in self.headers.items()},
                body,
            )
        )
        path = parts.path
        if path == "/loop":
            self._answer(302, b"", {"Location": "/loop"})
        elif path.startswith("/redirect"):
            target = parse_qs(parts.query)["to"][0]
            self._answer(int(parse_qs(parts.query).get("status", ["302"])[0]), b"", {"Location": target})
        elif path == "/big":
            self._answer(200, b"x" * 100_000, {"Content-Type": "text/plain"})
        elif path == "/slow":
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", "100")
            self.end_headers()
            for _ in range(100):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.05)
        elif path == "/fail":
            self._answer(500, b'{"error": "the weather service is down"}')
        else:
            echo = {
                "method": self.command,
                "path": path,
                "query": parse_qs(parts.query),
                "host": self.headers.get("Host"),
                "json": json.loads(body) if body else None,
                "temperature": 21.5,
            }
            self._answer(200, json.dumps(echo).encode())

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _handle


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that stopped reading (size cap, timeout) is what those tests want

    def __init__(self, state: ToolServer | None = None) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.state = state or ToolServer(self.server_address[1])


@contextmanager
def tool_server() -> Iterator[ToolServer]:
    """A real HTTP server on 127.0.0.1 (free port), stopped afterwards."""
    server = _Server()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield server.state
    finally:
        server.shutdown()
        server.server_close()
