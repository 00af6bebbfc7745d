"""Building blocks of the SD UNet (LDM, Rombach et al. 2022; diffusers ``UNet2DConditionModel``) as pure
functions over param dicts: ResnetBlock2D, Transformer2D (+ BasicTransformerBlock with GEGLU feed-forward),
Downsample2D / Upsample2D and the down / mid / up blocks.

Every block is described by a static, hashable :class:`BlockSpec`; ``init_block(mk, spec)`` builds its params
with diffusers' state-dict names (``resnets_0/conv1/kernel``, ``attentions_0/transformer_blocks_0/attn2/to_q``,
``downsamplers_0/conv``, ``upsamplers_0/conv``) and ``down_block`` / ``mid_block`` / ``up_block`` apply it.

Hooks: each attention layer computes attention through :func:`jaxdiff.attention.attend` (the choke point),
looking up its :class:`~jaxdiff.hooks.AttnSite` in a :class:`Hooks` (edits + capture spec). Blocks return the
captured maps as a dict ``{site: probs}`` next to their output, so everything stays a pure function.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxdiff import nn
from jaxdiff.attention import attend
from jaxdiff.conv_blocks import downsample, init_resnet, resnet, upsample  # noqa: F401 (re-exported)
from jaxdiff.hooks import NO_CAPTURE, NO_EDITS, AttnSite, CaptureSpec, UNetEdits

Array = jax.Array
Params = dict
Maps = dict  # {AttnSite: captured probs}

TRANSFORMER_GN_EPS = 1e-6  # Transformer2DModel's GroupNorm eps (fixed in diffusers, not config.norm_eps)
TRANSFORMER_LN_EPS = 1e-5  # BasicTransformerBlock LayerNorms (diffusers' norm_eps default)
FF_MULT = 4                # GEGLU inner dim = 4 * dim


class Hooks(NamedTuple):
    """Edits and capture spec handed down to every attention layer (see :mod:`jaxdiff.hooks`)."""

    edits: UNetEdits = NO_EDITS
    capture: CaptureSpec = NO_CAPTURE


NO_HOOKS = Hooks()


# -------------------------------------------------------------------------------------- attention
def init_attention(mk, dim: int, ctx_dim: int) -> Params:
    """diffusers ``Attention`` as used by SD: q/k/v without bias, ``to_out_0`` with bias."""
    return {"to_q": nn.init_dense(mk, dim, dim, bias=False), "to_k": nn.init_dense(mk, ctx_dim, dim, bias=False),
            "to_v": nn.init_dense(mk, ctx_dim, dim, bias=False), "to_out_0": nn.init_dense(mk, dim, dim)}


def attention(p: Params, x: Array, ctx: Array, heads: int, site: AttnSite, hooks: Hooks) -> tuple[Array, Maps]:
    """Project, attend through the choke point (with this site's edit/capture), project out."""
    out, probs = attend(nn.dense(p["to_q"], x), nn.dense(p["to_k"], ctx), nn.dense(p["to_v"], ctx), heads,
                        site=site, edit=hooks.edits.attn_edits(site) or None, capture=hooks.capture.mode(site))
    return nn.dense(p["to_out_0"], out), ({} if probs is None else {site: probs})


def init_geglu_ff(mk, dim: int) -> Params:
    inner = FF_MULT * dim
    return {"net_0": {"proj": nn.init_dense(mk, dim, 2 * inner)}, "net_2": nn.init_dense(mk, inner, dim)}


def geglu_ff(p: Params, x: Array) -> Array:
    """GEGLU feed-forward (Shazeer 2020): ``proj`` gives [hidden, gate]; ``net_2(hidden * gelu(gate))``,
    exact erf GELU as in diffusers' ``GEGLU``."""
    hidden, gate = jnp.split(nn.dense(p["net_0"]["proj"], x), 2, axis=-1)
    return nn.dense(p["net_2"], hidden * nn.gelu(gate))


def init_transformer_block(mk, dim: int, ctx_dim: int) -> Params:
    return {"norm1": nn.init_norm(mk, dim), "attn1": init_attention(mk, dim, dim),
            "norm2": nn.init_norm(mk, dim), "attn2": init_attention(mk, dim, ctx_dim),
            "norm3": nn.init_norm(mk, dim), "ff": init_geglu_ff(mk, dim)}


def transformer_block(p: Params, x: Array, ctx: Array, heads: int, where: tuple, hooks: Hooks) -> tuple[Array, Maps]:
    """BasicTransformerBlock (pre-LayerNorm): self-attention, cross-attention on ``ctx``, GEGLU FF, each residual.

    ``where`` = (part, block, attention, layer) addresses its two :class:`AttnSite` s.
    """
    h = nn.layer_norm(p["norm1"], x, TRANSFORMER_LN_EPS)
    a, m1 = attention(p["attn1"], h, h, heads, AttnSite(*where, "self"), hooks)
    x = x + a
    h = nn.layer_norm(p["norm2"], x, TRANSFORMER_LN_EPS)
    a, m2 = attention(p["attn2"], h, ctx.astype(h.dtype), heads, AttnSite(*where, "cross"), hooks)
    x = x + a
    x = x + geglu_ff(p["ff"], nn.layer_norm(p["norm3"], x, TRANSFORMER_LN_EPS))
    return x, {**m1, **m2}


# ---------------------------------------------------------------------------------- Transformer2D
@dataclass(frozen=True)
class TransformerSpec:
    """Static shape of one Transformer2DModel (continuous input, SD's ``attention_type="default"``).

    ``heads`` is the number of heads; head dim is ``channels // heads`` (diffusers passes
    ``out_channels // num_attention_heads``), so the inner width is ``heads * (channels // heads)``.
    """

    channels: int
    heads: int
    layers: int
    cross_dim: int
    groups: int
    linear_proj: bool  # SD2/SDXL: Linear proj_in/out on tokens; SD1: 1x1 conv on the image

    @property
    def inner(self) -> int:
        return self.heads * (self.channels // self.heads)


def _init_proj(mk, spec: TransformerSpec, cin: int, cout: int) -> Params:
    return nn.init_dense(mk, cin, cout) if spec.linear_proj else nn.init_conv(mk, cin, cout, 1)


def init_transformer2d(mk, spec: TransformerSpec) -> Params:
    p = {"norm": nn.init_norm(mk, spec.channels), "proj_in": _init_proj(mk, spec, spec.channels, spec.inner)}
    for i in range(spec.layers):
        p[f"transformer_blocks_{i}"] = init_transformer_block(mk, spec.inner, spec.cross_dim)
    p["proj_out"] = _init_proj(mk, spec, spec.inner, spec.channels)
    return p


def transformer2d(p: Params, x: Array, ctx: Array, spec: TransformerSpec, where: tuple = ("down", 0, 0),
                  hooks: Hooks = NO_HOOKS) -> tuple[Array, Maps]:
    """Transformer2DModel: GroupNorm (eps 1e-6) -> proj_in -> tokens (row-major H*W) -> blocks -> proj_out
    -> + residual. ``x`` NHWC, ``ctx`` (B, S, cross_dim); ``where`` = (part, block, attention index)."""
    b, hh, ww, c = x.shape
    h = nn.group_norm(p["norm"], x, spec.groups, TRANSFORMER_GN_EPS)
    if spec.linear_proj:
        h = nn.dense(p["proj_in"], h.reshape(b, hh * ww, c))
    else:
        h = nn.conv2d(p["proj_in"], h).reshape(b, hh * ww, spec.inner)
    maps: Maps = {}
    for i in range(spec.layers):
        h, m = transformer_block(p[f"transformer_blocks_{i}"], h, ctx, spec.heads, (*where, i), hooks)
        maps.update(m)
    if spec.linear_proj:
        h = nn.dense(p["proj_out"], h).reshape(b, hh, ww, c)
    else:
        h = nn.conv2d(p["proj_out"], h.reshape(b, hh, ww, spec.inner))
    return h + x, maps


# ----------------------------------------------------------------------------------------- blocks
@dataclass(frozen=True)
class BlockSpec:
    """Static description of one down / mid / up block, mirroring diffusers' constructor arguments.

    Down (``CrossAttnDownBlock2D`` / ``DownBlock2D``): resnet ``j`` maps ``in_channels`` (j = 0) or
    ``out_channels`` to ``out_channels``. Up (``CrossAttnUpBlock2D`` / ``UpBlock2D``): resnet ``j`` takes the
    running ``prev_channels`` (j = 0) or ``out_channels``, concatenated with a skip of ``in_channels`` channels
    for the last resnet and ``out_channels`` otherwise. Mid (``UNetMidBlock2DCrossAttn``): ``num_layers``
    (attention, resnet) pairs after a first resnet, all at ``in_channels``.
    """

    part: str                     # "down" | "mid" | "up"
    index: int                    # position in down_blocks / up_blocks (0 for mid)
    in_channels: int
    out_channels: int
    temb_channels: int
    num_layers: int = 1
    prev_channels: int = 0        # up blocks only
    transformer: TransformerSpec | None = None  # None: no attention (DownBlock2D / UpBlock2D)
    resample: bool = False        # add_downsample / add_upsample
    groups: int = 32
    eps: float = 1e-5

    def resnet_channels(self) -> list[tuple[int, int]]:
        """(cin, cout) of each resnet, in order."""
        n, cin, cout = self.num_layers, self.in_channels, self.out_channels
        if self.part == "down":
            return [(cin if j == 0 else cout, cout) for j in range(n)]
        if self.part == "mid":
            return [(cin, cin)] * (n + 1)
        return [((self.prev_channels if j == 0 else cout) + (cin if j == n - 1 else cout), cout) for j in range(n)]

    def num_attentions(self) -> int:
        return 0 if self.transformer is None else self.num_layers


def init_block(mk, spec: BlockSpec) -> Params:
    p = {f"resnets_{j}": init_resnet(mk, ci, co, spec.temb_channels)
         for j, (ci, co) in enumerate(spec.resnet_channels())}
    for j in range(spec.num_attentions()):
        p[f"attentions_{j}"] = init_transformer2d(mk, spec.transformer)
    if spec.resample:
        c = spec.out_channels
        p["downsamplers_0" if spec.part == "down" else "upsamplers_0"] = {"conv": nn.init_conv(mk, c, c, 3)}
    return p


def _resnet(p, spec: BlockSpec, j: int, x: Array, temb: Array) -> Array:
    return resnet(p[f"resnets_{j}"], x, temb, groups=spec.groups, eps=spec.eps)


def _attn(p, spec: BlockSpec, j: int, x: Array, ctx: Array, hooks: Hooks, maps: Maps) -> Array:
    """Attention ``j`` of the block if it has attentions (collecting captured maps), else identity."""
    if spec.transformer is None:
        return x
    x, m = transformer2d(p[f"attentions_{j}"], x, ctx, spec.transformer, (spec.part, spec.index, j), hooks)
    maps.update(m)
    return x


def down_block(p: Params, x: Array, temb: Array, ctx: Array, spec: BlockSpec,
               hooks: Hooks = NO_HOOKS) -> tuple[Array, tuple[Array, ...], Maps]:
    """Down block: (resnet, attention?) x num_layers, then the optional downsampler.

    Returns ``(x, skips, maps)``; ``skips`` holds each layer's output and the downsampled output, in order.
    """
    maps: Maps = {}
    skips = []
    for j in range(spec.num_layers):
        x = _attn(p, spec, j, _resnet(p, spec, j, x, temb), ctx, hooks, maps)
        skips.append(x)
    if spec.resample:
        x = downsample(p["downsamplers_0"], x)
        skips.append(x)
    return x, tuple(skips), maps


def mid_block(p: Params, x: Array, temb: Array, ctx: Array, spec: BlockSpec,
              hooks: Hooks = NO_HOOKS) -> tuple[Array, Maps]:
    """UNetMidBlock2DCrossAttn: resnet, then (attention, resnet) x num_layers."""
    maps: Maps = {}
    x = _resnet(p, spec, 0, x, temb)
    for j in range(spec.num_layers):
        x = _resnet(p, spec, j + 1, _attn(p, spec, j, x, ctx, hooks, maps), temb)
    return x, maps


def up_block(p: Params, x: Array, skips: tuple[Array, ...], temb: Array, ctx: Array, spec: BlockSpec,
             hooks: Hooks = NO_HOOKS, upsample_size: tuple[int, int] | None = None) -> tuple[Array, Maps]:
    """Up block: for each layer, concatenate the *last* remaining skip on channels (``[x, skip]``), resnet,
    attention?; then the optional upsampler. ``skips`` are this block's ``num_layers`` skips in down order."""
    if len(skips) != spec.num_layers:
        raise ValueError(f"up block {spec.index} needs {spec.num_layers} skip tensors, got {len(skips)}")
    maps: Maps = {}
    for j in range(spec.num_layers):
        x = jnp.concatenate([x, skips[-1 - j].astype(x.dtype)], axis=-1)
        x = _attn(p, spec, j, _resnet(p, spec, j, x, temb), ctx, hooks, maps)
    if spec.resample:
        x = upsample(p["upsamplers_0"], x, upsample_size)
    return x, maps
