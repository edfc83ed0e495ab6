"""NVML (nvidia-ml-py): free, total and used memory per GPU, and each compute process's use.

No library or no GPU is not an error: `read_gpus` returns a snapshot with no GPUs and the
reason, and the planner plans CPU only. Any other NVML failure (driver not loaded, GPU lost,
...) raises `NvmlError`, which keeps NVML's own error name and code, so the daemon can keep
its last good plan and report what went wrong.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

from diversityd.cardplan import (
    GpuProcess,
    GpuReading,
    GpuSnapshot,
)
from diversityd.errors import DiversitydError

# The codes of nvml.h (pynvml has them as NVML_ERROR_* constants too); kept here so the
# names survive even when pynvml cannot be imported.
NVML_ERROR_NAMES = {
    1: "NVML_ERROR_UNINITIALIZED",
    2: "NVML_ERROR_INVALID_ARGUMENT",
    3: "NVML_ERROR_NOT_SUPPORTED",
    4: "NVML_ERROR_NO_PERMISSION",
    5: "NVML_ERROR_ALREADY_INITIALIZED",
    6: "NVML_ERROR_NOT_FOUND",
    7: "NVML_ERROR_INSUFFICIENT_SIZE",
    8: "NVML_ERROR_INSUFFICIENT_POWER",
    9: "NVML_ERROR_DRIVER_NOT_LOADED",
    10: "NVML_ERROR_TIMEOUT",
    11: "NVML_ERROR_IRQ_ISSUE",
    12: "NVML_ERROR_LIBRARY_NOT_FOUND",
    13: "NVML_ERROR_FUNCTION_NOT_FOUND",
    14: "NVML_ERROR_CORRUPTED_INFOROM",
    15: "NVML_ERROR_GPU_IS_LOST",
    16: "NVML_ERROR_RESET_REQUIRED",
    17: "NVML_ERROR_OPERATING_SYSTEM",
    18: "NVML_ERROR_LIB_RM_VERSION_MISMATCH",
    19: "NVML_ERROR_IN_USE",
    20: "NVML_ERROR_MEMORY",
    21: "NVML_ERROR_NO_DATA",
    22: "NVML_ERROR_VGPU_ECC_NOT_ENABLED",
    23: "NVML_ERROR_INSUFFICIENT_RESOURCES",
    999: "NVML_ERROR_UNKNOWN",
}
LIBRARY_NOT_FOUND = 12
FUNCTION_NOT_FOUND = 13

# pynvml keeps global state (the loaded library, a reference count): one reader at a time.
_lock = threading.Lock()


class NvmlError(DiversitydError):
    """An NVML call failed; `name` and `code` are NVML's (e.g. NVML_ERROR_GPU_IS_LOST, 15)."""

    def __init__(self, call: str, code: int, description: str) -> None:
        self.call = call
        self.code = code
        self.name = NVML_ERROR_NAMES.get(code, f"NVML_ERROR_{code}")
        self.description = description
        super().__init__(
            f"NVML {call} failed: {self.name} ({code}): {description}",
            hint="keep the last good plan; check the driver with nvidia-smi",
        )


def _error_code(exc: BaseException) -> int:
    value = getattr(exc, "value", None)
    return value if isinstance(value, int) else 999


def _call(pynvml: Any, name: str, *args: Any) -> Any:
    try:
        return getattr(pynvml, name)(*args)
    except pynvml.NVMLError as exc:
        raise NvmlError(name, _error_code(exc), str(exc)) from None


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _processes(pynvml: Any, handle: Any) -> tuple[GpuProcess, ...]:
    infos = _call(pynvml, "nvmlDeviceGetComputeRunningProcesses", handle)
    processes = []
    for info in infos:
        used = getattr(info, "usedGpuMemory", None)
        processes.append(GpuProcess(int(info.pid), int(used) if used is not None else None))
    return tuple(processes)


def read_gpus() -> GpuSnapshot:
    """Look at every GPU once: memory and compute processes.

    Returns a snapshot without GPUs (and the reason) when there is no NVML library or no
    GPU; raises NvmlError for every other NVML failure.
    """
    try:
        pynvml = _import_pynvml()
    except ImportError:
        return GpuSnapshot((), "nvidia-ml-py (pynvml) is not installed: planning CPU only")
    with _lock:
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            code = _error_code(exc)
            if code == LIBRARY_NOT_FOUND:
                return GpuSnapshot(
                    (), "no NVIDIA driver: libnvidia-ml.so.1 not found; planning CPU only"
                )
            raise NvmlError("nvmlInit", code, str(exc)) from None
        try:
            count = _call(pynvml, "nvmlDeviceGetCount")
            if count == 0:
                return GpuSnapshot((), "NVML sees no GPU: planning CPU only")
            gpus = []
            for index in range(count):
                handle = _call(pynvml, "nvmlDeviceGetHandleByIndex", index)
                memory = _call(pynvml, "nvmlDeviceGetMemoryInfo", handle)
                gpus.append(
                    GpuReading(
                        index=index,
                        name=_text(_call(pynvml, "nvmlDeviceGetName", handle)),
                        uuid=_text(_call(pynvml, "nvmlDeviceGetUUID", handle)),
                        total_bytes=int(memory.total),
                        free_bytes=int(memory.free),
                        used_bytes=int(memory.used),
                        processes=_processes(pynvml, handle),
                    )
                )
            return GpuSnapshot(tuple(gpus))
        finally:
            # the reading (or its error) matters, not a failed shutdown
            with contextlib.suppress(pynvml.NVMLError):
                pynvml.nvmlShutdown()


def _import_pynvml() -> Any:
    import pynvml  # noqa: PLC0415 - the CLI's `plan --free-mib` never pays for it

    return pynvml
