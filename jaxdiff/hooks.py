"""The hook API: typed attention sites, edits as pytrees, capture specs as static data.

A steering method never reaches into the model. It hands the UNet

* ``edits``: a :class:`UNetEdits` pytree. Its *structure* (which sites, which fields are set, which h-space
  function) is static; its *values* (biases, masks, vectors, scales) are traced arrays, so new values never
  retrace a jitted caller;
* ``capture``: a hashable :class:`CaptureSpec` (pass it as a static argument) naming what to return in
  ``aux``: the h-space tensor and/or softmax probabilities of chosen attention sites.

Edits and captures are applied at exactly two choke points: :func:`jaxdiff.attention.attend` (every
attention layer) and the mid-block seam of :func:`jaxdiff.unet.apply_unet` (h-space).

Row layout: edits carry an optional ``rows`` mask of shape (B,) so a classifier-free-guidance batch laid out
``[uncond, cond]`` can edit only its conditional rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping

import jax
import jax.numpy as jnp

from jaxdiff.pytree import pytree_dataclass, static_field

Array = jax.Array


class UnknownSiteError(ValueError):
    """An edit or capture names an attention site the model does not have."""


@dataclass(frozen=True, order=True)
class AttnSite:
    """Address of one attention layer, independent of call order.

    ``part``: ``"down"``, ``"mid"`` or ``"up"``; ``block``: index in ``down_blocks``/``up_blocks`` (0 for mid);
    ``attention``: index of the Transformer2D in that block (``attentions_i``); ``layer``: index in its
    ``transformer_blocks``; ``kind``: ``"self"`` (``attn1``) or ``"cross"`` (``attn2``).
    """

    part: Literal["down", "mid", "up"]
    block: int
    attention: int
    layer: int
    kind: Literal["self", "cross"]

    @property
    def path(self) -> str:
        """The parameter path of this layer, e.g. ``down_blocks_1/attentions_0/transformer_blocks_0/attn2``."""
        blk = "mid_block" if self.part == "mid" else f"{self.part}_blocks_{self.block}"
        attn = "attn1" if self.kind == "self" else "attn2"
        return f"{blk}/attentions_{self.attention}/transformer_blocks_{self.layer}/{attn}"

    def __str__(self) -> str:
        return self.path




@pytree_dataclass
@dataclass(frozen=True)
class AttnEdit:
    """Edit of one attention layer (all fields optional; ``None`` means "not used", which is static).

    Shapes broadcast against logits/probabilities of shape (B, heads, Q, K) and values (B, K):

    * ``logit_bias``: added to the scaled logits ``q.k / sqrt(d)`` (spatial priors, soft masks);
    * ``token_keep``: (B, K) (or broadcastable) mask, 0/False removes a key token before the softmax
      (logit -> -inf), i.e. hard suppression with renormalisation over the remaining tokens;
    * ``prob_scale``: multiplies probabilities after the softmax, *without* renormalising (prompt-to-prompt
      reweighting; LWIM attribute suppression with gamma_a < 1); set ``renormalize=True`` to divide by the
      new row sum;
    * ``prob_replace`` + ``replace_weight``: ``p <- w * replace + (1 - w) * p`` (prompt-to-prompt map
      replacement, w in [0, 1] may depend on the step);
    * ``value_scale``: (B, K) multiplier on each key token's value vector (zeroing a token's value);
    * ``rows``: (B,) mask; rows where it is False are left unedited.
    """

    logit_bias: Array | None = None
    token_keep: Array | None = None
    prob_scale: Array | None = None
    prob_replace: Array | None = None
    replace_weight: Array | None = None
    value_scale: Array | None = None
    rows: Array | None = None
    renormalize: bool = static_field(default=False)

    def __post_init__(self):
        if (self.prob_replace is None) != (self.replace_weight is None):
            raise ValueError("AttnEdit: prob_replace and replace_weight must be given together")

    @property
    def edits_probs(self) -> bool:
        """Whether this edit needs explicit probabilities (otherwise a fused kernel with a bias would do)."""
        return self.prob_scale is not None or self.prob_replace is not None


@pytree_dataclass
@dataclass(frozen=True)
class HSpaceEdit:
    """Edit of the h-space (mid-block output, NHWC (B, h, w, C)) by a pure function.

    ``fn(h_row, t_row, params) -> h_row`` is applied to each batch row separately (``jax.vmap``) with that
    row's timestep; rows where ``rows`` is False keep the original ``h``. ``fn`` is static (part of the
    treedef, so use a module-level function, not a fresh lambda per call); ``params`` are traced leaves. With
    ``per_row_params=True`` every leaf of ``params`` has a leading batch axis and row ``i`` gets slice ``i``.
    """

    fn: Callable[[Array, Array, Any], Array] = static_field()
    params: Any = None
    rows: Array | None = None
    per_row_params: bool = static_field(default=False)

    def apply(self, h: Array, t: Array) -> Array:
        b = h.shape[0]
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (b,))
        in_axes = (0, 0, 0 if self.per_row_params else None)
        new = jax.vmap(self.fn, in_axes=in_axes)(h, t, self.params)
        if new.shape != h.shape:
            raise ValueError(f"h-space edit {getattr(self.fn, '__name__', self.fn)} returned shape {new.shape}, "
                             f"expected {h.shape}")
        new = new.astype(h.dtype)
        if self.rows is None:
            return new
        return jnp.where(jnp.asarray(self.rows, bool).reshape(b, 1, 1, 1), new, h)


# ------------------------------------------------------------------------- ready-made h-space edits
def _add_vector_fn(h, t, params):
    return h + params["scale"] * params["direction"]


def _scale_fn(h, t, params):
    return params["alpha"] * h


def _replace_fn(h, t, params):
    return jnp.broadcast_to(params["h"], h.shape)


def add_vector(direction: Array, scale: Array | float = 1.0, rows: Array | None = None) -> HSpaceEdit:
    """``h + scale * direction`` (SDisc / RespoDiff concept vectors); ``direction`` is (C,) or (h, w, C)."""
    return HSpaceEdit(_add_vector_fn, {"direction": jnp.asarray(direction), "scale": jnp.asarray(scale, jnp.float32)},
                      rows)


def scale_h(alpha: Array | float, rows: Array | None = None) -> HSpaceEdit:
    """``alpha * h`` (LWIM h attenuation, gamma_h < 1)."""
    return HSpaceEdit(_scale_fn, {"alpha": jnp.asarray(alpha, jnp.float32)}, rows)


def replace_h(h_new: Array, rows: Array | None = None, per_row: bool = False) -> HSpaceEdit:
    """Replace h by ``h_new``: one (h, w, C) tensor for all rows, or (B, h, w, C) with ``per_row=True``."""
    return HSpaceEdit(_replace_fn, {"h": jnp.asarray(h_new)}, rows, per_row_params=per_row)


@pytree_dataclass
@dataclass(frozen=True)
class UNetEdits:
    """All edits of one UNet call: an optional h-space edit and a mapping site -> :class:`AttnEdit`."""

    hspace: HSpaceEdit | None = None
    attn: Mapping[AttnSite, AttnEdit] = field(default_factory=dict)


NO_EDITS = UNetEdits()

CaptureMode = Literal["heads", "mean"]


@dataclass(frozen=True)
class CaptureSpec:
    """What a UNet call returns in ``aux`` (hashable: pass as a static argument of ``jax.jit``).

    * ``hspace``: return the mid-block output as ``aux["h"]`` (B, h, w, C), as the model computed it, i.e.
      *before* the h-space edit (the edited tensor is ``edits.hspace.apply(h, t)``);
    * ``attn``: sites whose softmax probabilities are returned in ``aux["attn"][site]``: (B, heads, Q, K)
      for mode ``"heads"`` or the head mean (B, Q, K) for ``"mean"``. Q is the row-major flattened spatial
      grid of that layer (use :func:`jaxdiff.attention.maps_to_grid`).
    """

    hspace: bool = False
    attn: tuple[tuple[AttnSite, CaptureMode], ...] = ()

    def __post_init__(self):
        for site, mode in self.attn:
            if not isinstance(site, AttnSite):
                raise TypeError(f"CaptureSpec.attn entries are (AttnSite, mode) pairs, got {site!r}")
            if mode not in ("heads", "mean"):
                raise ValueError(f"capture mode for {site} must be 'heads' or 'mean', got {mode!r}")

    @classmethod
    def of(cls, sites, mode: CaptureMode = "mean", hspace: bool = False) -> "CaptureSpec":
        return cls(hspace=hspace, attn=tuple((s, mode) for s in sites))

    def mode(self, site: AttnSite) -> CaptureMode | None:
        for s, m in self.attn:
            if s == site:
                return m
        return None


NO_CAPTURE = CaptureSpec()


def check_sites(known: tuple[AttnSite, ...], edits: UNetEdits, capture: CaptureSpec) -> None:
    """Raise :class:`UnknownSiteError` if an edit or capture names a site the model does not have."""
    known_set = set(known)
    named = [("edit", s) for s in edits.attn] + [("capture", s) for s, _ in capture.attn]
    bad = [f"{what} {s!r}" for what, s in named if s not in known_set]
    if bad:
        raise UnknownSiteError(
            "no such attention site: " + "; ".join(bad) + f". This model has {len(known)} sites, e.g. "
            + ", ".join(repr(s) for s in known[:4]) + " (see jaxdiff.unet.attn_sites(config)).")
