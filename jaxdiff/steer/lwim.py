"""LWIM: Shokrolahi, Kang & Kim, "Learning Where It Matters: Responsible and Interpretable Text-to-Image
Generation with Background Consistency" (TMLR 2026).

One per-channel bias ``delta_c`` (C,) per concept, added to h over the whole grid. The paper's three training
mechanisms (its released code has none of them; reconstructed as in the project's methods spec, section 2.4),
each a switch of :class:`LWIMTraining`:

(a) **MCA suppression**: the training prompt keeps the attribute word ("a red shape on grass") but in every
    cross-attention its token(s) get probability scale ``gamma_a`` with renormalisation over the row
    (``gamma_a = 0`` removes the token exactly: the output no longer depends on its embedding), so the frozen
    model cannot read the attribute from the text and the bias must carry it. Off: the neutral caption.
(b) **h attenuation**: ``h' = gamma_h h + delta_c`` during training (``gamma_h < 1``), sampling uses
    ``gamma_h = 1``.
(c) **spatially weighted loss**: ``w = 1 + beta M``, ``M`` the attribute word's DAAM-style cross-attention map
    of the training image (summed over sites, heads and steps at generation time, resized to the latent grid,
    max-normalised).

Loss target: ``"distill"`` (the released code: the frozen model's prediction for the *attribute* prompt, no
concept) or ``"noise"`` (Li et al.'s true noise).

Inference: ``h <- h + 2.0 delta_c`` on both guidance rows (released default), plus the **low-pass h
re-injection** for background consistency: a concept-free reference run's h at every step, its Haar LL band
(one-level 2-D Haar DWT with the detail bands zeroed = 2x2 block mean, nearest-upsampled), added with weight
``lambda`` (1.0): ``h <- h + 2 delta_c + lambda LL(h_ref,t)``. The released code takes the reference's
unconditional row (probably by accident); the row is a setting here.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.hooks import AttnEdit, HSpaceEdit, UNetEdits
from jaxdiff.steer.concepts import concept_shape
from jaxdiff.steer.objective import noised, predict, target_of, weighted_mse
from jaxdiff.steering import Steering
from jaxdiff.unet import UNetConfig, attn_sites

Array = jax.Array
METHOD, KIND, DEFAULT_SCALE, DEFAULT_ROWS = "lwim", "channel", 2.0, "both"
TARGETS = ("distill", "noise")
REF_ROWS = ("uncond", "cond")


@dataclass(frozen=True)
class LWIMTraining:
    """Switches and hyper-parameters of LWIM training. ``gamma_a=None`` turns (a) off, ``gamma_h=1`` (b),
    ``beta=0`` (c)."""

    gamma_a: float | None = 0.0
    gamma_h: float = 0.5
    beta: float = 1.0
    target: str = "distill"

    def __post_init__(self):
        if self.target not in TARGETS:
            raise ValueError(f"LWIM target must be one of {TARGETS}, got {self.target!r}")
        if self.gamma_a is not None and not 0.0 <= self.gamma_a <= 1.0:
            raise ValueError(f"gamma_a must be in [0, 1] (or None: off), got {self.gamma_a}")
        if not 0.0 < self.gamma_h <= 1.0:
            raise ValueError(f"gamma_h must be in (0, 1], got {self.gamma_h}")
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")


def init_vectors(n: int, h_shape) -> np.ndarray:
    """(n, C) biases drawn N(0, 0.02^2) as the released code initialises its concept embedding."""
    return (0.02 * np.random.default_rng(0).standard_normal((n, *concept_shape(KIND, h_shape)))).astype(np.float32)


def _attenuate_add(h, t, params):
    return params["gamma"].astype(h.dtype) * h + params["delta"].astype(h.dtype)


def suppression_scale(token_mask: Array, gamma_a: float) -> Array:
    """(B, K) probability scale: ``gamma_a`` on the attribute tokens (``token_mask`` True), 1 elsewhere."""
    return jnp.where(jnp.asarray(token_mask, bool), jnp.float32(gamma_a), jnp.float32(1.0))


def suppression_edits(config: UNetConfig, token_mask: Array, gamma_a: float) -> dict:
    """Attribute-token suppression at every cross-attention site, renormalised over the remaining tokens."""
    edit = AttnEdit(prob_scale=suppression_scale(token_mask, gamma_a), renormalize=True)
    return {s: edit for s in attn_sites(config) if s.kind == "cross"}


def training_edits(config: UNetConfig, delta: Array, batch: dict, cfg: LWIMTraining) -> UNetEdits:
    """The student's edits: ``gamma_h h + delta`` at the seam, and (a) if on."""
    b = delta.shape[0]
    hs = HSpaceEdit(_attenuate_add, {"delta": delta, "gamma": jnp.full((b,), cfg.gamma_h, jnp.float32)},
                    per_row_params=True)
    attn = {} if cfg.gamma_a is None else suppression_edits(config, batch["token_mask"], cfg.gamma_a)
    return UNetEdits(hspace=hs, attn=attn)


def loss(vectors: Array, batch: dict, key: Array, frozen: dict, *, unet: UNetConfig, cfg: LWIMTraining,
         prediction_type: str = "epsilon") -> tuple[Array, dict]:
    """LWIM's objective for a batch mixing concepts: ``batch = {"latents", "label", "neutral", "attribute"
    (caption indices), "token_mask": (B, 77) attribute tokens of the attribute caption, "map": (B, h, w)}``."""
    x0 = batch["latents"]
    x_t, t, eps, abar = noised(x0, key, frozen["alphas_cumprod"])
    caption = batch["attribute"] if cfg.gamma_a is not None else batch["neutral"]
    pred = predict(frozen, unet, x_t, t, caption, training_edits(unet, vectors[batch["label"]], batch, cfg))
    if cfg.target == "distill":
        target = jax.lax.stop_gradient(predict(frozen, unet, x_t, t, batch["attribute"]))
    else:
        target = target_of(prediction_type, x0, eps, abar)
    weight = None if cfg.beta == 0 else 1.0 + cfg.beta * batch["map"][..., None]
    value, per_row = weighted_mse(pred, target, weight)
    return value, {"mse": jnp.mean(per_row)}


# ------------------------------------------------------------------------------------ low-pass re-injection
def haar_lowpass(h: Array) -> Array:
    """The LL band of a one-level 2-D Haar DWT, inverse-transformed with the detail bands zeroed, of (..., H, W,
    C): each 2x2 block replaced by its mean (H, W even)."""
    *lead, hh, ww, c = h.shape
    if hh % 2 or ww % 2:
        raise ValueError(f"the Haar low-pass needs an even h grid, got {hh}x{ww}")
    blocks = h.reshape(*lead, hh // 2, 2, ww // 2, 2, c).mean(axis=(-4, -2), keepdims=True)
    return jnp.broadcast_to(blocks, (*lead, hh // 2, 2, ww // 2, 2, c)).reshape(h.shape)


def _add_lowpass(h, t, params):
    return h + (params["weight"] * haar_lowpass(params["ref"].astype(jnp.float32))).astype(h.dtype)


def reference_rows(ref_h: Array, *, guided: bool, row: str) -> Array:
    """(S, R, h, w, C) per-step h of a reference run's UNet rows -> the chosen half, repeated for every row of
    the steered run (the re-injection is added to both guidance rows, as released)."""
    if row not in REF_ROWS:
        raise ValueError(f"reference row must be one of {REF_ROWS}, got {row!r}")
    if not guided:
        return ref_h
    half = ref_h.shape[1] // 2
    chosen = ref_h[:, :half] if row == "uncond" else ref_h[:, half:]
    return jnp.concatenate([chosen, chosen], axis=1)


def lowpass_steering(ref_h: Array, weight: float | Array = 1.0, *, guided: bool, row: str = "uncond",
                     num_steps: int | None = None) -> Steering:
    """The re-injection of a reference run's per-step h (captured with ``hspace=True, reduce="stack",
    cond_only=False``: (S, R, h, w, C) for the S steps run). A run that started at step ``num_steps - S``
    (img2img) is padded in front so the step index addresses it."""
    ref = reference_rows(jnp.asarray(ref_h), guided=guided, row=row)
    s, r = ref.shape[:2]
    if num_steps is not None and num_steps > s:
        ref = jnp.concatenate([jnp.zeros((num_steps - s, *ref.shape[1:]), ref.dtype), ref])
    w = jnp.broadcast_to(jnp.asarray(weight, jnp.float32), ref.shape[:2])
    edit = HSpaceEdit(_add_lowpass, {"ref": ref, "weight": w}, per_row_params=True, per_step_params=True)
    return Steering(edits=UNetEdits(hspace=edit))
