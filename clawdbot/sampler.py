"""One background sampler per process: GPU, gateway and Ollama every few seconds, whether or not anyone watches.

Why one per process and not per viewer: ten admins with the dashboard open must not mean ten NVML and Ollama
polls every two seconds, and history must exist for the hours nobody watched. The sampler keeps the last hour
of readings in memory (what the dashboard's live figures and short charts show), stores each minute's mean
and peak in `metric_samples` (kept 30 days), brings the request rollups up to date every
`ROLLUP_INTERVAL_S` (`clawdbot.rollups`) and prunes both once an hour. A failing step (database or Ollama
down) is logged once and tried again on the next round; the thread never dies of it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, func, select

from clawdbot.admission import AdmissionStats
from clawdbot.audit import process_owner
from clawdbot.backends import BackendError, LoadedModel, OllamaBackend
from clawdbot.db import Database
from clawdbot.gateway import Gateway
from clawdbot.gpu import GpuStatus, read_gpus
from clawdbot.models import MetricSample, utcnow
from clawdbot.rollups import RETENTION, Rollups, bucket_start, upsert_rows

log = logging.getLogger(__name__)

SAMPLE_INTERVAL_S = 2.0
"""Seconds between two readings, the dashboard's refresh period."""
ROLLUP_INTERVAL_S = 10.0
"""Seconds between two refreshes of the request rollups (the charts lag the log by at most this)."""
PRUNE_INTERVAL_S = 3600.0
KEPT_IN_MEMORY = timedelta(hours=1)
_SAMPLE_KEY = ("metric", "bucket_s", "at", "source")


@dataclass(frozen=True)
class OllamaState:
    """What Ollama said at the last reading; `used` is False when the embedded model is the only backend."""

    used: bool
    reachable: bool
    host: str = ""
    version: str = ""
    error: str = ""
    loaded: tuple[LoadedModel, ...] = ()


@dataclass(frozen=True)
class Snapshot:
    """One reading of the process: its gateway, the GPUs, Ollama."""

    at: datetime
    gateway: AdmissionStats
    gpu: GpuStatus
    ollama: OllamaState

    def figures(self) -> dict[str, float]:
        """The readings stored per minute, by metric name (`gateway.*`, `gpu<index>.*`)."""
        figures = {
            "gateway.generating": float(self.gateway.generating),
            "gateway.queued": float(self.gateway.queued),
        }
        for g in self.gpu.gpus:
            figures[f"gpu{g.index}.memory_pct"] = 100 * g.memory_fraction
            if g.utilization_pct is not None:
                figures[f"gpu{g.index}.utilization_pct"] = float(g.utilization_pct)
            if g.temperature_c is not None:
                figures[f"gpu{g.index}.temperature_c"] = float(g.temperature_c)
            if g.power_w is not None:
                figures[f"gpu{g.index}.power_w"] = g.power_w
        return figures


class Sampler:
    """Samples `gateway` (its admission and its Ollama backend) and the GPUs; see the module docstring."""

    def __init__(
        self,
        db: Database,
        gateway: Gateway,
        *,
        interval: float = SAMPLE_INTERVAL_S,
        rollup_interval: float = ROLLUP_INTERVAL_S,
        read_gpu: Callable[[], GpuStatus] = read_gpus,
    ) -> None:
        self.db = db
        self.gateway = gateway
        self.interval = interval
        self.rollup_interval = rollup_interval
        self.rollups = Rollups(db)
        self.source = process_owner()
        self._read_gpu = read_gpu
        self._lock = threading.Lock()
        self._recent: deque[Snapshot] = deque()
        self._minute: datetime | None = None
        self._minute_values: dict[str, list[float]] = {}
        self._rolled_at = float("-inf")
        self._pruned_at = float("-inf")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failures: dict[str, str] = {}

    # -- the thread --------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the thread unless it runs already."""
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="clawdbot-sampler", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread and wait for the round in progress (at most `timeout` seconds)."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    @property
    def running(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive()

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            self.tick()
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - started)))

    # -- one round ---------------------------------------------------------------------------------

    def tick(self, now: datetime | None = None) -> Snapshot:
        """One round: read everything; store the minute that ended; refresh the rollups and prune when due."""
        snapshot = self.sample(now)
        self._guarded("store the minute's samples", lambda: self._record(snapshot))
        clock = time.monotonic()
        if clock - self._rolled_at >= self.rollup_interval:
            self._rolled_at = clock
            self._guarded("refresh the request rollups", lambda: self.rollups.refresh(snapshot.at))
        if clock - self._pruned_at >= PRUNE_INTERVAL_S:
            self._pruned_at = clock
            self._guarded("prune the dashboard history", lambda: self._prune(snapshot.at))
        return snapshot

    def sample(self, now: datetime | None = None) -> Snapshot:
        """Read the gateway, the GPUs and Ollama now and keep the reading in memory."""
        snapshot = Snapshot(
            at=now or utcnow(),
            gateway=self.gateway.admission.snapshot(),
            gpu=self._read_gpu(),
            ollama=self.read_ollama(),
        )
        with self._lock:
            self._recent.append(snapshot)
            while self._recent and snapshot.at - self._recent[0].at > KEPT_IN_MEMORY:
                self._recent.popleft()
        return snapshot

    def latest(self) -> Snapshot:
        """The newest reading, taken now if there is none yet."""
        with self._lock:
            if self._recent:
                return self._recent[-1]
        return self.sample()

    def recent(self, since: datetime) -> list[Snapshot]:
        """The readings kept in memory from `since` on, oldest first."""
        with self._lock:
            return [s for s in self._recent if s.at >= since]

    # -- Ollama ------------------------------------------------------------------------------------

    def ollama(self) -> OllamaBackend | None:
        """The gateway's Ollama backend, or None when the settings use the embedded model only."""
        backends = self.gateway.backends
        if backends.mode == "embedded":
            return None
        backend = backends.ollama_backend
        return backend if isinstance(backend, OllamaBackend) else None

    def read_ollama(self) -> OllamaState:
        """Whether Ollama answers, its version and the models it holds in memory."""
        backend = self.ollama()
        if backend is None:
            return OllamaState(used=False, reachable=False)
        try:
            version = backend.version()
            loaded = tuple(backend.loaded())
        except BackendError as exc:
            return OllamaState(True, False, backend.shown_host, error=exc.message)
        return OllamaState(True, True, backend.shown_host, version, loaded=loaded)

    def load_model(self, actor: str, model: str) -> None:
        """Load `model` in Ollama for `actor` (recorded as an event), then read Ollama again."""
        self._change_model(actor, model, load=True)

    def unload_model(self, actor: str, model: str) -> None:
        """Unload `model` from Ollama for `actor` (recorded as an event), then read Ollama again."""
        self._change_model(actor, model, load=False)

    def _change_model(self, actor: str, model: str, *, load: bool) -> None:
        backend = self.ollama()
        if backend is None:
            raise BackendError("Ollama is not used (CLAWDBOT_BACKEND=embedded), so there is no model to load")
        if load:
            backend.load_model(model)
        else:
            backend.unload_model(model)
        self.gateway.store.record_event(actor, "model.load" if load else "model.unload", model)
        self.sample()

    # -- storage -----------------------------------------------------------------------------------

    def _record(self, snapshot: Snapshot) -> None:
        """Add the reading to its minute; when a new minute begins, store the one that ended."""
        minute = bucket_start(snapshot.at, 60)
        ended: tuple[datetime, dict[str, list[float]]] | None = None
        with self._lock:
            if self._minute is not None and minute != self._minute:
                ended = (self._minute, self._minute_values)
                self._minute_values = {}
            self._minute = minute
            for name, value in snapshot.figures().items():
                self._minute_values.setdefault(name, []).append(value)
        if ended is not None:
            self.store_minute(*ended)

    def store_minute(self, minute: datetime, values: dict[str, list[float]]) -> None:
        """Store one minute's mean and peak of each figure for this process, and bring its hour up to date
        (the mean of its minutes' means, the highest peak)."""
        rows = [
            {
                "metric": name,
                "bucket_s": 60,
                "at": minute,
                "source": self.source,
                "mean": sum(readings) / len(readings),
                "peak": max(readings),
            }
            for name, readings in values.items()
            if readings
        ]
        if not rows:
            return
        hour = bucket_start(minute, 3600)
        with self.db.write_connection() as conn:
            upsert_rows(conn, MetricSample.__table__, rows, _SAMPLE_KEY)
            hours = conn.execute(
                select(MetricSample.metric, func.avg(MetricSample.mean), func.max(MetricSample.peak))
                .where(
                    MetricSample.bucket_s == 60,
                    MetricSample.source == self.source,
                    MetricSample.metric.in_([r["metric"] for r in rows]),
                    MetricSample.at >= hour,
                    MetricSample.at < hour + timedelta(hours=1),
                )
                .group_by(MetricSample.metric)
            ).all()
            upsert_rows(
                conn,
                MetricSample.__table__,
                [
                    {
                        "metric": m,
                        "bucket_s": 3600,
                        "at": hour,
                        "source": self.source,
                        "mean": mean,
                        "peak": peak,
                    }
                    for m, mean, peak in hours
                ],
                _SAMPLE_KEY,
            )

    def _prune(self, now: datetime) -> None:
        self.rollups.prune(now)
        with self.db.write_connection() as conn:
            conn.execute(delete(MetricSample).where(MetricSample.at < now - RETENTION))

    def _guarded(self, what: str, step: Callable[[], object]) -> None:
        try:
            step()
        except Exception as exc:
            message = f"{type(exc).__name__}: {exc}"
            if self._failures.get(what) != message:  # once per distinct failure, not every two seconds
                log.warning("the dashboard sampler could not %s: %s", what, message)
                self._failures[what] = message
        else:
            self._failures.pop(what, None)
