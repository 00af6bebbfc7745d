"""CLIP text encoders (SD1 CLIP-L/14, SD2 OpenCLIP-H, SDXL's two encoders) as pure functions over a params dict.

Param names are transformers' state-dict names without ``text_model.`` (``.N`` -> ``_N``, ``.`` -> ``/``), so the
generic converter loads both transformers >= 5.6 saves and real SD checkpoints (``text_model.*`` + ``position_ids``).

Maths (pre-LN transformer, OpenAI CLIP): ``h = tok_emb[ids] + pos_emb[:T]``; per layer
``h += out_proj(causal_attn(LN1(h)))``; ``h += fc2(act(fc1(LN2(h))))``; ``last = final_LN(h)``. The pooled output is
``last`` at the EOS position; ``text_embeds = pooled @ text_projection`` (no bias) for the WithProjection class.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from jaxdiff import nn
from jaxdiff.attention import attend

Array = jax.Array

ACTS = ("quick_gelu", "gelu")


@dataclass(frozen=True)
class CLIPTextConfig:
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 768
    eos_token_id: int = 2
    with_projection: bool = False

    def __post_init__(self):
        if self.hidden_act not in ACTS:
            raise ValueError(f"CLIP hidden_act {self.hidden_act!r} unsupported; supported: {list(ACTS)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"CLIP hidden_size {self.hidden_size} not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")

    @classmethod
    def from_diffusers(cls, d: dict) -> "CLIPTextConfig":
        """From a transformers ``CLIPTextConfig`` json dict (named like the other components' constructors)."""
        archs = d.get("architectures") or []
        known = {"CLIPTextModel", "CLIPTextModelWithProjection"}
        bad = [a for a in archs if a not in known]
        if bad:
            raise ValueError(f"unsupported text encoder architecture(s) {bad}; supported: {sorted(known)}")
        mt = d.get("model_type", "clip_text_model")
        if mt not in ("clip_text_model", "clip"):
            raise ValueError(f"unsupported text encoder model_type {mt!r}; expected 'clip_text_model'")
        act = d.get("hidden_act", "quick_gelu")
        if act not in ACTS:
            raise ValueError(f"unsupported CLIP hidden_act {act!r}; supported: {list(ACTS)}")
        eos = d.get("eos_token_id", 2)
        if eos is None:
            eos = 2
        if isinstance(eos, (list, tuple)):
            raise ValueError(f"unsupported CLIP eos_token_id {eos!r}; expected a single int")
        f = cls.__dataclass_fields__
        return cls(
            vocab_size=int(d.get("vocab_size", f["vocab_size"].default)),
            hidden_size=int(d.get("hidden_size", f["hidden_size"].default)),
            intermediate_size=int(d.get("intermediate_size", f["intermediate_size"].default)),
            num_hidden_layers=int(d.get("num_hidden_layers", f["num_hidden_layers"].default)),
            num_attention_heads=int(d.get("num_attention_heads", f["num_attention_heads"].default)),
            max_position_embeddings=int(d.get("max_position_embeddings", 77)),
            hidden_act=act,
            layer_norm_eps=float(d.get("layer_norm_eps", 1e-5)),
            projection_dim=int(d.get("projection_dim", 512)),
            eos_token_id=int(eos),
            with_projection="CLIPTextModelWithProjection" in archs,
        )


def init_encoder(mk: nn.Maker, config) -> dict:
    """The pre-LN transformer stack shared by the text and vision towers (``encoder/layers_N``); ``config`` is
    either tower's config (``hidden_size``, ``intermediate_size``, ``num_hidden_layers``)."""
    d, inner = config.hidden_size, config.intermediate_size

    def layer():
        return {
            "self_attn": {n: nn.init_dense(mk, d, d) for n in ("q_proj", "k_proj", "v_proj", "out_proj")},
            "layer_norm1": nn.init_norm(mk, d),
            "mlp": {"fc1": nn.init_dense(mk, d, inner), "fc2": nn.init_dense(mk, inner, d)},
            "layer_norm2": nn.init_norm(mk, d),
        }

    return {f"layers_{i}": layer() for i in range(config.num_hidden_layers)}


def init_clip_text(mk: nn.Maker, config: CLIPTextConfig) -> dict:
    c = config
    d = c.hidden_size
    p = {
        "embeddings": {"token_embedding": nn.init_embedding(mk, c.vocab_size, d),
                       "position_embedding": nn.init_embedding(mk, c.max_position_embeddings, d)},
        "encoder": init_encoder(mk, c),
        "final_layer_norm": nn.init_norm(mk, d),
    }
    if c.with_projection:
        p["text_projection"] = nn.init_dense(mk, d, c.projection_dim, bias=False)
    return p


def encoder_layer(p: dict, h: Array, config, *, causal: bool) -> Array:
    """One pre-LN CLIP layer (either tower; ``causal`` for text): ``h += out_proj(attn(LN1(h)))``;
    ``h += fc2(act(fc1(LN2(h))))``."""
    eps = config.layer_norm_eps
    x = nn.layer_norm(p["layer_norm1"], h, eps)
    a = p["self_attn"]
    out, _ = attend(nn.dense(a["q_proj"], x), nn.dense(a["k_proj"], x), nn.dense(a["v_proj"], x),
                    config.num_attention_heads, causal=causal)
    h = h + nn.dense(a["out_proj"], out)
    x = nn.layer_norm(p["layer_norm2"], h, eps)
    x = nn.dense(p["mlp"]["fc2"], nn.activation(config.hidden_act)(nn.dense(p["mlp"]["fc1"], x)))
    return h + x


def eos_positions(input_ids: Array, eos_token_id: int) -> Array:
    """transformers' pooling index: argmax(ids) for legacy ``eos_token_id == 2`` configs, else the first EOS."""
    ids = jnp.asarray(input_ids, jnp.int32)
    if eos_token_id == 2:
        return jnp.argmax(ids, axis=-1)
    return jnp.argmax((ids == eos_token_id).astype(jnp.int32), axis=-1)


def apply_clip_text(params: dict, input_ids: Array, *, config: CLIPTextConfig,
                    output_hidden_states: bool = False) -> tuple[Array, dict]:
    """``input_ids`` (B, T) int -> ``(last_hidden_state (B, T, D), aux)``.

    aux: ``pooled`` (B, D); ``text_embeds`` (B, projection_dim) with projection; ``hidden_states`` (tuple of
    num_hidden_layers + 1 arrays, embeddings first, none final-normed) and ``penultimate`` (= hidden_states[-2])
    if ``output_hidden_states``.
    """
    ids = jnp.asarray(input_ids, jnp.int32)
    t = ids.shape[1]
    if t > config.max_position_embeddings:
        raise ValueError(f"sequence length {t} exceeds max_position_embeddings {config.max_position_embeddings}")
    emb = params["embeddings"]
    h = jnp.take(emb["token_embedding"]["embedding"], ids, axis=0) + emb["position_embedding"]["embedding"][:t][None]
    hidden = [h]
    for i in range(config.num_hidden_layers):
        h = encoder_layer(params["encoder"][f"layers_{i}"], h, config, causal=True)
        hidden.append(h)
    last = nn.layer_norm(params["final_layer_norm"], h, config.layer_norm_eps)
    pooled = jnp.take_along_axis(last, eos_positions(ids, config.eos_token_id)[:, None, None], axis=1)[:, 0]
    aux = {"pooled": pooled}
    if config.with_projection:
        aux["text_embeds"] = nn.dense(params["text_projection"], pooled)
    if output_hidden_states:
        aux["hidden_states"] = tuple(hidden)
        aux["penultimate"] = hidden[-2]
    return last, aux


def encode_prompt_sdxl(params1: dict, cfg1: CLIPTextConfig, params2: dict, cfg2: CLIPTextConfig,
                       ids1: Array, ids2: Array) -> tuple[Array, Array]:
    """SDXL conditioning as diffusers' ``StableDiffusionXLPipeline.encode_prompt`` (positive prompt, clip_skip None).

    context = concat(hidden_states[-2] of encoder 1, hidden_states[-2] of encoder 2) on features, no final LN
    -> (B, 77, 768 + 1280); pooled = encoder 2's ``text_embeds`` (B, 1280).
    """
    if not cfg2.with_projection:
        raise ValueError("encode_prompt_sdxl: the second encoder must be CLIPTextModelWithProjection")
    _, a1 = apply_clip_text(params1, ids1, config=cfg1, output_hidden_states=True)
    _, a2 = apply_clip_text(params2, ids2, config=cfg2, output_hidden_states=True)
    return jnp.concatenate([a1["penultimate"], a2["penultimate"]], axis=-1), a2["text_embeds"]
