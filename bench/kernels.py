"""Per-kernel device time of a jitted function, from a ``jax.profiler`` trace (no TensorBoard needed).

    rows = top_kernels(lambda: f(x).block_until_ready(), repeats=5, n=10)

The trace (XSpace protobuf) is read back with ``jax.profiler.ProfileData``. On a GPU the device plane's
``XLA Ops`` line holds one event per executed HLO op (fusions, cuDNN convolutions, custom calls), timed on the
device; elsewhere (CPU) the events of the host plane's XLA client and Eigen threads are used, minus profiler
bookkeeping. Events of one name are summed over the traced calls and divided by ``repeats``, so each row is
milliseconds per call; the share is of the summed time of all ops.
"""

from __future__ import annotations

import glob
import tempfile
from collections import defaultdict
from collections.abc import Callable

SKIP_PREFIXES = ("ThreadpoolListener", "ThunkExecutor", "$")  # bookkeeping and wrappers of ops


def _op_lines(plane):
    lines = list(plane.lines)
    ops = [ln for ln in lines if ln.name == "XLA Ops"]
    if ops:
        return ops
    return [ln for ln in lines if ln.name != "python" and not ln.name.startswith("XLA Modules")]


def aggregate(xspace_path: str) -> dict[str, float]:
    """Summed nanoseconds per op name over the device planes (or the host plane when there is no device)."""
    from jax.profiler import ProfileData

    data = ProfileData.from_file(xspace_path)
    planes = [p for p in data.planes if p.name.startswith("/device:")]
    planes = planes or [p for p in data.planes if p.name == "/host:CPU"]
    totals: dict[str, float] = defaultdict(float)
    for plane in planes:
        for line in _op_lines(plane):
            for ev in line.events:
                if not ev.name.startswith(SKIP_PREFIXES) and ev.duration_ns > 0:
                    totals[ev.name] += ev.duration_ns
    return dict(totals)


def top_kernels(call: Callable[[], object], repeats: int = 3, n: int = 10) -> list[dict]:
    """Trace ``repeats`` calls of ``call`` (already compiled and warm; it must block) and return the ``n`` ops
    with the most time: ``{"name", "ms_per_call", "share"}``."""
    import jax

    trace_dir = tempfile.mkdtemp(prefix="jaxdiff-trace-")
    with jax.profiler.trace(trace_dir):
        for _ in range(repeats):
            call()
    files = glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)
    if not files:
        return []
    totals = aggregate(files[0])
    whole = sum(totals.values()) or 1.0
    ranked = sorted(totals.items(), key=lambda kv: -kv[1])[:n]
    return [{"name": k, "ms_per_call": v / repeats / 1e6, "share": v / whole} for k, v in ranked]


def format_kernels(rows: list[dict]) -> str:
    lines = ["| # | op | ms / call | share |", "|---|---|---|---|"]
    for i, r in enumerate(rows, 1):
        lines.append(f"| {i} | `{r['name'][:80]}` | {r['ms_per_call']:.3f} | {100 * r['share']:.1f}% |")
    return "\n".join(lines)
