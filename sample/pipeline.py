"""txt2img and img2img: text encoding, the whole denoising loop and the VAE decode in one compiled program.

:func:`sample_program` is jitted once per *structure* (configs, scheduler kind and step count, start step,
image size, batch size, dtype, capture spec, which edits exist, hook): token ids, noise,
the guidance scale, edit values, hook parameters and the step range of an edit are traced inputs, so new
prompts or values reuse the compiled program. Guidance on/off (scale > 1 or not) is structural: it decides
whether the batch carries the unconditional rows.

The maths is diffusers' ``StableDiffusionPipeline`` / ``StableDiffusionImg2ImgPipeline`` /
``StableDiffusionXLPipeline`` (latent diffusion, Rombach et al. 2022; classifier-free guidance, Ho & Salimans
2022; img2img as SDEdit, Meng et al. 2022: noise the encoded image to an intermediate step and denoise from
there), so equal inputs give equal latents (tests/test_sample_parity.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.checkpoint import StableDiffusionModel
from jaxdiff.clip import CLIPTextConfig
from jaxdiff.pytree import pytree_dataclass
from jaxdiff.schedulers import Schedule, add_noise_at_step
from jaxdiff.unet import UNetConfig
from jaxdiff.vae import VAEConfig, uint8_to_signed
from sample.loop import (NO_STEP_CAPTURE, StepCaptureSpec, as_step_capture, denoise, denoise_step,
                         reduced_captures)
from sample.model_fns import cast_params, cond_denoiser, image_latents, latents_to_unit, unet_denoiser, unit_to_uint8
from sample.sharding import replicate, resolve_mesh, shard_batch
from sample.spec import (SampleResult, SampleSpec, check_images, check_latents, img2img_start, latent_shape,
                         output_size, schedule_for)
from sample.steering import Steering, as_steering
from sample.text import (Conditioning, PromptIds, check_prompts, encode_prompts, prompt_ids, sdxl_time_ids,
                         text_encoder_names)

Array = jax.Array


@dataclass(frozen=True)
class Plan:
    """The static part of a sampling program (hashable; a new value compiles a new program)."""

    unet: UNetConfig
    vae: VAEConfig
    text: tuple[CLIPTextConfig, ...]
    start: int = 0
    img2img: bool = False
    dtype: str = "float32"
    capture: StepCaptureSpec = NO_STEP_CAPTURE
    progress: Callable[[int, int], None] | None = None


@pytree_dataclass
@dataclass(frozen=True)
class SampleInputs:
    """The traced per-call inputs: prompt ids, unit noise (B, h, w, C), guidance scale, the key of stochastic
    steps and, for img2img, the image in [-1, 1] (B, H, W, 3) and the VAE posterior draw (B, h, w, C)."""

    prompt: PromptIds
    noise: Array
    guidance: Array
    key: Array
    image: Array | None = None
    vae_noise: Array | None = None


def cast_and_encode(params: dict, prompt: PromptIds, plan: Plan) -> tuple[dict, Conditioning]:
    """First stage of every program: weights in the run's dtype, then the text conditioning."""
    params = cast_params(params, plan.dtype, plan.vae)
    names = ("text_encoder", "text_encoder_2")[:len(plan.text)]
    return params, encode_prompts(tuple(params[n] for n in names), plan.text, prompt)


def initial_latents(params: dict, inputs: SampleInputs, schedule: Schedule, plan: Plan) -> Array:
    """txt2img: the unit noise scaled by ``init_noise_sigma`` (diffusers scales given latents too); img2img
    (SDEdit): the encoded image noised to the level of the first step run (diffusers' ``add_noise`` at
    ``timesteps[start]``)."""
    if plan.img2img:
        x0 = image_latents(params["vae"], inputs.image, plan.vae, inputs.vae_noise)
        return add_noise_at_step(schedule, x0, inputs.noise, plan.start)
    return inputs.noise * schedule.init_noise_sigma


def _loop_step(params: dict, cond: Conditioning, inputs: SampleInputs, schedule: Schedule, steering: Steering,
               plan: Plan):
    """:func:`sample.loop.denoise_step` for this run's UNet, conditioning and options."""
    rows = inputs.noise.shape[0] * (2 if cond.guided else 1)
    return denoise_step(unet_denoiser(params["unet"], plan.unet, cond), schedule, rows=rows, guided=cond.guided,
                        guidance=inputs.guidance, key=inputs.key, steering=steering, capture=plan.capture,
                        cond_model=cond_denoiser(params["unet"], plan.unet, cond), cond=cond)


def decode_to_uint8(params: dict, x: Array, plan: Plan) -> Array:
    return unit_to_uint8(latents_to_unit(params["vae"], x, plan.vae))


def _sample_program(params: dict, inputs: SampleInputs, schedule: Schedule, steering: Steering, *,
                    plan: Plan) -> dict:
    """The txt2img / img2img program: ``{"images": (B, H, W, 3) uint8, "latents": (B, h, w, C) float32 final
    latents, "aux": reduced captures}``. Jitted as :data:`sample_program` with ``plan`` static."""
    params, cond = cast_and_encode(params, inputs.prompt, plan)
    x = initial_latents(params, inputs, schedule, plan)
    x, aux = denoise(unet_denoiser(params["unet"], plan.unet, cond), schedule, x, guided=cond.guided,
                     guidance=inputs.guidance, key=inputs.key, start=plan.start, steering=steering,
                     capture=plan.capture, progress=plan.progress,
                     cond_model=cond_denoiser(params["unet"], plan.unet, cond), cond=cond)
    return {"images": decode_to_uint8(params, x, plan), "latents": x, "aux": aux}


sample_program = jax.jit(_sample_program, static_argnames=("plan",))


# The same computation as three programs, stepped from the host so that progress can be reported between steps
# without a host callback inside the program (programs holding host callbacks are never written to JAX's
# persistent compilation cache, so a CLI run with a progress bar would recompile every time). One dispatch per
# step costs microseconds against a UNet evaluation.
def _prepare(params: dict, inputs: SampleInputs, schedule: Schedule, steering: Steering, *, plan: Plan):
    params, cond = cast_and_encode(params, inputs.prompt, plan)
    _, init = _loop_step(params, cond, inputs, schedule, steering, plan)
    return params, cond, init(initial_latents(params, inputs, schedule, plan), plan.start)


def _advance(params: dict, cond: Conditioning, carry, i: Array, inputs: SampleInputs, schedule: Schedule,
             steering: Steering, *, plan: Plan):
    body, _ = _loop_step(params, cond, inputs, schedule, steering, plan)
    return body(carry, i)


prepare_program = jax.jit(_prepare, static_argnames=("plan",))
advance_program = jax.jit(_advance, static_argnames=("plan",))
decode_program = jax.jit(decode_to_uint8, static_argnames=("plan",))


def run_stepped(args: tuple, plan: Plan, schedule_len: int, progress: Callable[[int, int], None]) -> dict:
    """:data:`sample_program`'s result computed by the three stepped programs, calling ``progress(done,
    total)`` on the host after each step."""
    params, inputs, schedule, steering = args
    params, cond, carry = prepare_program(*args, plan=plan)
    total, stacked = schedule_len - plan.start, []
    for done, i in enumerate(range(plan.start, schedule_len), 1):
        carry, ys = advance_program(params, cond, carry, jnp.int32(i), inputs, schedule, steering, plan=plan)
        jax.block_until_ready(carry[0])
        progress(done, total)
        stacked.append(ys)
    x, _, acc = carry
    ys = jax.tree.map(lambda *a: jnp.stack(a), *stacked) if stacked and stacked[0] else {}
    return {"images": decode_program(params, x, plan=plan), "latents": x,
            "aux": reduced_captures(plan.capture, acc, ys)}


def make_plan(model: StableDiffusionModel, **options) -> Plan:
    """The :class:`Plan` of ``model`` (its component configs) with the given run options."""
    return Plan(unet=model.configs["unet"], vae=model.configs["vae"],
                text=tuple(model.configs[n] for n in text_encoder_names(model)), **options)


def run_timed(run: Callable[[], dict], programs: tuple, t0: float) -> tuple[dict, dict]:
    """Call ``run`` (which calls the jitted ``programs``), wait, fetch to numpy; timings since ``t0`` (host
    preparation started) and whether the call compiled (a program's cache grew)."""
    t1 = time.perf_counter()
    cache_before = [p._cache_size() for p in programs]
    out = jax.block_until_ready(run())
    t2 = time.perf_counter()
    out = jax.device_get(out)
    t3 = time.perf_counter()
    return out, {"prepare": t1 - t0, "run": t2 - t1, "fetch": t3 - t2, "total": t3 - t0,
                 "compiled": float([p._cache_size() for p in programs] != cache_before)}


def start_draws(seed: int, shape: tuple[int, ...], vae_shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, Array]:
    """A run's random draws from its seed: the starting (img2img: added) unit noise ``shape``, img2img's VAE
    posterior draw ``vae_shape`` and the key of stochastic scheduler steps. A method that needs the run's own
    noise or reference latents (Abs-Grad-SAM's shared noise) draws them here."""
    noise_key, vae_key, step_key = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (np.asarray(jax.random.normal(noise_key, shape, jnp.float32)),
            np.asarray(jax.random.normal(vae_key, vae_shape, jnp.float32)), step_key)


def _sample(model: StableDiffusionModel, prompts: list[str], *, spec: SampleSpec, negative_prompts, seed: int,
            noise, image, vae_noise, edits, capture: StepCaptureSpec | None, progress, mesh) -> SampleResult:
    """Shared host side of txt2img / img2img: check, tokenise, draw noise, place, run, fetch."""
    t0 = time.perf_counter()
    spec.check()
    check_prompts(prompts, negative_prompts)
    b = len(prompts)
    if image is not None:
        image = check_images(image, b)
    height, width = output_size(model, spec, None if image is None else image.shape[1:3])
    schedule = schedule_for(model, spec)
    start = img2img_start(spec.steps, spec.strength, len(schedule)) if image is not None else 0
    capture = as_step_capture(capture)
    capture.check(start, len(schedule))
    steering = as_steering(edits)
    steering.check(len(schedule))

    time_ids = None
    if model.is_sdxl:
        time_ids = sdxl_time_ids(height, width, spec.original_size, spec.crop_top_left, spec.target_size)
    ids = prompt_ids(model, prompts, negative_prompts, guided=spec.guided, time_ids=time_ids)
    shape = (b, *latent_shape(model, height, width))
    vae_shape = (*shape[:3], model.configs["vae"].latent_channels)
    drawn_noise, drawn_vae_noise, step_key = start_draws(seed, shape, vae_shape)
    noise = drawn_noise if noise is None else check_latents("init_latents", noise, shape)
    if image is not None:
        vae_noise = drawn_vae_noise if vae_noise is None else check_latents("vae_noise", vae_noise, vae_shape)
        image = np.asarray(uint8_to_signed(image))

    mesh = resolve_mesh(mesh, b)
    inputs = SampleInputs(prompt=shard_batch(ids, mesh), noise=shard_batch(noise, mesh),
                          guidance=replicate(jnp.float32(spec.guidance), mesh), key=replicate(step_key, mesh),
                          image=shard_batch(image, mesh), vae_noise=shard_batch(vae_noise, mesh))
    plan = make_plan(model, start=start, img2img=image is not None, dtype=spec.dtype, capture=capture)
    args = (replicate(dict(model.params), mesh), inputs, replicate(schedule, mesh), replicate(steering, mesh))
    if progress is None:
        out, timings = run_timed(lambda: sample_program(*args, plan=plan), (sample_program,), t0)
    else:
        out, timings = run_timed(lambda: run_stepped(args, plan, len(schedule), progress),
                                 (prepare_program, advance_program, decode_program), t0)
    return SampleResult(images=out["images"], latents=out["latents"], init_latents=noise, aux=out["aux"],
                        timings=timings)


def txt2img(model: StableDiffusionModel, prompts: list[str], *, spec: SampleSpec = SampleSpec(),
            negative_prompts: list[str] | None = None, seed: int = 0, init_latents: np.ndarray | None = None,
            edits=None, capture: StepCaptureSpec | None = None, progress=None, mesh=None) -> SampleResult:
    """Text to image. ``init_latents`` (B, h, w, C) NHWC: unit-variance starting noise (scaled by the
    scheduler's ``init_noise_sigma``, like diffusers' ``latents=``); default: drawn from ``seed``."""
    return _sample(model, prompts, spec=spec, negative_prompts=negative_prompts, seed=seed, noise=init_latents,
                   image=None, vae_noise=None, edits=edits, capture=capture, progress=progress, mesh=mesh)


def img2img(model: StableDiffusionModel, prompts: list[str], init_image: np.ndarray, *,
            spec: SampleSpec = SampleSpec(), negative_prompts: list[str] | None = None, seed: int = 0,
            noise: np.ndarray | None = None, vae_noise: np.ndarray | None = None, edits=None,
            capture: StepCaptureSpec | None = None, progress=None, mesh=None) -> SampleResult:
    """Image to image (SDEdit) with diffusers' ``strength``: ``init_image`` uint8 (B or 1, H, W, 3) is encoded
    (posterior sample ``mean + std * vae_noise``), noised with ``noise`` to step ``start`` (see
    :func:`sample.spec.img2img_start`), and denoised from there. ``noise``/``vae_noise`` (B, h, w, C) default to
    draws from ``seed``."""
    return _sample(model, prompts, spec=spec, negative_prompts=negative_prompts, seed=seed, noise=noise,
                   image=init_image, vae_noise=vae_noise, edits=edits, capture=capture, progress=progress,
                   mesh=mesh)


def generate(model: StableDiffusionModel, prompts: list[str], *, spec: SampleSpec,
             negative_prompts: list[str] | None = None, seed: int = 0,
             init_latents: np.ndarray | None = None,    # NHWC (B, h, w, 4)
             init_image: np.ndarray | None = None,      # uint8 (B or 1, H, W, 3)
             edits=None, capture: StepCaptureSpec | None = None, progress=None, mesh=None) -> SampleResult:
    """The entry point of the CLI and benchmarks: txt2img, or img2img when ``init_image`` is given.

    Args:
      model: a loaded :class:`~jaxdiff.checkpoint.StableDiffusionModel` (SD1.x, SD2.x or SDXL).
      prompts: B prompts; negative_prompts: None, one for all, or B (the unconditional rows; "" if None).
      spec: :class:`~sample.spec.SampleSpec`.
      seed: draws the initial noise, img2img's VAE sample and stochastic scheduler steps.
      init_latents: (B, h, w, 4) unit-variance noise to start from instead of drawing it (txt2img: scaled by
        ``init_noise_sigma``; img2img: the noise added to the encoded image).
      edits: None, a :class:`~jaxdiff.hooks.UNetEdits` applied at every step, or a
        :class:`~sample.steering.Steering` (step range, per-step edit function, latent hook).
      capture: a :class:`~sample.loop.StepCaptureSpec`; results in ``SampleResult.aux``.
      progress: ``progress(done, total)`` called on the host after each step. With it, the run is stepped
        from the host (three cached programs: encode + initial latents, one step, decode) instead of one
        program, with the same result; any callable, it is not part of a program's identity.
      mesh: a :class:`jax.sharding.Mesh` with a ``"batch"`` axis to shard the batch over; None = all local
        devices if there are several and they divide B, else one device.

    Raises:
      ValueError: size not a multiple of the VAE factor, unknown scheduler name, strength outside (0, 1], wrong
        ``init_latents``/``init_image`` shape, prompt count mismatch, capture steps not run, bad ``active``.
    """
    if init_image is not None:
        return img2img(model, prompts, init_image, spec=spec, negative_prompts=negative_prompts, seed=seed,
                       noise=init_latents, edits=edits, capture=capture, progress=progress, mesh=mesh)
    return txt2img(model, prompts, spec=spec, negative_prompts=negative_prompts, seed=seed,
                   init_latents=init_latents, edits=edits, capture=capture, progress=progress, mesh=mesh)
