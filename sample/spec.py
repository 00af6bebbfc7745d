"""Sampling options (:class:`SampleSpec`), results (:class:`SampleResult`) and their host-side checks.

Scheduler names map to the kinds of :mod:`jaxdiff.schedulers`; a kind other than the model's own is built
from the model's ``scheduler_config.json`` the way diffusers' ``OtherScheduler.from_config(config)`` does
(shared keys reused, that class's defaults for the rest).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from jaxdiff.checkpoint import StableDiffusionModel
from jaxdiff.schedulers import KINDS, Schedule, SchedulerConfig, make_schedule
from jaxdiff.schedulers.config import DDIM, DDPM, DPM, EULER, EULER_ANCESTRAL, PNDM
from sample.model_fns import check_dtype

# Short names (CLI and benchmarks) -> scheduler kinds; the diffusers class names are accepted as well.
SCHEDULER_NAMES = {"ddim": DDIM, "ddpm": DDPM, "pndm": PNDM, "plms": PNDM, "euler": EULER,
                   "euler_a": EULER_ANCESTRAL, "dpm++2m": DPM, "dpmpp_2m": DPM}


@dataclass(frozen=True)
class SampleSpec:
    """Options of one sampling call. Fields that change the compiled program's shape or structure (steps,
    size, scheduler, eta, dtype, strength, guidance on/off) retrace when changed; the guidance *value* does not.

    * ``guidance``: classifier-free guidance scale; > 1 runs the guided [uncond, cond] batch (diffusers'
      rule), <= 1 the conditional rows only;
    * ``height``/``width``: pixels, multiples of the VAE factor (default: UNet ``sample_size`` x VAE factor);
    * ``scheduler``: a name of :data:`SCHEDULER_NAMES` or a diffusers class name; None = the model's own;
    * ``eta``: DDIM's eta (Song et al. 2021, eq. 16; 0 = deterministic); other kinds need 0;
    * ``dtype``: weight dtype, ``"float32"`` or ``"bfloat16"`` (scheduler maths stays float32);
    * ``strength``: img2img only, in (0, 1]: the fraction of the schedule run (diffusers' semantics);
    * ``original_size``/``crop_top_left``/``target_size``: SDXL micro-conditioning (pixels, (h, w)); sizes
      default to the output size, the crop to (0, 0).
    """

    steps: int = 30
    guidance: float = 7.5
    height: int | None = None
    width: int | None = None
    scheduler: str | None = None
    eta: float = 0.0
    dtype: str = "float32"
    strength: float = 0.8
    original_size: tuple[int, int] | None = None
    crop_top_left: tuple[int, int] = (0, 0)
    target_size: tuple[int, int] | None = None

    @property
    def guided(self) -> bool:
        return self.guidance > 1.0

    def check(self) -> None:
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be a positive int, got {self.steps!r}")
        check_dtype(self.dtype)
        if not 0.0 < self.strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {self.strength}")


@dataclass(frozen=True)
class SampleResult:
    """Output of :func:`sample.pipeline.generate`.

    * ``images``: (B, H, W, 3) uint8;
    * ``latents``: (B, h, w, 4) float32 NHWC final latents (diffusers' ``output_type="latent"``, NCHW there);
    * ``init_latents``: (B, h, w, 4) the unit-variance noise the run started from: txt2img's initial latents
      *before* scaling by the scheduler's ``init_noise_sigma`` (diffusers' ``latents=`` convention), img2img's
      noise added to the encoded image. Passing it back as ``init_latents`` reproduces the run;
    * ``aux``: reduced captures ``{"attn": {AttnSite: array}, "h": array}`` (numpy), ``{}`` without capture;
    * ``timings``: seconds: ``prepare`` (host: tokenise, draw noise, place), ``run`` (the compiled program,
      including any compilation), ``fetch`` (device -> host), ``total``; ``compiled`` is 1.0 when this
      call traced and compiled a new program, else 0.0.
    """

    images: np.ndarray
    latents: np.ndarray
    init_latents: np.ndarray
    aux: Any = field(default_factory=dict)
    timings: dict = field(default_factory=dict)


def scheduler_config(model: StableDiffusionModel, name: str | None = None) -> SchedulerConfig:
    """The model's scheduler config, or the same keys read as the scheduler ``name``."""
    if name is None:
        return SchedulerConfig.from_diffusers(model.scheduler_config)
    kind = SCHEDULER_NAMES.get(name, name if name in KINDS else None)
    if kind is None:
        raise ValueError(f"unknown scheduler {name!r}; valid names: {', '.join(SCHEDULER_NAMES)} "
                         f"(or a class name: {', '.join(KINDS)})")
    return SchedulerConfig.from_diffusers(model.scheduler_config, kind=kind)


def schedule_for(model: StableDiffusionModel, spec: SampleSpec) -> Schedule:
    """The schedule a run with ``spec`` samples on. ``len()`` of it is the length of ``Steering.active`` (PNDM
    has ``steps + 1`` entries); its ``timesteps`` are what a latent hook may need in its ``hook_params``."""
    return make_schedule(scheduler_config(model, spec.scheduler), spec.steps, eta=spec.eta)


def vae_factor(model: StableDiffusionModel) -> int:
    """Pixels per latent cell: 2 ** (number of VAE levels - 1) (8 for SD)."""
    return 2 ** (len(model.configs["vae"].block_out_channels) - 1)


def latent_shape(model: StableDiffusionModel, height: int, width: int) -> tuple[int, int, int]:
    """(h, w, C) of the UNet's latents for a ``height x width`` image."""
    f = vae_factor(model)
    return height // f, width // f, model.configs["unet"].in_channels


def output_size(model: StableDiffusionModel, spec: SampleSpec,
                image_hw: tuple[int, int] | None = None) -> tuple[int, int]:
    """(height, width) in pixels: the spec's, else the init image's, else UNet sample_size x VAE factor."""
    f = vae_factor(model)
    default = image_hw or (model.configs["unet"].sample_size * f,) * 2
    h = spec.height if spec.height is not None else default[0]
    w = spec.width if spec.width is not None else default[1]
    if h % f or w % f or h <= 0 or w <= 0:
        raise ValueError(f"height and width must be positive multiples of the VAE factor {f}, got {h}x{w}")
    if image_hw is not None and (h, w) != tuple(image_hw):
        raise ValueError(f"init_image is {image_hw[0]}x{image_hw[1]} but the spec asks for {h}x{w}; resize the "
                         "image or leave height/width unset")
    return h, w


def img2img_start(steps: int, strength: float, schedule_len: int) -> int:
    """First step index of img2img (diffusers' ``get_timesteps``): ``init_timestep = min(int(steps * strength),
    steps)`` steps are run, starting at ``steps - init_timestep`` (times the scheduler order, 1 for ours; PNDM's
    repeated timestep keeps its schedule ``steps + 1`` long, as diffusers')."""
    init_timestep = min(int(steps * strength), steps)
    start = max(steps - init_timestep, 0)
    if start >= schedule_len or init_timestep < 1:
        raise ValueError(f"strength {strength} with {steps} steps runs no denoising step "
                         f"(int(steps * strength) = {init_timestep}); raise strength or steps")
    return start


def check_latents(name: str, x, shape: tuple[int, ...]) -> np.ndarray:
    """``x`` as float32 numpy of exactly ``shape`` (NHWC), else a ValueError naming the expected shape."""
    x = np.asarray(x)
    if x.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} (B, h, w, C) NHWC, got {x.shape}")
    return x.astype(np.float32)


def check_images(x, batch: int) -> np.ndarray:
    """An image batch: uint8 (B or 1, H, W, 3) -> uint8 (B, H, W, 3)."""
    x = np.asarray(x)
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3 or x.shape[0] not in (1, batch):
        raise ValueError(f"images must be uint8 of shape (B or 1, H, W, 3) with B = {batch}, got {x.dtype} "
                         f"{x.shape}")
    return np.broadcast_to(x, (batch, *x.shape[1:]))
