"""jaxdiff: Stable Diffusion in pure JAX with h-space and attention as explicit pytrees, for steering research.

Never imports torch (tested)."""

from jaxdiff import xla_flags

xla_flags.apply()   # before JAX's first computation reads XLA_FLAGS (a CPU miscompile; see jaxdiff/xla_flags.py)

from jaxdiff.hooks import (NO_CAPTURE, NO_EDITS, AttnEdit, AttnSite, CaptureSpec, HSpaceEdit, UNetEdits,
                           UnknownSiteError, add_vector, replace_h, scale_h)

__all__ = ["NO_CAPTURE", "NO_EDITS", "AttnEdit", "AttnSite", "CaptureSpec", "HSpaceEdit", "UNetEdits",
           "UnknownSiteError", "add_vector", "replace_h", "scale_h"]
