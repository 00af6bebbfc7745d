"""Multi-head attention: the single choke point where attention edits and captures happen.

Every attention layer of the UNet (self and cross) calls :func:`attend`. A layer that is neither edited nor
captured takes the *fast path*; an edited/captured layer takes the *explicit path*, which materialises
float32 logits and softmax probabilities so they can be edited, returned, and differentiated.

Numerics: logits ``q.k^T / sqrt(d)`` and the softmax are always computed in float32 (the ``upcast_attention``
/ ``upcast_softmax`` of diffusers and SD2's ``_ATTN_PRECISION="fp32"``; required for SD2.x in half precision,
harmless otherwise); the weighted sum of values runs in the value dtype.

Fast path per backend (:func:`attention_kernel`, static per call site): on GPU, cuDNN's fused attention
(``jax.nn.dot_product_attention(implementation="cudnn")``) for half-precision inputs with head dims it takes,
else XLA's unfused attention (``implementation="xla"``; ``None`` would also mean XLA in jax 0.10). On CPU the
explicit einsum + softmax (~1.7x faster than ``dot_product_attention``'s XLA fallback there), with two
changes that matter for SD1.5's 64x64 self-attention (4096 x 4096 logits, 512 MiB per layer in float32):
heads are moved before tokens so both products are plain batched matmuls, and large logits are computed in
query blocks of one batch row (:func:`_query_block`, 16 MiB each) instead of being streamed through memory
several times (max, exp, sum, divide, PV). Measured on the 2-core CI machine, one such layer: 0.96 s
-> 0.18 s at batch 1. Each query row's computation is the same in every path (the softmax is per row), so
on CPU the fast and explicit paths agree bit for bit (checked at batch 1 and 2) and "capture on does not
change the output" holds exactly; on GPU it holds to the fused kernel's rounding.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from jaxdiff.hooks import AttnEdit, AttnSite, CaptureMode

Array = jax.Array


def _split_heads(x: Array, heads: int) -> Array:
    b, t, d = x.shape
    return x.reshape(b, t, heads, d // heads)


BLOCK_LOGITS = 2 ** 22  # float32 logits per query block of one batch row (16 MiB)


def _query_block(b: int, t: int, h: int, s: int) -> int:
    """Query block size: the largest divisor of ``t`` whose (h, block, s) logits fit in :data:`BLOCK_LOGITS`
    (at least 16), or ``t`` when the whole (b, h, t, s) logits do. Independent of ``b`` so a batch's rows
    are blocked alike (SD1.5 64x64 self-attention: block 128)."""
    if b * h * t * s <= BLOCK_LOGITS:
        return t
    block = max(16, BLOCK_LOGITS // (h * s))
    while t % block:
        block -= 1
    return block


def _to_bhtd(x_BTHD: Array) -> Array:
    # Heads before tokens: the two attention products become plain batched matmuls over (B, H), with no
    # strided access inside XLA's dot kernels (measured 2x faster on CPU than contracting the BTHD layout).
    return x_BTHD.transpose(0, 2, 1, 3)


KERNEL_ENV = "JAXDIFF_ATTENTION"  # "auto" (default), "xla" or "cudnn": the fast path's kernel on GPU


def _gpu_kernel(dtype, head_dim: int, compute_capability: str | None) -> str:
    """cuDNN's fused (flash) attention where it applies, else XLA's unfused attention.

    cuDNN's fused kernel takes half precision only (float32 stays on XLA, whose logits are float32 anyway),
    head dims that are multiples of 8 up to 128, or up to 256 from Hopper (compute capability 9.0) on; SD1.5's
    head dim 160 therefore needs XLA before Hopper.
    """
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return "xla"
    major = int(str(compute_capability or "0").split(".")[0])
    limit = 256 if major >= 9 else 128
    return "cudnn" if head_dim % 8 == 0 and head_dim <= limit and major >= 8 else "xla"


def attention_kernel(backend: str, dtype, head_dim: int, masked: bool, compute_capability: str | None = None,
                     override: str | None = None) -> str:
    """The fast path's kernel for one attention call, chosen statically from shapes, dtype and device.

    ``"blocked"`` (:func:`_blocked_attention`, the explicit softmax in query blocks, bit-identical to the path
    that edits and captures) for masked attention (the CLIP text encoder) and on CPU; otherwise one rule per
    backend: ``gpu`` -> :func:`_gpu_kernel`; any other backend (TPU) -> ``"xla"`` (a Pallas kernel, e.g. splash
    attention, would slot in here). ``override`` (the ``JAXDIFF_ATTENTION`` environment variable, read at
    trace time) forces ``"xla"`` or ``"cudnn"`` on GPU, for A/B measurements.
    """
    if masked or backend == "cpu":
        return "blocked"
    if backend != "gpu":
        return "xla"
    if override not in (None, "", "auto"):
        if override not in ("xla", "cudnn"):
            raise ValueError(f"{KERNEL_ENV}={override!r}: expected auto, xla or cudnn")
        return override
    return _gpu_kernel(dtype, head_dim, compute_capability)


def _compute_capability() -> str | None:
    return getattr(jax.devices()[0], "compute_capability", None)


def _fast_attention(q_BTHD: Array, k_BSHD: Array, v_BSHD: Array, mask_BHTS: Array | None) -> Array:
    backend = jax.default_backend()
    kernel = attention_kernel(backend, q_BTHD.dtype, q_BTHD.shape[-1], mask_BHTS is not None,
                              _compute_capability() if backend == "gpu" else None, os.environ.get(KERNEL_ENV))
    if kernel == "blocked":
        return _blocked_attention(q_BTHD, k_BSHD, v_BSHD, mask_BHTS)
    return jax.nn.dot_product_attention(q_BTHD, k_BSHD, v_BSHD, implementation=kernel)


def _blocked_attention(q_BTHD: Array, k_BSHD: Array, v_BSHD: Array, mask_BHTS: Array | None) -> Array:
    b, t, h, d = q_BTHD.shape
    block = _query_block(b, t, h, k_BSHD.shape[1])
    if mask_BHTS is not None or block == t:
        return _explicit_attention(q_BTHD, k_BSHD, v_BSHD, mask_BHTS, None)[0]
    # Sequential loop (lax.map) over (batch row, query block) pairs: one (H, block, S) slab of logits lives at
    # a time, the same size whatever the batch.
    n = t // block
    q_MHCD = _to_bhtd(q_BTHD).reshape(b, h, n, block, d).transpose(0, 2, 1, 3, 4).reshape(b * n, h, block, d)
    k_BHSD, v_BHSD = _to_bhtd(k_BSHD), _to_bhtd(v_BSHD)

    def one_block(args):
        q_HCD, row = args
        k_1HSD = jax.lax.dynamic_index_in_dim(k_BHSD, row, keepdims=True)
        v_1HSD = jax.lax.dynamic_index_in_dim(v_BHSD, row, keepdims=True)
        return _attention_core(q_HCD[None], k_1HSD, v_1HSD, None, None)[0][0]

    out_MHCD = jax.lax.map(one_block, (q_MHCD, jnp.repeat(jnp.arange(b), n)))
    return out_MHCD.reshape(b, n, h, block, -1).transpose(0, 1, 3, 2, 4).reshape(b, t, h, v_BSHD.shape[-1])


def _logits(q_BHTD: Array, k_BHSD: Array) -> Array:
    """float32 ``q.k^T``. On accelerators half-precision q, k go into the matmul as they are, accumulated in
    float32: their products are exact in float32, so this is diffusers' ``upcast_attention`` without a float32
    matmul (tensor cores). On CPU they are upcast first, which keeps CPU results bit-identical to earlier
    releases (the two differ in summation order only)."""
    if jax.default_backend() == "cpu" or q_BHTD.dtype == jnp.float32:
        return jnp.einsum("bhtd,bhsd->bhts", q_BHTD.astype(jnp.float32), k_BHSD.astype(jnp.float32))
    return jnp.einsum("bhtd,bhsd->bhts", q_BHTD, k_BHSD, preferred_element_type=jnp.float32)


def _attention_core(q_BHTD, k_BHSD, v_BHSD, mask_BHTS, edits: tuple[AttnEdit, ...] | None):
    """Returns (out (B, H, T, D), probs (B, H, T, S) float32 after edits). Several edits of one site apply in
    order within each stage: every logit edit, the softmax, every probability edit, every value scale."""
    edits = edits or ()
    scale = q_BHTD.shape[-1] ** -0.5
    logits = _logits(q_BHTD, k_BHSD) * scale
    if mask_BHTS is not None:
        logits = jnp.where(mask_BHTS, logits, -jnp.inf)
    for edit in edits:
        logits = _edit_logits(logits, edit)
    probs = jax.nn.softmax(logits, axis=-1)
    for edit in edits:
        probs = _edit_probs(probs, edit)
        v_BHSD = _to_bhtd(_edit_values(_to_bhtd(v_BHSD), edit))
    return jnp.einsum("bhts,bhsd->bhtd", probs.astype(v_BHSD.dtype), v_BHSD), probs


def _explicit_attention(q_BTHD, k_BSHD, v_BSHD, mask_BHTS, edit: tuple[AttnEdit, ...] | None):
    """Returns (out (B, T, H, D), probs (B, H, T, S) float32 after edits)."""
    out_BHTD, probs = _attention_core(_to_bhtd(q_BTHD), _to_bhtd(k_BSHD), _to_bhtd(v_BSHD), mask_BHTS, edit)
    return _to_bhtd(out_BHTD), probs


def _rows(edit: AttnEdit, new: Array, old: Array) -> Array:
    if edit.rows is None:
        return new
    mask = jnp.asarray(edit.rows, bool).reshape((-1,) + (1,) * (new.ndim - 1))
    return jnp.where(mask, new, old)


def _edit_logits(logits_BHTS: Array, edit: AttnEdit) -> Array:
    new = logits_BHTS
    if edit.logit_bias is not None:
        new = new + jnp.asarray(edit.logit_bias, jnp.float32)
    if edit.token_keep is not None:
        keep = jnp.asarray(edit.token_keep).astype(bool)
        if keep.ndim == 2:  # (B, S) -> (B, 1, 1, S)
            keep = keep[:, None, None, :]
        new = jnp.where(keep, new, -jnp.inf)
    return _rows(edit, new, logits_BHTS)


def _edit_probs(probs_BHTS: Array, edit: AttnEdit) -> Array:
    new = probs_BHTS
    if edit.prob_scale is not None:
        scale = jnp.asarray(edit.prob_scale, jnp.float32)
        if scale.ndim == 2:  # per-token (B, S)
            scale = scale[:, None, None, :]
        new = new * scale
        if edit.renormalize:
            new = new / jnp.sum(new, axis=-1, keepdims=True)
    if edit.prob_replace is not None:
        w = jnp.asarray(edit.replace_weight, jnp.float32)
        w = w.reshape(w.shape + (1,) * (4 - w.ndim)) if w.ndim <= 1 else w
        new = w * jnp.asarray(edit.prob_replace, jnp.float32) + (1.0 - w) * new
    return _rows(edit, new, probs_BHTS)


def _edit_values(v_BSHD: Array, edit: AttnEdit) -> Array:
    if edit.value_scale is None:
        return v_BSHD
    scale = jnp.asarray(edit.value_scale, v_BSHD.dtype)
    if scale.ndim == 2:  # (B, S) -> (B, S, 1, 1)
        scale = scale[:, :, None, None]
    return _rows(edit, v_BSHD * scale, v_BSHD)


def attend(q: Array, k: Array, v: Array, heads: int, *, site: AttnSite | None = None,
           edit: AttnEdit | tuple[AttnEdit, ...] | None = None, capture: CaptureMode | None = None,
           causal: bool = False, key_mask: Array | None = None) -> tuple[Array, Array | None]:
    """Scaled dot-product attention over projected inputs, with optional edit and capture.

    Args:
      q: (B, T, heads*D) queries; k, v: (B, S, heads*D) keys and values (already projected).
      heads: number of heads.
      site: the layer's address (for error messages; edits/captures are looked up by the caller).
      edit: an :class:`AttnEdit`, a tuple of them (applied in order), or None.
      capture: None, ``"heads"`` (return (B, heads, T, S) probs) or ``"mean"`` (return (B, T, S)).
      causal: causal mask (CLIP text encoder).
      key_mask: optional (B, S) bool, False keys are ignored.

    Returns:
      ``(out (B, T, heads*D), captured probs or None)``. Captured probs are float32 and differentiable.
    """
    b, t, _ = q.shape
    s = k.shape[1]
    q_, k_, v_ = _split_heads(q, heads), _split_heads(k, heads), _split_heads(v, heads)
    mask = None
    if causal:
        mask = jnp.tril(jnp.ones((t, s), bool))[None, None]
    if key_mask is not None:
        km = jnp.asarray(key_mask, bool)[:, None, None, :]
        mask = km if mask is None else mask & km
    if edit is None and capture is None:
        out = _fast_attention(q_, k_, v_, mask)
        return out.reshape(b, t, -1), None
    edits = None if edit is None else edit if isinstance(edit, tuple) else (edit,)
    out, probs = _explicit_attention(q_, k_, v_, mask, edits)
    captured = None
    if capture == "heads":
        captured = probs
    elif capture == "mean":
        captured = probs.mean(axis=1)
    elif capture is not None:
        raise ValueError(f"capture mode at {site} must be 'heads', 'mean' or None, got {capture!r}")
    return out.reshape(b, t, -1), captured


def maps_to_grid(probs: Array, height: int, width: int) -> Array:
    """Reshape captured probs (..., Q, K) with Q = height*width (row-major) to (..., height, width, K)."""
    *lead, q, kk = probs.shape
    if q != height * width:
        raise ValueError(f"attention map has {q} queries, not {height}x{width}")
    return probs.reshape(*lead, height, width, kk)
