"""Pieces shared by every scheduler: the ``Schedule``/``SchedulerState`` pytrees, the training noise schedule
(betas -> alphas_cumprod), timestep spacings and the x0/epsilon conversions.

Numerics. Schedules are built once per (config, step count) on the host in NumPy, reproducing diffusers'
float32 PyTorch arithmetic op for op: integer ``timesteps`` and ``alphas_cumprod`` match bit for bit on x86
CPUs; ``sigmas``, Euler's fractional timesteps and zero-terminal-SNR alphas to one float32 ulp, because
PyTorch's vectorised CPU sqrt is not always correctly rounded and we do not imitate that (parity tests). Step functions then
work in float32 whatever the sample dtype: bfloat16 alphas_cumprod (8 mantissa bits) round alpha-bar near 1 to
exactly 1, so SDXL Euler's last sigma becomes 0 and the step divides by it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.pytree import pytree_dataclass, static_field
from jaxdiff.schedulers.config import SchedulerConfig

Array = jax.Array
F32 = jnp.float32




@pytree_dataclass
@dataclass(frozen=True)
class Schedule:
    """A sampling schedule: ``config`` and step count are static, the arrays are float32/int32 leaves.

    * ``timesteps`` (N,): what the UNet is called with at step ``i``, exactly diffusers' ``scheduler.timesteps``.
      int32, except for the Euler kinds where diffusers' timesteps are fractional floats (``linspace`` spacing,
      Karras sigmas) and we keep them float32. PNDM has N = num_inference_steps + 1 (its repeated timestep);
      loop over ``range(len(schedule))``.
    * ``alphas_cumprod`` (num_train_timesteps,): alpha-bar of the training process.
    * ``sigmas`` (N + 1,): noise level of step ``i`` in variance-exploding units sigma = sqrt((1 - a) / a), and
      the final level last. For Euler/DPM these are the sigmas the solver steps between; for DDIM/DDPM/PNDM
      they are informative only (sigma of ``timesteps[i]``, then 0).
    * ``final_alpha_cumprod``: alpha-bar used when the previous timestep is < 0.
    * ``init_noise_sigma``: the standard deviation of the initial latent noise.
    """

    timesteps: Array
    alphas_cumprod: Array
    sigmas: Array
    final_alpha_cumprod: Array
    init_noise_sigma: Array
    config: SchedulerConfig = static_field()
    num_inference_steps: int = static_field()
    eta: float = static_field(default=0.0)

    def __len__(self) -> int:
        """Number of ``step`` calls in a full sampling loop."""
        return int(self.timesteps.shape[0])


@pytree_dataclass
@dataclass(frozen=True)
class SchedulerState:
    """What a multistep scheduler carries between steps (``None`` fields are absent for that kind).

    * ``counter``: int32, steps taken since :func:`init_state` (diffusers' ``counter``/``lower_order_nums``;
      differs from the step index when a loop starts mid-schedule, e.g. img2img);
    * ``history``: (K, *sample.shape) float32 earlier model outputs, most recent first (PNDM: K=3 epsilons;
      DPM-Solver++: K=1 data prediction);
    * ``cur_sample``: PNDM only, the sample of the first step, reused by its second (Heun-like) step.
    """

    counter: Array
    history: Array | None = None
    cur_sample: Array | None = None


# --------------------------------------------------------------------------------------------------------------
# Training noise schedule
# --------------------------------------------------------------------------------------------------------------

def torch_linspace_f32(start: float, end: float, n: int) -> np.ndarray:
    """``torch.linspace(start, end, n, dtype=torch.float32)`` bit for bit (x86 CPU kernel).

    PyTorch computes a float32 step, then start + step * i for the first half and end - step * (n - 1 - i) for
    the second, each with a fused multiply-add (one rounding). float64 arithmetic followed by one cast to
    float32 reproduces that; ``np.linspace(...).astype(float32)`` differs in the last bit for ~30% of entries.
    """
    s, e = np.float32(start), np.float32(end)
    step = np.float64((e - s) / np.float32(n - 1))   # float32 division, like torch
    i = np.arange(n, dtype=np.float64)
    out = np.where(i < n // 2, np.float64(s) + step * i, np.float64(e) - step * (n - 1 - i))
    return out.astype(np.float32)


def _squaredcos_cap_v2_betas(n: int, max_beta: float = 0.999) -> np.ndarray:
    """Cosine schedule of Nichol & Dhariwal 2021 (eq. 17), discretised as beta_t = 1 - abar(t+1)/abar(t)."""
    def abar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    return np.array([min(1 - abar((i + 1) / n) / abar(i / n), max_beta) for i in range(n)], np.float32)


def _cumprod_f32(x: np.ndarray) -> np.ndarray:
    # torch.cumprod on CPU accumulates float32 in double and rounds each output once.
    return np.cumprod(x.astype(np.float64)).astype(np.float32)


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2024 ("Common Diffusion Noise Schedules and Sample Steps Are Flawed"), Algorithm 1:
    shift and scale sqrt(alpha-bar) so the last timestep has zero SNR, keeping the first one."""
    sq = np.sqrt(_cumprod_f32(np.float32(1) - betas))
    s0, sT = sq[0], sq[-1]
    sq = (sq - sT) * (s0 / (s0 - sT))
    abar = sq * sq
    alphas = np.concatenate([abar[:1], abar[1:] / abar[:-1]])
    return (np.float32(1) - alphas).astype(np.float32)


def betas_np(c: SchedulerConfig) -> np.ndarray:
    """The training betas (float32, length ``num_train_timesteps``) as diffusers builds them."""
    T = c.num_train_timesteps
    if c.trained_betas is not None:
        betas = np.asarray(c.trained_betas, np.float32)
    elif c.beta_schedule == "linear":
        betas = torch_linspace_f32(c.beta_start, c.beta_end, T)
    elif c.beta_schedule == "scaled_linear":       # LDM/SD: linear in sqrt(beta)
        b = torch_linspace_f32(c.beta_start ** 0.5, c.beta_end ** 0.5, T)
        betas = b * b
    else:
        betas = _squaredcos_cap_v2_betas(T)
    if c.rescale_betas_zero_snr:
        betas = _rescale_zero_terminal_snr(betas)
    return betas


def alphas_cumprod_np(c: SchedulerConfig, *, zero_snr_floor: bool = False) -> np.ndarray:
    """alpha-bar_t = prod_{s<=t} (1 - beta_s) in float32. With zero-terminal-SNR rescaling, sigma-space
    schedulers (``zero_snr_floor``) replace the final 0 by 2**-24 so sigma_max = sqrt((1-a)/a) stays finite."""
    abar = _cumprod_f32(np.float32(1) - betas_np(c))
    if zero_snr_floor and c.rescale_betas_zero_snr:
        abar[-1] = 2.0 ** -24
    return abar


def vp_to_ve_sigmas_np(abar: np.ndarray) -> np.ndarray:
    """sigma = sqrt((1 - a) / a): the variance-exploding noise level of x / sqrt(a) (float32, like diffusers)."""
    abar = abar.astype(np.float32)
    return np.sqrt((np.float32(1) - abar) / abar)


# --------------------------------------------------------------------------------------------------------------
# Timestep spacing (Lin et al. 2024, Table 2)
# --------------------------------------------------------------------------------------------------------------

def spaced_timesteps_np(c: SchedulerConfig, n: int, *, round_linspace: bool = True) -> np.ndarray:
    """Descending float64 timesteps for ``n`` steps: "linspace" (0..T-1 evenly, both ends), "leading"
    (multiples of T//n plus ``steps_offset``) or "trailing" (T-1 down in steps of T/n). The Euler kinds keep
    linspace timesteps fractional (``round_linspace=False``)."""
    T = c.num_train_timesteps
    if n < 1 or n > T:
        raise ValueError(f"num_inference_steps must be in [1, {T}] (num_train_timesteps), got {n}")
    if c.timestep_spacing == "linspace":
        ts = np.linspace(0, T - 1, n)
        ts = (ts.round() if round_linspace else ts.astype(np.float32))[::-1]
    elif c.timestep_spacing == "leading":
        ts = (np.arange(0, n) * (T // n)).round()[::-1] + c.steps_offset
    else:  # trailing
        ts = np.round(np.arange(T, 0, -T / n)) - 1
    return np.ascontiguousarray(ts, dtype=np.float64)


def karras_sigmas_np(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022, eq. 5:
    sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, i = 0..n-1."""
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def sigma_to_t_np(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timesteps whose sigma is each of ``sigmas``: linear interpolation in log-sigma
    between the two neighbouring training timesteps (diffusers' ``_sigma_to_t``)."""
    def one(sigma):
        # One scalar at a time like diffusers: NumPy's SIMD float64 log can differ in the last bit from the
        # scalar path, which moves a fractional timestep by one float32 ulp.
        log_sigma = np.log(np.maximum(sigma, 1e-10))
        low = int(np.cumsum(log_sigma - log_sigmas >= 0).argmax().clip(max=log_sigmas.shape[0] - 2))
        w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
        return (1 - w) * low + w * (low + 1)
    return np.array([one(s) for s in np.asarray(sigmas, np.float64)])


# --------------------------------------------------------------------------------------------------------------
# Shared step maths (float32, traced)
# --------------------------------------------------------------------------------------------------------------

def bcast(scalar: Array, x: Array) -> Array:
    """Per-sample scalars (shape () or (B,)) reshaped to broadcast against ``x`` (B, ...)."""
    scalar = jnp.asarray(scalar)
    return scalar.reshape(scalar.shape + (1,) * (x.ndim - scalar.ndim))


def alpha_cumprod_at(s: Schedule, t: Array) -> Array:
    """alpha-bar at integer timestep(s) ``t``; ``final_alpha_cumprod`` where t < 0 (before the first one)."""
    t = jnp.asarray(t, jnp.int32)
    a = s.alphas_cumprod[jnp.clip(t, 0, s.alphas_cumprod.shape[0] - 1)]
    return jnp.where(t >= 0, a, s.final_alpha_cumprod)


def vp_x0_and_eps(prediction_type: str, model_output: Array, sample: Array, alpha_prod_t: Array):
    """(x0, epsilon) from a model output under x_t = sqrt(a) x0 + sqrt(1 - a) eps (a = alpha-bar_t).

    epsilon: x0 = (x_t - sqrt(1-a) eps) / sqrt(a) (Ho et al. 2020, eq. 15);
    v_prediction, v = sqrt(a) eps - sqrt(1-a) x0 (Salimans & Ho 2022, sec. 4): x0 = sqrt(a) x_t - sqrt(1-a) v,
    eps = sqrt(a) v + sqrt(1-a) x_t; sample: the output is x0.
    """
    sa, sb = jnp.sqrt(alpha_prod_t), jnp.sqrt(1 - alpha_prod_t)
    if prediction_type == "epsilon":
        return (sample - sb * model_output) / sa, model_output
    if prediction_type == "v_prediction":
        return sa * sample - sb * model_output, sa * model_output + sb * sample
    x0 = model_output
    return x0, (sample - sa * x0) / sb


def f32(x) -> Array:
    return jnp.asarray(x, F32)


def schedule_arrays(*, timesteps, alphas_cumprod, sigmas, final_alpha_cumprod, init_noise_sigma, timestep_dtype):
    """NumPy pieces -> the array fields of a :class:`Schedule`."""
    return dict(timesteps=jnp.asarray(np.asarray(timesteps).astype(timestep_dtype)),
                alphas_cumprod=f32(alphas_cumprod), sigmas=f32(sigmas),
                final_alpha_cumprod=f32(final_alpha_cumprod), init_noise_sigma=f32(init_noise_sigma))


def vp_schedule(c: SchedulerConfig, n: int, timesteps: np.ndarray, abar: np.ndarray, final_alpha_cumprod,
                eta: float = 0.0) -> Schedule:
    """A Schedule for the alpha-bar-indexed kinds (DDIM, DDPM, PNDM): integer timesteps, init noise sigma 1."""
    ts = np.asarray(timesteps, np.int64)
    with np.errstate(divide="ignore"):  # zero terminal SNR: sigma(T-1) = inf (informative only here)
        sigmas = np.concatenate([vp_to_ve_sigmas_np(abar[ts]), [0.0]])
    return Schedule(**schedule_arrays(timesteps=ts, alphas_cumprod=abar, sigmas=sigmas,
                                      final_alpha_cumprod=final_alpha_cumprod, init_noise_sigma=1.0,
                                      timestep_dtype=np.int32),
                    config=c, num_inference_steps=n, eta=float(eta))
