"""UNet2DConditionModel (SD1.x, SD2.x, SDXL base) as pure functions over a plain params dict.

The latent-diffusion UNet of Rombach et al. 2022 (LDM), following diffusers' ``UNet2DConditionModel`` maths
and state-dict names. Images are NHWC. Public API:

* :class:`UNetConfig` (frozen, hashable: pass it as a static argument) with
  :meth:`UNetConfig.from_diffusers` reading a diffusers ``unet/config.json`` dict;
* :func:`init_unet` ``(mk, config) -> params``;
* :func:`attn_sites` ``(config) -> (AttnSite, ...)`` in canonical order (down, mid, up; self before cross);
* :func:`apply_unet` ``(params, latents, t, text_ctx, *, config, edits, capture, added_cond) -> (out, aux)``.

Hooks: every attention layer goes through :func:`jaxdiff.attention.attend`; the h-space seam is right after
the mid block (capture first, then ``edits.hspace``).

Numerics: attention logits and softmax are always float32 (see :mod:`jaxdiff.attention`), so
``upcast_attention`` (SD2.1) is accepted and has no further effect; normalisation statistics are float32;
everything else runs in the dtype of the params (``conv_in`` kernel), e.g. bf16; ``conv_out`` runs in float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from jaxdiff import nn
from jaxdiff.hooks import NO_CAPTURE, NO_EDITS, AttnSite, CaptureSpec, UNetEdits, check_sites
from jaxdiff.unet_blocks import (BlockSpec, Hooks, TransformerSpec, down_block, init_block, mid_block,
                                 up_block)

Array = jax.Array
Params = dict

DOWN_TYPES = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}   # type -> has attention
UP_TYPES = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}
MID_TYPES = ("UNetMidBlock2DCrossAttn",)

# diffusers config keys we accept only at their default (value), with why they matter.
_REQUIRED_DEFAULTS = {
    "center_input_sample": False, "dual_cross_attention": False, "only_cross_attention": False,
    "class_embed_type": None, "num_class_embeds": None, "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0, "time_embedding_type": "positional",
    "time_embedding_dim": None, "time_embedding_act_fn": None, "timestep_post_act": None,
    "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3, "attention_type": "default",
    "class_embeddings_concat": False, "cross_attention_norm": None, "encoder_hid_dim": None,
    "encoder_hid_dim_type": None, "downsample_padding": 1, "mid_block_scale_factor": 1,
    "reverse_transformer_layers_per_block": None, "mid_block_only_cross_attention": None, "act_fn": "silu",
}
# accepted and ignored: dropout (inference/no-dropout training), addition_embed_type_num_heads (unused by
# text_time), upcast_attention (always fp32 logits/softmax).
_IGNORED = {"dropout", "addition_embed_type_num_heads", "upcast_attention"}
_FIELDS = {"sample_size", "in_channels", "out_channels", "flip_sin_to_cos", "freq_shift", "down_block_types",
           "mid_block_type", "up_block_types", "block_out_channels", "layers_per_block", "norm_num_groups",
           "norm_eps", "cross_attention_dim", "transformer_layers_per_block", "attention_head_dim",
           "num_attention_heads", "use_linear_projection", "addition_embed_type", "addition_time_embed_dim",
           "projection_class_embeddings_input_dim"}


def _per_level(name: str, value, n: int) -> tuple:
    """An int (same at every level) or a list of ``n`` ints -> tuple of ``n`` ints."""
    if isinstance(value, (list, tuple)):
        if len(value) != n or not all(isinstance(v, int) for v in value):
            raise ValueError(f"UNet config: {name}={value!r} must be an int or a list of {n} ints")
        return tuple(value)
    return (int(value),) * n


@dataclass(frozen=True)
class UNetConfig:
    """Static UNet architecture (hashable). Build from diffusers with :meth:`from_diffusers`.

    ``heads`` is the number of attention heads per level (diffusers' ``attention_head_dim`` means heads for
    these models, a known naming quirk; ``num_attention_heads`` takes precedence when given).
    ``addition_time_embed_dim > 0`` marks SDXL's ``text_time`` added conditioning.
    """

    sample_size: int = 64
    in_channels: int = 4
    out_channels: int = 4
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    mid_block_type: str = "UNetMidBlock2DCrossAttn"
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: tuple[int, ...] = (2, 2, 2, 2)
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 768
    transformer_layers_per_block: tuple[int, ...] = (1, 1, 1, 1)
    heads: tuple[int, ...] = (8, 8, 8, 8)
    use_linear_projection: bool = False
    addition_time_embed_dim: int = 0
    projection_class_embeddings_input_dim: int = 0

    @classmethod
    def from_diffusers(cls, d: Mapping[str, Any]) -> "UNetConfig":
        """From a diffusers ``UNet2DConditionModel`` config dict; raises ``ValueError`` naming any unsupported
        setting (keys starting with ``_`` are metadata and ignored)."""
        d = {k: v for k, v in d.items() if not k.startswith("_")}
        unknown = sorted(set(d) - _FIELDS - _IGNORED - set(_REQUIRED_DEFAULTS))
        if unknown:
            raise ValueError(f"UNet config: unsupported keys {unknown}")
        bad = [f"{k}={d[k]!r} (only {v!r} is supported)" for k, v in _REQUIRED_DEFAULTS.items()
               if k in d and d[k] != v and not (k == "only_cross_attention" and _all_false(d[k]))]
        if bad:
            raise ValueError("UNet config: unsupported settings: " + "; ".join(bad))
        down = tuple(d.get("down_block_types", cls.down_block_types))
        up = tuple(d.get("up_block_types", cls.up_block_types))
        mid = d.get("mid_block_type", cls.mid_block_type)
        for name, types, known in (("down_block_types", down, DOWN_TYPES), ("up_block_types", up, UP_TYPES),
                                   ("mid_block_type", (mid,), MID_TYPES)):
            for t in types:
                if t not in known:
                    raise ValueError(f"UNet config: {name} has unsupported block type {t!r}; supported: "
                                     f"{sorted(known)}")
        n = len(down)
        if len(up) != n:
            raise ValueError(f"UNet config: {n} down blocks but {len(up)} up blocks")
        channels = tuple(d.get("block_out_channels", cls.block_out_channels))
        if len(channels) != n:
            raise ValueError(f"UNet config: block_out_channels {channels} must have one entry per down block")
        heads = d.get("num_attention_heads") or d.get("attention_head_dim", 8)
        tlayers = d.get("transformer_layers_per_block", 1)
        if isinstance(tlayers, (list, tuple)) and any(isinstance(x, (list, tuple)) for x in tlayers):
            raise ValueError("UNet config: nested transformer_layers_per_block is not supported")
        cross = d.get("cross_attention_dim", 1280)
        if isinstance(cross, (list, tuple)):
            if len(set(cross)) != 1:
                raise ValueError(f"UNet config: per-block cross_attention_dim {cross} is not supported")
            cross = cross[0]
        addition = d.get("addition_embed_type")
        if addition not in (None, "text_time"):
            raise ValueError(f"UNet config: addition_embed_type={addition!r} is not supported (None or "
                             "'text_time' (SDXL))")
        add_dim = int(d.get("addition_time_embed_dim") or 0) if addition == "text_time" else 0
        proj_dim = int(d.get("projection_class_embeddings_input_dim") or 0) if addition == "text_time" else 0
        if addition == "text_time" and not (add_dim and proj_dim):
            raise ValueError("UNet config: addition_embed_type='text_time' needs addition_time_embed_dim and "
                             "projection_class_embeddings_input_dim")
        groups = d.get("norm_num_groups", 32)
        if groups is None:
            raise ValueError("UNet config: norm_num_groups=None is not supported")
        sample = d.get("sample_size", 64)
        if isinstance(sample, (list, tuple)):
            sample = sample[0]
        return cls(
            sample_size=int(sample or 64), in_channels=int(d.get("in_channels", 4)),
            out_channels=int(d.get("out_channels", 4)), flip_sin_to_cos=bool(d.get("flip_sin_to_cos", True)),
            freq_shift=float(d.get("freq_shift", 0)), down_block_types=down, up_block_types=up,
            mid_block_type=mid, block_out_channels=channels,
            layers_per_block=_per_level("layers_per_block", d.get("layers_per_block", 2), n),
            norm_num_groups=int(groups), norm_eps=float(d.get("norm_eps", 1e-5)), cross_attention_dim=int(cross),
            transformer_layers_per_block=_per_level("transformer_layers_per_block", tlayers, n),
            heads=_per_level("attention heads", heads, n),
            use_linear_projection=bool(d.get("use_linear_projection", False)),
            addition_time_embed_dim=add_dim, projection_class_embeddings_input_dim=proj_dim)

    # ---------------------------------------------------------------------------- derived structure
    @property
    def is_sdxl(self) -> bool:
        return self.addition_time_embed_dim > 0

    @property
    def temb_channels(self) -> int:
        return 4 * self.block_out_channels[0]

    def _transformer(self, level: int, channels: int) -> TransformerSpec:
        return TransformerSpec(channels=channels, heads=self.heads[level],
                               layers=self.transformer_layers_per_block[level], cross_dim=self.cross_attention_dim,
                               groups=self.norm_num_groups, linear_proj=self.use_linear_projection)

    def _spec(self, part, index, cin, cout, layers, level, attn, resample, prev=0) -> BlockSpec:
        return BlockSpec(part=part, index=index, in_channels=cin, out_channels=cout,
                         temb_channels=self.temb_channels, num_layers=layers, prev_channels=prev,
                         transformer=self._transformer(level, cout) if attn else None, resample=resample,
                         groups=self.norm_num_groups, eps=self.norm_eps)

    def down_specs(self) -> tuple[BlockSpec, ...]:
        ch, n = self.block_out_channels, len(self.block_out_channels)
        return tuple(self._spec("down", i, ch[max(i - 1, 0)], ch[i], self.layers_per_block[i], i,
                                DOWN_TYPES[t], i < n - 1) for i, t in enumerate(self.down_block_types))

    def mid_spec(self) -> BlockSpec:
        c = self.block_out_channels[-1]
        return self._spec("mid", 0, c, c, 1, -1, True, False)

    def up_specs(self) -> tuple[BlockSpec, ...]:
        """diffusers' reversed lists: up block ``i`` sits at level ``n-1-i`` with ``layers_per_block + 1``
        resnets; its skip-input channels are those of the level below (``reversed[min(i+1, n-1)]``)."""
        rch, n = self.block_out_channels[::-1], len(self.block_out_channels)
        return tuple(self._spec("up", i, rch[min(i + 1, n - 1)], rch[i], self.layers_per_block[n - 1 - i] + 1,
                                n - 1 - i, UP_TYPES[t], i < n - 1, prev=rch[max(i - 1, 0)])
                     for i, t in enumerate(self.up_block_types))


def _all_false(x) -> bool:
    return x is False or (isinstance(x, (list, tuple)) and not any(x))


# --------------------------------------------------------------------------------------------- init
def init_unet(mk, config: UNetConfig) -> Params:
    """Parameter tree with diffusers state-dict names (``.N`` -> ``_N``)."""
    c0, temb = config.block_out_channels[0], config.temb_channels
    p = {"conv_in": nn.init_conv(mk, config.in_channels, c0, 3),
         "time_embedding": {"linear_1": nn.init_dense(mk, c0, temb), "linear_2": nn.init_dense(mk, temb, temb)}}
    if config.is_sdxl:
        p["add_embedding"] = {"linear_1": nn.init_dense(mk, config.projection_class_embeddings_input_dim, temb),
                              "linear_2": nn.init_dense(mk, temb, temb)}
    for spec in config.down_specs():
        p[f"down_blocks_{spec.index}"] = init_block(mk, spec)
    p["mid_block"] = init_block(mk, config.mid_spec())
    for spec in config.up_specs():
        p[f"up_blocks_{spec.index}"] = init_block(mk, spec)
    p["conv_norm_out"] = nn.init_norm(mk, c0)
    p["conv_out"] = nn.init_conv(mk, c0, config.out_channels, 3)
    return p


def attn_sites(config: UNetConfig) -> tuple[AttnSite, ...]:
    """Every attention layer of the model: down blocks, mid, up blocks; per Transformer2D layer self then cross."""
    sites = []
    for spec in (*config.down_specs(), config.mid_spec(), *config.up_specs()):
        for a in range(spec.num_attentions()):
            for layer in range(spec.transformer.layers):
                sites += [AttnSite(spec.part, spec.index, a, layer, kind) for kind in ("self", "cross")]
    return tuple(sites)


# ------------------------------------------------------------------------------------ embeddings
def _mlp(p: Params, x: Array) -> Array:
    """diffusers ``TimestepEmbedding``: linear_1 -> silu -> linear_2."""
    return nn.dense(p["linear_2"], jax.nn.silu(nn.dense(p["linear_1"], x)))


def time_embedding(params: Params, t: Array, batch: int, config: UNetConfig, dtype,
                   added_cond: Mapping[str, Array] | None) -> Array:
    """(B, 4*C0) embedding of timesteps (+ SDXL's text_time embedding of pooled text and size/crop ids)."""
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32).reshape(-1), (batch,))
    emb = nn.timestep_embedding(t, config.block_out_channels[0], config.flip_sin_to_cos, config.freq_shift)
    temb = _mlp(params["time_embedding"], emb.astype(dtype))
    if config.is_sdxl:
        temb = temb + _mlp(params["add_embedding"], _text_time_input(added_cond, batch, config).astype(dtype))
    elif added_cond is not None:
        raise ValueError("apply_unet: added_cond is only for SDXL (addition_embed_type='text_time') models")
    return temb


def _text_time_input(added_cond, batch: int, config: UNetConfig) -> Array:
    """SDXL (Podell et al. 2023): each time id (orig size, crop, target size) gets a sinusoidal embedding of
    ``addition_time_embed_dim``; flattened and appended to the pooled text embedding."""
    if added_cond is None or "text_embeds" not in added_cond or "time_ids" not in added_cond:
        raise ValueError("apply_unet: this SDXL UNet needs added_cond={'text_embeds': (B, D), 'time_ids': (B, 6)}")
    text = jnp.asarray(added_cond["text_embeds"], jnp.float32)
    ids = jnp.asarray(added_cond["time_ids"], jnp.float32)
    dim = config.addition_time_embed_dim
    want = config.projection_class_embeddings_input_dim
    if text.ndim != 2 or ids.ndim != 2 or text.shape[-1] + ids.shape[-1] * dim != want:
        raise ValueError(f"apply_unet: text_embeds {text.shape} + time_ids {ids.shape} x {dim} must give "
                         f"{want} features per row")
    ids_emb = nn.timestep_embedding(ids.reshape(-1), dim, config.flip_sin_to_cos, config.freq_shift)
    x = jnp.concatenate([text, ids_emb.reshape(ids.shape[0], -1)], axis=-1)
    return jnp.broadcast_to(x, (batch, want))


# ---------------------------------------------------------------------------------------- forward
def apply_unet(params: Params, latents: Array, t: Array, text_ctx: Array, *, config: UNetConfig,
               edits: UNetEdits = NO_EDITS, capture: CaptureSpec = NO_CAPTURE,
               added_cond: Mapping[str, Array] | None = None) -> tuple[Array, dict]:
    """One UNet evaluation.

    Args:
      latents: (B, H, W, C_in) NHWC. t: scalar or (B,) timesteps (float allowed).
      text_ctx: (B, S, cross_attention_dim) encoder hidden states.
      edits / capture: hooks (:mod:`jaxdiff.hooks`); ``capture`` must be static under ``jax.jit``.
      added_cond: SDXL only, ``{"text_embeds": (B, D), "time_ids": (B, 6)}``.

    Returns:
      ``(out, aux)``: out (B, H, W, C_out) float32, the model prediction (eps or v: the scheduler decides);
      ``aux = {"h": mid-block output (B, h, w, C_mid) before the h-space edit, or None unless
      capture.hspace, "attn": {site: probs} for captured sites (empty dict if none)}``.
    """
    check_sites(attn_sites(config), edits, capture)
    hooks = Hooks(edits, capture)
    dtype = params["conv_in"]["kernel"].dtype
    b = latents.shape[0]
    temb = time_embedding(params, t, b, config, dtype, added_cond)
    ctx = jnp.asarray(text_ctx).astype(dtype)
    maps: dict = {}

    x = nn.conv2d(params["conv_in"], jnp.asarray(latents).astype(dtype))
    skips = [x]
    for spec in config.down_specs():
        x, s, m = down_block(params[f"down_blocks_{spec.index}"], x, temb, ctx, spec, hooks)
        skips += s
        maps.update(m)

    x, m = mid_block(params["mid_block"], x, temb, ctx, config.mid_spec(), hooks)
    maps.update(m)
    h = x if capture.hspace else None   # the h-space seam (Kwon et al. 2023): capture, then edit
    for edit in edits.hspace_edits:     # several methods' h edits compose in order
        x = edit.apply(x, t)

    for spec in config.up_specs():
        mine, skips = skips[-spec.num_layers:], skips[:-spec.num_layers]
        size = skips[-1].shape[1:3] if spec.resample else None   # diffusers' upsample_size for odd sizes
        x, m = up_block(params[f"up_blocks_{spec.index}"], x, tuple(mine), temb, ctx, spec, hooks, size)
        maps.update(m)

    x = nn.group_norm(params["conv_norm_out"], x, config.norm_num_groups, config.norm_eps)
    out = nn.conv2d(params["conv_out"], jax.nn.silu(x).astype(jnp.float32))
    return out, {"h": h, "attn": {s: maps[s] for s in attn_sites(config) if s in maps}}
