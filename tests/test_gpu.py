"""GPU readings through the real NVML library: on a machine without an NVIDIA driver (this one, CI) every call
answers at once with one sentence saying that no driver is present, and the failed start is not retried on
every reading, since the VRAM guard reads the GPU on the path to the first token.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pynvml
import pytest

from clawdbot import gpu
from clawdbot.admission import Admission
from clawdbot.gpu import VramGuard, read_gpus


@pytest.fixture
def nvml_starts(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[BaseException | None]]:
    """A fresh start of the gpu module's NVML state; lists each real `nvmlInit()` call with its error or None."""
    real_init = pynvml.nvmlInit
    calls: list[BaseException | None] = []

    def counted_init(*args: Any, **kwargs: Any) -> None:
        try:
            real_init(*args, **kwargs)
        except BaseException as exc:
            calls.append(exc)
            raise
        calls.append(None)

    monkeypatch.setattr(gpu, "_initialized", False)
    monkeypatch.setattr(gpu, "_init_failure", None)
    monkeypatch.setattr(pynvml, "nvmlInit", counted_init)
    yield calls
    if calls and calls[0] is None:
        pynvml.nvmlShutdown()


def _needs_no_driver(calls: list[BaseException | None]) -> None:
    if calls and calls[0] is None:
        pytest.skip("this machine has a working NVIDIA driver")


def test_no_driver_is_said_plainly_and_the_failed_start_is_remembered(
    nvml_starts: list[BaseException | None],
) -> None:
    first = read_gpus()
    _needs_no_driver(nvml_starts)
    statuses = [first] + [read_gpus() for _ in range(50)]

    assert len(nvml_starts) == 1  # one attempt, not one per reading
    assert all(status == first for status in statuses)
    assert not first.available and first.gpus == [] and first.memory_fraction is None
    error = nvml_starts[0]
    if isinstance(error, pynvml.NVMLError_LibraryNotFound):
        assert first.message.startswith("No NVIDIA driver is installed on this machine (NVML: ")
    else:
        assert "NVIDIA driver" in first.message
    assert first.message.endswith("; GPU figures are not shown and the VRAM guard is off.")
    assert "\n" not in first.message


def test_the_start_is_tried_again_after_the_retry_interval(
    nvml_starts: list[BaseException | None], monkeypatch: pytest.MonkeyPatch
) -> None:
    read_gpus()
    _needs_no_driver(nvml_starts)
    read_gpus()
    assert len(nvml_starts) == 1
    monkeypatch.setattr(gpu, "INIT_RETRY_S", 0.0)  # as if the interval had passed: a driver may have loaded
    read_gpus()
    assert len(nvml_starts) == 2


def test_without_a_driver_the_vram_guard_never_holds_requests_back(
    nvml_starts: list[BaseException | None],
) -> None:
    guard = VramGuard(0.95, interval=0.0)  # reads on every call
    admission = Admission(2, 1, 5.0, pressure=guard, pressure_interval=1e-6)
    for _ in range(20):
        with admission.enter() as ticket:
            assert ticket.admitted
    _needs_no_driver(nvml_starts)
    assert not guard()
    assert len(nvml_starts) == 1
    assert not admission.snapshot().vram_hold
