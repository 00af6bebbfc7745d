"""Prompt conditioning for sampling: token ids on the host, CLIP encoding inside the compiled program.

Classifier-free guidance (Ho & Salimans 2022, "Classifier-Free Diffusion Guidance") evaluates the UNet on
unconditional and conditional rows together. The row layout is explicit and is diffusers': with ``B`` prompts
the UNet batch has ``R = 2B`` rows ``[uncond_0 .. uncond_{B-1}, cond_0 .. cond_{B-1}]``; without guidance
``R = B`` conditional rows. Edits that should touch only one half use :func:`guidance_rows`.

Token ids are *inputs* of the compiled program (tokenised here, on the host), so a new prompt of the same batch
size never retraces. SDXL (Podell et al. 2023, "SDXL: Improving Latent Diffusion Models for High-Resolution
Image Synthesis", sec. 2.2) also conditions on the pooled text embedding of its second encoder and on
"micro-conditioning" ids ``(original_h, original_w, crop_top, crop_left, target_h, target_w)``, which are
traced float inputs too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.checkpoint import StableDiffusionModel
from jaxdiff.clip import CLIPTextConfig, apply_clip_text, encode_prompt_sdxl
from jaxdiff.pytree import pytree_dataclass, static_field
from jaxdiff.tokenizer import load_tokenizer, tokenize

Array = jax.Array


@pytree_dataclass
@dataclass(frozen=True)
class PromptIds:
    """Everything the compiled program needs to build the text conditioning (arrays are traced).

    * ``ids``: one (R, 77) int32 array per text encoder (SDXL has two), rows ``[uncond..., cond...]`` when
      ``guided``;
    * ``time_ids``: SDXL only, (R, 6) float32 micro-conditioning;
    * ``guided``: whether the rows carry the unconditional half (static);
    * ``zero_uncond``: () bool, SDXL's ``force_zeros_for_empty_prompt``: without a negative prompt the
      unconditional context and pooled embedding are zeros rather than the encoding of "" (traced, so adding
      or dropping negative prompts does not retrace).
    """

    ids: tuple[Array, ...]
    time_ids: Array | None = None
    zero_uncond: Array | None = None
    guided: bool = static_field(default=False)


@pytree_dataclass
@dataclass(frozen=True)
class Conditioning:
    """Encoded conditioning of one sampling run: ``context`` (R, 77, D) cross-attention input and, for SDXL,
    ``added_cond = {"text_embeds": (R, P), "time_ids": (R, 6)}``. ``guided`` as in :class:`PromptIds`."""

    context: Array
    added_cond: dict | None = None
    guided: bool = static_field(default=False)


def guidance_rows(batch: int, *, guided: bool = True, cond: bool = True, uncond: bool = False) -> np.ndarray:
    """(R,) bool row mask selecting the conditional and/or unconditional rows of a guidance batch.

    Pass it as an edit's ``rows`` to steer only the conditional branch, e.g.
    ``add_vector(d, rows=guidance_rows(B))``. Without guidance every row is conditional."""
    if not guided:
        return np.full((batch,), cond)
    return np.concatenate([np.full((batch,), uncond), np.full((batch,), cond)])


def text_encoder_names(model: StableDiffusionModel) -> tuple[str, ...]:
    """``("text_encoder",)`` or, for SDXL, ``("text_encoder", "text_encoder_2")``."""
    return ("text_encoder", "text_encoder_2") if model.is_sdxl else ("text_encoder",)


def check_prompts(prompts: Sequence[str], negative_prompts: Sequence[str] | None) -> list[str] | None:
    """Validate a prompt batch; returns one negative prompt per prompt (a single one is repeated) or None."""
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts) or not prompts:
        raise ValueError(f"prompts must be a non-empty list of str, got {prompts!r}")
    if negative_prompts is None:
        return None
    if isinstance(negative_prompts, str) or not all(isinstance(p, str) for p in negative_prompts):
        raise ValueError(f"negative_prompts must be a list of str, got {negative_prompts!r}")
    if len(negative_prompts) == 1:
        return list(negative_prompts) * len(prompts)
    if len(negative_prompts) != len(prompts):
        raise ValueError(f"got {len(prompts)} prompts but {len(negative_prompts)} negative prompts; pass one "
                         "negative prompt per prompt, or a single one for all")
    return list(negative_prompts)


def sdxl_time_ids(height: int, width: int, original_size: tuple[int, int] | None = None,
                  crop_top_left: tuple[int, int] = (0, 0), target_size: tuple[int, int] | None = None) -> np.ndarray:
    """SDXL micro-conditioning ``(orig_h, orig_w, crop_top, crop_left, target_h, target_w)`` as float32 (6,).

    Defaults as diffusers' ``StableDiffusionXLPipeline``: original and target size are the output size, no
    crop. Sizes are in pixels, height first."""
    original = tuple(original_size) if original_size is not None else (height, width)
    target = tuple(target_size) if target_size is not None else (height, width)
    ids = (*original, *tuple(crop_top_left), *target)
    if len(ids) != 6:
        raise ValueError(f"SDXL sizes must be (height, width) pairs, got original_size={original_size!r}, "
                         f"crop_top_left={crop_top_left!r}, target_size={target_size!r}")
    return np.asarray(ids, np.float32)


def prompt_ids(model: StableDiffusionModel, prompts: Sequence[str], negative_prompts: Sequence[str] | None = None,
               *, guided: bool, time_ids: np.ndarray | None = None) -> PromptIds:
    """Tokenise prompts (and negative prompts) for every text encoder of ``model``.

    Unconditional rows use the negative prompts, or "" when there are none (diffusers' default); for SDXL
    without negative prompts they are zeroed inside the program instead (``force_zeros_for_empty_prompt``).
    ``time_ids`` (6,) is the SDXL micro-conditioning, repeated for every row (required for SDXL, refused
    otherwise). Prompts longer than the tokenizer's 77 tokens raise :class:`jaxdiff.tokenizer.PromptTooLongError`.
    """
    negatives = check_prompts(prompts, negative_prompts)
    rows = list(prompts)
    if guided:
        rows = (negatives if negatives is not None else [""] * len(prompts)) + rows
    tok_names = ("tokenizer", "tokenizer_2") if model.is_sdxl else ("tokenizer",)
    missing = [n for n in tok_names if n not in model.tokenizer_dirs]
    if missing:
        raise ValueError(f"the model has no {', '.join(missing)} folder; cannot tokenise prompts")
    ids = tuple(jnp.asarray(tokenize(load_tokenizer(model.tokenizer_dirs[n]), rows)) for n in tok_names)
    if model.is_sdxl != (time_ids is not None):
        raise ValueError("time_ids are SDXL micro-conditioning: required for SDXL models, refused otherwise")
    tid = None if time_ids is None else jnp.asarray(np.broadcast_to(np.asarray(time_ids, np.float32),
                                                                     (len(rows), 6)))
    zero = jnp.asarray(guided and negatives is None) if model.is_sdxl else None
    return PromptIds(ids, tid, zero, guided=guided)


def encode_prompts(text_params: tuple, text_configs: tuple[CLIPTextConfig, ...], prompt: PromptIds) -> Conditioning:
    """Run the text encoder(s) on token ids (traceable; the first stage of the compiled sampling program).

    SD1.x/SD2.x: the final-layer-normed last hidden state (diffusers with ``clip_skip=None``). SDXL: the two
    encoders' penultimate hidden states concatenated, and encoder 2's projected pooled output
    (:func:`jaxdiff.clip.encode_prompt_sdxl`)."""
    if len(text_configs) == 1:
        context, _ = apply_clip_text(text_params[0], prompt.ids[0], config=text_configs[0])
        return Conditioning(context, None, guided=prompt.guided)
    context, pooled = encode_prompt_sdxl(text_params[0], text_configs[0], text_params[1], text_configs[1],
                                         *prompt.ids)
    if prompt.guided:   # zero the unconditional half (the first R/2 rows) when asked to
        zero = (jnp.arange(context.shape[0]) < context.shape[0] // 2) & prompt.zero_uncond
        context = jnp.where(zero[:, None, None], 0.0, context).astype(context.dtype)
        pooled = jnp.where(zero[:, None], 0.0, pooled).astype(pooled.dtype)
    return Conditioning(context, {"text_embeds": pooled, "time_ids": prompt.time_ids}, guided=prompt.guided)
