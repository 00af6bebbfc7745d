"""Per-step steering of a sampling run: the one object every steering method hands the sampler.

A :class:`Steering` carries three kinds of intervention, all pure data (static functions + traced values):

* **UNet edits per step** (h-space and attention edits, :mod:`jaxdiff.hooks`): ``edits`` used at every step,
  or built per step by a static ``edit_fn(i, t, edits) -> UNetEdits`` from traced values, switched on for the
  steps where the traced ``active`` mask is True (an inactive step falls back to the unedited tensors bit for
  bit, through the edits' ``rows`` masks). h-space edits with ``per_step_params`` get their params sliced at
  the step (a per-step tensor, e.g. LWIM's re-injected reference h of *that* step).
* **Pre-step hooks** ``fn(x, ctx, params) -> x`` (or ``(x, stats)``, see below), run before every step's UNet call, step 0 included, on the
  latents that step is about to denoise. ``ctx`` is a :class:`StepContext`: step index, timestep, schedule, a
  PRNG key, the conditioning, the step's edits and the already-cast denoiser (all rows, and the conditional rows
  only), so a hook can differentiate a loss of freshly captured cross-attention maps with respect to the latents
  (Learn-to-Steer's test-time optimisation, Yiflach, Atzmon & Chechik, WACV 2026) without re-passing weights.
* **Post-step hooks** ``fn(x_in, x_out, captures, ctx, params) -> x_out`` (or ``(x_out, stats)``), run after the scheduler step on the
  step's input and output latents and the step's captures (as selected by the run's capture spec, before
  reduction): Abs-Grad-SAM's background replacement after a step, with saliency from the step input.

A hook may also report per-step statistics: it returns ``(x, stats)`` with ``stats`` a dict of arrays (e.g.
refinements used, final loss per row). The sampler stacks them over the steps run and returns them in the
run's ``aux["hooks"]`` (one dict, the hooks' keys merged; two hooks may not report the same key).

:func:`compose` combines steerings of several methods into one run: their edits are merged in order
(:func:`jaxdiff.hooks.merge_edits`: several h-space edits, several edits of one attention site) and their hooks
run in order. Composing with an empty ``Steering()`` changes nothing.

Hook and edit functions are static (part of a compiled program's identity): use module-level functions or
instances of a frozen dataclass with ``__call__`` (equal instances reuse the compiled program); a fresh lambda
per call recompiles. Values (vectors, scales, masks, step ranges, learning rates) are traced leaves: new values
never retrace.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxdiff.hooks import NO_EDITS, AttnEdit, HSpaceEdit, UNetEdits, merge_edits
from jaxdiff.pytree import pytree_dataclass, static_field

Array = jax.Array
# model(x (R, h, w, C), t, edits, capture) -> (output, aux): the UNet closed over its (cast) params and context
Denoiser = Callable[..., tuple[Array, dict]]

HOOK_KEY_SALT = 0x5EED   # hooks draw from fold_in(fold_in(run key, i), salt): never the scheduler's own draw


@dataclass(frozen=True)
class StepContext:
    """What a hook sees of step ``i`` (built inside the compiled loop; arrays are traced).

    * ``i``: step index into ``schedule.timesteps``; ``t``: its timestep; ``schedule``: the run's schedule;
    * ``key``: a PRNG key for this step's hooks (independent of the scheduler's stochastic draw);
    * ``cond``: the run's conditioning (``context`` (R, 77, D), SDXL ``added_cond``), rows ``[uncond, cond]``
      when ``guided``;
    * ``model``: the denoiser over all R rows (with guidance, x must be given twice: ``[x, x]``);
    * ``cond_model``: the denoiser over the conditional rows only (B rows; equal to ``model`` without
      guidance), e.g. for a loss of conditional cross-attention maps;
    * ``edits``: this step's UNet edits (pass them to the models to see the steered UNet);
    * ``guided``, ``guidance``: classifier-free guidance on/off (static) and its scale (traced).
    """

    i: Array
    t: Array
    schedule: Any
    key: Array
    cond: Any
    model: Denoiser
    cond_model: Denoiser | None
    edits: UNetEdits
    guided: bool
    guidance: Array


@pytree_dataclass
@dataclass(frozen=True)
class StepHook:
    """A static hook function with its traced parameters (see the module docstring for the signatures)."""

    fn: Callable = static_field()
    params: Any = None


@pytree_dataclass
@dataclass(frozen=True)
class Steering:
    """Everything that steers one sampling run (every field optional).

    * ``edits``: a :class:`~jaxdiff.hooks.UNetEdits` used at every (active) step, or, with ``edit_fn``, any
      pytree of traced values ``edit_fn`` turns into the step's ``UNetEdits``;
    * ``active``: (len(schedule),) bool, the steps on which the edits apply (None: all);
    * ``edit_fn``: static ``(i, t, edits) -> UNetEdits``;
    * ``pre``: :class:`StepHook` s run before each step's UNet call, in order;
    * ``post``: :class:`StepHook` s run after each scheduler step, in order;
    * ``parts``: steerings composed after this one (:func:`compose`).

    Edits address UNet rows: with guidance those are ``[uncond..., cond...]``; per-row edit arrays need that
    many rows. A run's schedule (``sample.spec.schedule_for``) gives ``active``'s length.
    """

    edits: Any = None
    active: Array | None = None
    edit_fn: Callable[[Array, Array, Any], UNetEdits] | None = static_field(default=None)
    pre: tuple[StepHook, ...] = ()
    post: tuple[StepHook, ...] = ()
    parts: tuple["Steering", ...] = ()

    def own_edits_at(self, i: Array, t: Array, rows: int) -> UNetEdits:
        """This steering's own edits of step ``i`` (without ``parts``)."""
        edits = self.edit_fn(i, t, self.edits) if self.edit_fn is not None else self.edits
        if edits is None:
            return NO_EDITS
        if not isinstance(edits, UNetEdits):
            raise TypeError(f"steering edits must be UNetEdits (or edit_fn must return them), got {type(edits)}")
        edits = edits.map_hspace(lambda e: e.at_step(i))
        if self.active is None:
            return edits
        return gate_edits(edits, jnp.asarray(self.active)[i].astype(bool), rows)

    def edits_at(self, i: Array, t: Array, rows: int) -> UNetEdits:
        """The UNet edits of step ``i`` (timestep ``t``) for a UNet batch of ``rows`` rows: this steering's,
        then each part's, merged in order."""
        own = self.own_edits_at(i, t, rows)
        if not self.parts:
            return own
        return merge_edits(own, *(p.edits_at(i, t, rows) for p in self.parts))

    @property
    def pre_hooks(self) -> tuple[StepHook, ...]:
        return self.pre + tuple(h for p in self.parts for h in p.pre_hooks)

    @property
    def post_hooks(self) -> tuple[StepHook, ...]:
        return self.post + tuple(h for p in self.parts for h in p.post_hooks)

    def check(self, num_steps: int) -> None:
        """Host-side checks against the schedule length: ``active``'s shape, per-step edit params' length."""
        if self.active is not None and tuple(jnp.shape(self.active)) != (num_steps,):
            raise ValueError(f"Steering.active must have shape ({num_steps},) (one entry per schedule step), "
                             f"got {tuple(jnp.shape(self.active))}")
        if isinstance(self.edits, UNetEdits):
            for e in self.edits.hspace_edits:
                lead = {jnp.shape(a)[0] for a in jax.tree.leaves(e.params)} if e.per_step_params else set()
                if lead - {num_steps}:
                    raise ValueError(f"per-step h-space edit params have {sorted(lead)} steps, the schedule has "
                                     f"{num_steps}")
        for p in self.parts:
            p.check(num_steps)


def gate_edits(edits: UNetEdits, on: Array, rows: int) -> UNetEdits:
    """``edits`` with every ``rows`` mask and-ed with the traced scalar ``on``: where ``on`` is False each edited
    tensor is replaced by the unedited one, bit for bit."""
    def gate(mask):
        base = jnp.ones((rows,), bool) if mask is None else jnp.broadcast_to(jnp.asarray(mask, bool), (rows,))
        return base & on

    def gated(es):
        out = tuple(dataclasses.replace(e, rows=gate(e.rows)) for e in es)
        return None if not out else out[0] if len(out) == 1 else out

    return UNetEdits(hspace=gated(edits.hspace_edits),
                     attn={s: gated(edits.attn_edits(s)) for s in edits.attn})


def as_steering(edits) -> Steering:
    """``None``, a :class:`UNetEdits` (every step) or a :class:`Steering` -> :class:`Steering`."""
    if edits is None:
        return Steering()
    if isinstance(edits, Steering):
        return edits
    if isinstance(edits, UNetEdits):
        return Steering(edits=edits)
    raise TypeError(f"edits must be None, UNetEdits or Steering, got {type(edits).__name__}")


def compose(*steerings) -> Steering:
    """One steering running every given one (``None``, ``UNetEdits`` or ``Steering``) in argument order: edits
    merged (h-space edits and edits of one site applied one after the other), pre- and post-step hooks run in
    that order. A single steering is returned as is."""
    parts = tuple(as_steering(s) for s in steerings if s is not None)
    if len(parts) == 1:
        return parts[0]
    return Steering(parts=parts)


def run_pre_hooks(steering: Steering, x: Array, ctx: StepContext) -> tuple[Array, dict]:
    """Apply the pre-step hooks in order (shape- and dtype-checked): ``(x, stats)``."""
    stats: dict = {}
    for hook in steering.pre_hooks:
        x = _checked(hook.fn(x, ctx, hook.params), x, "pre-step", stats)
    return x, stats


def run_post_hooks(steering: Steering, x_in: Array, x_out: Array, captures: dict,
                   ctx: StepContext) -> tuple[Array, dict]:
    """Apply the post-step hooks in order (shape- and dtype-checked): ``(x_out, stats)``."""
    stats: dict = {}
    for hook in steering.post_hooks:
        x_out = _checked(hook.fn(x_in, x_out, captures, ctx, hook.params), x_out, "post-step", stats)
    return x_out, stats


def _checked(new, like: Array, what: str, stats: dict) -> Array:
    if isinstance(new, tuple):
        new, extra = new
        if not isinstance(extra, dict) or set(extra) & set(stats):
            raise ValueError(f"{what} hook stats must be a dict with keys no other hook reports, got "
                             f"{type(extra).__name__} {sorted(extra) if isinstance(extra, dict) else ''}")
        stats.update(extra)
    if jnp.shape(new) != like.shape:
        raise ValueError(f"{what} hook returned shape {jnp.shape(new)}, expected {like.shape}")
    return jnp.asarray(new).astype(like.dtype)


# AttnEdit fields whose leading axis is the UNet row when they have this many dims (jaxdiff.attention's rules).
_ROW_AXIS_NDIM = {"logit_bias": (4,), "token_keep": (2, 4), "prob_scale": (2, 4), "prob_replace": (4,),
                  "replace_weight": (1, 4), "value_scale": (2,), "rows": (1,)}


def cond_half_edits(edits: UNetEdits, rows: int) -> UNetEdits:
    """The edits of the conditional half of a guided UNet batch of ``rows`` rows ``[uncond, cond]``, for a
    call on the conditional rows only (:attr:`StepContext.cond_model`): every per-row array (h-space ``rows``
    masks and per-row params, attention arrays whose leading axis is the row) keeps its second half; arrays
    broadcast over rows are kept as they are."""
    half = rows // 2

    def cut(a):
        return a if a is None or jnp.ndim(a) == 0 or jnp.shape(a)[0] != rows else a[half:]

    def hs(e: HSpaceEdit) -> HSpaceEdit:
        params = jax.tree.map(lambda a: a[half:], e.params) if e.per_row_params else e.params
        return dataclasses.replace(e, rows=cut(e.rows), params=params)

    def at(e: AttnEdit) -> AttnEdit:
        new = {f: cut(getattr(e, f)) for f, dims in _ROW_AXIS_NDIM.items()
               if getattr(e, f) is not None and jnp.ndim(getattr(e, f)) in dims}
        return dataclasses.replace(e, **new)

    hspace = tuple(hs(e) for e in edits.hspace_edits)
    attn = {s: tuple(at(e) for e in edits.attn_edits(s)) for s in edits.attn}
    return UNetEdits(hspace=None if not hspace else hspace[0] if len(hspace) == 1 else hspace,
                     attn={s: v[0] if len(v) == 1 else v for s, v in attn.items()})
