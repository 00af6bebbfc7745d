"""Per-step captures of the sampling loop and their reductions over steps ("stack", "sum", "steps"), guidance
rows, and that capturing (and observing with progress callbacks and an identity hook) changes nothing.

Loop-level tests run :func:`sample.loop.denoise` on a cheap analytic denoiser (compiles in a fraction of a
second); the end-to-end ones run the tiny SD model's compiled program.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.hooks import AttnSite
from jaxdiff.schedulers import SchedulerConfig, make_schedule
from sample.loop import StepCaptureSpec, denoise
from sample.pipeline import generate
from sample.spec import SampleSpec
from sample.steering import Steering, StepHook
from tests.conftest import max_abs
from tests.test_sample_fixture import NEGATIVES, PROMPTS, tiny_sd  # noqa: F401 - fixture

SITE = AttnSite("mid", 0, 0, 0, "cross")
DDIM_CONFIG = SchedulerConfig.from_diffusers({"_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear",
                                             "beta_start": 0.00085, "beta_end": 0.012, "clip_sample": False})


def fake_model(x, t, edits, capture):
    """An analytic denoiser with the UNet's calling convention; its "captures" depend on x and t."""
    t = jnp.asarray(t, jnp.float32) / 1000.0
    out = 0.3 * jnp.sin(2.0 * x + t)
    h = jnp.cos(x) * (1.0 + t) if capture.hspace else None
    attn = {s: jnp.tanh(x.reshape(x.shape[0], -1, x.shape[-1]) * t) for s, _ in capture.attn}
    return out, {"h": h, "attn": attn}


def run_fake(capture, *, guided=True, start=0, steering=Steering(), progress=None, steps=8):
    schedule = make_schedule(DDIM_CONFIG, steps)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 3))
    fn = jax.jit(lambda x, g: denoise(fake_model, schedule, x, guided=guided, guidance=g, key=jax.random.PRNGKey(1),
                                      start=start, steering=steering, capture=capture, progress=progress))
    return fn(x, jnp.float32(3.0))


def spec(reduce, steps=(), cond_only=True):
    return StepCaptureSpec.of([SITE], mode="mean", hspace=True, reduce=reduce, steps=steps, cond_only=cond_only)


@pytest.mark.parametrize("start", [0, 3])
def test_reductions_loop_level(start):
    x_stack, stack = run_fake(spec("stack"), start=start)
    x_sum, total = run_fake(spec("sum"), start=start)
    picked = (5, start, 7)
    x_steps, chosen = run_fake(spec("steps", picked), start=start)
    x_none, none = run_fake(spec("none"), start=start)
    assert none == {}
    for x in (x_sum, x_steps, x_none):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(x_stack))
    assert stack["h"].shape == (8 - start, 2, 4, 4, 3) and stack["attn"][SITE].shape == (8 - start, 2, 16, 3)
    for key in ("h", "attn"):
        s, t, c = (jax.tree.leaves(a[key]) for a in (stack, total, chosen))
        for s_, t_, c_ in zip(s, t, c):
            np.testing.assert_allclose(np.asarray(t_), np.asarray(s_).sum(0), rtol=1e-6, atol=1e-6)
            np.testing.assert_array_equal(np.asarray(c_), np.asarray(s_)[[p - start for p in picked]])


def test_guidance_rows_loop_level():
    _, cond = run_fake(spec("stack"))
    _, both = run_fake(spec("stack", cond_only=False))
    _, unguided = run_fake(spec("stack"), guided=False)
    assert both["h"].shape[1] == 4 and cond["h"].shape[1] == 2 and unguided["h"].shape[1] == 2
    np.testing.assert_array_equal(np.asarray(both["h"][:, 2:]), np.asarray(cond["h"]))


def test_capture_spec_checks():
    with pytest.raises(ValueError, match="reduce"):
        StepCaptureSpec(reduce="mean")
    with pytest.raises(ValueError, match="steps"):
        StepCaptureSpec(reduce="steps")
    with pytest.raises(ValueError, match="steps"):
        StepCaptureSpec(reduce="sum", steps=(1,))
    with pytest.raises(ValueError, match="not run"):
        spec("steps", (1, 12)).check(0, 10)
    with pytest.raises(ValueError, match="not run"):
        spec("steps", (1,)).check(4, 10)   # img2img starting at step 4


# ---------------------------------------------------------------------------------------------- end to end
STEPS = 10
SITES = (AttnSite("down", 0, 0, 0, "cross"), SITE)
CALLS: list = []


def count_progress(done, total):
    CALLS.append((done, total))


def identity_hook(x_in, x_out, captures, ctx, params):
    return x_out


@pytest.fixture(scope="module")
def e2e(tiny_sd):
    model, _ = tiny_sd
    s = SampleSpec(steps=STEPS, scheduler="ddim")
    x = np.random.default_rng(7).standard_normal((2, 16, 16, 4)).astype(np.float32)

    def run(**kw):
        return generate(model, PROMPTS, spec=s, negative_prompts=NEGATIVES, init_latents=x, **kw)

    CALLS.clear()
    observed = run(capture=StepCaptureSpec.of(SITES, "mean", hspace=True), progress=count_progress,
                   edits=Steering(post=(StepHook(identity_hook, {"unused": jnp.zeros(3)}),)))
    return {"plain": run(), "stack": observed, "progress": list(CALLS),
            "sum": run(capture=StepCaptureSpec.of(SITES, "mean", hspace=True, reduce="sum")),
            "steps": run(capture=StepCaptureSpec.of(SITES, "heads", hspace=True, reduce="steps", steps=(0, 4, 9),
                                                    cond_only=False))}


def test_observers_do_not_change_the_result(e2e):
    """Captures, a progress callback and an identity latent hook leave latents and images unchanged."""
    plain, observed = e2e["plain"], e2e["stack"]
    print(f"capture+progress+identity hook vs plain: {max_abs(observed.latents, plain.latents, 'observed run'):.1e}")
    np.testing.assert_array_equal(observed.images, plain.images)
    np.testing.assert_allclose(observed.latents, plain.latents, rtol=0, atol=1e-6)
    assert sorted(e2e["progress"]) == [(k, STEPS) for k in range(1, STEPS + 1)]


def test_reductions_end_to_end(e2e):
    stack, total, chosen = e2e["stack"].aux, e2e["sum"].aux, e2e["steps"].aux
    assert stack["h"].shape == (STEPS, 2, 8, 8, 64)                      # cond rows, mid-block h
    assert stack["attn"][SITES[0]].shape == (STEPS, 2, 256, 77)         # head mean, 16x16 queries
    assert chosen["attn"][SITES[0]].shape == (3, 4, 4, 256, 77)         # all rows, all heads
    np.testing.assert_allclose(stack["attn"][SITE].sum(-1), 1.0, atol=1e-5)
    for key in ("h", "attn"):
        for s_, t_ in zip(jax.tree.leaves(stack[key]), jax.tree.leaves(total[key])):
            np.testing.assert_allclose(t_, s_.sum(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(chosen["h"][:, 2:], stack["h"][[0, 4, 9]], rtol=0, atol=1e-6)
    heads_mean = chosen["attn"][SITE][:, 2:].mean(axis=2)
    np.testing.assert_allclose(heads_mean, stack["attn"][SITE][[0, 4, 9]], rtol=0, atol=1e-6)
