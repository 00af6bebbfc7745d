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

Composition: ``UNetEdits.hspace`` may hold several h-space edits and each site of ``UNetEdits.attn`` several
attention edits (tuples), applied in order; :func:`merge_edits` concatenates the edits of several methods, so
two methods touching h or one site compose without hand-merging.
"""

from __future__ import annotations

import dataclasses
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
    With ``per_step_params=True`` every leaf has a leading *step* axis (one entry per schedule step, before any
    batch axis): a sampling run's :class:`~jaxdiff.steering.Steering` hands the UNet slice ``i`` at step ``i``
    (:meth:`at_step`), e.g. LWIM's re-injection of the reference run's h of that very step.
    """

    fn: Callable[[Array, Array, Any], Array] = static_field()
    params: Any = None
    rows: Array | None = None
    per_row_params: bool = static_field(default=False)
    per_step_params: bool = static_field(default=False)

    def at_step(self, i: Array) -> "HSpaceEdit":
        """This edit with per-step params sliced at step ``i`` (traced); unchanged if not ``per_step_params``."""
        if not self.per_step_params:
            return self
        params = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), self.params)
        return dataclasses.replace(self, params=params, per_step_params=False)

    def apply(self, h: Array, t: Array) -> Array:
        if self.per_step_params:
            raise ValueError("a per-step h-space edit must be sliced to its step (HSpaceEdit.at_step) before use; "
                             "sampling with a Steering does that")
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
    """All edits of one UNet call: h-space edit(s) and a mapping site -> attention edit(s).

    ``hspace`` is None, one :class:`HSpaceEdit` or a tuple of them, applied in order at the mid-block seam;
    each ``attn`` value is one :class:`AttnEdit` or a tuple of them, applied in order at that site (all logit
    edits in order, the softmax, then all probability edits in order, and value scales)."""

    hspace: HSpaceEdit | tuple[HSpaceEdit, ...] | None = None
    attn: Mapping[AttnSite, AttnEdit | tuple[AttnEdit, ...]] = field(default_factory=dict)

    @property
    def hspace_edits(self) -> tuple[HSpaceEdit, ...]:
        """The h-space edits in order (empty tuple if none)."""
        return as_tuple(self.hspace)

    def attn_edits(self, site: AttnSite) -> tuple[AttnEdit, ...]:
        """The edits of ``site`` in order (empty tuple if none)."""
        return as_tuple(self.attn.get(site))

    def map_hspace(self, f: Callable[[HSpaceEdit], HSpaceEdit]) -> "UNetEdits":
        """These edits with ``f`` applied to every h-space edit (e.g. slicing per-step params)."""
        if self.hspace is None:
            return self
        new = tuple(f(e) for e in self.hspace_edits)
        return UNetEdits(hspace=new[0] if len(new) == 1 else new, attn=self.attn)


def as_tuple(x) -> tuple:
    """None -> (), a tuple -> itself, anything else -> (x,)."""
    if x is None:
        return ()
    return x if isinstance(x, tuple) else (x,)


NO_EDITS = UNetEdits()


def merge_edits(*edits: UNetEdits) -> UNetEdits:
    """One :class:`UNetEdits` applying every given one's edits, in argument order (h-space edits one after the
    other; at a site named by several, their attention edits one after the other). Merging with
    :data:`NO_EDITS` returns the other edits unchanged."""
    hspace: tuple = ()
    attn: dict = {}
    for e in edits:
        hspace += e.hspace_edits
        for site in e.attn:
            attn[site] = attn.get(site, ()) + e.attn_edits(site)
    hs = None if not hspace else hspace[0] if len(hspace) == 1 else hspace
    return UNetEdits(hspace=hs, attn={s: v[0] if len(v) == 1 else v for s, v in attn.items()})

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
