"""The model's components as traced functions for the compiled programs: weight dtype, the UNet as a denoiser
callable, image <-> latent conversions.

Numerics. ``dtype="bfloat16"`` casts the UNet and text-encoder weights (the UNet then runs in bf16 with float32
normalisation statistics, attention softmax and final conv, see :mod:`jaxdiff.unet`); scheduler maths and the
latent carry stay float32. The VAE stays float32 when its config says ``force_upcast`` (the SD/SDXL VAEs
overflow in half precision), as diffusers upcasts it.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

from jaxdiff.hooks import CaptureSpec, UNetEdits
from jaxdiff.unet import UNetConfig, apply_unet
from jaxdiff.vae import VAEConfig, decode_latents, encode_to_latents
from sample.loop import Denoiser
from sample.text import Conditioning

Array = jax.Array
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")


def cast_params(params: Mapping[str, dict], dtype: str, vae_config: VAEConfig) -> dict:
    """Component params in the run's dtype (float leaves only); the VAE keeps float32 if ``force_upcast``.
    Traced inside the program: one convert per weight per call, negligible next to the sampling loop."""
    check_dtype(dtype)
    want = DTYPES[dtype]
    if want == jnp.float32:
        return dict(params)

    def cast(tree):
        return jax.tree.map(lambda x: x.astype(want) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)

    return {name: (p if name == "vae" and vae_config.force_upcast else cast(p)) for name, p in params.items()}


def unet_denoiser(unet_params: dict, config: UNetConfig, cond: Conditioning) -> Denoiser:
    """The UNet closed over its params and text conditioning: ``(x, t, edits, capture) -> (output, aux)``.
    ``x`` has the conditioning's rows (R); the scalar timestep is broadcast to every row."""
    def model(x: Array, t: Array, edits: UNetEdits, capture: CaptureSpec):
        return apply_unet(unet_params, x, t, cond.context, config=config, edits=edits, capture=capture,
                          added_cond=cond.added_cond)
    return model


def cond_denoiser(unet_params: dict, config: UNetConfig, cond: Conditioning) -> Denoiser:
    """:func:`unet_denoiser` over the conditional rows only (the second half of a guided conditioning)."""
    if cond.guided:
        half = lambda a: a[a.shape[0] // 2:]   # noqa: E731
        cond = Conditioning(context=half(cond.context), guided=False,
                            added_cond=None if cond.added_cond is None else jax.tree.map(half, cond.added_cond))
    return unet_denoiser(unet_params, config, cond)


def image_latents(vae_params: dict, images: Array, config: VAEConfig, noise: Array | None = None) -> Array:
    """Images in [-1, 1] (B, H, W, 3) -> scaled latents: a posterior sample ``mean + std * noise`` with the given
    standard-normal ``noise`` (diffusers' img2img ``latent_dist.sample``), or the posterior mean if None
    (DDIM inversion, as null-text inversion encodes)."""
    images = jnp.asarray(images, jnp.float32)
    if noise is None:
        return encode_to_latents(vae_params, images, config=config, sample=False)
    return encode_to_latents(vae_params, images, config=config, noise=noise)


def latents_to_unit(vae_params: dict, latents: Array, config: VAEConfig) -> Array:
    """Latents -> images in [0, 1] float32 (decode, then diffusers' ``(x / 2 + 0.5).clamp(0, 1)``)."""
    x = decode_latents(vae_params, latents, config=config).astype(jnp.float32)
    return jnp.clip(x / 2 + 0.5, 0.0, 1.0)


def unit_to_uint8(x: Array) -> Array:
    """[0, 1] -> uint8 as diffusers' ``numpy_to_pil``: ``(x * 255).round()`` (traceable)."""
    return jnp.round(x * 255.0).astype(jnp.uint8)
