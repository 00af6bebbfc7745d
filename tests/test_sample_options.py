"""Sampling options: scheduler names, bfloat16 weights, and clear errors for bad arguments (raised on the host
before anything compiles)."""

from __future__ import annotations

import numpy as np
import pytest

from jaxdiff.hooks import AttnEdit, AttnSite, UNetEdits, UnknownSiteError
from jaxdiff.schedulers import KINDS
from jaxdiff.tokenizer import PromptTooLongError
from sample.loop import StepCaptureSpec
from sample.pipeline import generate
from sample.sharding import batch_mesh
from sample.spec import SCHEDULER_NAMES, SampleSpec, scheduler_config
from tests.test_sample_fixture import NEGATIVES, PROMPTS, sample_images, tiny_sd  # noqa: F401 - fixture

SPEC = SampleSpec(steps=4, scheduler="ddim")


def test_scheduler_names(tiny_sd):
    model, _ = tiny_sd
    assert set(SCHEDULER_NAMES.values()) == set(KINDS)
    assert scheduler_config(model, None).kind == "PNDMScheduler"     # the model's own
    for name, kind in SCHEDULER_NAMES.items():
        assert scheduler_config(model, name).kind == kind
    for kind in KINDS:
        assert scheduler_config(model, kind).kind == kind
    # keys of the model's config carry over, as with diffusers' from_config
    assert scheduler_config(model, "euler").beta_schedule == "scaled_linear"


def test_bfloat16_weights(tiny_sd):
    model, _ = tiny_sd
    x = np.random.default_rng(0).standard_normal((2, 16, 16, 4)).astype(np.float32)
    # (the float32 run's program is the one tests/test_sample_fixture.py and the DDIM parity test compile)
    f32 = generate(model, PROMPTS, spec=SampleSpec(steps=10, scheduler="ddim"), negative_prompts=NEGATIVES,
                   init_latents=x)
    bf16 = generate(model, PROMPTS, spec=SampleSpec(steps=10, scheduler="ddim", dtype="bfloat16"),
                    negative_prompts=NEGATIVES, init_latents=x)
    assert bf16.latents.dtype == np.float32   # scheduler maths and the latent carry stay float32
    err = np.abs(bf16.latents - f32.latents).max()
    pix = np.abs(bf16.images.astype(int) - f32.images.astype(int))
    print(f"bf16 vs fp32: latents max-abs {err:.3f}, mean |pixel diff| {pix.mean():.2f}")
    # bf16 keeps ~3 significant digits; 10 guided steps amplify that (measured 0.15 / 2.1 grey levels)
    assert 0 < err < 0.5 and pix.mean() < 5.0


def test_cli_loads_bfloat16_leaf_by_leaf(tiny_sd):
    """``--dtype bfloat16`` casts while converting (no float32 copy of the whole model is held beside it): every
    float leaf is the float32 load rounded to bf16, on the device."""
    import jax
    import jax.numpy as jnp

    from sample.cli import load_model
    model, folder = tiny_sd
    bf16 = load_model(folder, "bfloat16")
    leaves = jax.tree.leaves(bf16.params)
    assert all(isinstance(x, jax.Array) and x.dtype == jnp.bfloat16 for x in leaves)
    for a, b in zip(leaves, jax.tree.leaves(model.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(jnp.asarray(b, jnp.bfloat16)))


@pytest.mark.parametrize("kwargs,match", [
    (dict(spec=SampleSpec(height=33)), "multiples of the VAE factor 2"),
    (dict(spec=SampleSpec(width=0)), "multiples of the VAE factor"),
    (dict(spec=SampleSpec(scheduler="heun")), "unknown scheduler 'heun'; valid names: ddim, ddpm"),
    (dict(spec=SampleSpec(strength=0.0), init_image=sample_images()), r"strength must be in \(0, 1\]"),
    (dict(spec=SampleSpec(strength=1.5), init_image=sample_images()), r"strength must be in \(0, 1\]"),
    (dict(spec=SampleSpec(steps=4, strength=0.2), init_image=sample_images()), "runs no denoising step"),
    (dict(spec=SampleSpec(steps=0)), "steps must be a positive int"),
    (dict(spec=SampleSpec(dtype="float16")), "dtype must be one of"),
    (dict(spec=SampleSpec(scheduler="euler", eta=0.5)), "eta is a DDIMScheduler option"),
    (dict(init_latents=np.zeros((2, 4, 16, 16))), r"init_latents must have shape \(2, 16, 16, 4\)"),
    (dict(init_latents=np.zeros((1, 16, 16, 4))), r"init_latents must have shape \(2, 16, 16, 4\)"),
    (dict(init_image=sample_images().astype(np.float32)), "images must be uint8"),
    (dict(spec=SampleSpec(height=32, width=32), init_image=sample_images()[:, :16]),
     "init_image is 16x32 but the spec asks for 32x32"),
    (dict(negative_prompts=["a", "b", "c"]), "2 prompts but 3 negative prompts"),
    (dict(negative_prompts="water"), "negative_prompts must be a list of str"),
    (dict(capture=StepCaptureSpec.of([], hspace=True, reduce="steps", steps=(4,))), r"capture steps \[4\]"),
])
def test_bad_arguments(tiny_sd, kwargs, match):
    model, _ = tiny_sd
    kwargs = {"spec": SPEC, **kwargs}
    with pytest.raises(ValueError, match=match):
        generate(model, PROMPTS, **kwargs)


def test_mesh_checks():
    """(A mesh that does not divide the batch needs several devices: tests/test_sample_sharding.py's subprocess
    checks that None falls back to one device there; here the axis name rule.)"""
    import jax
    from jax.sharding import Mesh

    from sample.sharding import resolve_mesh

    mesh = Mesh(np.asarray(jax.devices()[:1]), ("data",))
    with pytest.raises(ValueError, match="axis named 'batch'"):
        resolve_mesh(mesh, 2)
    assert resolve_mesh(batch_mesh(jax.devices()[:1]), 3).shape["batch"] == 1


def test_prompt_errors(tiny_sd):
    model, _ = tiny_sd
    with pytest.raises(ValueError, match="non-empty list of str"):
        generate(model, "a red circle", spec=SPEC)
    with pytest.raises(ValueError, match="non-empty list of str"):
        generate(model, [], spec=SPEC)
    with pytest.raises(PromptTooLongError):
        generate(model, ["red " * 80, "blue"], spec=SPEC)


def test_unknown_site_is_refused(tiny_sd):
    model, _ = tiny_sd
    edits = UNetEdits(attn={AttnSite("down", 3, 0, 0, "cross"): AttnEdit(logit_bias=np.zeros(()))})
    with pytest.raises(UnknownSiteError, match="no such attention site"):
        generate(model, PROMPTS, spec=SPEC, edits=edits)
