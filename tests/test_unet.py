"""Parity of the JAX UNet (jaxdiff.unet, jaxdiff.unet_blocks) with diffusers 0.42.1 (PyTorch, CPU, fp32).

Weights always go through the real converter: block tests via ``state_dict_to_params`` on the module's state
dict, full models via ``save_pretrained`` + ``weights_convert.components.load_component``. Tolerance: max-abs
<= 1e-5 on tiny fp32 models (measured ~1e-6: float32 reassociation in convs/matmuls only).
"""

from __future__ import annotations

import gc

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import nn
from jaxdiff.hooks import CaptureSpec
from jaxdiff.unet import UNetConfig, apply_unet, attn_sites, init_unet
from jaxdiff.unet_blocks import (BlockSpec, TransformerSpec, down_block, init_block, init_resnet,
                                 init_transformer2d, mid_block, resnet, transformer2d, up_block)
from tests.conftest import max_abs, nchw_to_nhwc, nhwc_to_nchw, torch_state_dict
from weights_convert import state_dict_to_params

import torch  # noqa: E402  (the reference; a missing torch must fail, not skip)

TOL = 1e-5
B, TEMB, CTX, S, GROUPS, EPS = 2, 16, 12, 5, 4, 1e-5


# ------------------------------------------------------------------------------------------ helpers
def _params(module, template) -> dict:
    params, _ = state_dict_to_params(torch_state_dict(module), template, what=type(module).__name__)
    return params


def _tiny_module(cls, seed=0, **kw):
    """A diffusers module with PyTorch's default init, then its norm affine params drawn at random (torch
    initialises them to 1/0, which would leave a swapped scale/bias untested). Explicit, not silent."""
    torch.manual_seed(seed)
    m = cls(**kw).eval()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                mod.weight.normal_(1.0, 0.1)
                mod.bias.normal_(0.0, 0.1)
    return m


def _randn(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def _t(x):
    return torch.from_numpy(np.ascontiguousarray(x))


def _tspec(channels, heads=2, layers=1, linear=False):
    return TransformerSpec(channels=channels, heads=heads, layers=layers, cross_dim=CTX, groups=GROUPS,
                           linear_proj=linear)


# ------------------------------------------------------------------------------------------- layers
@pytest.mark.parametrize("cin,cout", [(8, 8), (8, 16)])
def test_resnet_block(rng, cin, cout):
    from diffusers.models.resnet import ResnetBlock2D

    m = _tiny_module(ResnetBlock2D, in_channels=cin, out_channels=cout, temb_channels=TEMB, groups=GROUPS, eps=EPS)
    p = _params(m, init_resnet(nn.template_maker(), cin, cout, TEMB))
    x, temb = _randn(rng, B, cin, 6, 6), _randn(rng, B, TEMB)
    with torch.no_grad():
        ref = m(_t(x), _t(temb)).numpy()
    out = resnet(p, nchw_to_nhwc(x), temb, groups=GROUPS, eps=EPS)
    assert max_abs(nhwc_to_nchw(out), ref, "ResnetBlock2D") <= TOL


@pytest.mark.parametrize("linear", [False, True], ids=["conv_proj", "linear_proj"])
def test_transformer2d(rng, linear):
    from diffusers import Transformer2DModel

    c, heads, layers = 16, 2, 2
    m = _tiny_module(Transformer2DModel, num_attention_heads=heads, attention_head_dim=c // heads, in_channels=c,
                     num_layers=layers, cross_attention_dim=CTX, norm_num_groups=GROUPS,
                     use_linear_projection=linear)
    spec = _tspec(c, heads, layers, linear)
    p = _params(m, init_transformer2d(nn.template_maker(), spec))
    x, ctx = _randn(rng, B, c, 4, 6), _randn(rng, B, S, CTX)   # non-square: checks token order
    with torch.no_grad():
        ref = m(_t(x), encoder_hidden_states=_t(ctx)).sample.numpy()
    out, maps = transformer2d(p, nchw_to_nhwc(x), ctx, spec)
    assert maps == {}
    assert max_abs(nhwc_to_nchw(out), ref, f"Transformer2DModel linear={linear}") <= TOL


# ------------------------------------------------------------------------------------------- blocks
DOWN_CASES = {
    "CrossAttnDownBlock2D": dict(attn=True, resample=True),
    "CrossAttnDownBlock2D-last-linear": dict(attn=True, resample=False, linear=True),
    "DownBlock2D": dict(attn=False, resample=True),
}


@pytest.mark.parametrize("case", list(DOWN_CASES))
def test_down_block(rng, case):
    from diffusers.models.unets.unet_2d_blocks import CrossAttnDownBlock2D, DownBlock2D

    o = DOWN_CASES[case]
    cin, cout, n = 8, 16, 2
    common = dict(in_channels=cin, out_channels=cout, temb_channels=TEMB, num_layers=n, resnet_eps=EPS,
                  resnet_groups=GROUPS, add_downsample=o["resample"])
    if o["attn"]:
        m = _tiny_module(CrossAttnDownBlock2D, num_attention_heads=2, cross_attention_dim=CTX,
                         use_linear_projection=o.get("linear", False), transformer_layers_per_block=2, **common)
    else:
        m = _tiny_module(DownBlock2D, **common)
    spec = BlockSpec("down", 0, cin, cout, TEMB, n, transformer=_tspec(cout, 2, 2, o.get("linear", False))
                     if o["attn"] else None, resample=o["resample"], groups=GROUPS, eps=EPS)
    p = _params(m, init_block(nn.template_maker(), spec))
    x, temb, ctx = _randn(rng, B, cin, 8, 8), _randn(rng, B, TEMB), _randn(rng, B, S, CTX)
    with torch.no_grad():
        kw = dict(encoder_hidden_states=_t(ctx)) if o["attn"] else {}
        ref, ref_skips = m(_t(x), _t(temb), **kw)
    out, skips, _ = down_block(p, nchw_to_nhwc(x), temb, ctx, spec)
    assert len(skips) == len(ref_skips)
    assert max_abs(nhwc_to_nchw(out), ref.numpy(), case) <= TOL
    for s, r in zip(skips, ref_skips):
        assert max_abs(nhwc_to_nchw(s), r.numpy(), case + " skip") <= TOL


@pytest.mark.parametrize("linear", [False, True], ids=["conv_proj", "linear_proj"])
def test_mid_block(rng, linear):
    from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2DCrossAttn

    c = 16
    m = _tiny_module(UNetMidBlock2DCrossAttn, in_channels=c, temb_channels=TEMB, resnet_eps=EPS,
                     resnet_groups=GROUPS, num_attention_heads=4, cross_attention_dim=CTX,
                     use_linear_projection=linear, transformer_layers_per_block=2)
    spec = BlockSpec("mid", 0, c, c, TEMB, 1, transformer=_tspec(c, 4, 2, linear), groups=GROUPS, eps=EPS)
    p = _params(m, init_block(nn.template_maker(), spec))
    x, temb, ctx = _randn(rng, B, c, 4, 4), _randn(rng, B, TEMB), _randn(rng, B, S, CTX)
    with torch.no_grad():
        ref = m(_t(x), _t(temb), encoder_hidden_states=_t(ctx)).numpy()
    out, _ = mid_block(p, nchw_to_nhwc(x), temb, ctx, spec)
    assert max_abs(nhwc_to_nchw(out), ref, "UNetMidBlock2DCrossAttn") <= TOL


UP_CASES = {
    "CrossAttnUpBlock2D": dict(attn=True, resample=True),
    "CrossAttnUpBlock2D-last-linear": dict(attn=True, resample=False, linear=True),
    "UpBlock2D": dict(attn=False, resample=True),
}


@pytest.mark.parametrize("case", list(UP_CASES))
def test_up_block(rng, case):
    from diffusers.models.unets.unet_2d_blocks import CrossAttnUpBlock2D, UpBlock2D

    o = UP_CASES[case]
    cin, prev, cout, n = 8, 24, 16, 3     # distinct channel counts: a wrong skip order fails on shapes
    common = dict(in_channels=cin, prev_output_channel=prev, out_channels=cout, temb_channels=TEMB,
                  num_layers=n, resnet_eps=EPS, resnet_groups=GROUPS, add_upsample=o["resample"])
    if o["attn"]:
        m = _tiny_module(CrossAttnUpBlock2D, num_attention_heads=2, cross_attention_dim=CTX,
                         use_linear_projection=o.get("linear", False), **common)
    else:
        m = _tiny_module(UpBlock2D, **common)
    spec = BlockSpec("up", 0, cin, cout, TEMB, n, prev_channels=prev,
                     transformer=_tspec(cout, 2, 1, o.get("linear", False)) if o["attn"] else None,
                     resample=o["resample"], groups=GROUPS, eps=EPS)
    p = _params(m, init_block(nn.template_maker(), spec))
    x, temb, ctx = _randn(rng, B, prev, 4, 4), _randn(rng, B, TEMB), _randn(rng, B, S, CTX)
    skips = [_randn(rng, B, cin, 4, 4)] + [_randn(rng, B, cout, 4, 4) for _ in range(n - 1)]
    with torch.no_grad():
        kw = dict(encoder_hidden_states=_t(ctx)) if o["attn"] else {}
        ref = m(_t(x), tuple(_t(s) for s in skips), _t(temb), **kw).numpy()
    out, _ = up_block(p, nchw_to_nhwc(x), tuple(nchw_to_nhwc(s) for s in skips), temb, ctx, spec)
    assert max_abs(nhwc_to_nchw(out), ref, case) <= TOL


# --------------------------------------------------------------------------------------- full UNets
BASE = dict(sample_size=16, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
            cross_attention_dim=32, attention_head_dim=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
TEXT_DIM = 16
TINY_UNETS = {
    "sd1": BASE,
    "sd2": {**BASE, "use_linear_projection": True, "attention_head_dim": (2, 4), "upcast_attention": True,
            "layers_per_block": 2, "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D")},
    "sdxl": {**BASE, "use_linear_projection": True, "attention_head_dim": (2, 4),
             "transformer_layers_per_block": (1, 2), "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
             "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"), "addition_embed_type": "text_time",
             "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": TEXT_DIM + 6 * 8},
}


def _saved_unet(tmp_path, seed=0, **kw):
    """A diffusers UNet with default (random) init, saved as safetensors and loaded with the real loader."""
    from diffusers import UNet2DConditionModel
    from weights_convert.components import load_component

    torch.manual_seed(seed)
    m = UNet2DConditionModel(**kw).eval()
    m.save_pretrained(tmp_path, safe_serialization=True)
    cfg, params = load_component(tmp_path, "unet")
    return m, cfg, params


def _run_both(m, cfg, params, x, t, ctx, added=None):
    with torch.no_grad():
        tadded = None if added is None else {k: _t(v) for k, v in added.items()}
        ref = m(_t(x), _t(t), _t(ctx), added_cond_kwargs=tadded).sample.numpy()
    fn = jax.jit(apply_unet, static_argnames=("config", "capture"))
    out, aux = fn(params, nchw_to_nhwc(x), jnp.asarray(t), jnp.asarray(ctx), config=cfg, added_cond=added)
    return nhwc_to_nchw(out), ref, aux


@pytest.mark.parametrize("name", list(TINY_UNETS))
def test_tiny_unet(tmp_path, rng, name):
    kw = TINY_UNETS[name]
    m, cfg, params = _saved_unet(tmp_path, **kw)
    assert cfg.is_sdxl == (name == "sdxl")
    x, ctx = _randn(rng, B, 4, 16, 16), _randn(rng, B, 7, 32)
    t = np.array([981.0, 3.5], np.float32)    # per-row, non-integer timesteps
    added = None
    if name == "sdxl":
        added = {"text_embeds": _randn(rng, B, TEXT_DIM),
                 "time_ids": np.array([[1024, 1024, 0, 0, 1024, 1024], [768, 512, 16, 8, 1024, 1024]], np.float32)}
    out, ref, aux = _run_both(m, cfg, params, x, t, ctx, added)
    assert aux["h"] is None and aux["attn"] == {}
    assert max_abs(out, ref, f"UNet2DConditionModel tiny {name}") <= TOL


def test_tiny_unet_odd_size(tmp_path, rng):
    """Latents not divisible by the up factor: diffusers forwards ``upsample_size``; we resize to the skip."""
    m, cfg, params = _saved_unet(tmp_path, **BASE)
    x, ctx = _randn(rng, 1, 4, 9, 14), _randn(rng, 1, 7, 32)
    out, ref, _ = _run_both(m, cfg, params, x, np.array([10.0], np.float32), ctx)
    assert max_abs(out, ref, "UNet2DConditionModel tiny sd1 odd size") <= TOL


def test_sdxl_added_cond_errors():
    cfg = UNetConfig.from_diffusers(TINY_UNETS["sdxl"])
    params = init_unet(nn.random_maker(0), cfg)
    x, ctx = jnp.zeros((1, 8, 8, 4)), jnp.zeros((1, 3, 32))
    with pytest.raises(ValueError, match="added_cond"):
        apply_unet(params, x, 1.0, ctx, config=cfg)
    with pytest.raises(ValueError, match="features per row"):
        apply_unet(params, x, 1.0, ctx, config=cfg, added_cond={"text_embeds": jnp.zeros((1, 3)),
                                                                   "time_ids": jnp.zeros((1, 6))})
    sd1 = UNetConfig.from_diffusers(BASE)
    with pytest.raises(ValueError, match="only for SDXL"):
        apply_unet(init_unet(nn.random_maker(0), sd1), x, 1.0, ctx, config=sd1,
                   added_cond={"text_embeds": jnp.zeros((1, 16)), "time_ids": jnp.zeros((1, 6))})


# ------------------------------------------------------------------------------------------- config
SD15 = {"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "act_fn": "silu",
        "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False,
        "cross_attention_dim": 768, "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                                         "CrossAttnDownBlock2D", "DownBlock2D"],
        "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
        "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4,
        "sample_size": 64, "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                              "CrossAttnUpBlock2D"]}
SD21 = {**SD15, "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024, "use_linear_projection": True,
        "upcast_attention": True, "sample_size": 96, "dual_cross_attention": False}
SDXL = {**SD15, "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280], "cross_attention_dim": 2048,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "transformer_layers_per_block": [1, 2, 10], "use_linear_projection": True,
        "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816, "sample_size": 128}


def _n_params(p):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(p))


@pytest.mark.parametrize("d,n_params,n_sites", [(SD15, 859_520_964, 32), (SD21, 865_910_724, 32),
                                                 (SDXL, 2_567_463_684, 140)], ids=["sd15", "sd21", "sdxl"])
def test_real_configs(d, n_params, n_sites):
    """Real SD1.5 / SD2.1 / SDXL-base configs parse, and the template has the published parameter counts."""
    cfg = UNetConfig.from_diffusers(d)
    assert _n_params(init_unet(nn.template_maker(), cfg)) == n_params
    sites = attn_sites(cfg)
    assert len(sites) == n_sites and len(set(sites)) == n_sites
    assert sites[0].path == ("down_blocks_0" if d is not SDXL else "down_blocks_1") + \
        "/attentions_0/transformer_blocks_0/attn1"


@pytest.mark.parametrize("key,value,match", [
    ("down_block_types", ["SimpleCrossAttnDownBlock2D", "DownBlock2D"], "SimpleCrossAttnDownBlock2D"),
    ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn", "UNetMidBlock2DSimpleCrossAttn"),
    ("class_embed_type", "timestep", "class_embed_type"),
    ("addition_embed_type", "text_image", "addition_embed_type"),
    ("dual_cross_attention", True, "dual_cross_attention"),
    ("only_cross_attention", True, "only_cross_attention"),
    ("resnet_time_scale_shift", "scale_shift", "resnet_time_scale_shift"),
    ("some_future_option", 1, "some_future_option"),
])
def test_config_rejects_unsupported(key, value, match):
    with pytest.raises(ValueError, match=match):
        UNetConfig.from_diffusers({**BASE, key: value})


def test_num_attention_heads_precedence():
    cfg = UNetConfig.from_diffusers({**BASE, "attention_head_dim": 4, "num_attention_heads": [2, 8]})
    assert cfg.heads == (2, 8)
    assert UNetConfig.from_diffusers(BASE).heads == (4, 4)


# ---------------------------------------------------------------------------------------- full size
@pytest.mark.fullsize
def test_fullsize_sd15_architecture(tmp_path, rng):
    """diffusers' default UNet2DConditionModel (SD1.5 architecture) with cross_attention_dim 768, random
    default init, one fp32 forward at 64x64. 16 layers deep of fp32 reassociation: checked relative to the
    output's scale (max-abs / std <= 1e-3)."""
    m, cfg, params = _saved_unet(tmp_path, cross_attention_dim=768)
    x, ctx = _randn(rng, 1, 4, 64, 64), _randn(rng, 1, 77, 768)
    out, ref, _ = _run_both(m, cfg, params, x, np.array([500.0], np.float32), ctx)
    del m, params
    gc.collect()
    err = max_abs(out, ref, "UNet2DConditionModel SD1.5 architecture 64x64")
    assert err / ref.std() <= 1e-3, (err, ref.std())


def test_bf16_compute(rng):
    """bf16 params + latents run the network in bf16 (norm statistics and attention softmax in fp32) and return
    a float32 output close to the fp32 one. bf16 has an 8-bit mantissa: measured RMS error / std ~2e-2, half of
    it from rounding the weights alone (~1e-2 with fp32 compute), so the bound is on RMS, not max-abs."""
    cfg = UNetConfig.from_diffusers(BASE)
    params = init_unet(nn.random_maker(0, std=0.05), cfg)
    x, ctx = jnp.asarray(_randn(rng, 2, 16, 16, 4)), jnp.asarray(_randn(rng, 2, 7, 32))
    fn = jax.jit(apply_unet, static_argnames=("config", "capture"))
    ref, _ = fn(params, x, 500.0, ctx, config=cfg)   # scalar t broadcasts over the batch
    half = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    out, aux = fn(half, x.astype(jnp.bfloat16), 500.0, ctx, config=cfg, capture=CaptureSpec(hspace=True))
    assert out.dtype == jnp.float32 and aux["h"].dtype == jnp.bfloat16
    rel = float(jnp.sqrt(jnp.mean(jnp.square(out - ref))) / jnp.std(ref))
    assert rel < 5e-2, rel
