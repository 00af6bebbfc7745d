"""AutoencoderKL (the Stable Diffusion VAE) as pure functions over a plain params dict.

The KL-regularised autoencoder of latent diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis with
Latent Diffusion Models"): an encoder maps an image x in [-1, 1] to a diagonal Gaussian q(z|x) with mean and
log-variance; latents are sampled with the reparameterisation z = mean + exp(logvar / 2) * eps, eps ~ N(0, I)
(Kingma & Welling 2014, "Auto-Encoding Variational Bayes"), and scaled by the checkpoint's ``scaling_factor``
(and ``shift_factor`` where set) so the diffusion model sees roughly unit-variance latents.

Layout follows diffusers ``AutoencoderKL`` (``autoencoders/autoencoder_kl.py``, ``autoencoders/vae.py``) so the
generic converter maps its state dict by name: ``encoder/down_blocks_0/resnets_0/norm1/scale``,
``encoder/mid_block/attentions_0/to_q/kernel``, ``quant_conv/kernel``, ``decoder/up_blocks_0/upsamplers_0/conv``.

Numerics: GroupNorm statistics in float32 (:func:`jaxdiff.nn.group_norm`); attention logits/softmax in float32
(:func:`jaxdiff.attention.attend`); decode runs in float32 when ``force_upcast`` is set (the SDXL VAE overflows
in fp16), otherwise in the dtype of the latents passed in.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import nn
from jaxdiff.attention import attend
from jaxdiff.conv_blocks import downsample, init_resnet, resnet, upsample

Params = dict
Array = jax.Array

VAE_EPS = 1e-6  # every VAE GroupNorm (resnets, attention, conv_norm_out) uses eps 1e-6 in diffusers


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    norm_num_groups: int = 32
    act_fn: str = "silu"
    sample_size: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    force_upcast: bool = True
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    mid_block_add_attention: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True

    @classmethod
    def from_diffusers(cls, d: dict) -> "VAEConfig":
        down = tuple(d.get("down_block_types", cls.down_block_types))
        up = tuple(d.get("up_block_types", cls.up_block_types))
        for t in down:
            if t != "DownEncoderBlock2D":
                raise ValueError(f"unsupported VAE down block type {t!r}; only 'DownEncoderBlock2D'")
        for t in up:
            if t != "UpDecoderBlock2D":
                raise ValueError(f"unsupported VAE up block type {t!r}; only 'UpDecoderBlock2D'")
        boc = tuple(int(c) for c in d.get("block_out_channels", cls.block_out_channels))
        if len(down) != len(boc) or len(up) != len(boc):
            raise ValueError(f"{len(down)} down / {len(up)} up block types for {len(boc)} block_out_channels")
        shift = d.get("shift_factor")
        sf = d.get("scaling_factor")
        return cls(
            in_channels=int(d.get("in_channels", 3)), out_channels=int(d.get("out_channels", 3)),
            latent_channels=int(d.get("latent_channels", 4)), block_out_channels=boc,
            layers_per_block=int(d.get("layers_per_block", 1)), norm_num_groups=int(d.get("norm_num_groups", 32)),
            act_fn=str(d.get("act_fn", "silu")), sample_size=int(d.get("sample_size", 32) or 32),
            scaling_factor=float(0.18215 if sf is None else sf),
            shift_factor=None if shift is None else float(shift),
            force_upcast=bool(d.get("force_upcast", True)), down_block_types=down, up_block_types=up,
            mid_block_add_attention=bool(d.get("mid_block_add_attention", True)),
            use_quant_conv=d.get("use_quant_conv") is not False,  # absent / null means True
            use_post_quant_conv=d.get("use_post_quant_conv") is not False,
        )


# --------------------------------------------------------------------------------------- attention
def init_vae_attention(mk, c: int) -> Params:
    return {"group_norm": nn.init_norm(mk, c), "to_q": nn.init_dense(mk, c, c), "to_k": nn.init_dense(mk, c, c),
            "to_v": nn.init_dense(mk, c, c), "to_out_0": nn.init_dense(mk, c, c)}


def vae_attention(p: Params, x: Array, *, groups: int) -> Array:
    """Single-head spatial self-attention with GroupNorm, residual, rescale_output_factor 1 (diffusers
    ``Attention(residual_connection=True, heads=1, dim_head=C)``)."""
    b, h, w, c = x.shape
    t = nn.group_norm(p["group_norm"], x, groups, VAE_EPS).reshape(b, h * w, c)
    out, _ = attend(nn.dense(p["to_q"], t), nn.dense(p["to_k"], t), nn.dense(p["to_v"], t), heads=1)
    return x + nn.dense(p["to_out_0"], out).reshape(b, h, w, c)


# --------------------------------------------------------------------------------------------- blocks
def init_mid_block(mk, c: int, attention: bool) -> Params:
    p = {"resnets_0": init_resnet(mk, c, c), "resnets_1": init_resnet(mk, c, c)}
    if attention:
        p["attentions_0"] = init_vae_attention(mk, c)
    return p


def mid_block(p: Params, x: Array, *, groups: int, act) -> Array:
    """UNetMidBlock2D: resnet, [attention], resnet."""
    x = resnet(p["resnets_0"], x, groups=groups, eps=VAE_EPS, act=act)
    if "attentions_0" in p:
        x = vae_attention(p["attentions_0"], x, groups=groups)
    return resnet(p["resnets_1"], x, groups=groups, eps=VAE_EPS, act=act)


# ----------------------------------------------------------------------------------------------- model
def init_vae(mk, config: VAEConfig) -> Params:
    cfg, boc, L = config, config.block_out_channels, config.latent_channels
    enc: Params = {"conv_in": nn.init_conv(mk, cfg.in_channels, boc[0], 3)}
    cin = boc[0]
    for i, cout in enumerate(boc):
        blk = {f"resnets_{j}": init_resnet(mk, cin if j == 0 else cout, cout)
               for j in range(cfg.layers_per_block)}
        if i < len(boc) - 1:
            blk["downsamplers_0"] = {"conv": nn.init_conv(mk, cout, cout, 3)}
        enc[f"down_blocks_{i}"] = blk
        cin = cout
    enc["mid_block"] = init_mid_block(mk, boc[-1], cfg.mid_block_add_attention)
    enc["conv_norm_out"] = nn.init_norm(mk, boc[-1])
    enc["conv_out"] = nn.init_conv(mk, boc[-1], 2 * L, 3)

    rev = boc[::-1]
    dec: Params = {"conv_in": nn.init_conv(mk, L, rev[0], 3),
                   "mid_block": init_mid_block(mk, rev[0], cfg.mid_block_add_attention)}
    prev = rev[0]
    for i, cout in enumerate(rev):
        blk = {f"resnets_{j}": init_resnet(mk, prev if j == 0 else cout, cout)
               for j in range(cfg.layers_per_block + 1)}
        if i < len(rev) - 1:
            blk["upsamplers_0"] = {"conv": nn.init_conv(mk, cout, cout, 3)}
        dec[f"up_blocks_{i}"] = blk
        prev = cout
    dec["conv_norm_out"] = nn.init_norm(mk, boc[0])
    dec["conv_out"] = nn.init_conv(mk, boc[0], cfg.out_channels, 3)

    p: Params = {"encoder": enc, "decoder": dec}
    if cfg.use_quant_conv:
        p["quant_conv"] = nn.init_conv(mk, 2 * L, 2 * L, 1)
    if cfg.use_post_quant_conv:
        p["post_quant_conv"] = nn.init_conv(mk, L, L, 1)
    return p


def vae_encode(params: Params, images: Array, *, config: VAEConfig) -> tuple[Array, Array]:
    """Images (B, H, W, C) NHWC in [-1, 1] -> ``(mean, logvar)`` each (B, H/f, W/f, latent_channels).

    logvar is clipped to [-30, 20] like diffusers' ``DiagonalGaussianDistribution`` (keeps exp() finite).
    """
    cfg, g, act = config, config.norm_num_groups, nn.activation(config.act_fn)
    e = params["encoder"]
    x = nn.conv2d(e["conv_in"], images)
    for i in range(len(cfg.block_out_channels)):
        blk = e[f"down_blocks_{i}"]
        for j in range(cfg.layers_per_block):
            x = resnet(blk[f"resnets_{j}"], x, groups=g, eps=VAE_EPS, act=act)
        if "downsamplers_0" in blk:
            x = downsample(blk["downsamplers_0"], x, asymmetric_pad=True)
    x = mid_block(e["mid_block"], x, groups=g, act=act)
    x = nn.conv2d(e["conv_out"], act(nn.group_norm(e["conv_norm_out"], x, g, VAE_EPS)))
    if "quant_conv" in params:
        x = nn.conv2d(params["quant_conv"], x)
    mean, logvar = jnp.split(x, 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)


def vae_sample(mean: Array, logvar: Array, key: Array) -> Array:
    """Reparameterised sample ``mean + exp(0.5 logvar) * eps``, eps ~ N(0, I) from ``key`` (Kingma & Welling)."""
    eps = jax.random.normal(key, mean.shape, jnp.float32).astype(mean.dtype)
    return mean + jnp.exp(0.5 * logvar) * eps


def vae_decode(params: Params, z: Array, *, config: VAEConfig) -> Array:
    """Unscaled latents (B, h, w, latent_channels) -> images NHWC, nominally in [-1, 1] (not clipped).

    With ``config.force_upcast`` the whole decoder runs in float32 (the SDXL VAE overflows in fp16) and the
    output is cast back to ``z.dtype``; otherwise it runs in ``z.dtype``.
    """
    cfg, g, act = config, config.norm_num_groups, nn.activation(config.act_fn)
    out_dtype = z.dtype
    x = z.astype(jnp.float32) if cfg.force_upcast else z
    if "post_quant_conv" in params:
        x = nn.conv2d(params["post_quant_conv"], x)
    d = params["decoder"]
    x = nn.conv2d(d["conv_in"], x)
    x = mid_block(d["mid_block"], x, groups=g, act=act)
    for i in range(len(cfg.block_out_channels)):
        blk = d[f"up_blocks_{i}"]
        for j in range(cfg.layers_per_block + 1):
            x = resnet(blk[f"resnets_{j}"], x, groups=g, eps=VAE_EPS, act=act)
        if "upsamplers_0" in blk:
            x = upsample(blk["upsamplers_0"], x)
    x = nn.conv2d(d["conv_out"], act(nn.group_norm(d["conv_norm_out"], x, g, VAE_EPS)))
    return x.astype(out_dtype)


def encode_to_latents(params: Params, images: Array, key: Array | None = None, *, config: VAEConfig,
                      sample: bool = True, noise: Array | None = None) -> Array:
    """Images in [-1, 1] -> diffusion latents ``(z - shift_factor) * scaling_factor`` (shift only if set).

    ``sample=True`` draws z with ``key``, or uses the given standard-normal ``noise`` (latent-shaped) as the
    reparameterisation draw (one of the two is required); ``sample=False`` uses the posterior mean.
    """
    mean, logvar = vae_encode(params, images, config=config)
    if sample:
        if (key is None) == (noise is None):
            raise ValueError("encode_to_latents(sample=True) needs exactly one of key= or noise=")
        z = vae_sample(mean, logvar, key) if noise is None else mean + jnp.exp(0.5 * logvar) * noise
    else:
        z = mean
    if config.shift_factor is not None:
        z = z - config.shift_factor
    return z * config.scaling_factor


def decode_latents(params: Params, latents: Array, *, config: VAEConfig) -> Array:
    """Inverse of the scaling in :func:`encode_to_latents`, then :func:`vae_decode`."""
    z = latents / config.scaling_factor
    if config.shift_factor is not None:
        z = z + config.shift_factor
    return vae_decode(params, z, config=config)


# --------------------------------------------------------------------------------------- image helpers
def uint8_to_signed(images) -> Array:
    """uint8 (..., H, W, C) in [0, 255] -> float32 in [-1, 1] (``x / 127.5 - 1``, VaeImageProcessor)."""
    return jnp.asarray(images, jnp.float32) / 127.5 - 1.0


def signed_to_uint8(x) -> np.ndarray:
    """[-1, 1] -> uint8 like diffusers' postprocess: ``(x/2 + 0.5).clamp(0, 1) * 255`` then round."""
    y = jnp.clip(jnp.asarray(x, jnp.float32) / 2 + 0.5, 0.0, 1.0) * 255.0
    return np.asarray(jnp.round(y)).astype(np.uint8)
