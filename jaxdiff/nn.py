"""Pure neural-network primitives over plain parameter dicts (NHWC images, (B, T, D) sequences).

Every layer is a pair of functions:

* ``init_<layer>(mk, ...)`` builds the parameter dict by calling a *maker* ``mk(shape) -> array`` once per
  leaf. The maker decides what a leaf is: :func:`template_maker` gives ``jax.ShapeDtypeStruct`` leaves (the
  shape template the weight converter fills, allocated for free), :func:`random_maker` gives cheap numpy
  random arrays for tests (a full Flax init of SD1.5 takes ~1 min on CPU; this takes ~1 s).
* ``<layer>(p, x)`` applies it.

Leaf names follow Flax conventions (``kernel``, ``bias``, ``scale``, ``embedding``); container names follow
diffusers' state-dict names with ``.N`` written ``_N`` (``down_blocks_0/resnets_1/conv1/kernel``), so the
converter maps names mechanically and a path in our tree reads like the PyTorch key it came from.

Numerics (these decide parity with PyTorch, see ``shared/docs/anchors_jax_sd.md`` section 6):
* normalisation statistics are computed in float32 whatever the activation dtype;
* GELU is the exact erf form (PyTorch's default), never the tanh approximation;
* convolutions use explicit symmetric padding like ``torch.nn.Conv2d(padding=k // 2)``.
"""

from __future__ import annotations

import math
from typing import Callable, Protocol

import jax
import jax.numpy as jnp
import numpy as np

Params = dict
Array = jax.Array


class Maker(Protocol):
    def __call__(self, shape: tuple[int, ...], kind: str = "weight") -> object: ...


def template_maker(dtype=jnp.float32) -> Maker:
    """Shape-only leaves (``jax.ShapeDtypeStruct``): the template a checkpoint must fill exactly."""

    def mk(shape, kind="weight"):
        return jax.ShapeDtypeStruct(tuple(shape), dtype)

    return mk


def random_maker(seed: int = 0, std: float = 0.02, dtype=np.float32) -> Maker:
    """Cheap numpy random leaves for tests: weights ~ N(0, std), norm scales ~ 1 + N(0, std), biases ~ N(0, std).

    Biases and norm parameters are random too (not 0/1) so parity tests exercise every leaf.
    """
    rng = np.random.default_rng(seed)

    def mk(shape, kind="weight"):
        x = rng.standard_normal(shape).astype(dtype) * std
        if kind == "scale":
            x = x + 1
        return jnp.asarray(x)

    return mk


# --------------------------------------------------------------------------------------------- dense
def init_dense(mk: Maker, din: int, dout: int, bias: bool = True) -> Params:
    p = {"kernel": mk((din, dout))}
    if bias:
        p["bias"] = mk((dout,), "bias")
    return p


def dense(p: Params, x: Array) -> Array:
    """``x @ kernel + bias`` over the last axis; kernel is (in, out) (PyTorch Linear weight transposed)."""
    y = jnp.matmul(x, p["kernel"].astype(x.dtype))
    if "bias" in p:
        y = y + p["bias"].astype(x.dtype)
    return y


# ---------------------------------------------------------------------------------------------- conv
def init_conv(mk: Maker, cin: int, cout: int, k: int, bias: bool = True) -> Params:
    p = {"kernel": mk((k, k, cin, cout))}
    if bias:
        p["bias"] = mk((cout,), "bias")
    return p


def conv2d(p: Params, x: Array, stride: int = 1, padding: int | tuple[tuple[int, int], tuple[int, int]] | None = None) -> Array:
    """2-D convolution, NHWC input, HWIO kernel. Default padding is ``k // 2`` on every side (PyTorch's)."""
    kernel = p["kernel"].astype(x.dtype)
    k = kernel.shape[0]
    if padding is None:
        padding = k // 2
    if isinstance(padding, int):
        padding = ((padding, padding), (padding, padding))
    y = jax.lax.conv_general_dilated(
        x, kernel, window_strides=(stride, stride), padding=padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    if "bias" in p:
        y = y + p["bias"].astype(x.dtype)
    return y


# ------------------------------------------------------------------------------------------ norms
def init_norm(mk: Maker, c: int) -> Params:
    return {"scale": mk((c,), "scale"), "bias": mk((c,), "bias")}


def group_norm(p: Params, x: Array, groups: int, eps: float = 1e-5) -> Array:
    """GroupNorm over (H, W, C/groups) per group, NHWC. Statistics in float32 (bf16 variance underflows)."""
    dtype = x.dtype
    *lead, c = x.shape
    xg = x.astype(jnp.float32).reshape(lead[0], -1, groups, c // groups)
    mean = xg.mean(axis=(1, 3), keepdims=True)
    var = jnp.square(xg - mean).mean(axis=(1, 3), keepdims=True)
    xg = (xg - mean) * jax.lax.rsqrt(var + eps)
    y = xg.reshape(x.shape) * p["scale"].astype(jnp.float32) + p["bias"].astype(jnp.float32)
    return y.astype(dtype)


def layer_norm(p: Params, x: Array, eps: float = 1e-5) -> Array:
    """LayerNorm over the last axis; statistics in float32 (two-pass variance, as torch computes it)."""
    dtype = x.dtype
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    var = jnp.square(xf - mean).mean(-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + eps) * p["scale"].astype(jnp.float32) + p["bias"].astype(jnp.float32)
    return y.astype(dtype)


# ------------------------------------------------------------------------------------ activations
def gelu(x: Array) -> Array:
    """Exact (erf) GELU, as ``torch.nn.functional.gelu`` by default. Flax's ``nn.gelu`` defaults to tanh."""
    return jax.nn.gelu(x, approximate=False)


def quick_gelu(x: Array) -> Array:
    """OpenAI CLIP's ``x * sigmoid(1.702 x)`` (CLIP-L/14 config ``hidden_act="quick_gelu"``)."""
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": gelu,
    "quick_gelu": quick_gelu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


def activation(name: str) -> Callable[[Array], Array]:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}") from None


# -------------------------------------------------------------------------------------- embeddings
def init_embedding(mk: Maker, n: int, d: int) -> Params:
    return {"embedding": mk((n, d))}


def timestep_embedding(t: Array, dim: int, flip_sin_to_cos: bool = True, downscale_freq_shift: float = 0.0,
                       scale: float = 1.0, max_period: float = 10000.0) -> Array:
    """Sinusoidal embedding of (B,) timesteps -> (B, dim) float32 (DDPM, Ho et al. 2020; diffusers'
    ``get_timestep_embedding``): ``freq_i = exp(-ln(max_period) * i / (dim/2 - shift))``."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - downscale_freq_shift)
    args = jnp.asarray(t, jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    emb = scale * args
    emb = jnp.concatenate([jnp.sin(emb), jnp.cos(emb)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2 == 1:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


# ------------------------------------------------------------------------------------ resampling
def upsample_nearest_2x(x: Array) -> Array:
    """Nearest-neighbour 2x upsampling, NHWC (``F.interpolate(scale_factor=2, mode="nearest")``)."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
