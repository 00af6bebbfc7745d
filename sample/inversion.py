"""DDIM inversion of real images, plain or with fixed-point iterations, and its reconstruction quality.

DDIM (Song et al. 2021, eq. 12 with eta = 0) steps from the noise level of ``t`` to ``t_prev = t - T/N`` by

    x_prev = sqrt(a_prev) x0(x_t) + sqrt(1 - a_prev) eps(x_t, t),   x0(x_t) = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t).

Inverting a step means solving this for ``x_t`` given ``x_prev``:

    x_t = sqrt(a_t) (x_prev - sqrt(1 - a_prev) eps) / sqrt(a_prev) + sqrt(1 - a_t) eps,   eps = eps(x_t, t),

an implicit equation because ``eps`` is evaluated at the unknown ``x_t``. *Plain* DDIM inversion (Song et al.
2021, sec. 4.3; as in null-text inversion, Mokady et al. 2023) uses ``eps(x_prev, t)``
instead. *Fixed-point* inversion iterates ``x_t <- F(x_t)``, the right-hand side evaluated at the current
estimate, K times from the plain estimate (Pan et al. 2023, "Effective Real Image Editing with Accelerated
Iterative Diffusion Inversion"; ReNoise, Garibi et al. 2024; Learn-to-Steer inverts its training images with
5 such iterations per step, 50 steps, guidance 1, keeping reconstructions of PSNR >= 19.5 dB). A converged
fixed point is an exact inverse: sampling DDIM from the inverted latents returns the image's latents.

The inversion uses the model's scheduler config read as ``DDIMScheduler`` with ``clip_sample=False``
(clipping x0 is not invertible; real SD configs have it off). Regenerate from ``InversionResult.latents`` with
that schedule (:func:`inversion_schedule`) to reproduce the reconstruction.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.checkpoint import StableDiffusionModel
from jaxdiff.hooks import NO_CAPTURE, NO_EDITS
from jaxdiff.schedulers import Schedule, make_schedule
from jaxdiff.schedulers.common import alpha_cumprod_at, vp_x0_and_eps
from jaxdiff.schedulers.config import DDIM
from jaxdiff.vae import uint8_to_signed
from sample.loop import Denoiser, StepCaptureSpec, as_step_capture, denoise, guided_prediction
from sample.model_fns import image_latents, latents_to_unit, unet_denoiser, unit_to_uint8
from sample.pipeline import Plan, cast_and_encode, make_plan, run_timed
from sample.sharding import replicate, resolve_mesh, shard_batch
from sample.spec import SampleSpec, check_images, output_size, scheduler_config
from sample.text import PromptIds, check_prompts, prompt_ids, sdxl_time_ids

Array = jax.Array


def inversion_schedule(model: StableDiffusionModel, steps: int) -> Schedule:
    """The DDIM schedule inversion and its regeneration use: the model's config as DDIM, no x0 clipping."""
    return make_schedule(dataclasses.replace(scheduler_config(model, "ddim"), clip_sample=False), steps)


def ddim_invert(model: Denoiser, schedule: Schedule, latents: Array, *, guided: bool, guidance: Array,
                fixed_point_iters: Array | int = 0) -> tuple[Array, Array]:
    """Invert the DDIM steps ``len(schedule) - 1 .. 0`` in reverse, from clean ``latents`` (B, h, w, C).

    Args:
      model: denoiser (see :mod:`sample.loop`); guided/guidance: classifier-free guidance as in sampling.
      fixed_point_iters: K >= 0 fixed-point refinements per step (traced; 0 = plain DDIM inversion).

    Returns:
      ``(x_T, trajectory)``: the inverted latents (B, h, w, C) float32 and every step's result (N, B, h, w, C),
      least noisy first (``trajectory[-1] == x_T``).
    """
    s = schedule
    if s.config.kind != DDIM or s.eta != 0.0 or s.config.clip_sample:
        raise ValueError("ddim_invert needs a deterministic DDIM schedule (eta 0, clip_sample off), got "
                         f"{s.config.kind} eta={s.eta} clip_sample={s.config.clip_sample}")
    delta = s.config.num_train_timesteps // s.num_inference_steps
    iters = jnp.asarray(fixed_point_iters, jnp.int32)

    def invert_step(x_prev, i):
        t = s.timesteps[i]
        a_prev, a_t = alpha_cumprod_at(s, t - delta), alpha_cumprod_at(s, t)   # the levels DDIM step i joins

        def rhs(x_eval):
            out, _ = guided_prediction(model, x_eval, t, guided=guided, guidance=guidance, edits=NO_EDITS,
                                       capture=NO_CAPTURE)
            _, eps = vp_x0_and_eps(s.config.prediction_type, out, x_eval, a_t)
            x0 = (x_prev - jnp.sqrt(1 - a_prev) * eps) / jnp.sqrt(a_prev)
            return jnp.sqrt(a_t) * x0 + jnp.sqrt(1 - a_t) * eps

        x_t = rhs(x_prev)                                             # plain: eps(x_prev, t)
        x_t = jax.lax.fori_loop(0, iters, lambda _, x: rhs(x), x_t)   # fixed point: eps(x_t, t)
        return x_t, x_t

    x_T, trajectory = jax.lax.scan(invert_step, jnp.asarray(latents, jnp.float32),
                                   jnp.arange(len(s) - 1, -1, -1, dtype=jnp.int32))
    return x_T, trajectory


def psnr(a: Array, b: Array) -> Array:
    """Peak signal-to-noise ratio in dB per row of images in [0, 1]: ``10 log10(1 / MSE)``."""
    mse = jnp.mean((jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32)) ** 2, axis=(1, 2, 3))
    return -10.0 * jnp.log10(mse)


def _inversion_program(params: dict, prompt: PromptIds, image: Array, guidance: Array, fixed_point_iters: Array,
                       schedule: Schedule, *, plan: Plan) -> dict:
    """Encode the image, invert, regenerate, decode, measure: the fields of :class:`InversionResult` (jitted as
    :data:`inversion_program` with ``plan`` static)."""
    params, cond = cast_and_encode(params, prompt, plan)
    model = unet_denoiser(params["unet"], plan.unet, cond)
    z0 = image_latents(params["vae"], image, plan.vae)    # posterior mean, as null-text inversion encodes
    z_T, trajectory = ddim_invert(model, schedule, z0, guided=cond.guided, guidance=guidance,
                                  fixed_point_iters=fixed_point_iters)
    # Deterministic DDIM: the key is never used.
    z0_hat, aux = denoise(model, schedule, z_T, guided=cond.guided, guidance=guidance, key=jax.random.PRNGKey(0),
                          capture=plan.capture, progress=plan.progress)
    rec = latents_to_unit(params["vae"], z0_hat, plan.vae)
    vae_rec = latents_to_unit(params["vae"], z0, plan.vae)
    return {"latents": z_T, "trajectory": trajectory, "image_latents": z0, "regenerated": z0_hat,
            "reconstruction": unit_to_uint8(rec), "psnr": psnr(rec, image / 2 + 0.5),
            "psnr_vae": psnr(rec, vae_rec), "psnr_autoencoder": psnr(vae_rec, image / 2 + 0.5), "aux": aux}


inversion_program = jax.jit(_inversion_program, static_argnames=("plan",))


@dataclass(frozen=True)
class InversionResult:
    """Output of :func:`invert` (numpy arrays, NHWC).

    * ``latents``: (B, h, w, C) inverted noise x_T; DDIM sampling from it with :func:`inversion_schedule`
      (``init_latents=`` of a ``"ddim"`` run on configs with ``clip_sample`` off) regenerates the image;
    * ``trajectory``: (N, B, h, w, C) latents after each inversion step, least noisy first;
    * ``image_latents``: (B, h, w, C) the encoded input (VAE posterior mean, scaled);
    * ``regenerated``: (B, h, w, C) latents sampled back from ``latents`` (compare with ``image_latents``);
    * ``reconstruction``: (B, H, W, 3) uint8 decode of ``regenerated``;
    * ``psnr``: (B,) dB, reconstruction vs the input image (Learn-to-Steer's filter, >= 19.5 dB);
    * ``psnr_vae``: (B,) dB, reconstruction vs the VAE round trip ``decode(image_latents)``: the inversion's own
      error, without the autoencoder's;
    * ``psnr_autoencoder``: (B,) dB, the VAE round trip vs the input: the ceiling of ``psnr``;
    * ``aux``: captures of the regeneration (``capture``), e.g. Learn-to-Steer's attention maps;
    * ``timings``: as :class:`sample.spec.SampleResult`.
    """

    latents: np.ndarray
    trajectory: np.ndarray
    image_latents: np.ndarray
    regenerated: np.ndarray
    reconstruction: np.ndarray
    psnr: np.ndarray
    psnr_vae: np.ndarray
    psnr_autoencoder: np.ndarray
    aux: Any = field(default_factory=dict)
    timings: dict = field(default_factory=dict)


def invert(model: StableDiffusionModel, images: np.ndarray, prompts: list[str], *, steps: int = 50,
           guidance: float = 1.0, fixed_point_iters: int = 0, negative_prompts: list[str] | None = None,
           capture: StepCaptureSpec | None = None, dtype: str = "float32", progress=None,
           mesh=None) -> InversionResult:
    """DDIM-invert uint8 ``images`` (B or 1, H, W, 3) under ``prompts``, then regenerate and measure PSNR.

    Encoding, inversion, regeneration and decoding run as one compiled program; ``fixed_point_iters`` and
    ``guidance`` are traced (changing them does not retrace; guidance on/off does). ``guidance`` 1 (no
    classifier-free guidance) is the usual choice: with guidance the implicit step is harder to invert.
    ``capture``/``progress``/``mesh`` as in :func:`sample.pipeline.generate`; captures and progress are those
    of the regeneration loop.
    """
    t0 = time.perf_counter()
    spec = SampleSpec(steps=steps, guidance=guidance, dtype=dtype)
    spec.check()
    check_prompts(prompts, negative_prompts)
    if not isinstance(fixed_point_iters, int) or fixed_point_iters < 0:
        raise ValueError(f"fixed_point_iters must be an int >= 0, got {fixed_point_iters!r}")
    b = len(prompts)
    images = check_images(images, b)
    height, width = output_size(model, spec, images.shape[1:3])
    schedule = inversion_schedule(model, steps)
    capture = as_step_capture(capture)
    capture.check(0, len(schedule))
    time_ids = sdxl_time_ids(height, width) if model.is_sdxl else None
    ids = prompt_ids(model, prompts, negative_prompts, guided=spec.guided, time_ids=time_ids)
    plan = make_plan(model, dtype=dtype, capture=capture, progress=progress)
    mesh = resolve_mesh(mesh, b)
    args = (replicate(dict(model.params), mesh), shard_batch(ids, mesh),
            shard_batch(np.asarray(uint8_to_signed(images)), mesh), replicate(jnp.float32(guidance), mesh),
            replicate(jnp.int32(fixed_point_iters), mesh), replicate(schedule, mesh))
    out, timings = run_timed(lambda: inversion_program(*args, plan=plan), (inversion_program,), t0)
    return InversionResult(timings=timings, **out)
