"""Two-tower CLIP (transformers' ``CLIPModel``): text tower, vision tower, bias-free projections and ``logit_scale``.

Param names are transformers' state-dict names of a ``CLIPModel`` (``text_model/...``, ``vision_model/...``,
``visual_projection/kernel``, ``text_projection/kernel``, ``logit_scale``), so :mod:`weights_convert.clip_model`
maps a ``model.safetensors`` mechanically.

Maths (transformers ``CLIPModel.forward``): ``image_embeds = normalise(pooled_vision @ visual_projection)``,
``text_embeds = normalise(pooled_text @ text_projection)`` (L2 over features);
``logits_per_image = exp(logit_scale) * image_embeds @ text_embeds.T`` (B_img, B_txt).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import jax
import jax.numpy as jnp

from jaxdiff import nn
from jaxdiff.clip import CLIPTextConfig, apply_clip_text, init_clip_text
from jaxdiff.clip_vision import CLIPVisionConfig, apply_clip_vision, init_clip_vision

Array = jax.Array

# transformers' CLIPTextConfig defaults (ViT-B/32's text tower); CLIPTextConfig's own defaults are SD's CLIP-L/14.
TEXT_DEFAULTS = {"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
                 "num_attention_heads": 8, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
                 "layer_norm_eps": 1e-5, "eos_token_id": 2}


class NoVisionTowerError(ValueError):
    """A config describes a text-only CLIP (``CLIPTextModel``...), not a two-tower ``CLIPModel``."""


@dataclass(frozen=True)
class CLIPModelConfig:
    """Both towers' configs and the shared embedding size (defaults: openai/clip-vit-base-patch32)."""

    text: CLIPTextConfig = field(default_factory=lambda: CLIPTextConfig(**TEXT_DEFAULTS))
    vision: CLIPVisionConfig = CLIPVisionConfig()
    projection_dim: int = 512

    @classmethod
    def from_transformers(cls, d: dict) -> "CLIPModelConfig":
        """From a transformers ``CLIPModel`` config.json dict (``text_config`` / ``vision_config`` sub-dicts; the
        ``*_config_dict`` spellings of old saves too). Raises :class:`NoVisionTowerError` for a text-only config."""
        archs = d.get("architectures") or []
        vision = d.get("vision_config") or d.get("vision_config_dict")
        if d.get("model_type") != "clip" or not isinstance(vision, dict):
            kind = ", ".join(archs) or f"model_type {d.get('model_type')!r}"
            raise NoVisionTowerError(f"has no vision tower (config.json describes {kind}); a transformers CLIPModel "
                                     "folder is needed (model_type 'clip', e.g. openai/clip-vit-base-patch32)")
        text = {**TEXT_DEFAULTS, **{k: v for k, v in (d.get("text_config") or d.get("text_config_dict") or {}).items()
                                     if v is not None}}
        text.pop("architectures", None)
        return cls(text=CLIPTextConfig.from_diffusers(text), vision=CLIPVisionConfig.from_transformers(vision),
                   projection_dim=int(d.get("projection_dim", 512)))


def init_clip_model(mk: nn.Maker, config: CLIPModelConfig) -> dict:
    c = config
    return {
        "text_model": init_clip_text(mk, c.text),
        "vision_model": init_clip_vision(mk, c.vision),
        "visual_projection": nn.init_dense(mk, c.vision.hidden_size, c.projection_dim, bias=False),
        "text_projection": nn.init_dense(mk, c.text.hidden_size, c.projection_dim, bias=False),
        "logit_scale": mk(()),
    }


def _unit(x: Array) -> Array:
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def image_features(params: dict, pixels: Array, *, config: CLIPModelConfig) -> Array:
    """(B, projection_dim) unnormalised (transformers' ``get_image_features``); ``pixels`` preprocessed NHWC."""
    _, pooled = apply_clip_vision(params["vision_model"], pixels, config=config.vision)
    return nn.dense(params["visual_projection"], pooled)


def text_features(params: dict, input_ids: Array, *, config: CLIPModelConfig) -> Array:
    """(B, projection_dim) unnormalised (transformers' ``get_text_features``) from (B, T) token ids."""
    _, aux = apply_clip_text(params["text_model"], input_ids, config=config.text)
    return nn.dense(params["text_projection"], aux["pooled"])


def image_embeds(params: dict, pixels: Array, *, config: CLIPModelConfig) -> Array:
    """(B, projection_dim) L2-normalised image embeddings (``CLIPOutput.image_embeds``)."""
    return _unit(image_features(params, pixels, config=config))


def text_embeds(params: dict, input_ids: Array, *, config: CLIPModelConfig) -> Array:
    """(B, projection_dim) L2-normalised text embeddings (``CLIPOutput.text_embeds``)."""
    return _unit(text_features(params, input_ids, config=config))


def logits_per_image(img_embeds: Array, txt_embeds: Array, logit_scale: Array | float) -> Array:
    """``exp(logit_scale) * img_embeds @ txt_embeds.T``: (B_img, B_txt) from normalised embeddings."""
    return jnp.exp(jnp.asarray(logit_scale, jnp.float32)) * (img_embeds @ txt_embeds.T)
