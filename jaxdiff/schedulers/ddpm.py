"""DDPM ancestral sampling (Ho, Jain & Abbeel 2020, "Denoising Diffusion Probabilistic Models"), diffusers'
``DDPMScheduler`` with a fixed (not learned) variance."""

from __future__ import annotations

import jax.numpy as jnp

from jaxdiff.schedulers.common import (Schedule, SchedulerState, alpha_cumprod_at, alphas_cumprod_np,
                                       spaced_timesteps_np, vp_schedule, vp_x0_and_eps)
from jaxdiff.schedulers.config import SchedulerConfig

HISTORY = 0


def make(c: SchedulerConfig, n: int, eta: float) -> Schedule:
    # Before the first training timestep alpha-bar is 1 (diffusers' ``self.one``).
    return vp_schedule(c, n, spaced_timesteps_np(c, n), alphas_cumprod_np(c), 1.0)


def needs_noise(s: Schedule) -> bool:
    return True


def step(s: Schedule, state: SchedulerState, i, model_output, sample, noise):
    """Sample x_prev ~ q(x_prev | x_t, x0) (Ho et al. 2020, eqs. 6-7), x0 predicted by eq. 15:

        mean = sqrt(a_prev) beta_t / (1 - a_t) x0 + sqrt(alpha_t) (1 - a_prev) / (1 - a_t) x_t,
        var = (1 - a_prev) / (1 - a_t) beta_t        ("fixed_small", beta-tilde; "fixed_large": beta_t),

    with alpha_t = a_t / a_prev and beta_t = 1 - alpha_t between consecutive *inference* timesteps. No noise
    is added at t = 0."""
    c = s.config
    n = s.timesteps.shape[0]
    t = s.timesteps[i]
    prev_t = jnp.where(i + 1 < n, s.timesteps[jnp.minimum(i + 1, n - 1)], -1)
    a_t, a_prev = alpha_cumprod_at(s, t), alpha_cumprod_at(s, prev_t)
    alpha, beta = a_t / a_prev, 1 - a_t / a_prev
    x0, _ = vp_x0_and_eps(c.prediction_type, model_output, sample, a_t)
    if c.clip_sample:
        x0 = jnp.clip(x0, -c.clip_sample_range, c.clip_sample_range)
    mean = (jnp.sqrt(a_prev) * beta) / (1 - a_t) * x0 + (jnp.sqrt(alpha) * (1 - a_prev)) / (1 - a_t) * sample
    # Clamped like diffusers so the log-variance form never sees log(0).
    var = jnp.maximum(((1 - a_prev) / (1 - a_t)) * beta, 1e-20)
    if c.variance_type == "fixed_small":
        std = jnp.sqrt(var)
    elif c.variance_type == "fixed_small_log":
        std = jnp.exp(0.5 * jnp.log(var))
    else:  # fixed_large
        std = jnp.sqrt(beta)
    return mean + jnp.where(t > 0, std, 0.0) * noise, state
