"""The denoising objective of a *frozen* UNet with trainable steering parameters (concept vectors), shared by
the h-space concept methods.

Ho et al. 2020, eq. 14 (``L_simple``): draw ``t ~ U{0..T-1}`` and ``eps ~ N(0, I)``, form
``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`` and regress the UNet output onto the target of the model's
parameterisation (``eps``; for v-prediction models Salimans & Ho 2022's ``v = sqrt(abar) eps - sqrt(1 - abar)
x_0``). Only the steering parameters receive gradients: the UNet weights and the encoded captions come in as
``frozen`` arrays (replicated, never differentiated).

``frozen``: ``{"unet": params, "context": (U, 77, D) encoded captions, "alphas_cumprod": (T,)}`` plus, for SDXL,
``"text_embeds": (U, P)`` and ``"time_ids": (U, 6)``; a batch addresses captions by index into these.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdiff.hooks import NO_EDITS, UNetEdits
from jaxdiff.unet import UNetConfig, apply_unet

Array = jax.Array
PREDICTION_TYPES = ("epsilon", "v_prediction")


def noised(x0: Array, key: Array, alphas_cumprod: Array) -> tuple[Array, Array, Array, Array]:
    """``(x_t, t, eps, abar_t)`` for clean latents ``x0`` (B, h, w, C): one timestep and noise draw per row."""
    k_t, k_eps = jax.random.split(key)
    t = jax.random.randint(k_t, (x0.shape[0],), 0, alphas_cumprod.shape[0])
    eps = jax.random.normal(k_eps, x0.shape, jnp.float32)
    abar = alphas_cumprod[t][:, None, None, None]
    return jnp.sqrt(abar) * x0 + jnp.sqrt(1.0 - abar) * eps, t, eps, abar


def target_of(prediction_type: str, x0: Array, eps: Array, abar: Array) -> Array:
    """What the UNet predicts: the noise, or v."""
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return jnp.sqrt(abar) * eps - jnp.sqrt(1.0 - abar) * x0
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def predict(frozen: dict, config: UNetConfig, x_t: Array, t: Array, caption: Array,
            edits: UNetEdits = NO_EDITS) -> Array:
    """The frozen UNet's prediction for rows ``x_t`` with captions ``caption`` (B,) (indices into ``frozen``)."""
    added = None
    if "text_embeds" in frozen:
        added = {"text_embeds": frozen["text_embeds"][caption], "time_ids": frozen["time_ids"][caption]}
    out, _ = apply_unet(frozen["unet"], x_t, t, frozen["context"][caption], config=config, edits=edits,
                        added_cond=added)
    return out.astype(jnp.float32)


def weighted_mse(pred: Array, target: Array, weight: Array | None = None) -> tuple[Array, Array]:
    """(batch mean of ``weight * (pred - target)^2``, per-row plain MSE); ``weight`` broadcasts to (B, h, w, C)."""
    sq = jnp.square(pred - target)
    per_row = jnp.mean(sq, axis=(1, 2, 3))
    if weight is None:
        return jnp.mean(per_row), per_row
    return jnp.mean(weight * sq), per_row
