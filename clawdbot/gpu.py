"""GPU readings through NVIDIA's NVML (`pynvml` from nvidia-ml-py).

On a machine without an NVIDIA driver every call still answers: `read_gpus()` returns no devices and one
sentence saying why, and the VRAM guard never holds requests back.
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


_init_lock = threading.Lock()
_initialized = False


def _optional(read: Any, *args: Any) -> Any:
    try:
        return read(*args)
    except pynvml.NVMLError:
        return None


def _ensure_init() -> None:
    global _initialized
    with _init_lock:
        if not _initialized:
            pynvml.nvmlInit()
            _initialized = True


def read_gpus() -> GpuStatus:
    """Read every NVIDIA GPU; never raises."""
    try:
        _ensure_init()
        count = pynvml.nvmlDeviceGetCount()
    except pynvml.NVMLError as exc:
        return GpuStatus(
            False, f"No NVIDIA GPU can be read on this machine (NVML: {exc}); GPU figures are not shown."
        )
    except OSError as exc:  # the NVML library itself is missing or broken
        return GpuStatus(
            False, f"No NVIDIA driver is installed on this machine ({exc}); GPU figures are not shown."
        )
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
