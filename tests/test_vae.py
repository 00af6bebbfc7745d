"""AutoencoderKL parity with diffusers (PyTorch) on tiny random configs, via the generic converter."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import nn
from jaxdiff.vae import (VAEConfig, decode_latents, encode_to_latents, uint8_to_signed, init_vae, signed_to_uint8,
                         vae_decode, vae_encode, vae_sample)
from tests.conftest import max_abs, nchw_to_nhwc

TOL = 1e-5

BASE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64), layers_per_block=1,
            norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, sample_size=32)
CASES = {
    "2level": (BASE, 32),
    "no_mid_attn": (dict(BASE, mid_block_add_attention=False), 32),
    "3level": (dict(BASE, block_out_channels=(16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 3,
                    up_block_types=("UpDecoderBlock2D",) * 3), 32),
    "no_quant_convs_64px": (dict(BASE, use_quant_conv=False, use_post_quant_conv=False), 64),
}


def _torch_vae(kw, tmp_path, seed=0):
    import torch
    import diffusers
    torch.manual_seed(seed)
    m = diffusers.AutoencoderKL(**kw).eval()
    with torch.no_grad():  # perturb every leaf (norm scales, biases) so parity exercises them all
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    m.save_pretrained(tmp_path, safe_serialization=True)
    return torch, m


@pytest.mark.parametrize("case", list(CASES))
def test_parity_with_diffusers(case, tmp_path):
    from weights_convert.components import load_component
    kw, size = CASES[case]
    torch, m = _torch_vae(kw, tmp_path)
    config, params = load_component(tmp_path, "vae")
    assert config.mid_block_add_attention == kw.get("mid_block_add_attention", True)
    x = np.random.default_rng(1).uniform(-1, 1, (2, 3, size, size)).astype(np.float32)
    with torch.no_grad():
        dist = m.encode(torch.from_numpy(x)).latent_dist
        mean_t, logvar_t = dist.mean.numpy(), dist.logvar.numpy()
        dec_t = m.decode(dist.mean).sample.numpy()
    mean, logvar = vae_encode(params, jnp.asarray(nchw_to_nhwc(x)), config=config)
    e_mean = max_abs(mean, nchw_to_nhwc(mean_t), "vae mean")
    e_logvar = max_abs(logvar, nchw_to_nhwc(logvar_t), "vae logvar")
    dec = vae_decode(params, jnp.asarray(nchw_to_nhwc(mean_t)), config=config)
    e_dec = max_abs(dec, nchw_to_nhwc(dec_t), "vae decode")
    rel = e_dec / float(np.abs(dec_t).max())
    print(f"{case}: mean {e_mean:.2e} logvar {e_logvar:.2e} decode {e_dec:.2e} (rel {rel:.2e}, "
          f"|ref| max {np.abs(dec_t).max():.2f})")
    assert e_mean <= TOL and e_logvar <= TOL and e_dec <= TOL


def test_rejects_unknown_block_type():
    with pytest.raises(ValueError, match="AttnDownEncoderBlock2D"):
        VAEConfig.from_diffusers(dict(BASE, down_block_types=("AttnDownEncoderBlock2D", "DownEncoderBlock2D")))


def _small():
    cfg = VAEConfig.from_diffusers(dict(BASE, scaling_factor=0.13025, shift_factor=0.1))
    return cfg, init_vae(nn.random_maker(0, std=0.05), cfg)


def test_sample_deterministic_and_statistics():
    mean = jnp.full((4, 64, 64, 4), 0.7)
    logvar = jnp.full((4, 64, 64, 4), np.log(0.25))  # std 0.5
    a = vae_sample(mean, logvar, jax.random.key(0))
    assert np.array_equal(np.asarray(a), np.asarray(vae_sample(mean, logvar, jax.random.key(0))))
    assert not np.array_equal(np.asarray(a), np.asarray(vae_sample(mean, logvar, jax.random.key(1))))
    # 65536 draws: standard error of the mean 0.5/256 ~ 2e-3, of the std ~1.4e-3
    assert abs(float(a.mean()) - 0.7) < 1e-2 and abs(float(a.std()) - 0.5) < 1e-2


def test_scaling_round_trip():
    cfg, params = _small()
    x = jnp.asarray(np.random.default_rng(2).uniform(-1, 1, (1, 32, 32, 3)), jnp.float32)
    lat = encode_to_latents(params, x, config=cfg, sample=False)
    mean, _ = vae_encode(params, x, config=cfg)
    np.testing.assert_allclose(lat, (mean - 0.1) * 0.13025, rtol=1e-6, atol=1e-7)
    err = max_abs(decode_latents(params, lat, config=cfg), vae_decode(params, mean, config=cfg))
    assert err <= 1e-5
    with pytest.raises(ValueError, match="key"):
        encode_to_latents(params, x, config=cfg)
    s = encode_to_latents(params, x, jax.random.key(3), config=cfg)
    assert s.shape == lat.shape


def test_image_helpers_round_trip():
    u = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, -1)
    x = uint8_to_signed(u)
    assert float(x.min()) == -1.0 and float(x.max()) == 1.0
    assert np.array_equal(signed_to_uint8(x), u)
    assert np.array_equal(signed_to_uint8(jnp.array([-3.0, 3.0])), np.array([0, 255], np.uint8))
