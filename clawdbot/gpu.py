"""GPU readings through NVIDIA's NVML (`pynvml` from nvidia-ml-py).

On a machine without an NVIDIA driver every call still answers: `read_gpus()` returns no devices and one
sentence saying why (that no driver is installed, or that it is not loaded), and the VRAM guard never holds
requests back.

A failed `nvmlInit()` is remembered and tried again only after `INIT_RETRY_S`: each attempt searches for and
fails to load the driver's library (0.1-0.5 ms here), and the VRAM guard reads the GPU on the path to the
first token (at most every 0.5 s), so retrying every time slowed one request each half second. Trying again
now and then still picks up a driver loaded after clawdbot started (e.g. a service started before the driver).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import pynvml


@dataclass(frozen=True)
class GpuSample:
    index: int
    name: str
    memory_used: int
    memory_total: int
    utilization_pct: int | None
    temperature_c: int | None
    power_w: float | None
    power_limit_w: float | None

    @property
    def memory_fraction(self) -> float:
        return self.memory_used / self.memory_total if self.memory_total else 0.0


@dataclass(frozen=True)
class GpuStatus:
    """What NVML says now: the devices, or why there are none."""

    available: bool
    message: str
    gpus: list[GpuSample] = field(default_factory=list)

    @property
    def memory_fraction(self) -> float | None:
        """The fullest device's memory use, or None without a GPU."""
        return max((g.memory_fraction for g in self.gpus), default=None)


INIT_RETRY_S = 60.0
"""Least time between two attempts to start NVML after one failed."""

_init_lock = threading.Lock()
_initialized = False
# time.monotonic() of the last failed attempt, and what it said
_init_failure: tuple[float, GpuStatus] | None = None


def _optional(read: Any, *args: Any) -> Any:
    try:
        return read(*args)
    except pynvml.NVMLError:
        return None


def _no_driver(exc: BaseException) -> GpuStatus:
    """Why NVML cannot start, in one sentence for the operations page and the health check."""
    if isinstance(exc, pynvml.NVMLError_LibraryNotFound | OSError):
        what = "No NVIDIA driver is installed on this machine"
    elif isinstance(exc, pynvml.NVMLError_DriverNotLoaded):
        what = "The NVIDIA driver is installed but not loaded on this machine"
    else:
        what = "The NVIDIA driver cannot be used on this machine"
    return GpuStatus(False, f"{what} (NVML: {exc}); GPU figures are not shown and the VRAM guard is off.")


def _ensure_init() -> GpuStatus | None:
    """Start NVML once per process; returns None when it runs, else why not (remembered for INIT_RETRY_S)."""
    global _initialized, _init_failure
    with _init_lock:
        if _initialized:
            return None
        if _init_failure is not None and time.monotonic() - _init_failure[0] < INIT_RETRY_S:
            return _init_failure[1]
        try:
            pynvml.nvmlInit()
        except (pynvml.NVMLError, OSError) as exc:  # OSError: the library itself is broken
            _init_failure = (time.monotonic(), _no_driver(exc))
            return _init_failure[1]
        _initialized, _init_failure = True, None
        return None


def read_gpus() -> GpuStatus:
    """Read every NVIDIA GPU; never raises."""
    failure = _ensure_init()
    if failure is not None:
        return failure
    try:
        return _read_devices()
    except pynvml.NVMLError as exc:
        return GpuStatus(
            False, f"The NVIDIA GPUs cannot be read now (NVML: {exc}); GPU figures are not shown."
        )


def _read_devices() -> GpuStatus:
    count = pynvml.nvmlDeviceGetCount()
    gpus = []
    for index in range(count):
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
        rates = _optional(pynvml.nvmlDeviceGetUtilizationRates, handle)
        power = _optional(pynvml.nvmlDeviceGetPowerUsage, handle)
        limit = _optional(pynvml.nvmlDeviceGetEnforcedPowerLimit, handle)
        name = pynvml.nvmlDeviceGetName(handle)
        gpus.append(
            GpuSample(
                index=index,
                name=name.decode() if isinstance(name, bytes) else str(name),
                memory_used=int(memory.used),
                memory_total=int(memory.total),
                utilization_pct=int(rates.gpu) if rates is not None else None,
                temperature_c=_optional(pynvml.nvmlDeviceGetTemperature, handle, pynvml.NVML_TEMPERATURE_GPU),
                power_w=power / 1000 if power is not None else None,
                power_limit_w=limit / 1000 if limit is not None else None,
            )
        )
    if not gpus:
        return GpuStatus(
            False, "The NVIDIA driver reports no GPU on this machine; GPU figures are not shown."
        )
    return GpuStatus(True, f"{len(gpus)} GPU(s)", gpus)


class VramGuard:
    """Says whether GPU memory use is above the guard fraction, reading NVML at most every `interval` seconds."""

    def __init__(self, fraction: float, interval: float = 0.5) -> None:
        self.fraction = fraction
        self.interval = interval
        self._lock = threading.Lock()
        self._checked_at = float("-inf")
        self._over = False

    def __call__(self) -> bool:
        with self._lock:
            now = time.monotonic()
            if now - self._checked_at >= self.interval:
                used = read_gpus().memory_fraction
                self._over = used is not None and used > self.fraction
                self._checked_at = now
            return self._over
