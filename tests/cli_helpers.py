"""Running the installed `clawdbot` command as a real process, as users and scripts do."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import httpx

CLAWDBOT = str(Path(sys.executable).parent / "clawdbot")


def clean_env(db_url: str, data_dir: Path, **extra: str) -> dict[str, str]:
    """The environment minus any clawdbot settings of the caller, plus the given database and data dir."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLAWDBOT_") and k != "OLLAMA_HOST"}
    env.update(CLAWDBOT_DATABASE_URL=db_url, CLAWDBOT_DATA_DIR=str(data_dir), **extra)
    return env


def run_cli(
    args: list[str], db_url: str, cwd: Path, stdin: str | None = None, **extra: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CLAWDBOT, *args], cwd=cwd, env=clean_env(db_url, cwd / "data", **extra), input=stdin,
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


START_TIMEOUT = 90.0


@contextmanager
def clawdbot_run(workdir: Path, env: Mapping[str, str]) -> Iterator[str]:
    """`clawdbot run` on a free port in `workdir` (its output in server.log); yields its URL once it serves."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = workdir / "server.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [CLAWDBOT, "run", "--port", str(port)],
            cwd=workdir,
            env=dict(env),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            _wait_until_serving(url, proc, log_path)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()


def _wait_until_serving(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"clawdbot run exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"{url}/signin", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"clawdbot run did not serve {url} within {START_TIMEOUT:.0f} s:\n{log.read_text()}")
