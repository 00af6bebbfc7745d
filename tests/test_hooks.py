"""The hook API wired into the UNet (jaxdiff.unet + jaxdiff.hooks + jaxdiff.attention) on a tiny SD1-shaped
UNet with random params (no PyTorch needed): captures are observational, identity edits are identities, edit
values never retrace, unknown sites are refused, gradients flow, ``rows`` restricts edits to chosen rows."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import nn
from jaxdiff.hooks import (AttnEdit, AttnSite, CaptureSpec, UNetEdits, UnknownSiteError, add_vector, scale_h)
from jaxdiff.unet import UNetConfig, apply_unet, attn_sites, init_unet

CONFIG = UNetConfig.from_diffusers(
    {"sample_size": 16, "block_out_channels": [32, 64], "layers_per_block": 1, "norm_num_groups": 8,
     "cross_attention_dim": 32, "attention_head_dim": 4, "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
     "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"]})
B, S, HEADS, C_MID = 2, 7, 4, 64
SITES = attn_sites(CONFIG)
DOWN_SELF = AttnSite("down", 0, 0, 0, "self")
DOWN_CROSS = AttnSite("down", 0, 0, 0, "cross")
UP_CROSS = AttnSite("up", 1, 1, 0, "cross")

unet = jax.jit(apply_unet, static_argnames=("config", "capture"))


@pytest.fixture(scope="module")
def inputs():
    params = init_unet(nn.random_maker(0, std=0.05), CONFIG)
    key = jax.random.PRNGKey(0)
    latents = jax.random.normal(key, (B, 16, 16, 4))
    ctx = jax.random.normal(jax.random.fold_in(key, 1), (B, S, 32))
    t = jnp.array([700.0, 700.0])
    return params, latents, t, ctx


def run(inputs, edits=None, capture=CaptureSpec(), fn=unet):
    params, latents, t, ctx = inputs
    kw = {} if edits is None else {"edits": edits}
    return fn(params, latents, t, ctx, config=CONFIG, capture=capture, **kw)


def test_sites_canonical_order():
    assert SITES == (DOWN_SELF, DOWN_CROSS, AttnSite("mid", 0, 0, 0, "self"), AttnSite("mid", 0, 0, 0, "cross"),
                     AttnSite("up", 1, 0, 0, "self"), AttnSite("up", 1, 0, 0, "cross"),
                     AttnSite("up", 1, 1, 0, "self"), UP_CROSS)
    assert UP_CROSS.path == "up_blocks_1/attentions_1/transformer_blocks_0/attn2"


def test_capture_does_not_change_output(inputs):
    plain, aux0 = run(inputs)
    assert aux0["h"] is None and aux0["attn"] == {}
    everything = CaptureSpec(hspace=True, attn=tuple((s, "heads") for s in SITES))
    captured, aux = run(inputs, capture=everything)
    np.testing.assert_array_equal(np.asarray(captured), np.asarray(plain))  # bit-equal on CPU
    # jit returns dicts with sorted keys (AttnSite order), so compare as sets; attn_sites() is canonical order
    assert set(aux["attn"]) == set(SITES)


def test_capture_shapes_and_normalisation(inputs):
    cap = CaptureSpec(hspace=True, attn=((DOWN_SELF, "heads"), (DOWN_CROSS, "mean"), (UP_CROSS, "heads"),
                                         (AttnSite("mid", 0, 0, 0, "cross"), "mean")))
    _, aux = run(inputs, capture=cap)
    shapes = {s: aux["attn"][s].shape for s, _ in cap.attn}
    assert shapes == {DOWN_SELF: (B, HEADS, 256, 256), DOWN_CROSS: (B, 256, S), UP_CROSS: (B, HEADS, 256, S),
                      AttnSite("mid", 0, 0, 0, "cross"): (B, 64, S)}
    for s, _ in cap.attn:
        p = np.asarray(aux["attn"][s])
        assert p.dtype == np.float32 and (p >= 0).all()
        np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-5)
    assert aux["h"].shape == (B, 8, 8, C_MID)


def _identity_edit():
    return AttnEdit(logit_bias=jnp.zeros((B, HEADS, 1, 1)), token_keep=jnp.ones((B, S), bool),
                    prob_scale=jnp.ones((B, S)), prob_replace=jnp.full((B, HEADS, 256, S), 0.3),
                    replace_weight=jnp.zeros(()), value_scale=jnp.ones((B, S)))


def test_identity_edits_equal_no_edit(inputs):
    plain, _ = run(inputs)
    self_id = AttnEdit(logit_bias=jnp.zeros(()), prob_scale=jnp.ones(()), value_scale=jnp.ones((B, 256)))
    for hspace in (add_vector(jnp.ones((C_MID,)), scale=0.0), scale_h(1.0)):
        edits = UNetEdits(hspace=hspace, attn={DOWN_CROSS: _identity_edit(), UP_CROSS: _identity_edit(),
                                               DOWN_SELF: self_id})
        out, _ = run(inputs, edits)
        np.testing.assert_array_equal(np.asarray(out), np.asarray(plain))


def test_edit_values_do_not_retrace(inputs):
    traces = []

    def counted(params, latents, t, ctx, edits):
        traces.append(1)
        return apply_unet(params, latents, t, ctx, config=CONFIG, edits=edits)[0]

    f = jax.jit(counted)
    params, latents, t, ctx = inputs
    outs = []
    for v in (0.0, 2.0, -1.0):
        edits = UNetEdits(hspace=add_vector(jnp.ones((C_MID,)), scale=v),
                          attn={DOWN_CROSS: AttnEdit(logit_bias=jnp.full((B, 1, 1, S), v))})
        outs.append(f(params, latents, t, ctx, edits))
    assert len(traces) == 1 and f._cache_size() == 1
    assert not np.allclose(outs[0], outs[1])


@pytest.mark.parametrize("bad", [AttnSite("down", 1, 0, 0, "self"), AttnSite("mid", 0, 0, 1, "cross"),
                                 AttnSite("up", 1, 2, 0, "cross")])
def test_unknown_site_raises(inputs, bad):
    with pytest.raises(UnknownSiteError, match=re.escape(repr(bad))):
        run(inputs, UNetEdits(attn={bad: AttnEdit(logit_bias=jnp.zeros(()))}))
    with pytest.raises(UnknownSiteError, match=re.escape(repr(bad))):
        run(inputs, capture=CaptureSpec.of([bad]))


def test_gradients_flow_from_captured_maps(inputs):
    params, latents, t, ctx = inputs
    cap = CaptureSpec.of([UP_CROSS, DOWN_CROSS], mode="mean")

    def loss(x):
        _, aux = apply_unet(params, x, t, ctx, config=CONFIG, capture=cap)
        return aux["attn"][UP_CROSS][..., 2].sum() + aux["attn"][DOWN_CROSS][..., 3].sum()

    g = np.asarray(jax.jit(jax.grad(loss))(latents))
    assert np.isfinite(g).all() and np.abs(g).max() > 0


def test_gradients_flow_to_edit_params_and_latents(inputs):
    params, latents, t, ctx = inputs

    def loss(x, bias, direction):
        edits = UNetEdits(hspace=add_vector(direction, 1.0), attn={DOWN_CROSS: AttnEdit(logit_bias=bias)})
        out, _ = apply_unet(params, x, t, ctx, config=CONFIG, edits=edits)
        return jnp.sum(out ** 2)

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(latents, jnp.zeros((B, 1, 1, S)), jnp.zeros((C_MID,)))
    for name, g in zip(("latents", "logit_bias", "h direction"), grads):
        g = np.asarray(g)
        assert np.isfinite(g).all() and np.abs(g).max() > 0, name


def test_rows_mask_edits_only_chosen_rows(inputs):
    plain, aux0 = run(inputs, capture=CaptureSpec(hspace=True))
    rows = jnp.array([False, True])
    edits = UNetEdits(hspace=add_vector(jnp.ones((C_MID,)), scale=3.0, rows=rows),
                      attn={DOWN_CROSS: AttnEdit(logit_bias=jnp.full((B, 1, 1, S), 4.0).at[..., 0].set(-4.0),
                                                 prob_scale=jnp.full((B, S), 0.5), rows=rows)})
    out, aux = run(inputs, edits, CaptureSpec(hspace=True))
    np.testing.assert_array_equal(np.asarray(out[0]), np.asarray(plain[0]))
    assert np.abs(np.asarray(out[1] - plain[1])).max() > 1e-3
    # the captured h is the model's h, before the h-space edit (the attention edit upstream still acts on row 1)
    np.testing.assert_array_equal(np.asarray(aux["h"][0]), np.asarray(aux0["h"][0]))


def test_capture_is_before_hspace_edit(inputs):
    _, aux0 = run(inputs, capture=CaptureSpec(hspace=True))
    out, aux = run(inputs, UNetEdits(hspace=scale_h(0.5)), CaptureSpec(hspace=True))
    np.testing.assert_array_equal(np.asarray(aux["h"]), np.asarray(aux0["h"]))


def test_token_keep_zeroes_captured_prob(inputs):
    keep = jnp.ones((B, S), bool).at[:, 3].set(False)
    cap = CaptureSpec.of([DOWN_CROSS, UP_CROSS], mode="heads")
    _, aux = run(inputs, UNetEdits(attn={DOWN_CROSS: AttnEdit(token_keep=keep)}), cap)
    p = np.asarray(aux["attn"][DOWN_CROSS])
    assert (p[..., 3] == 0).all()
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-5)
    assert (np.asarray(aux["attn"][UP_CROSS])[..., 3] > 0).all()   # other layers untouched
