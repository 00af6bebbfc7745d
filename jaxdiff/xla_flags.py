"""XLA flags jaxdiff needs for correct results, set once when ``jaxdiff`` is imported (before JAX's first
computation reads ``XLA_FLAGS``; a flag the user already set is left alone).

* ``--xla_cpu_experimental_ynn_fusion_type=-reduce``: jaxlib 0.10's CPU compiler fuses some reductions into
  YNNPACK kernels that give wrong results inside a jitted, vmapped VJP of the UNet at 8 or more cotangents (the
  layer-norm backward of a transformer block: 13% relative error against the same computation op by op, in
  float32 and float64 alike; exact again without the YNNPACK reduce fusion). Abs-Grad-SAM's exact saliency is
  such a computation; ``tests/test_abs_grad_sam.py`` compares it with a brute-force Jacobian. Only set for the
  jaxlib versions checked (an unknown flag aborts XLA).
"""

from __future__ import annotations

import os
from importlib import metadata

CHECKED = {"0.10": ("--xla_cpu_experimental_ynn_fusion_type", "-reduce")}


def required_flags(jaxlib_version: str) -> list[str]:
    """The ``--flag=value`` strings needed with this jaxlib version."""
    major_minor = ".".join(jaxlib_version.split(".")[:2])
    flag = CHECKED.get(major_minor)
    return [f"{flag[0]}={flag[1]}"] if flag else []


def apply() -> None:
    """Append the required flags to ``XLA_FLAGS`` unless the user set them."""
    try:
        version = metadata.version("jaxlib")
    except metadata.PackageNotFoundError:
        return
    current = os.environ.get("XLA_FLAGS", "")
    extra = [f for f in required_flags(version) if f.split("=")[0] not in current]
    if extra:
        os.environ["XLA_FLAGS"] = " ".join([current, *extra]).strip()
