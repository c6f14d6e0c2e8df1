"""The background sampler: GPU (no driver here), gateway and Ollama readings, stored minutes, the thread."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from clawdbot.backends import ModelNotFound
from clawdbot.db import Database
from clawdbot.gpu import GpuSample, GpuStatus
from clawdbot.health import check_health
from clawdbot.metrics import WINDOWS, traffic
from clawdbot.models import MetricSample
from clawdbot.runtime import Runtime, install_shared_runtime, shared_runtime
from clawdbot.sampler import Sampler
from clawdbot.settings import load_settings
from tests.ollama_sim import VERSION, OllamaSimulator

T0 = datetime(2026, 11, 1, 12, 0, 5, tzinfo=UTC)
ONE_GPU = GpuStatus(
    True,
    "1 GPU(s)",
    [GpuSample(0, "NVIDIA RTX 6000 Ada", 12 * 2**30, 48 * 2**30, 63, 71, 250.5, 300.0)],
)


@pytest.fixture
def runtime(workdir: Path, db: Database, sim: OllamaSimulator) -> Iterator[Runtime]:
    rt = Runtime(load_settings(database_url=db.url, data_dir="data", backend="ollama", ollama_host=sim.url))
    yield rt
    rt.close()


def stored(db: Database, bucket_s: int = 60) -> dict[tuple[str, datetime], tuple[float, float]]:
    with db.read() as session:
        rows = session.execute(select(MetricSample).where(MetricSample.bucket_s == bucket_s)).scalars().all()
        return {(r.metric, r.at): (r.mean, r.peak) for r in rows}


def test_without_an_nvidia_driver_the_gpu_is_one_sentence_and_the_rest_is_sampled(runtime: Runtime) -> None:
    snapshot = runtime.sampler.sample()
    health = check_health(runtime)
    if Path("/proc/driver/nvidia/version").exists():  # a machine with the driver loaded reads its GPUs
        assert snapshot.gpu.available and snapshot.gpu.gpus
        return
    assert not snapshot.gpu.available and snapshot.gpu.gpus == []
    assert "NVIDIA driver" in snapshot.gpu.message and snapshot.gpu.message.endswith(".")
    assert set(snapshot.figures()) == {"gateway.generating", "gateway.queued"}
    assert snapshot.ollama.reachable and snapshot.ollama.version == VERSION
    assert health["status"] == "ok"
    assert health["gpu"] == {"status": "unavailable", "message": snapshot.gpu.message, "gpus": []}


def test_each_minute_is_stored_with_its_mean_and_peak(runtime: Runtime) -> None:
    sampler = Sampler(runtime.db, runtime.gateway, read_gpu=lambda: ONE_GPU)
    admission = runtime.gateway.admission
    held = [admission.enter(), admission.enter()]
    try:
        sampler.tick(T0)  # 2 generating
        held += [admission.enter(), admission.enter(), admission.enter()]  # 4 generating, 1 queued
        sampler.tick(T0 + timedelta(seconds=30))
        assert stored(runtime.db) == {}  # the minute has not ended yet
        sampler.tick(T0 + timedelta(seconds=57))  # 12:01:02, a new minute: 12:00 is stored
    finally:
        for ticket in held:
            ticket.release()
    rows = stored(runtime.db)
    minute = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
    assert rows[("gateway.generating", minute)] == (3.0, 4.0)
    assert rows[("gateway.queued", minute)] == (0.5, 1.0)
    assert rows[("gpu0.memory_pct", minute)] == (25.0, 25.0)
    assert rows[("gpu0.utilization_pct", minute)] == (63.0, 63.0)
    assert rows[("gpu0.temperature_c", minute)] == (71.0, 71.0)
    assert rows[("gpu0.power_w", minute)] == (250.5, 250.5)
    assert {at for _, at in rows} == {minute}
    # the hour so far: the mean of its minutes' means, the highest peak
    assert stored(runtime.db, 3600)[("gateway.generating", minute)] == (3.0, 4.0)
    sampler.store_minute(minute + timedelta(minutes=1), {"gateway.generating": [1.0, 1.0]})
    assert stored(runtime.db, 3600)[("gateway.generating", minute)] == (2.0, 4.0)


def test_an_hour_of_readings_is_kept_in_memory(runtime: Runtime) -> None:
    sampler = Sampler(runtime.db, runtime.gateway)
    for minutes in (0, 30, 61):
        sampler.sample(T0 + timedelta(minutes=minutes))
    kept = sampler.recent(T0 - timedelta(days=1))
    assert [s.at for s in kept] == [T0 + timedelta(minutes=30), T0 + timedelta(minutes=61)]
    assert sampler.latest().at == T0 + timedelta(minutes=61)


def test_a_round_brings_the_rollups_up_to_date(runtime: Runtime) -> None:
    store = runtime.store
    now = datetime.now(UTC)
    request_id = store.start_request(user="alice", agent="contract", model_requested="qwen3:32b")
    store.finish_request(request_id, "ok", latency_ms=420.0, ttft_ms=42.0, model_used="qwen3:32b")
    runtime.sampler.tick()
    charts = traffic(runtime.db, WINDOWS["15 min"], now + timedelta(seconds=1))
    assert charts.requests == 1 and charts.latency_p50 == pytest.approx(420, rel=0.02)


def test_ollama_readings_up_down_and_not_used(runtime: Runtime, sim: OllamaSimulator, workdir: Path) -> None:
    sampler = runtime.sampler
    runtime.gateway.backends.ollama_backend.load_model("qwen3:32b")  # type: ignore[attr-defined]
    state = sampler.read_ollama()
    assert state.used and state.reachable and state.version == VERSION and state.host == sim.url
    (model,) = state.loaded
    assert model.name == "qwen3:32b" and model.size_vram and model.context_length and model.expires_at
    sim.stop()
    down = sampler.read_ollama()
    assert down.used and not down.reachable
    assert f"cannot reach Ollama at {sim.url}" in down.error and "ollama serve" in down.error
    embedded = Runtime(load_settings(database_url=runtime.db.url, data_dir="data", backend="embedded"))
    try:
        assert not embedded.sampler.read_ollama().used
        assert embedded.sampler.ollama() is None
    finally:
        embedded.close()


def test_loading_a_model_that_is_not_installed_says_so(runtime: Runtime, sim: OllamaSimulator) -> None:
    with pytest.raises(ModelNotFound, match="nosuch:1b"):
        runtime.sampler.load_model("ops", "nosuch:1b")
    runtime.sampler.load_model("ops", "qwen3:32b")
    assert sim.loaded == ["qwen3:32b"]
    runtime.sampler.unload_model("ops", "qwen3:32b")
    assert sim.loaded == []


def test_the_thread_samples_until_stopped_and_survives_failing_steps(
    runtime: Runtime, workdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[int] = []
    enough = threading.Event()

    def read_gpu() -> GpuStatus:
        calls.append(1)
        if len(calls) >= 3:
            enough.set()
        return ONE_GPU

    # A database without the dashboard's tables: every store and rollup step fails, the thread goes on.
    blank = Database(f"sqlite:///{workdir / 'blank.db'}")
    sampler = Sampler(blank, runtime.gateway, interval=0.01, rollup_interval=0.0, read_gpu=read_gpu)
    sampler.start()
    sampler.start()  # a second start does not start a second thread
    try:
        assert enough.wait(30), "the sampler thread took no readings"
        assert sampler.running
        assert [t.name for t in threading.enumerate()].count("clawdbot-sampler") == 1
    finally:
        sampler.stop()
        blank.dispose()
    assert not sampler.running
    failures = [r.getMessage() for r in caplog.records if "dashboard sampler could not" in r.getMessage()]
    assert any("refresh the request rollups" in f and "rollup_state" in f for f in failures)
    assert len(failures) == len(set(failures))  # each failure logged once, not every round


def test_the_server_runtime_starts_one_sampler(
    workdir: Path, db: Database, sim: OllamaSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLAWDBOT_DATABASE_URL", db.url)
    monkeypatch.setenv("OLLAMA_HOST", sim.url)
    previous = install_shared_runtime(None)
    rt: Any = None
    try:
        rt = shared_runtime()
        assert rt.sampler.running
        assert shared_runtime() is rt
    finally:
        install_shared_runtime(previous)
        if rt is not None:
            rt.close()
    assert not rt.sampler.running
