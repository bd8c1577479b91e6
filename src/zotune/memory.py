"""Process memory as runs and benchmarks report it: peak resident memory (Linux ``VmHWM``) or the
CUDA peak allocation, and a reset of that peak so that a measurement starts where its work does."""

from __future__ import annotations

import contextlib
import ctypes
import gc

import torch


def status_kb(key: str) -> int:
    """A ``/proc/self/status`` field in kB (``"VmRSS"``, ``"VmHWM"``), or -1 where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1


def peak_memory_mb(device: torch.device | None = None) -> float:
    """Peak resident memory of this process (VmHWM), or CUDA peak allocation on a GPU."""
    if device is not None and device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    hwm = status_kb("VmHWM")
    if hwm >= 0:
        return hwm / 1024
    import resource  # not Linux: the peak since the process started, which cannot be reset

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_memory(device: torch.device | None = None) -> bool:
    """Start the peak afresh from the memory in use now: on a GPU, CUDA's peak allocation; on the
    CPU, freed heap goes back to the OS and VmHWM is reset to the current RSS (Linux >= 4.0).
    Returns False where the CPU peak cannot be reset (then :func:`peak_memory_mb` keeps the
    process's whole history)."""
    if device is not None and device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
