"""`GET /health`: whether the database, the model server and the GPU answer, for load balancers and operators.

It stays 200 with `"status": "degraded"` when a part is down, so a monitor can read which part; a machine
without an NVIDIA driver is healthy (the GPU may sit behind a remote Ollama), and says so.
"""

from __future__ import annotations

from typing import Any

from clawdbot.backends import BackendError, OllamaBackend, without_credentials
from clawdbot.errors import ClawdbotError
from clawdbot.gpu import read_gpus
from clawdbot.runtime import Runtime


def _database(runtime: Runtime) -> dict[str, Any]:
    try:
        runtime.db.check()
    except ClawdbotError as exc:
        return {"status": "error", "error": exc.message}
    return {"status": "ok", "dialect": runtime.db.engine.dialect.name}


def _ollama(runtime: Runtime) -> dict[str, Any]:
    settings = runtime.settings
    if settings.backend == "embedded":
        return {"status": "not_used", "backend": "embedded"}
    backend = runtime.gateway.backends.ollama_backend
    host = without_credentials(backend.host if isinstance(backend, OllamaBackend) else settings.ollama_host)
    try:
        version = backend.version() if isinstance(backend, OllamaBackend) else ""
    except BackendError as exc:
        return {"status": "unreachable", "host": host, "error": exc.message}
    return {"status": "ok", "host": host, "version": version}


def _gpu() -> dict[str, Any]:
    status = read_gpus()
    if not status.available:
        return {"status": "unavailable", "message": status.message, "gpus": []}
    gpus = [
        {
            "index": g.index,
            "name": g.name,
            "memory_used": g.memory_used,
            "memory_total": g.memory_total,
            "utilization_pct": g.utilization_pct,
            "temperature_c": g.temperature_c,
            "power_w": g.power_w,
            "power_limit_w": g.power_limit_w,
        }
        for g in status.gpus
    ]
    return {"status": "ok", "message": status.message, "gpus": gpus}


def check_health(runtime: Runtime) -> dict[str, Any]:
    """The /health document of the contract: status, database, ollama, gpu."""
    database = _database(runtime)
    ollama = _ollama(runtime)
    healthy = database["status"] == "ok" and ollama["status"] in ("ok", "not_used")
    return {"status": "ok" if healthy else "degraded", "database": database, "ollama": ollama, "gpu": _gpu()}
