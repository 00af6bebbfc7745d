"""jaxdiff: Stable Diffusion in pure JAX with h-space and attention as explicit pytrees, for steering research.

Never imports torch (tested)."""

from jaxdiff.hooks import (NO_CAPTURE, NO_EDITS, AttnEdit, AttnSite, CaptureSpec, HSpaceEdit, UNetEdits,
                           UnknownSiteError, add_vector, replace_h, scale_h)

__all__ = ["NO_CAPTURE", "NO_EDITS", "AttnEdit", "AttnSite", "CaptureSpec", "HSpaceEdit", "UNetEdits",
           "UnknownSiteError", "add_vector", "replace_h", "scale_h"]
