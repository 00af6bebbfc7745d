"""Measurement helpers shared by the benchmark scripts (standard library only, so the diffusers-Flax peer can
import it from its own virtualenv).

* CPU load: other people share this machine's cores; :func:`wait_for_quiet` waits for the 1-minute load
  average to drop before a measurement and every result records the load next to it.
* Peak memory: peak RSS of *this* process (``VmHWM``), resettable through ``/proc/self/clear_refs`` so that
  loading weights and running steps can be reported separately. Each framework runs in its own subprocess.
* Timing: :func:`time_calls` runs warm-up calls then timed calls; callers block on the result inside ``fn``.
* Children report one ``RESULT {json}`` line on stdout; :func:`run_child` runs one and parses it.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from importlib import metadata

RESULT_PREFIX = "RESULT "
GiB = 1024 ** 3


# ------------------------------------------------------------------------------------------- load
def loadavg() -> float:
    """The 1-minute load average."""
    return os.getloadavg()[0]


def wait_for_quiet(threshold: float = 1.2, max_wait_s: float = 600.0, poll_s: float = 15.0,
                   log: Callable[[str], None] = print) -> float:
    """Wait until the 1-minute load is below ``threshold`` (at most ``max_wait_s``); returns the load then."""
    start = time.monotonic()
    load = loadavg()
    while load >= threshold and time.monotonic() - start < max_wait_s:
        log(f"  load {load:.2f} >= {threshold}: waiting ({time.monotonic() - start:.0f}s so far)")
        time.sleep(poll_s)
        load = loadavg()
    if load >= threshold:
        log(f"  load still {load:.2f} after {max_wait_s:.0f}s: measuring anyway (recorded next to the result)")
    return load


# ----------------------------------------------------------------------------------------- memory
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def peak_rss_bytes() -> int:
    """Peak resident set size of this process since start or the last :func:`reset_peak_rss`."""
    return _status_kib("VmHWM") * 1024


def rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def release_free_heap() -> None:
    """Return freed malloc memory to the OS (glibc ``malloc_trim``), so RSS stops counting buffers that were
    freed after loading (e.g. the numpy state dict a converter copied from)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak_rss() -> bool:
    """Release freed heap, then reset ``VmHWM`` to the current RSS (Linux ``clear_refs`` value 5). False where
    not permitted."""
    gc.collect()
    release_free_heap()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ----------------------------------------------------------------------------------------- timing
def time_calls(fn: Callable[[], object], repeats: int, warmup: int = 1) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls (``fn`` must block until
    its result is computed)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def summarize(times: list[float]) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "times_s": times}


# ------------------------------------------------------------------------------------------ compiling
def use_persistent_compilation_cache(cache_dir: str | None) -> None:
    """Point JAX's persistent compilation cache at ``cache_dir`` (None: leave it off), caching every program:
    no minimum compile time, no minimum entry size. Call before the first compilation."""
    if not cache_dir:
        return
    import jax

    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


# ------------------------------------------------------------------------------------------ machine
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _meminfo_bytes(field: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def total_ram_bytes() -> int:
    return _meminfo_bytes("MemTotal")


def available_ram_bytes() -> int:
    return _meminfo_bytes("MemAvailable")


def versions(packages: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for p in packages:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = "not installed"
    return out


def machine_info(packages: tuple[str, ...] = ()) -> dict:
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "ram_gib": round(total_ram_bytes() / GiB, 1),
            "python": platform.python_version(), "versions": versions(packages)}


# ------------------------------------------------------------------------------------------ children
def emit_result(result: dict) -> None:
    """A child's last stdout line: ``RESULT {json}``."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def run_child(cmd: list[str], timeout_s: float, env: dict | None = None, log: Callable[[str], None] = print) -> dict:
    """Run a child benchmark process; returns its RESULT dict, or ``{"error": ...}`` with the output's tail."""
    log("  $ " + " ".join(cmd))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False,
                              env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f}s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    tail = (proc.stdout + proc.stderr)[-3000:]
    return {"error": f"exit {proc.returncode}, no result", "tail": tail}


def python_for(venv: str) -> str | None:
    """The interpreter of a virtualenv folder, or None if it does not exist."""
    exe = os.path.join(venv, "bin", "python")
    return exe if os.access(exe, os.X_OK) else None


def this_python() -> str:
    return sys.executable
