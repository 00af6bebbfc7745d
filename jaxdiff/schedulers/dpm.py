"""DPM-Solver++ multistep (Lu, Zhou, Bao, Chen, Li & Zhu 2022, "DPM-Solver++: Fast Solver for Guided Sampling
of Diffusion Probabilistic Models"), diffusers' ``DPMSolverMultistepScheduler`` with ``algorithm_type=
"dpmsolver++"`` and ``solver_order`` 1 or 2 ("DPM++ 2M").

Notation: alpha_t = 1/sqrt(sigma^2 + 1), sigma_t = sigma alpha_t (VP), lambda_t = log(alpha_t / sigma_t)
(half log-SNR), h = lambda_next - lambda_cur. The solver is exact for the linear part and extrapolates the data
prediction x0 linearly in lambda from the previous step.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxdiff.schedulers.common import (Schedule, SchedulerState, alphas_cumprod_np, karras_sigmas_np,
                                       schedule_arrays, sigma_to_t_np, vp_to_ve_sigmas_np)
from jaxdiff.schedulers.config import SchedulerConfig

HISTORY = 1  # the previous step's data prediction


def _timesteps_np(c: SchedulerConfig, n: int, abar: np.ndarray) -> np.ndarray:
    """DPM's own spacing: N+1 points with the last (t = 0) dropped, over [0, last_timestep) where
    ``lambda_min_clipped`` may cut off the noisiest timesteps (for the cosine schedule)."""
    T = c.num_train_timesteps
    if n < 1 or n > T:
        raise ValueError(f"num_inference_steps must be in [1, {T}] (num_train_timesteps), got {n}")
    lam = np.log(np.sqrt(abar)) - np.log(np.sqrt(np.float32(1) - abar))
    last = T - int(np.searchsorted(lam[::-1], np.float32(c.lambda_min_clipped)))
    if c.timestep_spacing == "linspace":
        ts = np.linspace(0, last - 1, n + 1).round()[::-1][:-1]
    elif c.timestep_spacing == "leading":
        ts = (np.arange(0, n + 1) * (last // (n + 1))).round()[::-1][:-1] + c.steps_offset
    else:  # trailing
        ts = np.arange(last, 0, -T / n).round() - 1
    return np.ascontiguousarray(ts).astype(np.int64)


def make(c: SchedulerConfig, n: int, eta: float) -> Schedule:
    abar = alphas_cumprod_np(c, zero_snr_floor=True)
    ts = _timesteps_np(c, n, abar)
    train_sigmas = vp_to_ve_sigmas_np(abar)
    if c.use_karras_sigmas:
        sigmas = karras_sigmas_np(float(train_sigmas[0]), float(train_sigmas[-1]), n)
        ts = sigma_to_t_np(sigmas, np.log(train_sigmas))
        if c.beta_schedule != "squaredcos_cap_v2":
            ts = ts.round()
        ts = ts.astype(np.int64)  # diffusers truncates the cosine schedule's fractional timesteps
    else:
        sigmas = np.interp(ts, np.arange(len(train_sigmas)), train_sigmas)
    last = train_sigmas[0] if c.final_sigmas_type == "sigma_min" else 0.0
    sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
    return Schedule(**schedule_arrays(timesteps=ts, alphas_cumprod=abar, sigmas=sigmas, final_alpha_cumprod=1.0,
                                      init_noise_sigma=1.0, timestep_dtype=np.int32),
                    config=c, num_inference_steps=len(ts), eta=eta)


def needs_noise(s: Schedule) -> bool:
    return False


def alpha_sigma(sigma):
    """VE sigma -> VP (alpha_t, sigma_t) = (1/sqrt(sigma^2 + 1), sigma/sqrt(sigma^2 + 1))."""
    alpha = 1 / jnp.sqrt(sigma ** 2 + 1)
    return alpha, sigma * alpha


def step(s: Schedule, state: SchedulerState, i, model_output, sample, noise):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2), with D0 = x0_cur, D1 = (x0_cur - x0_prev) / r0,
    r0 = h_prev / h:

        first order:  x_next = (sigma_next / sigma_cur) x - alpha_next (e^-h - 1) D0
        midpoint:     ... - 0.5 alpha_next (e^-h - 1) D1
        heun:         ... + alpha_next ((e^-h - 1) / h + 1) D1

    The first step since ``init_state`` is first order (no history). So is the last one when it lands on
    sigma = 0 (``final_sigmas_type="zero"``: lambda = inf, the update returns D0), or with ``euler_at_final``,
    or with ``lower_order_final`` and fewer than 15 steps; all as diffusers decides it.
    """
    c = s.config
    n = s.timesteps.shape[0]
    # Static part of diffusers' "lower_order_final" decision; the step index part is traced.
    final_first_order = c.euler_at_final or (c.lower_order_final and n < 15) or c.final_sigmas_type == "zero"
    second = (state.counter >= 1) & jnp.logical_not((i == n - 1) & final_first_order)
    if c.solver_order == 1:
        second = jnp.zeros((), bool)

    alpha_t, sigma_t = alpha_sigma(s.sigmas[i + 1])
    alpha_s0, sigma_s0 = alpha_sigma(s.sigmas[i])
    alpha_s1, sigma_s1 = alpha_sigma(s.sigmas[jnp.maximum(i - 1, 0)])
    # Data prediction x0 (DPM-Solver++ works with x0 rather than epsilon).
    if c.prediction_type == "epsilon":
        m0 = (sample - sigma_s0 * model_output) / alpha_s0
    elif c.prediction_type == "v_prediction":
        m0 = alpha_s0 * sample - sigma_s0 * model_output
    else:
        m0 = model_output

    # lambda_next = +inf at sigma = 0: h = inf, e^-h = 0, and the first-order update returns D0 exactly.
    lam_t = jnp.log(alpha_t) - jnp.log(sigma_t)
    lam_s0 = jnp.log(alpha_s0) - jnp.log(sigma_s0)
    lam_s1 = jnp.log(alpha_s1) - jnp.log(sigma_s1)
    h, h_0 = lam_t - lam_s0, lam_s0 - lam_s1
    # 1/r0 only where the second-order term is used (elsewhere h may be inf and h_0 zero); keeps it finite.
    r0 = jnp.where(second, h_0, 1.0) / jnp.where(second, h, 1.0)
    d1 = jnp.where(second, 1.0 / r0, 0.0) * (m0 - state.history[0])
    phi = alpha_t * (jnp.exp(-h) - 1.0)
    x = (sigma_t / sigma_s0) * sample - phi * m0
    if c.solver_type == "midpoint":
        x = x - (0.5 * phi) * d1
    else:  # heun
        x = x + (alpha_t * ((jnp.exp(-h) - 1.0) / jnp.where(second, h, 1.0) + 1.0)) * d1
    return x, SchedulerState(counter=state.counter + 1, history=m0[None])
