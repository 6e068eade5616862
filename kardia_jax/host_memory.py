"""Keep freed host memory for reuse on CPU-only installs (glibc `mallopt`), applied at `import kardia_jax`.

XLA:CPU allocates each program's buffers with `malloc` on its worker threads and frees them when the
program ends. With glibc's defaults those threads use their own arenas, which hand freed memory back to
the kernel, so the next run of the same program page-faults every buffer in again: a GRPO update of
the GRPO benchmark workload took ~470,000 minor faults (~1.9 GB zeroed by the kernel, ~0.65 s of system
time) on every call, about 15% of the step.

`keep_freed_memory()` sets one malloc arena (M_ARENA_MAX = 1), no mmap'd chunks (M_MMAP_MAX = 0) and no
trimming (M_TRIM_THRESHOLD = max): freed buffers stay in the process and are reused, and the process
keeps its peak memory. A run whose buffers do not fit the freed space as it is fragmented grows the heap
(faulting once more), so the heap can exceed the peak: running a program with 136 MiB of temporaries
ten times left 0.2-0.6 GiB of heap, and most runs faulted nothing.

It has to run before JAX starts its thread pool, hence at import. It is applied only where it pays and is
safe: Linux with glibc, no TPU/GPU JAX plugin installed (or JAX_PLATFORMS=cpu), and no simulated devices
(`--xla_force_host_platform_device_count` in XLA_FLAGS, as in the tests: that client still faulted its
buffers in, and the setting made the test suite slower, e.g. 51 -> 68 s with 2.3 -> 8.7 s of system
time for four GRPO trainer tests). Set KARDIA_KEEP_FREED_MEMORY=0 to opt out, =1 to force it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import os
import platform

M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8  # glibc malloc.h
ACCELERATOR_PLUGINS = ("libtpu", "jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin")
ENV = "KARDIA_KEEP_FREED_MEMORY"


def cpu_only() -> bool:
    """True if JAX will run on the CPU: JAX_PLATFORMS says cpu, or no accelerator plugin is installed."""
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    return not any(importlib.util.find_spec(name) for name in ACCELERATOR_PLUGINS)


def simulated_devices() -> bool:
    """True if XLA_FLAGS asks the CPU client for simulated devices."""
    return "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "")


def keep_freed_memory() -> bool:
    """Applies the glibc settings above if this process should have them; returns whether it did."""
    wanted = os.environ.get(ENV, "")
    if wanted not in ("", "0", "1"):
        raise ValueError(f"{ENV}={wanted!r}: use 1 (keep freed memory), 0 (glibc defaults) or leave it unset.")
    if wanted == "0" or (wanted == "" and (not cpu_only() or simulated_devices())):
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    # mallopt takes an int; -1 converts to SIZE_MAX for the trim threshold, i.e. never trim.
    return all(libc.mallopt(option, value) == 1 for option, value in
               ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1)))
