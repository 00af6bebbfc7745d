"""The denoising loop as one ``lax.scan`` over step indices, with guidance, per-step steering and captures.

The loop is k-diffusion shaped (Crowson's ``sample_*`` functions): it takes a *denoiser callable*
``model(x, t, edits, capture) -> (output, aux)`` (the UNet closed over its params and text conditioning, built
inside the compiled program) and a :class:`~jaxdiff.schedulers.Schedule`; the scheduler's pure
``step(schedule, state, i, output, x)`` does the update. The scanned ``xs`` are the step indices
``start .. len(schedule) - 1``, so the step index reaches edits, hooks and stochastic keys as data.

Per-step captures come back as scan outputs, reduced so memory stays bounded (:class:`StepCaptureSpec`):
``"stack"`` keeps every step (S, ...), ``"sum"`` keeps one float32 running sum, ``"steps"`` keeps only chosen
step indices (k, ...) in a carried buffer, ``"none"`` returns nothing (captures only feed the latent hook).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Literal

import jax
import jax.numpy as jnp

from jaxdiff.hooks import NO_CAPTURE, AttnSite, CaptureMode, CaptureSpec, UNetEdits
from jaxdiff.schedulers import Schedule, init_state, scale_model_input, step
from jaxdiff.steering import HOOK_KEY_SALT, Steering, StepContext, run_post_hooks, run_pre_hooks

Array = jax.Array
Denoiser = Callable[[Array, Array, UNetEdits, CaptureSpec], tuple[Array, dict]]
Reduce = Literal["stack", "sum", "steps", "none"]
_REDUCTIONS = ("stack", "sum", "steps", "none")


@dataclass(frozen=True)
class StepCaptureSpec:
    """What a sampling run captures at each step and how it reduces it over steps (hashable, static).

    * ``unet``: the per-call :class:`~jaxdiff.hooks.CaptureSpec` (h-space and/or attention sites, with head
      mode ``"heads"`` (B, heads, Q, K) or head mean ``"mean"`` (B, Q, K));
    * ``reduce``: ``"stack"`` (S, ...) for the S steps run; ``"sum"`` over those steps (float32); ``"steps"``
      only the schedule indices in ``steps``, stacked in that order (k, ...); ``"none"``: nothing returned;
    * ``steps``: for ``"steps"``, indices into ``schedule.timesteps`` (PNDM's schedule has N + 1 entries);
    * ``cond_only``: with guidance, keep only the conditional rows (B instead of 2B).
    """

    unet: CaptureSpec = NO_CAPTURE
    reduce: Reduce = "stack"
    steps: tuple[int, ...] = ()
    cond_only: bool = True

    def __post_init__(self):
        if not isinstance(self.unet, CaptureSpec):
            raise TypeError(f"StepCaptureSpec.unet must be a CaptureSpec, got {type(self.unet).__name__}")
        if self.reduce not in _REDUCTIONS:
            raise ValueError(f"StepCaptureSpec.reduce must be one of {_REDUCTIONS}, got {self.reduce!r}")
        if (self.reduce == "steps") != bool(self.steps):
            raise ValueError("StepCaptureSpec.steps (a tuple of step indices) goes with reduce='steps', and only "
                             f"with it; got reduce={self.reduce!r}, steps={self.steps!r}")
        if len(set(self.steps)) != len(self.steps) or not all(isinstance(s, int) for s in self.steps):
            raise ValueError(f"StepCaptureSpec.steps must be distinct ints, got {self.steps!r}")

    @classmethod
    def of(cls, sites=(), mode: CaptureMode = "mean", *, hspace: bool = False, reduce: Reduce = "stack",
           steps: tuple[int, ...] = (), cond_only: bool = True) -> "StepCaptureSpec":
        return cls(CaptureSpec.of(tuple(sites), mode=mode, hspace=hspace), reduce, tuple(steps), cond_only)

    @property
    def sites(self) -> tuple[AttnSite, ...]:
        return tuple(s for s, _ in self.unet.attn)

    def check(self, start: int, num_steps: int) -> None:
        """Host-side check that every requested step index is run (``start <= i < num_steps``)."""
        bad = [s for s in self.steps if not start <= s < num_steps]
        if bad:
            raise ValueError(f"capture steps {bad} are not run: this run executes schedule steps {start}.."
                             f"{num_steps - 1}")


NO_STEP_CAPTURE = StepCaptureSpec(reduce="none")


def as_step_capture(capture: StepCaptureSpec | None) -> StepCaptureSpec:
    """``None`` -> :data:`NO_STEP_CAPTURE`; anything but a :class:`StepCaptureSpec` is refused."""
    if capture is None:
        return NO_STEP_CAPTURE
    if not isinstance(capture, StepCaptureSpec):
        raise TypeError(f"capture must be a StepCaptureSpec, got {type(capture).__name__}")
    return capture


def guided_prediction(model: Denoiser, x: Array, t: Array, *, guided: bool, guidance: Array,
                      edits: UNetEdits, capture: CaptureSpec) -> tuple[Array, dict]:
    """Model output with classifier-free guidance (Ho & Salimans 2022, eq. 6, in diffusers' form)::

        out = out_uncond + w (out_cond - out_uncond)

    on one UNet batch laid out ``[uncond..., cond...]`` (``x`` is duplicated). Without guidance the output is the
    conditional one. Returns the (B, ...) guided output and the UNet's aux for all rows."""
    out, aux = model(jnp.concatenate([x, x]) if guided else x, t, edits, capture)
    if guided:
        uncond, cond = jnp.split(out, 2)
        out = uncond + guidance * (cond - uncond)
    return out, aux


def select_captures(aux: dict, spec: StepCaptureSpec, guided: bool) -> dict:
    """The step's captures ``{"attn": {site: probs}, "h": h}`` (``h`` only if captured), conditional rows only
    when ``spec.cond_only`` and the batch is guided."""
    caps = {"attn": dict(aux["attn"])}
    if spec.unet.hspace:
        caps["h"] = aux["h"]
    if guided and spec.cond_only:
        caps = jax.tree.map(lambda a: a[a.shape[0] // 2:], caps)
    return caps


def _reduce_init(spec: StepCaptureSpec, shapes) -> dict:
    """Zero accumulators for ``"sum"`` (float32) and ``"steps"`` (k slots, capture dtype)."""
    if spec.reduce == "sum":
        return jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), shapes)
    if spec.reduce == "steps":
        return jax.tree.map(lambda s: jnp.zeros((len(spec.steps), *s.shape), s.dtype), shapes)
    return {}


def _reduce_step(spec: StepCaptureSpec, acc: dict, caps: dict, i: Array) -> tuple[dict, dict]:
    """(new accumulator, scan output) for one step's captures."""
    if spec.reduce == "stack":
        return acc, caps
    if spec.reduce == "sum":
        # float32 running sum: bf16 captures summed over 50 steps would lose ~6 bits.
        return jax.tree.map(lambda a, c: a + c.astype(jnp.float32), acc, caps), {}
    if spec.reduce == "steps":
        # Write slot k if i == steps[k]; otherwise rewrite slot 0 with itself. One in-place dynamic-update-slice
        # of one capture per step, never a pass over the whole (k, ...) buffer.
        hit = jnp.asarray(spec.steps, jnp.int32) == i          # (k,) at most one True
        slot = jnp.argmax(hit)
        def put(a, c):
            new = jnp.where(hit.any(), c.astype(a.dtype), a[slot])
            return jax.lax.dynamic_update_index_in_dim(a, new, slot, 0)
        return jax.tree.map(put, acc, caps), {}
    return acc, {}


def _report(progress: Callable[[int, int], None], total: int, done) -> None:
    progress(int(done), total)


def denoise_step(model: Denoiser, schedule: Schedule, *, rows: int, guided: bool, guidance: Array, key: Array,
                 steering: Steering = Steering(), capture: StepCaptureSpec = NO_STEP_CAPTURE,
                 cond_model: Denoiser | None = None, cond=None):
    """The loop body ``body((x, state, acc), i) -> ((x, state, acc), ys)`` of :func:`denoise` and a function
    ``init(latents, start)`` giving its first carry (``rows``: UNet batch, 2B when ``guided``).

    One step: edits of step ``i`` (``steering.edits_at``), the pre-step hooks (they see a
    :class:`~jaxdiff.steering.StepContext` with ``model``, ``cond_model`` and ``cond``), UNet input scaled by
    ``scale_model_input``, guided model output, ``step`` (stochastic kinds draw from ``fold_in(key, i)``), then
    the post-step hooks; the step's captures go to the reduction (``acc``) or out as ``ys`` for ``"stack"``."""
    key = jnp.asarray(key)
    if cond_model is None and not guided:
        cond_model = model

    def one_step(x, state, i):
        t = schedule.timesteps[i]
        step_key = jax.random.fold_in(key, i)
        edits = steering.edits_at(i, t, rows)
        ctx = StepContext(i=i, t=t, schedule=schedule, key=jax.random.fold_in(step_key, HOOK_KEY_SALT), cond=cond,
                          model=model, cond_model=cond_model, edits=edits, guided=guided, guidance=guidance)
        x, pre_stats = run_pre_hooks(steering, x, ctx)
        out, aux = guided_prediction(model, scale_model_input(schedule, x, i), t, guided=guided, guidance=guidance,
                                     edits=edits, capture=capture.unet)
        caps = select_captures(aux, capture, guided)
        x_new, state = step(schedule, state, i, out, x, key=step_key)
        x_new, post_stats = run_post_hooks(steering, x, x_new, caps, ctx)
        if set(pre_stats) & set(post_stats):
            raise ValueError(f"pre- and post-step hooks report the same stats keys: "
                             f"{sorted(set(pre_stats) & set(post_stats))}")
        stats = {**pre_stats, **post_stats}
        return x_new, state, caps, stats

    def init(latents: Array, start: int) -> tuple:
        latents = jnp.asarray(latents, jnp.float32)
        state0 = init_state(schedule, latents)
        acc0 = {}
        if capture.reduce in ("sum", "steps"):   # accumulator shapes: trace one step abstractly (no compute)
            shapes = jax.eval_shape(lambda x: one_step(x, state0, jnp.int32(start))[2], latents)
            acc0 = _reduce_init(capture, shapes)
        return latents, state0, acc0

    def body(carry, i):
        x, state, acc = carry
        x, state, caps, stats = one_step(x, state, i)
        acc, ys = _reduce_step(capture, acc, caps, i)
        if stats:
            ys = dict(ys, hooks=stats)
        return (x, state, acc), ys

    return body, init


def reduced_captures(capture: StepCaptureSpec, acc: dict, ys: dict) -> dict:
    """The run's capture output: the stacked per-step ``ys`` for ``"stack"``, else the accumulator; plus the
    hooks' per-step stats (stacked over the steps run) under ``"hooks"`` when a hook reports any."""
    out = ys if capture.reduce == "stack" else acc
    if "hooks" in ys:
        out = dict(out, hooks=ys["hooks"])
    return out


def check_start(start: int, n: int) -> None:
    if not 0 <= start < n:
        raise ValueError(f"start step {start} outside the schedule's {n} steps")


def denoise(model: Denoiser, schedule: Schedule, latents: Array, *, guided: bool, guidance: Array, key: Array,
            start: int = 0, steering: Steering = Steering(), capture: StepCaptureSpec = NO_STEP_CAPTURE,
            progress: Callable[[int, int], None] | None = None, cond_model: Denoiser | None = None,
            cond=None) -> tuple[Array, dict]:
    """Run scheduler steps ``start .. len(schedule) - 1`` from ``latents`` (B, h, w, C) in one ``lax.scan`` of
    :func:`denoise_step`. The latent carry stays float32 whatever the UNet dtype (the schedulers compute in
    float32).

    Args:
      model: denoiser ``(x (R, h, w, C), t, edits, capture) -> (output, aux)`` with R = 2B when ``guided``.
      guidance: traced scalar guidance scale (used only when ``guided``).
      start: first step index (static; img2img starts mid-schedule with a fresh scheduler state, as diffusers).
      cond_model, cond: the conditional-rows denoiser and the conditioning, handed to hooks in their
        :class:`~jaxdiff.steering.StepContext` (``sample.pipeline`` supplies both).
      progress: called as ``progress(done, total)`` once per step from inside the compiled loop
        (``jax.debug.callback``: no effect on the computation); static, so reuse one callable. A program with
        a host callback is never written to JAX's persistent compilation cache; :func:`sample.pipeline.generate`
        therefore reports progress by stepping from the host instead.

    Returns:
      ``(latents, aux)``: final latents (B, h, w, C) float32; ``aux`` the reduced captures
      ``{"attn": {site: ...}, "h": ...}`` (``{}`` for ``reduce="none"``).
    """
    n = len(schedule)
    check_start(start, n)
    body, init = denoise_step(model, schedule, rows=latents.shape[0] * (2 if guided else 1), guided=guided,
                              guidance=guidance, key=key, steering=steering, capture=capture,
                              cond_model=cond_model, cond=cond)

    def observed(carry, i):
        carry, ys = body(carry, i)
        if progress is not None:
            jax.debug.callback(functools.partial(_report, progress, n - start), i - start + 1)
        return carry, ys

    (x, _, acc), ys = jax.lax.scan(observed, init(latents, start), jnp.arange(start, n, dtype=jnp.int32))
    return x, reduced_captures(capture, acc, ys)
