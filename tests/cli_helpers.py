"""Running the installed `clawdbot` command as a real process, as users and scripts do."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

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
