"""Convolutional blocks shared by the UNet and the VAE (diffusers ``resnet.py``, ``downsampling.py``,
``upsampling.py``): ResnetBlock2D with an optional time embedding, and the 2x down/upsamplers. NHWC layout,
params named as diffusers' state dict (``norm1``, ``conv1``, ``time_emb_proj``, ``conv_shortcut``, ``conv``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdiff import nn

Array = jax.Array
Params = dict


def init_resnet(mk, cin: int, cout: int, temb: int | None = None) -> Params:
    """ResnetBlock2D params; ``time_emb_proj`` only with a time embedding (UNet, not VAE); ``conv_shortcut``
    (1x1) only when the channel count changes."""
    p = {"norm1": nn.init_norm(mk, cin), "conv1": nn.init_conv(mk, cin, cout, 3)}
    if temb is not None:
        p["time_emb_proj"] = nn.init_dense(mk, temb, cout)
    p.update(norm2=nn.init_norm(mk, cout), conv2=nn.init_conv(mk, cout, cout, 3))
    if cin != cout:
        p["conv_shortcut"] = nn.init_conv(mk, cin, cout, 1)
    return p


def resnet(p: Params, x: Array, temb: Array | None = None, *, groups: int, eps: float,
           act=jax.nn.silu) -> Array:
    """``skip(x) + conv2(act(GN(conv1(act(GN(x))) + proj(act(temb)))))``: time_embedding_norm "default",
    output_scale_factor 1, dropout off (inference). ``x`` NHWC, ``temb`` (B, T) or None (VAE)."""
    h = nn.conv2d(p["conv1"], act(nn.group_norm(p["norm1"], x, groups, eps)))
    if temb is not None:
        h = h + nn.dense(p["time_emb_proj"], act(temb.astype(h.dtype)))[:, None, None, :]
    h = nn.conv2d(p["conv2"], act(nn.group_norm(p["norm2"], h, groups, eps)))
    skip = nn.conv2d(p["conv_shortcut"], x) if "conv_shortcut" in p else x
    return skip + h


def downsample(p: Params, x: Array, *, asymmetric_pad: bool = False) -> Array:
    """Downsample2D with a 3x3 stride-2 conv. UNet: padding 1 (``downsample_padding=1``); VAE
    (``asymmetric_pad``): padding 0 after a zero pad of one row/column at the bottom/right only."""
    return nn.conv2d(p["conv"], x, stride=2, padding=((0, 1), (0, 1)) if asymmetric_pad else 1)


def resize_nearest(x: Array, size: tuple[int, int]) -> Array:
    """``F.interpolate(mode="nearest", size=...)``: source index ``floor(i * in / out)`` per axis."""
    _, hh, ww, _ = x.shape
    if size == (2 * hh, 2 * ww):
        return nn.upsample_nearest_2x(x)
    rows = (jnp.arange(size[0]) * hh) // size[0]
    cols = (jnp.arange(size[1]) * ww) // size[1]
    return x[:, rows][:, :, cols]


def upsample(p: Params, x: Array, size: tuple[int, int] | None = None) -> Array:
    """Upsample2D with conv: nearest 2x (or to ``size``, diffusers' ``upsample_size``) then a 3x3 conv."""
    size = size or (2 * x.shape[1], 2 * x.shape[2])
    return nn.conv2d(p["conv"], resize_nearest(x, size))
