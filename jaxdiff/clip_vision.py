"""CLIP vision transformer (ViT, Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
Supervision") as pure functions over a params dict, with the encoder layers of :mod:`jaxdiff.clip`.

Param names are transformers' ``CLIPVisionModel`` state-dict names under ``vision_model.`` (``.N`` -> ``_N``, ``.``
-> ``/``; ``pre_layrnorm`` keeps transformers' spelling).

Maths, for pixels ``x`` (B, S, S, C) NHWC, S = ``image_size``, P = ``patch_size``:
``patches = conv_PxP_stride_P(x)`` (no bias) -> (B, (S/P)^2, D) row-major over the patch grid;
``h = concat([class_embedding, patches]) + position_embedding``; ``h = pre_layrnorm(h)``; the non-causal encoder
layers; ``pooled = post_layernorm(h[:, 0])`` (the class token). ``last_hidden_state`` is ``h`` without the
post-LN, as in transformers.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from jaxdiff import nn
from jaxdiff.clip import ACTS, encoder_layer, init_encoder

Array = jax.Array


@dataclass(frozen=True)
class CLIPVisionConfig:
    """transformers' ``CLIPVisionConfig`` fields we use; defaults are transformers' (= ViT-B/32)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    image_size: int = 224
    patch_size: int = 32
    num_channels: int = 3
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        if self.hidden_act not in ACTS:
            raise ValueError(f"CLIP vision hidden_act {self.hidden_act!r} unsupported; supported: {list(ACTS)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"CLIP vision hidden_size {self.hidden_size} not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"CLIP vision image_size {self.image_size} not divisible by patch_size {self.patch_size}")

    @property
    def num_positions(self) -> int:
        """Patches plus the class token."""
        return (self.image_size // self.patch_size) ** 2 + 1

    @classmethod
    def from_transformers(cls, d: dict) -> "CLIPVisionConfig":
        """From a transformers ``vision_config`` dict (missing keys: transformers' defaults)."""
        mt = d.get("model_type", "clip_vision_model")
        if mt != "clip_vision_model":
            raise ValueError(f"unsupported CLIP vision model_type {mt!r}; expected 'clip_vision_model'")
        f = cls.__dataclass_fields__
        kw = {k: d[k] for k in f if d.get(k) is not None}
        return cls(**{k: (type(f[k].default)(v)) for k, v in kw.items()})


def init_clip_vision(mk: nn.Maker, config: CLIPVisionConfig) -> dict:
    c, d = config, config.hidden_size
    return {
        "embeddings": {"class_embedding": mk((d,)),
                       "patch_embedding": nn.init_conv(mk, c.num_channels, d, c.patch_size, bias=False),
                       "position_embedding": nn.init_embedding(mk, c.num_positions, d)},
        "pre_layrnorm": nn.init_norm(mk, d),
        "encoder": init_encoder(mk, c),
        "post_layernorm": nn.init_norm(mk, d),
    }


def apply_clip_vision(params: dict, pixels: Array, *, config: CLIPVisionConfig) -> tuple[Array, Array]:
    """``pixels`` (B, S, S, C) float, already normalised (:mod:`jaxdiff.clip_preprocess`) ->
    ``(last_hidden_state (B, 1 + (S/P)^2, D), pooled (B, D))``."""
    c = config
    x = jnp.asarray(pixels, jnp.float32)
    if x.ndim != 4 or x.shape[1:] != (c.image_size, c.image_size, c.num_channels):
        raise ValueError(f"CLIP vision input must be (B, {c.image_size}, {c.image_size}, {c.num_channels}) NHWC, "
                         f"got {x.shape}")
    emb = params["embeddings"]
    patches = nn.conv2d(emb["patch_embedding"], x, stride=c.patch_size, padding=0)
    b = x.shape[0]
    patches = patches.reshape(b, -1, c.hidden_size)
    cls_tok = jnp.broadcast_to(emb["class_embedding"].astype(x.dtype), (b, 1, c.hidden_size))
    h = jnp.concatenate([cls_tok, patches], axis=1) + emb["position_embedding"]["embedding"][None]
    h = nn.layer_norm(params["pre_layrnorm"], h, c.layer_norm_eps)
    for i in range(c.num_hidden_layers):
        h = encoder_layer(params["encoder"][f"layers_{i}"], h, c, causal=False)
    pooled = nn.layer_norm(params["post_layernorm"], h[:, 0], c.layer_norm_eps)
    return h, pooled
