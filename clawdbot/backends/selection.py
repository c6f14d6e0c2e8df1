"""Which backend serves a request: Ollama, the embedded model, or `auto` (Ollama while it answers)."""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

from clawdbot.backends.base import Backend
from clawdbot.backends.embedded_model import EmbeddedBackend
from clawdbot.backends.ollama_server import OllamaBackend

if TYPE_CHECKING:
    from clawdbot.settings import Settings


class BackendSelector:
    """Picks the backend per the `backend` setting; both backends are created once and reused.

    `auto` uses Ollama while it answers /api/version and the embedded model otherwise (or Ollama anyway
    when neither is usable, since its error says how to start it). The probe result is kept for
    `probe_ttl` seconds; call `invalidate()` after a request failed on a backend to probe again at once.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        ollama: Backend | None = None,
        embedded: Backend | None = None,
        probe_ttl: float = 10.0,
    ) -> None:
        self.settings = settings
        self.mode: str = settings.backend
        self.probe_ttl = probe_ttl
        self._ollama = ollama
        self._embedded = embedded
        self._owned: list[OllamaBackend | EmbeddedBackend] = []
        self._lock = threading.Lock()
        self._probe_lock = threading.Lock()
        self._probed: tuple[float, bool] | None = None

    @property
    def ollama_backend(self) -> Backend:
        with self._lock:
            if self._ollama is None:
                backend = OllamaBackend(
                    self.settings.ollama_host,
                    self.settings.connect_timeout,
                    self.settings.read_timeout,
                    keep_alive=self.settings.keep_alive,
                )
                self._owned.append(backend)
                self._ollama = backend
            return self._ollama

    @property
    def embedded_backend(self) -> Backend:
        with self._lock:
            if self._embedded is None:
                backend = EmbeddedBackend(self.settings.embedded_model or None)
                self._owned.append(backend)
                self._embedded = backend
            return self._embedded

    def current(self) -> Backend:
        """The backend to use for the next request."""
        if self.mode == "ollama":
            return self.ollama_backend
        if self.mode == "embedded":
            return self.embedded_backend
        primary = self.ollama_backend
        if self._ollama_reachable(primary):
            return primary
        fallback = self.embedded_backend
        return fallback if fallback.reachable() else primary

    def invalidate(self) -> None:
        """Forget the last probe (call it when a request failed), so the next `current()` probes again."""
        with self._probe_lock:
            self._probed = None

    def close(self) -> None:
        """Close the backends this selector created (not the ones passed in)."""
        with self._lock:
            owned, self._owned = self._owned, []
        for backend in owned:
            backend.close()

    def _ollama_reachable(self, backend: Backend) -> bool:
        # Under a lock: when the cache expires, one request probes and the others wait for its answer.
        with self._probe_lock:
            now = time.monotonic()
            if self._probed is not None and now - self._probed[0] < self.probe_ttl:
                return self._probed[1]
            ok = backend.reachable()
            self._probed = (time.monotonic(), ok)
            return ok
