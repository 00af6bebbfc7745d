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
from sample.steering import Steering, as_steering
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


# ------------------------------------------------------------------------------------- the latent hook
def _shift_by_h(latents, i, captures, params):
    """Adds a per-step multiple of this step's captured h (the fake model's h has the latents' shape)."""
    return latents + params["delta"][i] * captures["h"]


def _gradient_step(latents, i, captures, params):
    """Learn-to-Steer-shaped: one gradient step on a loss of the model's prediction at the next timestep."""
    def loss(z):
        out, _ = fake_model(z, params["timesteps"][i], NO_EDITS, StepCaptureSpec().unet)
        return jnp.sum((out - params["target"]) ** 2)
    return latents - params["lr"] * jax.grad(loss)(latents)


@pytest.mark.parametrize("hook", [_shift_by_h, _gradient_step])
def test_hook_loop_level(hook):
    schedule = make_schedule(DDIM_CONFIG, 6)
    x0 = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 3))
    params = {"delta": jnp.linspace(0.1, 0.6, 6), "timesteps": schedule.timesteps, "lr": jnp.float32(0.05),
              "target": jnp.full((2, 4, 4, 3), 0.2)}
    capture = StepCaptureSpec.of([SITE], hspace=True, reduce="none")
    steering = Steering(hook=hook, hook_params=params)
    got, _ = jax.jit(lambda x: denoise(fake_model, schedule, x, guided=True, guidance=jnp.float32(2.0),
                                       key=jax.random.PRNGKey(0), steering=steering, capture=capture))(x0)
    x, state = x0, init_state(schedule, x0)
    for i in range(6):   # reference: the same loop in Python
        t = schedule.timesteps[i]
        out, aux = fake_model(jnp.concatenate([x, x]), t, NO_EDITS, capture.unet)
        u, c = jnp.split(out, 2)
        x, state = step(schedule, state, i, u + 2.0 * (c - u), x)
        x = hook(x, i, {"attn": {}, "h": aux["h"][2:]}, params)
    np.testing.assert_allclose(np.asarray(got), np.asarray(x), rtol=1e-5, atol=1e-6)
    plain, _ = jax.jit(lambda x: denoise(fake_model, schedule, x, guided=True, guidance=jnp.float32(2.0),
                                         key=jax.random.PRNGKey(0)))(x0)
    assert np.abs(np.asarray(got) - np.asarray(plain)).max() > 1e-3
