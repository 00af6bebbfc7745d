"""Noise schedulers as pure JAX functions with explicit state (k-diffusion style, diffusers-exact numerics).

Supported: DDIM, DDPM, PNDM (PLMS), Euler, Euler ancestral, DPM-Solver++ 2M; epsilon, v and x0 prediction.
A sampling loop::

    cfg = SchedulerConfig.from_json("model/scheduler/scheduler_config.json")
    sched = make_schedule(cfg, 30)
    x = jax.random.normal(key, shape) * sched.init_noise_sigma
    state = init_state(sched, x)
    for i in range(len(sched)):                      # or lax.fori_loop / lax.scan: ``i`` may be traced
        eps = unet(scale_model_input(sched, x, i), sched.timesteps[i], ...)
        x, state = step(sched, state, i, eps, x, key=jax.random.fold_in(step_key, i))

``i`` indexes ``sched.timesteps``; ``state`` counts the steps taken, so a loop may start mid-schedule
(img2img: noise with :func:`add_noise_at_step`, then run i = i0 .. len-1 from a fresh ``init_state``).
Stochastic steps (DDPM, Euler ancestral, DDIM with eta > 0) take a ``key`` or the ``noise`` itself (standard
normal, the sample's shape); the others ignore both. All maths is float32; ``step`` returns the sample's dtype.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

from jaxdiff.schedulers import ddim, ddpm, dpm, euler, pndm
from jaxdiff.schedulers.common import Schedule, SchedulerState, alpha_cumprod_at, bcast, f32
from jaxdiff.schedulers.config import (DDIM, DDPM, DPM, EULER, EULER_ANCESTRAL, KINDS, PNDM, SchedulerConfig)

__all__ = ["KINDS", "Schedule", "SchedulerConfig", "SchedulerState", "add_noise", "add_noise_at_step",
           "get_velocity", "init_state", "make_schedule", "scale_model_input", "step"]

_SIGMA_SPACE = (EULER, EULER_ANCESTRAL)
_MODULES = {DDIM: ddim, DDPM: ddpm, PNDM: pndm, EULER: euler, EULER_ANCESTRAL: euler, DPM: dpm}
_STEP = {DDIM: ddim.step, DDPM: ddpm.step, PNDM: pndm.step, EULER: euler.step,
         EULER_ANCESTRAL: euler.step_ancestral, DPM: dpm.step}


def make_schedule(config: SchedulerConfig | Mapping, num_inference_steps: int, *, eta: float = 0.0) -> Schedule:
    """The schedule diffusers' ``set_timesteps(num_inference_steps)`` produces, as a pytree.

    ``config``: a :class:`SchedulerConfig` or a diffusers config dict. ``eta`` (DDIM only, static): 0 is
    deterministic DDIM, 1 the DDPM posterior variance."""
    if isinstance(config, Mapping):
        config = SchedulerConfig.from_diffusers(config)
    if config.kind not in _MODULES:
        raise ValueError(f"unsupported scheduler kind {config.kind!r}; supported: {', '.join(KINDS)}")
    if eta != 0.0 and config.kind != DDIM:
        raise ValueError(f"eta is a DDIMScheduler option; {config.kind} got eta={eta}")
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    return _MODULES[config.kind].make(config, int(num_inference_steps), float(eta))


def init_state(schedule: Schedule, sample: jax.Array) -> SchedulerState:
    """Fresh state for a loop on samples shaped like ``sample`` (history zero-filled, float32)."""
    k = _MODULES[schedule.config.kind].HISTORY
    shape = jnp.shape(sample)
    return SchedulerState(counter=jnp.zeros((), jnp.int32),
                          history=jnp.zeros((k, *shape), jnp.float32) if k else None,
                          cur_sample=jnp.zeros(shape, jnp.float32) if schedule.config.kind == PNDM else None)


def scale_model_input(schedule: Schedule, sample: jax.Array, i) -> jax.Array:
    """The UNet input at step ``i``: sample / sqrt(sigma_i^2 + 1) for the Euler kinds, the sample otherwise."""
    if schedule.config.kind not in _SIGMA_SPACE:
        return sample
    return euler.scale_model_input(schedule, f32(sample), jnp.asarray(i, jnp.int32)).astype(jnp.result_type(sample))


def step(schedule: Schedule, state: SchedulerState, i, model_output: jax.Array, sample: jax.Array, *,
         key: jax.Array | None = None, noise: jax.Array | None = None) -> tuple[jax.Array, SchedulerState]:
    """One sampler step from ``timesteps[i]`` to the next: ``(prev_sample, new_state)``.

    ``i`` may be a traced int32 (jit/scan/fori_loop); the kind and every option are static. ``key`` draws the
    standard-normal noise of stochastic kinds; ``noise`` passes it directly instead (e.g. to reproduce another
    implementation's draws). Computed in float32; returned in ``sample``'s dtype."""
    kind = schedule.config.kind
    if _MODULES[kind].needs_noise(schedule):
        if (key is None) == (noise is None):
            raise ValueError(f"{kind} step is stochastic: pass exactly one of key= or noise=")
        noise = jax.random.normal(key, jnp.shape(sample), jnp.float32) if noise is None else f32(noise)
    else:
        noise = None
    prev, new_state = _STEP[kind](schedule, state, jnp.asarray(i, jnp.int32), f32(model_output), f32(sample), noise)
    return prev.astype(jnp.result_type(sample)), new_state


def add_noise(schedule: Schedule, x0: jax.Array, noise: jax.Array, t) -> jax.Array:
    """Forward process at training timestep(s) ``t`` (shape () or (B,)), in the scheduler's sample space.

    Variance preserving, x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise (Ho et al. 2020, eq. 4), for the
    alpha-bar kinds and DPM; x0 + sigma(t) noise for the Euler kinds, with sigma(t) interpolated linearly
    between training timesteps (``t`` may be fractional, like Euler's timesteps). Returns float32."""
    x0, noise = f32(x0), f32(noise)
    if schedule.config.kind in _SIGMA_SPACE:
        s = jnp.sqrt((1 - schedule.alphas_cumprod) / schedule.alphas_cumprod)
        sigma = jnp.interp(f32(t), jnp.arange(s.shape[0], dtype=jnp.float32), s)
        return x0 + noise * bcast(sigma, x0)
    a = bcast(alpha_cumprod_at(schedule, t), x0)
    return jnp.sqrt(a) * x0 + jnp.sqrt(1 - a) * noise


def add_noise_at_step(schedule: Schedule, x0: jax.Array, noise: jax.Array, i) -> jax.Array:
    """Noise ``x0`` to the level of step ``i`` exactly as the sampler sees it (img2img starting at step ``i``):
    ``sigmas[i]`` for Euler (VE) and DPM (VP via alpha = 1/sqrt(sigma^2+1)), alpha-bar of ``timesteps[i]``
    otherwise. Matches diffusers' ``add_noise`` after ``set_begin_index(i)``. Returns float32."""
    x0, noise = f32(x0), f32(noise)
    i = jnp.asarray(i, jnp.int32)
    kind = schedule.config.kind
    if kind in _SIGMA_SPACE:
        return x0 + noise * schedule.sigmas[i]
    if kind == DPM:
        alpha, sigma = dpm.alpha_sigma(schedule.sigmas[i])
        return alpha * x0 + sigma * noise
    a = alpha_cumprod_at(schedule, schedule.timesteps[i])
    return jnp.sqrt(a) * x0 + jnp.sqrt(1 - a) * noise


def get_velocity(schedule: Schedule, x0: jax.Array, noise: jax.Array, t) -> jax.Array:
    """The v-prediction target v = sqrt(a_t) noise - sqrt(1 - a_t) x0 (Salimans & Ho 2022, sec. 4) at integer
    training timestep(s) ``t`` (shape () or (B,)). Returns float32."""
    x0, noise = f32(x0), f32(noise)
    a = bcast(alpha_cumprod_at(schedule, t), x0)
    return jnp.sqrt(a) * noise - jnp.sqrt(1 - a) * x0
