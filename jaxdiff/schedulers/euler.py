"""Euler samplers in sigma space (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based
Generative Models"): diffusers' ``EulerDiscreteScheduler`` and ``EulerAncestralDiscreteScheduler``.

They integrate the probability-flow ODE of x = x0 + sigma eps, the variance-exploding view of the latent
(x_VE = x_VP / sqrt(alpha-bar)), so the initial noise is scaled by ``init_noise_sigma`` and the UNet input by
1 / sqrt(sigma^2 + 1) (:func:`scale_model_input`), which maps it back to the variance-preserving x_t it was
trained on.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxdiff.schedulers.common import (Schedule, SchedulerState, alphas_cumprod_np, karras_sigmas_np,
                                       schedule_arrays, sigma_to_t_np, spaced_timesteps_np, vp_to_ve_sigmas_np)
from jaxdiff.schedulers.config import SchedulerConfig

HISTORY = 0


def make(c: SchedulerConfig, n: int, eta: float) -> Schedule:
    abar = alphas_cumprod_np(c, zero_snr_floor=True)
    T = c.num_train_timesteps
    ts = spaced_timesteps_np(c, n, round_linspace=False)
    train_sigmas = vp_to_ve_sigmas_np(abar)
    # Fractional timesteps get a sigma interpolated linearly between training timesteps (in float64, then
    # rounded to float32 once, like diffusers).
    sigmas = np.interp(ts, np.arange(T), train_sigmas)
    if c.use_karras_sigmas:
        smin = c.sigma_min if c.sigma_min is not None else float(sigmas[-1])
        smax = c.sigma_max if c.sigma_max is not None else float(sigmas[0])
        sigmas = karras_sigmas_np(smin, smax, n)
        ts = sigma_to_t_np(sigmas, np.log(train_sigmas))
    last = train_sigmas[0] if c.final_sigmas_type == "sigma_min" else 0.0
    sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
    smax = sigmas.max()
    # "leading" spacing starts below t = T-1, at a sigma the prior N(0, sigma_max^2 + 1) over-covers: diffusers
    # scales the initial noise by sqrt(sigma_max^2 + 1) there and by sigma_max otherwise.
    init = smax if c.timestep_spacing in ("linspace", "trailing") else np.sqrt(smax * smax + np.float32(1))
    return Schedule(**schedule_arrays(timesteps=ts, alphas_cumprod=abar, sigmas=sigmas, final_alpha_cumprod=1.0,
                                      init_noise_sigma=init, timestep_dtype=np.float32),
                    config=c, num_inference_steps=n, eta=eta)


def scale_model_input(s: Schedule, sample, i):
    """x_VE / sqrt(sigma^2 + 1) = x_VP: the UNet input at step ``i``."""
    sigma = s.sigmas[i]
    return sample / jnp.sqrt(sigma ** 2 + 1)


def _denoised(prediction_type: str, model_output, sample, sigma):
    """x0 = D(x; sigma) from the model output. epsilon: x0 = x - sigma eps (Karras et al. 2022, Table 1, VP
    preconditioning). v (Salimans & Ho 2022) in sigma units: x0 = c_skip x + c_out v with c_skip = 1/(sigma^2+1),
    c_out = -sigma/sqrt(sigma^2+1). sample: the output is x0."""
    if prediction_type == "epsilon":
        return sample - sigma * model_output
    if prediction_type == "v_prediction":
        return model_output * (-sigma / jnp.sqrt(sigma ** 2 + 1)) + sample / (sigma ** 2 + 1)
    return model_output


def needs_noise(s: Schedule) -> bool:
    return s.config.kind == "EulerAncestralDiscreteScheduler"


def step(s: Schedule, state: SchedulerState, i, model_output, sample, noise):
    """Karras et al. 2022, Algorithm 2 with S_churn = 0 (no noise injection), i.e. one Euler step of the ODE
    dx/dsigma = (x - D(x; sigma)) / sigma from sigma_i to sigma_{i+1}."""
    sigma, sigma_next = s.sigmas[i], s.sigmas[i + 1]
    x0 = _denoised(s.config.prediction_type, model_output, sample, sigma)
    d = (sample - x0) / sigma
    return sample + d * (sigma_next - sigma), state


def step_ancestral(s: Schedule, state: SchedulerState, i, model_output, sample, noise):
    """Euler ancestral (k-diffusion ``sample_euler_ancestral``): split the move to sigma_{i+1} into a
    deterministic Euler step down to sigma_down and fresh noise of std sigma_up, with
    sigma_up^2 = sigma_{i+1}^2 (sigma_i^2 - sigma_{i+1}^2) / sigma_i^2 and sigma_down^2 = sigma_{i+1}^2 - sigma_up^2,
    so the marginal at sigma_{i+1} is kept (the DDPM posterior in sigma space, eta = 1)."""
    sigma, sigma_next = s.sigmas[i], s.sigmas[i + 1]
    x0 = _denoised(s.config.prediction_type, model_output, sample, sigma)
    sigma_up = jnp.sqrt(sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2)
    sigma_down = jnp.sqrt(sigma_next ** 2 - sigma_up ** 2)
    d = (sample - x0) / sigma
    return sample + d * (sigma_down - sigma) + noise * sigma_up, state
