"""Per-step steering of a sampling run: UNet edits that depend on the step, and a latent hook between steps.

The step index ``i`` (into ``schedule.timesteps``) is the scan's ``xs``, so it reaches the edits as a traced
int32; nothing counts calls. Two ways to make edits depend on the step, combinable:

* ``active``: a (len(schedule),) bool array (traced: a new step range never retraces). On inactive steps every
  edit is switched off through its ``rows`` mask, which falls back to the unedited tensor exactly
  (``where(False, edited, original)``), so an inactive step computes what an unedited UNet computes;
* ``edit_fn(i, t, edits) -> UNetEdits``: a pure, static function building the step's edits from the traced
  values ``edits``, e.g. a strength schedule ``scale * weights[i]`` or prompt-to-prompt's attention-replacement
  window over the first steps (Hertz et al. 2023, "Prompt-to-Prompt Image Editing with Cross-Attention
  Control").

The latent hook ``hook(latents, i, captures, hook_params) -> latents`` runs after scheduler step ``i`` and
before step ``i + 1``: it sees the latents the next step will denoise, this step's captures (as selected by the
run's :class:`~sample.loop.StepCaptureSpec`, before reduction) and traced ``hook_params``. It may call
``jax.grad`` itself: Learn-to-Steer's test-time gradient step on the latents (Yiflach, Atzmon & Chechik,
WACV 2026) or an Abs-Grad-SAM-style background replacement plug in here. The latents it returns are denoised
next at ``schedule.timesteps[i + 1]``: a hook that needs timesteps, UNet params or a text context takes them in
``hook_params`` (see :func:`sample.spec.schedule_for`, :func:`sample.text.encode_prompts`); an update before the
very first step is an update of the initial latents.

``edit_fn`` and ``hook`` are static (part of the compiled program's identity): use module-level functions, or
instances of a frozen dataclass with ``__call__`` to carry static settings such as a ``UNetConfig`` (equal
instances reuse the compiled program; a fresh lambda or ``functools.partial`` per call recompiles).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxdiff.hooks import NO_EDITS, UNetEdits
from jaxdiff.pytree import pytree_dataclass, static_field

Array = jax.Array
LatentHook = Callable[[Array, Array, dict, Any], Array]


@pytree_dataclass
@dataclass(frozen=True)
class Steering:
    """Everything that steers one sampling run (every field optional).

    * ``edits``: a :class:`~jaxdiff.hooks.UNetEdits` used at every (active) step, or, with ``edit_fn``, any
      pytree of traced values ``edit_fn`` turns into the step's ``UNetEdits``;
    * ``active``: (len(schedule),) bool, the steps on which the edits apply (None: all);
    * ``edit_fn``: static ``(i, t, edits) -> UNetEdits``;
    * ``hook``: static ``(latents, i, captures, hook_params) -> latents`` (see the module docstring);
    * ``hook_params``: traced pytree handed to ``hook``.

    Edits address UNet rows: with guidance those are ``[uncond..., cond...]`` (see
    :func:`sample.text.guidance_rows`); per-row edit arrays need that many rows. The schedule of a run
    (:func:`sample.spec.schedule_for`) gives ``active``'s length and the timesteps a hook may need.
    """

    edits: Any = None
    active: Array | None = None
    edit_fn: Callable[[Array, Array, Any], UNetEdits] | None = static_field(default=None)
    hook: LatentHook | None = static_field(default=None)
    hook_params: Any = None

    def edits_at(self, i: Array, t: Array, rows: int) -> UNetEdits:
        """The UNet edits of step ``i`` (timestep ``t``) for a UNet batch of ``rows`` rows."""
        edits = self.edit_fn(i, t, self.edits) if self.edit_fn is not None else self.edits
        if edits is None:
            return NO_EDITS
        if not isinstance(edits, UNetEdits):
            raise TypeError(f"steering edits must be UNetEdits (or edit_fn must return them), got {type(edits)}")
        if self.active is None:
            return edits
        return gate_edits(edits, jnp.asarray(self.active)[i].astype(bool), rows)

    def check(self, num_steps: int) -> None:
        """Host-side check of ``active``'s shape against the schedule length."""
        if self.active is not None and tuple(jnp.shape(self.active)) != (num_steps,):
            raise ValueError(f"Steering.active must have shape ({num_steps},) (one entry per schedule step), "
                             f"got {tuple(jnp.shape(self.active))}")


def gate_edits(edits: UNetEdits, on: Array, rows: int) -> UNetEdits:
    """``edits`` with every ``rows`` mask and-ed with the traced scalar ``on``: where ``on`` is False each edited
    tensor is replaced by the unedited one, bit for bit."""
    def gate(mask):
        base = jnp.ones((rows,), bool) if mask is None else jnp.broadcast_to(jnp.asarray(mask, bool), (rows,))
        return base & on

    hspace = None if edits.hspace is None else dataclasses.replace(edits.hspace, rows=gate(edits.hspace.rows))
    return UNetEdits(hspace=hspace, attn={s: dataclasses.replace(e, rows=gate(e.rows)) for s, e in edits.attn.items()})


def as_steering(edits) -> Steering:
    """``None``, a :class:`UNetEdits` (every step) or a :class:`Steering` -> :class:`Steering`."""
    if edits is None:
        return Steering()
    if isinstance(edits, Steering):
        return edits
    if isinstance(edits, UNetEdits):
        return Steering(edits=edits)
    raise TypeError(f"edits must be None, UNetEdits or Steering, got {type(edits).__name__}")
