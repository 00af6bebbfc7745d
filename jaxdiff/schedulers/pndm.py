"""PLMS: the linear multistep half of PNDM (Liu, Ren, Lin & Zhao 2022, "Pseudo Numerical Methods for Diffusion
Models on Manifolds"), diffusers' ``PNDMScheduler`` with ``skip_prk_steps=True`` as Stable Diffusion uses it.

Instead of PNDM's three Runge-Kutta warm-up steps, the first two steps follow crowsonkb's PLMS for latent
diffusion: an Euler step from t0 to t1, then a *second* evaluation at t1 that redoes the step from t0 with the
average of both epsilons (Heun's method). That is why ``timesteps`` holds N + 1 entries with t1 repeated.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxdiff.schedulers.common import (Schedule, SchedulerState, alpha_cumprod_at, alphas_cumprod_np,
                                       spaced_timesteps_np, vp_schedule, vp_x0_and_eps)
from jaxdiff.schedulers.config import SchedulerConfig

HISTORY = 3  # epsilons kept for the 4-step Adams-Bashforth formula (plus the current one)

# Adams-Bashforth weights (Liu et al. 2022, eq. 12), by number of steps taken: the combined epsilon is
# (w0 e_cur + w1 e_1 + w2 e_2 + w3 e_3) / denom with e_k the k-th most recent stored epsilon. Row 1 is the Heun
# correction: (e_t1 + e_t0) / 2, evaluated from the first step's sample. Integer weights and one division, so
# the arithmetic is the same as diffusers'.
_AB_WEIGHTS = np.array([[1, 0, 0, 0], [1, 1, 0, 0], [3, -1, 0, 0], [23, -16, 5, 0], [55, -59, 37, -9]], np.float32)
_AB_DENOM = np.array([1, 2, 2, 12, 24], np.float32)


def make(c: SchedulerConfig, n: int, eta: float) -> Schedule:
    ts = spaced_timesteps_np(c, n)
    ts = np.concatenate([ts[:1], ts[1:2], ts[1:]])  # t0, t1, t1, t2, ..., t_{N-1}
    abar = alphas_cumprod_np(c)
    final = 1.0 if c.set_alpha_to_one else abar[0]
    return vp_schedule(c, n, ts, abar, final)


def needs_noise(s: Schedule) -> bool:
    return False


def _transfer(sample, eps, a_t, a_prev):
    """PNDM's transfer part phi (Liu et al. 2022, eq. 9): the DDIM step x_t -> x_prev for a given epsilon,

        x_prev = sqrt(a_prev / a_t) x_t - (a_prev - a_t) eps / (a_t sqrt(1 - a_prev) + sqrt(a_t (1 - a_t) a_prev)).
    """
    denom = a_t * jnp.sqrt(1 - a_prev) + jnp.sqrt(a_t * (1 - a_t) * a_prev)
    return jnp.sqrt(a_prev / a_t) * sample - (a_prev - a_t) * eps / denom


def step(s: Schedule, state: SchedulerState, i, model_output, sample, noise):
    """One PLMS step. ``state.counter`` (steps since ``init_state``), not ``i``, picks the multistep order, as
    diffusers' ``counter`` does. Model outputs are combined *before* the v -> epsilon conversion, exactly like
    diffusers (the conversion uses the sample and timestep of the step being taken)."""
    c = s.config
    k = state.counter
    delta = c.num_train_timesteps // s.num_inference_steps
    t = s.timesteps[i]
    # Steps go from t to t - delta (delta = T // N), whatever the spacing: with "linspace" that is not the next
    # timestep, a diffusers quirk kept for parity. The repeated-timestep step (k == 1) re-integrates from
    # t + delta (= t0 for leading/trailing spacing) to t.
    t_from = jnp.where(k == 1, t + delta, t)
    t_to = jnp.where(k == 1, t, t - delta)
    a_t, a_prev = alpha_cumprod_at(s, t_from), alpha_cumprod_at(s, t_to)

    row = jnp.minimum(k, 4)
    w = jnp.asarray(_AB_WEIGHTS)[row]
    h = state.history
    eps = (w[0] * model_output + w[1] * h[0] + w[2] * h[1] + w[3] * h[2]) / jnp.asarray(_AB_DENOM)[row]
    x = jnp.where(k == 1, state.cur_sample, sample)
    if c.prediction_type == "v_prediction":
        _, eps = vp_x0_and_eps("v_prediction", eps, x, a_t)
    prev = _transfer(x, eps, a_t, a_prev)

    # Every model output except the repeated step's joins the history; the first step's sample is kept for k==1.
    pushed = jnp.concatenate([model_output[None], h[:-1]])
    history = jnp.where(k == 1, h, pushed)
    cur_sample = jnp.where(k == 0, sample, state.cur_sample)
    return prev, SchedulerState(counter=k + 1, history=history, cur_sample=cur_sample)
