"""Per-step steering: edits active on a step range, edits built per step by a function, the latent hook.

The reference for a step-range edit is the loop written out in Python: one jitted UNet call per step, with the
edit on the chosen steps and without it elsewhere, and the scheduler's ``step``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.hooks import NO_EDITS, AttnEdit, AttnSite, UNetEdits, add_vector
from jaxdiff.schedulers import init_state, make_schedule, step
from jaxdiff.unet import apply_unet
from sample.loop import StepCaptureSpec, denoise
from sample.pipeline import generate
from sample.spec import SampleSpec, scheduler_config
from sample.steering import Steering, StepHook, as_steering, compose
from sample.text import encode_prompts, guidance_rows, prompt_ids
from tests.conftest import max_abs
from tests.test_sample_captures import DDIM_CONFIG, SITE, fake_model
from tests.test_sample_fixture import NEGATIVES, PROMPTS, tiny_sd  # noqa: F401 - fixture

STEPS, GUIDANCE, ON = 10, 7.5, (3, 7)
# The compiled scan and the op-by-op loop round differently (XLA fuses the guidance combination into the step,
# the text encoder into the program); 10 guided steps amplify that to ~2e-5 (see test_sample_parity.py).
LOOP_TOL = 1e-4
CROSS = AttnSite("down", 0, 0, 0, "cross")


def steering_edits(strength: float) -> UNetEdits:
    """An h-space direction on the conditional rows plus a cross-attention token reweighting on all rows."""
    direction = jnp.asarray(np.random.default_rng(0).standard_normal(64).astype(np.float32))
    weights = jnp.ones((4, 77)).at[:, 2].set(1.0 + strength)
    return UNetEdits(hspace=add_vector(direction, scale=strength, rows=guidance_rows(2)),
                     attn={CROSS: AttnEdit(prob_scale=weights)})


def active(lo: int, hi: int) -> np.ndarray:
    return (np.arange(STEPS) >= lo) & (np.arange(STEPS) < hi)


def manual_loop(model, x, edits: UNetEdits, on) -> np.ndarray:
    """Guided DDIM written out step by step: ``edits`` on steps where ``on[i]``, none elsewhere."""
    schedule = make_schedule(scheduler_config(model, "ddim"), STEPS)
    cond = encode_prompts((model.params["text_encoder"],), (model.configs["text_encoder"],),
                          prompt_ids(model, PROMPTS, NEGATIVES, guided=True))
    unet = jax.jit(apply_unet, static_argnames=("config", "capture"))
    x, state = jnp.asarray(x) * schedule.init_noise_sigma, init_state(schedule, jnp.asarray(x))
    for i in range(STEPS):
        t = schedule.timesteps[i]
        out, _ = unet(model.params["unet"], jnp.concatenate([x, x]), t, cond.context, config=model.configs["unet"],
                      edits=edits if on[i] else NO_EDITS)
        uncond, c = jnp.split(out, 2)
        x, state = step(schedule, state, i, uncond + GUIDANCE * (c - uncond), x)
    return np.asarray(x)


def scaled_edits(i, t, values) -> UNetEdits:
    """edit_fn: the strength follows a per-step weight (0 switches the edit off exactly: h + 0 d, p * 1)."""
    s = values["strength"] * values["weights"][i]
    return UNetEdits(hspace=add_vector(values["direction"], scale=s, rows=guidance_rows(2)),
                     attn={CROSS: AttnEdit(prob_scale=jnp.ones((4, 77)).at[:, 2].set(1.0 + s))})


@pytest.fixture(scope="module")
def runs(tiny_sd):
    model, _ = tiny_sd
    x = np.random.default_rng(11).standard_normal((2, 16, 16, 4)).astype(np.float32)
    spec = SampleSpec(steps=STEPS, guidance=GUIDANCE, scheduler="ddim")

    def run(edits):
        return generate(model, PROMPTS, spec=spec, negative_prompts=NEGATIVES, init_latents=x, edits=edits).latents

    edits = steering_edits(2.0)
    values = {"strength": jnp.float32(2.0), "weights": jnp.asarray(active(*ON), jnp.float32),
              "direction": edits.hspace.params["direction"]}
    return {"model": model, "x": x, "edits": edits, "plain": run(None), "always": run(edits),
            "range": run(Steering(edits=edits, active=active(*ON))),
            "fn": run(Steering(edits=values, edit_fn=scaled_edits))}


def test_step_range_equals_manual_loop(runs):
    ref = manual_loop(runs["model"], runs["x"], runs["edits"], active(*ON))
    err = max_abs(runs["range"], ref, f"edit on steps {ON} vs manual loop")
    moved, always = (np.abs(runs[k] - runs["plain"]).max() for k in ("range", "always"))
    print(f"edit on steps [{ON[0]}, {ON[1]}): compiled vs manual loop {err:.1e}; the edit moves latents by "
          f"{moved:.3f} (on every step: {always:.3f})")
    assert err <= LOOP_TOL
    assert np.abs(runs["range"] - runs["plain"]).max() > 1e-3        # the edit does something ...
    assert np.abs(runs["range"] - runs["always"]).max() > 1e-3       # ... and only on its steps


def test_edit_fn_matches_active_mask(runs):
    """A per-step strength of 1 on the range and 0 elsewhere is the same as the active mask."""
    assert max_abs(runs["fn"], runs["range"], "edit_fn weights vs active mask") <= 1e-6


def test_edits_on_every_step_match_manual_loop(runs):
    ref = manual_loop(runs["model"], runs["x"], runs["edits"], np.ones(STEPS, bool))
    assert max_abs(runs["always"], ref, "edit on every step vs manual loop") <= LOOP_TOL


def test_steering_checks():
    assert as_steering(None) == Steering()
    with pytest.raises(TypeError, match="UNetEdits or Steering"):
        as_steering({"not": "edits"})
    with pytest.raises(ValueError, match=r"shape \(10,\)"):
        Steering(active=np.ones(9, bool)).check(10)


# ------------------------------------------------------------------------------------- step hooks
def _shift_by_h(x_in, x_out, captures, ctx, params):
    """Post-step: adds a per-step multiple of this step's captured h (the fake model's h has the latents' shape)."""
    return x_out + params["delta"][ctx.i] * captures["h"]


def _gradient_step(x, ctx, params):
    """Pre-step, Learn-to-Steer-shaped: one gradient step on a loss of the conditional model's prediction at the
    timestep this step is about to denoise (``ctx.t``), through ``ctx.cond_model``."""
    def loss(z):
        out, _ = ctx.cond_model(z, ctx.t, NO_EDITS, StepCaptureSpec().unet)
        return jnp.sum((out - params["target"]) ** 2)
    return x - params["lr"] * jax.grad(loss)(x)


PARAMS = {"delta": jnp.linspace(0.1, 0.6, 6), "lr": jnp.float32(0.05), "target": jnp.full((2, 4, 4, 3), 0.2)}


def _loop_reference(schedule, x, pre=None, post=None):
    """The steered loop written out in Python: pre hook, guided model call, scheduler step, post hook."""
    state = init_state(schedule, x)
    for i in range(len(schedule)):
        t = schedule.timesteps[i]
        if pre is not None:
            x = x - PARAMS["lr"] * jax.grad(lambda z: jnp.sum((fake_model(z, t, NO_EDITS, StepCaptureSpec().unet)[0]
                                                               - PARAMS["target"]) ** 2))(x)
        out, aux = fake_model(jnp.concatenate([x, x]), t, NO_EDITS, CAPTURE.unet)
        u, c = jnp.split(out, 2)
        x_new, state = step(schedule, state, i, u + 2.0 * (c - u), x)
        x = x_new if post is None else x_new + PARAMS["delta"][i] * aux["h"][2:]
    return x


CAPTURE = StepCaptureSpec.of([SITE], hspace=True, reduce="none")


def _run(schedule, x0, steering):
    # fake_model ignores its conditioning, so it serves as its own conditional-rows denoiser
    got, _ = jax.jit(lambda x: denoise(fake_model, schedule, x, guided=True, guidance=jnp.float32(2.0),
                                       key=jax.random.PRNGKey(0), steering=steering, capture=CAPTURE,
                                       cond_model=fake_model))(x0)
    return np.asarray(got)


@pytest.mark.parametrize("which", ["pre", "post", "both"])
def test_hooks_loop_level(which):
    schedule = make_schedule(DDIM_CONFIG, 6)
    x0 = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 3))
    pre = (StepHook(_gradient_step, PARAMS),) if which in ("pre", "both") else ()
    post = (StepHook(_shift_by_h, PARAMS),) if which in ("post", "both") else ()
    got = _run(schedule, x0, Steering(pre=pre, post=post))
    ref = _loop_reference(schedule, x0, pre=pre or None, post=post or None)
    np.testing.assert_allclose(got, np.asarray(ref), rtol=1e-5, atol=1e-6)
    assert np.abs(got - _run(schedule, x0, Steering())).max() > 1e-3


def _record_step(x, ctx, params):
    """Pre-step hook adding the step index: the first step (0) must be seen too."""
    return x + params["w"] * (ctx.i + 1).astype(x.dtype)


def _times_two(x_in, x_out, captures, ctx, params):
    return x_out * params["k"]


def _plus_one(x_in, x_out, captures, ctx, params):
    return x_out + params["k"]


def test_hooks_of_composed_steerings_run_in_order():
    schedule = make_schedule(DDIM_CONFIG, 6)
    x0 = jax.random.normal(jax.random.PRNGKey(1), (2, 4, 4, 3))
    a = Steering(post=(StepHook(_times_two, {"k": jnp.float32(2.0)}),))
    b = Steering(post=(StepHook(_plus_one, {"k": jnp.float32(1.0)}),))
    ab, ba = _run(schedule, x0, compose(a, b)), _run(schedule, x0, compose(b, a))
    both = _run(schedule, x0, Steering(post=a.post + b.post))
    np.testing.assert_array_equal(ab, both)                 # compose == the hooks listed in that order
    assert np.abs(ab - ba).max() > 1e-3                     # ... and the order matters
    pre = Steering(pre=(StepHook(_record_step, {"w": jnp.float32(0.01)}),))
    assert np.abs(_run(make_schedule(DDIM_CONFIG, 1), x0, pre) - _run(make_schedule(DDIM_CONFIG, 1), x0,
                                                                         Steering())).max() > 1e-3


def test_compose_with_empty_is_bitwise(runs):
    model, x = runs["model"], runs["x"]
    spec = SampleSpec(steps=STEPS, guidance=GUIDANCE, scheduler="ddim")
    got = generate(model, PROMPTS, spec=spec, negative_prompts=NEGATIVES, init_latents=x,
                   edits=compose(Steering(), Steering(edits=runs["edits"], active=active(*ON)), None)).latents
    np.testing.assert_array_equal(got, runs["range"])


def test_two_hspace_edits_compose_to_their_sum(runs):
    """Two h-space vectors on the same rows, composed, equal one edit with the summed vector (to float32
    rounding: h + a + b vs h + (a + b)); two attention edits of one site compose as applied in order."""
    model, x = runs["model"], runs["x"]
    spec = SampleSpec(steps=STEPS, guidance=GUIDANCE, scheduler="ddim")
    rng = np.random.default_rng(3)
    a, b = (jnp.asarray(rng.standard_normal(64), jnp.float32) for _ in range(2))
    rows = guidance_rows(2)

    def run(edits):
        return generate(model, PROMPTS, spec=spec, negative_prompts=NEGATIVES, init_latents=x, edits=edits).latents
    two = run(compose(UNetEdits(hspace=add_vector(a, 1.5, rows)), UNetEdits(hspace=add_vector(b, 1.5, rows))))
    one = run(UNetEdits(hspace=add_vector(a + b, 1.5, rows)))
    assert max_abs(two, one, "composed h edits vs summed vector") <= LOOP_TOL   # 10 guided steps amplify rounding
    w1, w2 = jnp.ones((4, 77)).at[:, 2].set(2.0), jnp.ones((4, 77)).at[:, 2].set(0.5)
    pair = run(compose(UNetEdits(attn={CROSS: AttnEdit(prob_scale=w1)}), UNetEdits(attn={CROSS: AttnEdit(prob_scale=w2)})))
    assert max_abs(pair, runs["plain"], "scale x2 then x0.5 = identity") <= LOOP_TOL
