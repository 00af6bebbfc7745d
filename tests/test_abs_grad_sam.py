"""Abs-Grad-SAM (jaxdiff.steer.abs_grad_sam, sample.background) on tiny random SD1/SD2/SDXL-shaped models: the
exact saliency equals a brute-force Jacobian, the ReLU and random-projection variants, mask helpers on hand-made
arrays, replacement (background = noised reference exactly, subject untouched), no retrace, identity and capture
invariance, and composition with concepts and Learn-to-Steer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.hooks import AttnEdit, CaptureSpec, UNetEdits
from jaxdiff.schedulers import add_noise_at_step, scale_model_input
from jaxdiff.steer import abs_grad_sam as ags
from jaxdiff.tokenizer import load_tokenizer
from sample.background import BackgroundError, BackgroundRequest, background_run, resolve_sites, subject_tokens
from sample.pipeline import generate, sample_program
from sample.spec import SampleSpec, vae_factor
from tests.test_concepts import tiny
from tests.test_learn_to_steer import context

SPEC = SampleSpec(steps=6, guidance=7.5, scheduler="ddim", strength=1.0)
PROMPTS = ["a red circle on grass", "a blue square on sand"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("ags_models")
    return {k: tiny(k, root) for k in ("sd1", "sd2", "sdxl")}


def reference_image(model, seed: int = 0, batch: int = 1) -> np.ndarray:
    """A random reference image of the model's default size (16 x 16 latents)."""
    size = model.configs["unet"].sample_size * vae_factor(model)
    return np.random.default_rng(seed).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)


def tokens(model, prompts=PROMPTS, words=(("circle",), ("square",))):
    return subject_tokens(load_tokenizer(model.tokenizer_dirs["tokenizer"]), list(prompts), list(words))


# ------------------------------------------------------------------------------------------------ saliency
def brute_force(model, variant: str, cotangents=None):
    """I_s(o) = sum_{h,q} A[h,q,s] f(d eps(o) / d A[h,q,s]) by jax.jacrev of eps in the probabilities themselves
    (A substituted through AttnEdit.prob_replace), for every output element o."""
    ctx = context(model, PROMPTS)
    site = resolve_sites(model.configs["unet"], ())[0]
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 16, 16, model.configs["unet"].in_channels))
    z = scale_model_input(ctx.schedule, x, ctx.i)
    _, aux = ctx.cond_model(z, ctx.t, UNetEdits(), CaptureSpec.of((site,), mode="heads"))
    a = aux["attn"][site]                                               # (B, H, Q, K)

    def eps(probs):
        edit = UNetEdits(attn={site: AttnEdit(prob_replace=probs, replace_weight=jnp.float32(1.0))})
        return ctx.cond_model(z, ctx.t, edit, CaptureSpec())[0]

    jac = jax.jacrev(eps)(a)                                            # (B, h, w, C, B, H, Q, K)
    b = x.shape[0]
    jac = jnp.stack([jac[i, ..., i, :, :, :] for i in range(b)])       # each row's own derivative
    jac = jac.reshape(b, -1, *a.shape[1:])                              # (B, n, H, Q, K)
    if cotangents is not None:                                          # (n, B, h, w, C) projections
        jac = jnp.einsum("nbo,bohqk->bnhqk", cotangents.reshape(cotangents.shape[0], b, -1), jac)
    f = jnp.abs if variant == "abs" else lambda g: jnp.maximum(g, 0)
    per_token = (a[:, None] * f(jac)).sum(axis=(2, 3))                 # (B, n, K)
    return ctx, x, site, per_token


@pytest.mark.parametrize("variant", ags.VARIANTS)
def test_exact_saliency_equals_brute_force_jacobian(models, variant):
    model = models["sd1"]
    ctx, x, site, per_token = brute_force(model, variant)
    onehot, weights = tokens(model)
    cfg = ags.SaliencyConfig((site,), variant=variant)                  # one VJP at a time (the default)
    got = ags.step_saliency(x, ctx, jnp.asarray(onehot), jnp.asarray(weights), cfg)
    b, j = got.shape[:2]
    want = jnp.einsum("bnk,btk,bjt->bjn", per_token, onehot, weights).reshape(got.shape)
    assert float(jnp.abs(want).max()) > 0
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * float(jnp.abs(want).max()))
    assert not np.asarray(got[:, 1:]).any()                            # padded words score zero


def test_relu_differs_from_abs_and_is_bounded_by_it(models):
    model = models["sd1"]
    ctx = context(model, PROMPTS)
    onehot, weights = (jnp.asarray(a) for a in tokens(model))
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 16, 16, 4))
    site = resolve_sites(model.configs["unet"], ())
    s_abs, s_relu = (ags.step_saliency(x, ctx, onehot, weights, ags.SaliencyConfig(site, variant=v))
                     for v in ags.VARIANTS)
    assert bool((s_relu <= s_abs + 1e-7).all()) and float(jnp.abs(s_abs - s_relu).max()) > 1e-3 * float(s_abs.max())


def test_random_projection_variant_is_the_projected_jacobian(models):
    model = models["sd1"]
    ctx = context(model, PROMPTS)
    key = ctx.key
    n = 16 * 16 * 4
    cots = jax.vmap(lambda o: jax.random.normal(jax.random.fold_in(key, o), (2, 16, 16, 4)))(jnp.arange(n))
    _, x, site, per_token = brute_force(model, "abs", cotangents=cots)
    onehot, weights = tokens(model)
    got = ags.step_saliency(x, ctx, jnp.asarray(onehot), jnp.asarray(weights),
                            ags.SaliencyConfig((site,), cotangent="random", chunk=3))   # 3 does not divide n
    want = jnp.einsum("bnk,btk,bjt->bjn", per_token, onehot, weights).reshape(got.shape)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * float(jnp.abs(want).max()))
    exact = ags.step_saliency(x, ctx, jnp.asarray(onehot), jnp.asarray(weights), ags.SaliencyConfig((site,)))
    corr = np.corrcoef(np.asarray(exact[:, 0]).ravel(), np.asarray(got[:, 0]).ravel())[0, 1]
    assert corr < 0.9                                                  # not the per-element scores


# ------------------------------------------------------------------------------------------------ masks
def test_mask_helpers_on_hand_made_arrays():
    s = jnp.zeros((1, 7, 7, 2)).at[0, 3, 3, 0].set(1.0)
    blurred = ags.gaussian_blur(s, 3, jnp.float32(1.0))
    assert float(blurred.sum()) == pytest.approx(1.0) and float(blurred[0, 3, 3, 0]) == float(blurred.max())
    np.testing.assert_allclose(ags.gaussian_blur(jnp.full((1, 5, 5, 1), 2.0), 3, jnp.float32(2.0)), 2.0, rtol=1e-6)
    assert ags.gaussian_blur(s, 1, jnp.float32(1.0)) is s
    one = s > 0.5
    assert int(ags.dilate(one, 1).sum()) == 9 and int(ags.dilate(one, 2).sum()) == 25
    corner = jnp.zeros((1, 4, 4, 1), bool).at[0, 0, 0, 0].set(True)
    assert int(ags.dilate(corner, 1).sum()) == 4                      # clipped at the border
    ramp = jnp.arange(16.0).reshape(1, 4, 4, 1)
    m = ags.threshold(ramp, jnp.float32(0.5))
    assert int(m.sum()) == int((np.arange(16) > 7.5 + 0.5 * np.arange(16).std()).sum())
    # union over valid words only; per position: one mask for every channel
    scores = jnp.zeros((1, 3, 6, 6, 2)).at[0, 0, 1, 1, 0].set(5.0).at[0, 1, 4, 4, 1].set(5.0).at[0, 2, 0, 5, :].set(9.)
    valid = jnp.asarray([[True, True, False]])
    m = ags.subject_mask(scores, valid, ags.MaskConfig(blur=1, dilation=0), jnp.float32(1.0), jnp.float32(0.5))
    assert m.shape == (1, 6, 6, 2) and bool(m[0, 1, 1, 0]) and bool(m[0, 4, 4, 1]) and not bool(m[0, 0, 5].any())
    assert int(m.sum()) == 2
    mp = ags.subject_mask(scores, valid, ags.MaskConfig(blur=1, dilation=0, per_position=True), jnp.float32(1.0),
                          jnp.float32(0.5))
    assert mp.shape == (1, 6, 6, 1) and bool(mp[0, 1, 1, 0]) and bool(mp[0, 4, 4, 0]) and int(mp.sum()) == 2


def test_scaled_steps_and_replace_mask():
    assert ags.scaled_steps(45) == (5, 18, 28)
    assert ags.scaled_steps(27) == (3, 11, 17)
    assert ags.scaled_steps(3) == (1, 2)
    r = ags.replace_mask(30, 3, (3, 11, 17))
    assert r.shape == (31,) and np.flatnonzero(r).tolist() == [6, 14, 20]


# ------------------------------------------------------------------------------------------------ replacement
def test_replacement_sets_background_to_the_noised_reference_exactly(models):
    model = models["sd1"]
    steering, record = background_run(model, PROMPTS, SPEC, BackgroundRequest(replace_steps=(2,)),
                                      reference_image(model, batch=2), seed=0)
    hook = steering.post[0]
    p = hook.params
    ctx = context(model, PROMPTS)
    x_in = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 4))
    x_out = jax.random.normal(jax.random.PRNGKey(2), (2, 16, 16, 4))
    for i in range(len(ctx.schedule.timesteps)):
        c = ctx.__class__(**{**ctx.__dict__, "i": jnp.int32(i), "t": ctx.schedule.timesteps[i]})
        new, stats = hook.fn(x_in, x_out, {}, c, p)
        m = np.asarray(stats["background"]["mask"])
        if i + 1 != 2:
            assert np.array_equal(new, x_out) and not m.any() and not np.asarray(stats["background"]["replaced"]).any()
            continue
        ref = np.asarray(add_noise_at_step(ctx.schedule, p["reference"], p["noise"], i + 1))
        assert 0.02 < m.mean() < 0.9
        # background: the noised reference (same formula; XLA may fuse it differently: float32 rounding only)
        np.testing.assert_allclose(np.asarray(new)[~m], ref[~m], rtol=0, atol=1e-6)
        assert np.array_equal(np.asarray(new)[m], np.asarray(x_out)[m])                # subject: untouched
    assert record["replace_steps"] == [2] and record["subjects"] == [["circle"], ["square"]]


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
def test_runs_on_every_model_shape_and_replaces(models, kind):
    model = models[kind]
    image = reference_image(model)
    steering, record = background_run(model, PROMPTS, SPEC, BackgroundRequest(replace_steps=(1, 3)), image, seed=0)
    res = generate(model, PROMPTS, spec=SPEC, seed=0, init_image=image, edits=steering)
    replaced = np.asarray(res.aux["hooks"]["background"]["replaced"])          # (steps run, B)
    assert replaced[:, 0].tolist() == [True, False, True, False, False, False]
    masks = np.asarray(res.aux["hooks"]["background"]["mask"])
    assert masks[0].any() and not masks[1].any() and res.images.shape[0] == 2
    plain = generate(model, PROMPTS, spec=SPEC, seed=0, init_image=image)
    assert not np.array_equal(res.images, plain.images)
    assert record["sites"][0].startswith("up_blocks_")


def test_identity_and_capture_invariance_and_no_retrace(models):
    model = models["sd1"]
    image = reference_image(model)
    plain = generate(model, PROMPTS, spec=SPEC, seed=0, init_image=image)
    steering, _ = background_run(model, PROMPTS, SPEC, BackgroundRequest(replace_steps=(2,)), image, seed=0)
    p = steering.post[0].params
    # identity 1: no replacement step -> plain img2img, bit for bit
    off = ags.background_steering(steering.post[0].fn, {**p, "replace": jnp.zeros_like(p["replace"])})
    assert np.array_equal(generate(model, PROMPTS, spec=SPEC, seed=0, init_image=image, edits=off).images,
                          plain.images)
    # identity 2: a mask covering everything (threshold far below) -> plain img2img, bit for bit
    all_subject = ags.background_steering(steering.post[0].fn, {**p, "k_std": jnp.float32(-1e6)})
    before = sample_program._cache_size()
    assert np.array_equal(generate(model, PROMPTS, spec=SPEC, seed=0, init_image=image, edits=all_subject).images,
                          plain.images)
    # new subjects and new steps: traced values, the same compiled program
    other, _ = background_run(model, PROMPTS, SPEC, BackgroundRequest(subjects=("on",), replace_steps=(1, 4)),
                              image, seed=0)
    res = generate(model, PROMPTS, spec=SPEC, seed=0, init_image=image, edits=steering)
    generate(model, PROMPTS, spec=SPEC, seed=0, init_image=image, edits=other)
    assert sample_program._cache_size() == before
    # capture on does not change the output
    from sample.cli import heatmap_capture
    captured = generate(model, PROMPTS, spec=SPEC, seed=0, init_image=image, edits=steering,
                        capture=heatmap_capture(model))
    assert np.array_equal(captured.images, res.images)


def test_pure_noise_start_option(models):
    model = models["sd1"]
    req = BackgroundRequest(replace_steps=(2,), start="noise")
    steering, record = background_run(model, PROMPTS, SPEC, req, reference_image(model), seed=0)
    assert record["start"] == "noise" and len(steering.pre) == 1
    hook = steering.pre[0]
    ctx = context(model, PROMPTS)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 4))
    start = int(hook.params["start"])
    at = ctx.__class__(**{**ctx.__dict__, "i": jnp.int32(start)})
    later = ctx.__class__(**{**ctx.__dict__, "i": jnp.int32(start + 1)})
    np.testing.assert_array_equal(hook.fn(x, at, hook.params),
                                  hook.params["noise"] * ctx.schedule.init_noise_sigma)
    np.testing.assert_array_equal(hook.fn(x, later, hook.params), x)
    res = generate(model, PROMPTS, spec=SPEC, seed=0, init_image=reference_image(model), edits=steering)
    assert np.asarray(res.aux["hooks"]["background"]["replaced"])[1].all()


def test_request_errors(models):
    model = models["sd1"]
    image = reference_image(model)
    with pytest.raises(BackgroundError, match="does not occur"):
        background_run(model, PROMPTS, SPEC, BackgroundRequest(subjects=("dog",)), image, seed=0)
    with pytest.raises(BackgroundError, match=r"must be in 1\.\.5"):
        background_run(model, PROMPTS, SPEC, BackgroundRequest(replace_steps=(6,)), image, seed=0)
    with pytest.raises(BackgroundError, match="self-attention site"):
        background_run(model, PROMPTS, SPEC, BackgroundRequest(sites=(resolve_sites(
            model.configs["unet"], ())[0].path.replace("attn2", "attn1"),)), image, seed=0)
    with pytest.raises(BackgroundError, match="no such attention site"):
        background_run(model, PROMPTS, SPEC, BackgroundRequest(sites=("up_blocks_9/attn2",)), image, seed=0)
    with pytest.raises(BackgroundError, match="no subject"):
        background_run(model, ["a photo"], SPEC, BackgroundRequest(), image, seed=0)


def test_composed_with_concepts_and_relations_each_part_acts(models):
    """compose(concept edits, Learn-to-Steer pre-step hook, Abs-Grad-SAM post-step hook): edits merged, the
    relation hook runs before each step's UNet call (seeing the concept edits), the background hook after the
    scheduler step (its saliency under the same edits). Dropping any part changes the images."""
    from jaxdiff.hooks import add_vector
    from jaxdiff.steer import learn_to_steer as l2s
    from jaxdiff.steering import Steering, compose
    from tests.test_learn_to_steer import PROMPTS as RELATION_PROMPTS
    from tests.test_learn_to_steer import setup

    model = models["sd1"]
    spec = SampleSpec(steps=4, guidance=7.5, scheduler="ddim", strength=1.0)
    image = reference_image(model)
    width = model.configs["unet"].block_out_channels[-1]
    concept = Steering(edits=UNetEdits(hspace=add_vector(jnp.linspace(-1.0, 1.0, width), 2.0)))
    hook, p, _ = setup(model, RELATION_PROMPTS)
    relations = l2s.relation_steering(hook, p)
    background, _ = background_run(model, RELATION_PROMPTS, spec,
                                   BackgroundRequest(subjects=("circle",), replace_steps=(2,)), image, seed=0)

    def run(*parts):
        return generate(model, RELATION_PROMPTS, spec=spec, seed=0, init_image=image, edits=compose(*parts))

    every = run(concept, relations, background)
    stats = every.aux["hooks"]
    assert np.asarray(stats["relations"]["refinements"])[0].min() > 0
    assert np.asarray(stats["background"]["replaced"])[:, 0].tolist() == [False, True, False, False]
    for kept in ((relations, background), (concept, background), (concept, relations)):
        assert not np.array_equal(run(*kept).images, every.images)
