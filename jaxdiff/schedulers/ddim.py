"""DDIM (Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models"), diffusers' ``DDIMScheduler``."""

from __future__ import annotations

import jax.numpy as jnp

from jaxdiff.schedulers.common import (Schedule, SchedulerState, alpha_cumprod_at, alphas_cumprod_np,
                                       spaced_timesteps_np, vp_schedule, vp_x0_and_eps)
from jaxdiff.schedulers.config import SchedulerConfig

HISTORY = 0


def make(c: SchedulerConfig, n: int, eta: float) -> Schedule:
    abar = alphas_cumprod_np(c)
    final = 1.0 if c.set_alpha_to_one else abar[0]
    return vp_schedule(c, n, spaced_timesteps_np(c, n), abar, final, eta)


def needs_noise(s: Schedule) -> bool:
    return s.eta > 0


def step(s: Schedule, state: SchedulerState, i, model_output, sample, noise):
    """Song et al. 2021, eq. 12 with sigma_t(eta) of eq. 16:

        x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma_t^2) eps + sigma_t z,
        sigma_t = eta sqrt((1 - a_prev) / (1 - a_t)) sqrt(1 - a_t / a_prev).

    eta = 0 is the deterministic DDIM sampler, eta = 1 the DDPM posterior. As in diffusers the previous
    timestep is always t - T // N, whatever the spacing (for "linspace" it is not the next timestep)."""
    c = s.config
    t = s.timesteps[i]
    prev_t = t - c.num_train_timesteps // s.num_inference_steps
    a_t, a_prev = alpha_cumprod_at(s, t), alpha_cumprod_at(s, prev_t)
    x0, eps = vp_x0_and_eps(c.prediction_type, model_output, sample, a_t)
    if c.clip_sample:
        x0 = jnp.clip(x0, -c.clip_sample_range, c.clip_sample_range)
    variance = ((1 - a_prev) / (1 - a_t)) * (1 - a_t / a_prev)
    std = s.eta * jnp.sqrt(variance)
    prev = jnp.sqrt(a_prev) * x0 + jnp.sqrt(1 - a_prev - std ** 2) * eps
    if needs_noise(s):
        prev = prev + std * noise
    return prev, state
