"""A text progress bar over denoising steps, fed from inside the compiled loop (``jax.debug.callback``)."""

from __future__ import annotations

import sys
import time


class ProgressBar:
    """``sampling  12/30 [########------------]  3.2 it/s  eta 6s`` on one terminal line (stderr).

    Called as ``bar(done, total)`` after each step (``done`` counts steps finished in this run; ``total`` is the
    run's step count, fewer than ``--steps`` for img2img); the clock starts at the first call, so the rate
    excludes compilation (reported separately)."""

    def __init__(self, label: str = "sampling", width: int = 24, stream=None):
        self.label, self.width = label, width
        self.stream = stream or sys.stderr
        self.t0 = None

    def __call__(self, done, total) -> None:
        done, self.total = int(done), int(total)
        now = time.perf_counter()
        if self.t0 is None or done == 1:
            self.t0 = now
        rate = (done - 1) / (now - self.t0) if done > 1 and now > self.t0 else 0.0
        eta = f"  eta {(self.total - done) / rate:.0f}s" if rate > 0 else ""
        fill = self.width * done // self.total
        bar = "#" * fill + "-" * (self.width - fill)
        self.stream.write(f"\r{self.label} {done:>4}/{self.total} [{bar}] {rate:5.2f} it/s{eta}   ")
        if done >= self.total:
            self.stream.write("\n")
        self.stream.flush()
