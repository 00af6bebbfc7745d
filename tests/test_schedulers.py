"""Per-step parity of jaxdiff.schedulers with diffusers 0.42.1 schedulers (PyTorch, CPU, fp32).

Both sides are built from the same config dict and fed the same seeded numpy model outputs. At every step our
``step`` starts from diffusers' current sample (so each comparison measures one step, state included) and a
second, free-running copy of our loop is compared at the end. Stochastic steps get diffusers' own draws:
diffusers samples with a freshly seeded CPU ``torch.Generator`` per step and we pass the identical
``torch.randn`` tensor as ``noise=``. Integer timesteps must match exactly; float32 schedule arrays to 2 ulp.

Tolerance: max-abs <= 1e-5 x max(1, max|sample in|, max|sample out|) at every step (fp32). Measured: <= 4e-7
of that scale for every kind (float32 rounding only).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.schedulers import (KINDS, SchedulerConfig, add_noise, add_noise_at_step, get_velocity, init_state,
                                make_schedule, scale_model_input, step)
from tests.conftest import max_abs

# diffusers' own np.array(torch_tensor) calls warn under NumPy 2; not ours.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

TOL = 1e-5
# PyTorch's vectorised float32 sqrt on CPU is not always correctly rounded (~0.7% of inputs are 1 ulp off, the
# exact set depends on the CPU kernel), so sigmas = sqrt((1-a)/a) and the timesteps derived from them can differ
# from ours (correctly rounded NumPy) by one float32 ulp. alphas_cumprod and integer timesteps match exactly.
ULP = 2.5e-7
# Derived tables (sigmas, fractional timesteps, zero-terminal-SNR alpha-bar) go through float32 sqrt/log/pow,
# whose vectorised CPU kernels (PyTorch's and NumPy's SIMD paths) are not correctly rounded and differ between
# CPU models: measured up to 1.3e-6 relative (~10 ulp) for sigmas, 3.6e-7 absolute for rescaled alpha-bar on
# one machine while bit-exact on another. Per-step samples are still held to TOL.
TABLE_RTOL, TABLE_ATOL = 2e-6, 5e-7
SHAPE = (2, 4, 8, 8)
# Typical SD 1.x/2.x scheduler config; keys a class does not take are ignored (by diffusers and by us).
SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
          steps_offset=1, set_alpha_to_one=False, clip_sample=False, skip_prk_steps=True)
SDXL = dict(SD, _class_name="EulerDiscreteScheduler", _diffusers_version="0.19.0.dev0", interpolation_type="linear",
            prediction_type="epsilon", sample_max_value=1.0, timestep_spacing="leading", trained_betas=None,
            use_karras_sigmas=False)
STOCHASTIC = ("DDPMScheduler", "EulerAncestralDiscreteScheduler")


def _torch():
    import diffusers
    import torch
    return torch, diffusers


def _cfg(kind, **kw):
    return dict(SD, _class_name=kind, **kw)


def run_parity(cfg: dict, n: int, *, eta: float = 0.0, seed: int = 0, start: int = 0,
               what: str = "prev_sample") -> float:
    """Run diffusers and jaxdiff side by side over the ``n``-step schedule from step ``start`` (img2img-style,
    ``set_begin_index``); assert parity at every step; return the worst relative error."""
    torch, diffusers = _torch()
    kind = cfg["_class_name"]
    ref = getattr(diffusers, kind).from_config(cfg)
    ref.set_timesteps(n)
    if start and hasattr(ref, "set_begin_index"):
        ref.set_begin_index(start)
    sched = make_schedule(SchedulerConfig.from_diffusers(cfg), n, eta=eta)

    ref_ts = ref.timesteps.numpy()
    assert sched.timesteps.dtype == (jnp.float32 if ref_ts.dtype.kind == "f" else jnp.int32)
    if ref_ts.dtype.kind == "f":
        # Euler's fractional float32 timesteps: within 2 ulp (see ULP below); integer timesteps: exactly.
        np.testing.assert_allclose(np.asarray(sched.timesteps), ref_ts, rtol=TABLE_RTOL, atol=0)
        np.testing.assert_array_equal(np.asarray(sched.timesteps)[ref_ts == ref_ts.round()],
                                      ref_ts[ref_ts == ref_ts.round()])
    else:
        np.testing.assert_array_equal(np.asarray(sched.timesteps), ref_ts)
    if kind in ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler"):
        np.testing.assert_allclose(np.asarray(sched.sigmas), ref.sigmas.numpy(), rtol=TABLE_RTOL, atol=0)
    np.testing.assert_allclose(np.asarray(sched.alphas_cumprod), ref.alphas_cumprod.numpy(), rtol=ULP,
                               atol=TABLE_ATOL)
    init_sigma = float(ref.init_noise_sigma)
    assert float(sched.init_noise_sigma) == pytest.approx(init_sigma, rel=ULP)

    rng = np.random.default_rng(seed)
    x_np = (rng.standard_normal(SHAPE) * init_sigma).astype(np.float32)
    x_ref, x_free = torch.from_numpy(x_np), jnp.asarray(x_np)
    state = state_free = init_state(sched, x_free)
    worst, traj_scale = 0.0, 1.0
    for i, t in enumerate(ref.timesteps):
        if i < start:
            continue
        out = rng.standard_normal(SHAPE).astype(np.float32)
        # Per step, both sides start from the same sample (diffusers' trajectory), so each comparison measures
        # that step alone. Scale: the larger of input and output magnitude; e.g. the first Euler step from
        # sigma_max = 4096 (zero terminal SNR) cancels a ~1e4 sample down to ~1e2, and one float32 ulp of the
        # input is all the accuracy there is.
        x = jnp.asarray(x_ref.numpy())
        scale = max(1.0, float(x_ref.abs().max()))
        inp_ref = ref.scale_model_input(x_ref, t)
        assert max_abs(scale_model_input(sched, x, i), inp_ref.numpy(), "model_input") <= TOL * scale

        kw, noise = {}, None
        if kind in STOCHASTIC or eta > 0:
            noise_ref = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1000 + i))
            noise = noise_ref.numpy()
            if kind == "DDIMScheduler":
                kw = dict(eta=eta, variance_noise=noise_ref)
            else:
                kw = dict(generator=torch.Generator().manual_seed(1000 + i))
        x_ref = ref.step(torch.from_numpy(out), t, x_ref, **kw).prev_sample
        x, state = step(sched, state, i, jnp.asarray(out), x, noise=noise)
        scale = max(scale, float(x_ref.abs().max()))
        err = max_abs(x, x_ref.numpy(), what)
        assert err <= TOL * scale, f"{kind} step {i} (t={t}): max-abs {err:.3g}, scale {scale:.3g}"
        worst = max(worst, err / scale)
        # Our own free-running trajectory, checked at the end against the trajectory's largest magnitude.
        x_free, state_free = step(sched, state_free, i, jnp.asarray(out), x_free, noise=noise)
        traj_scale = max(traj_scale, scale)
    assert max_abs(x_free, x_ref.numpy(), "final_sample") <= TOL * traj_scale
    return worst


# -------------------------------------------------------------------------------- per-step parity
# Every kind x prediction type x step count, each with the class's default spacing (leading for DDIM/DDPM/PNDM,
# linspace for Euler/DPM) and the SD config above.
@pytest.mark.parametrize("n", [10, 25])
@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("kind", KINDS)
def test_parity(kind, pred, n):
    run_parity(_cfg(kind, prediction_type=pred), n)


# Spacings other than the class default, and options SD-family checkpoints use.
VARIANTS = [(kind, dict(timestep_spacing=sp)) for kind in KINDS for sp in ("leading", "trailing", "linspace")
            if sp != ("leading" if kind in ("DDIMScheduler", "DDPMScheduler", "PNDMScheduler") else "linspace")]
VARIANTS += [
    ("DDIMScheduler", dict(timestep_spacing="trailing", rescale_betas_zero_snr=True, prediction_type="v_prediction")),
    ("DDIMScheduler", dict(clip_sample=True, prediction_type="sample")),
    ("DDIMScheduler", dict(beta_schedule="squaredcos_cap_v2", set_alpha_to_one=True)),
    ("DDIMScheduler", dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02)),
    ("DDPMScheduler", dict(variance_type="fixed_large", clip_sample=True)),
    ("DDPMScheduler", dict(variance_type="fixed_small_log", prediction_type="v_prediction")),
    ("PNDMScheduler", dict(set_alpha_to_one=True, prediction_type="v_prediction", timestep_spacing="linspace")),
    ("EulerDiscreteScheduler", dict(use_karras_sigmas=True)),
    ("EulerDiscreteScheduler", dict(use_karras_sigmas=True, timestep_spacing="leading", final_sigmas_type="sigma_min")),
    ("EulerDiscreteScheduler", dict(timestep_spacing="trailing", rescale_betas_zero_snr=True,
                                    prediction_type="v_prediction")),
    ("EulerDiscreteScheduler", dict(prediction_type="sample")),
    ("EulerAncestralDiscreteScheduler", dict(prediction_type="v_prediction", timestep_spacing="leading")),
    ("DPMSolverMultistepScheduler", dict(use_karras_sigmas=True)),
    ("DPMSolverMultistepScheduler", dict(solver_type="heun", prediction_type="v_prediction")),
    ("DPMSolverMultistepScheduler", dict(solver_order=1)),
    ("DPMSolverMultistepScheduler", dict(final_sigmas_type="sigma_min", lower_order_final=False)),
    ("DPMSolverMultistepScheduler", dict(final_sigmas_type="sigma_min", euler_at_final=True,
                                         prediction_type="sample")),
]


@pytest.mark.parametrize("n", [10, 25])
@pytest.mark.parametrize("kind,extra", VARIANTS, ids=[f"{k}-{'-'.join(f'{a}={b}' for a, b in e.items())}"
                                                      for k, e in VARIANTS])
def test_parity_variants(kind, extra, n):
    run_parity(_cfg(kind, **extra), n)


@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_ddim_eta_with_explicit_noise(eta):
    run_parity(_cfg("DDIMScheduler"), 25, eta=eta)
    run_parity(_cfg("DDIMScheduler", prediction_type="v_prediction", timestep_spacing="trailing"), 10, eta=eta)


@pytest.mark.parametrize("kind", ["PNDMScheduler", "DPMSolverMultistepScheduler", "EulerAncestralDiscreteScheduler"])
def test_parity_starting_mid_schedule(kind):
    """img2img-style loops start at step i0 with a fresh state: the multistep order follows the steps taken
    (``state.counter``), not the index, as in diffusers (PNDM's repeated-timestep step happens at i0 + 1)."""
    run_parity(_cfg(kind, prediction_type="v_prediction"), 25, start=7)


def test_sdxl_euler_leading_fp32_and_bf16():
    """SDXL's EulerDiscrete config (leading spacing, steps_offset=1): parity, then the same loop on bfloat16
    samples/model outputs stays finite and close to fp32 (the scheduler maths is float32 inside)."""
    run_parity(SDXL, 30)
    sched = make_schedule(SchedulerConfig.from_diffusers(SDXL), 30)
    assert float(sched.timesteps[0]) == 958.0 and float(sched.timesteps[-1]) == 1.0
    rng = np.random.default_rng(1)
    x32 = jnp.asarray(rng.standard_normal(SHAPE), jnp.float32) * sched.init_noise_sigma
    outs = jnp.asarray(rng.standard_normal((len(sched), *SHAPE)), jnp.float32)
    x16 = x32.astype(jnp.bfloat16)
    s32 = s16 = init_state(sched, x32)
    for i in range(len(sched)):
        assert scale_model_input(sched, x16, i).dtype == jnp.bfloat16
        x32, s32 = step(sched, s32, i, outs[i], x32)
        x16, s16 = step(sched, s16, i, outs[i].astype(jnp.bfloat16), x16)
    assert x16.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(x16.astype(jnp.float32))))
    assert float(jnp.max(jnp.abs(x16.astype(jnp.float32) - x32))) < 0.1 * float(jnp.max(jnp.abs(x32)))


# -------------------------------------------------------------------------------- jit / scan / grad
@pytest.mark.parametrize("kind", KINDS)
def test_scan_equals_python_loop(kind):
    """The step index is traced inside jit + lax.scan; same result as the eager Python loop (DDIM with eta > 0 so
    its noise path is traced too)."""
    eta = 0.5 if kind == "DDIMScheduler" else 0.0
    sched = make_schedule(SchedulerConfig.from_diffusers(_cfg(kind, prediction_type="v_prediction")), 10, eta=eta)
    rng = np.random.default_rng(2)
    x0 = jnp.asarray(rng.standard_normal(SHAPE), jnp.float32) * sched.init_noise_sigma
    outs = jnp.asarray(rng.standard_normal((len(sched), *SHAPE)), jnp.float32)
    keys = jax.random.split(jax.random.key(0), len(sched))

    x, state = x0, init_state(sched, x0)
    for i in range(len(sched)):
        x, state = step(sched, state, i, outs[i], x, key=keys[i])

    @jax.jit
    def run(sched, x):
        def body(carry, inp):
            x, state = carry
            i, out, key = inp
            return step(sched, state, i, out, x, key=key), None
        (x, _), _ = jax.lax.scan(body, (x, init_state(sched, x)), (jnp.arange(len(sched)), outs, keys))
        return x

    np.testing.assert_allclose(np.asarray(run(sched, x0)), np.asarray(x), rtol=1e-5, atol=1e-5)


def test_gradients_through_loop_are_finite():
    """Differentiating a DPM++ loop (its last step lands on sigma = 0, lambda = inf) gives finite gradients."""
    sched = make_schedule(SchedulerConfig.from_diffusers(_cfg("DPMSolverMultistepScheduler")), 10)

    def loss(x):
        def body(carry, i):
            x, state = carry
            return step(sched, state, i, 0.1 * x, x), None
        (x, _), _ = jax.lax.scan(body, (x, init_state(sched, x)), jnp.arange(len(sched)))
        return jnp.sum(x ** 2)

    g = jax.grad(loss)(jnp.ones(SHAPE, jnp.float32))
    assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).max()) > 0


def test_stochastic_steps_need_key_or_noise():
    sched = make_schedule(SchedulerConfig.from_diffusers(_cfg("EulerAncestralDiscreteScheduler")), 5)
    x = jnp.ones(SHAPE)
    with pytest.raises(ValueError, match="key= or noise="):
        step(sched, init_state(sched, x), 0, x, x)
    a, _ = step(sched, init_state(sched, x), 0, x, x, key=jax.random.key(3))
    b, _ = step(sched, init_state(sched, x), 0, x, x, key=jax.random.key(3))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="eta"):
        make_schedule(sched.config, 5, eta=0.5)


# -------------------------------------------------------------------------------- add_noise / velocity
@pytest.mark.parametrize("kind", ["DDPMScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler"])
def test_add_noise_and_velocity(kind):
    torch, diffusers = _torch()
    cfg = _cfg(kind, timestep_spacing="leading")
    ref = getattr(diffusers, kind).from_config(cfg)
    ref.set_timesteps(20)
    sched = make_schedule(SchedulerConfig.from_diffusers(cfg), 20)
    rng = np.random.default_rng(4)
    x0, noise = (rng.standard_normal(SHAPE).astype(np.float32) for _ in range(2))
    t = ref.timesteps[[3, 11]]
    want = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), t).numpy()
    got = add_noise(sched, x0, noise, jnp.asarray(t.numpy()))
    assert max_abs(got, want, "add_noise") <= TOL * np.abs(want).max()
    # Starting mid-schedule (img2img): the level of step 5 as the sampler sees it.
    ref.set_begin_index(5) if hasattr(ref, "set_begin_index") else None
    want = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), ref.timesteps[5:6].repeat(2)).numpy()
    got = add_noise_at_step(sched, x0, noise, 5)
    assert max_abs(got, want, "add_noise_at_step") <= TOL * np.abs(want).max()
    if kind == "DDPMScheduler":
        tt = torch.tensor([10, 900])
        want = ref.get_velocity(torch.from_numpy(x0), torch.from_numpy(noise), tt).numpy()
        got = get_velocity(sched, x0, noise, jnp.asarray([10, 900]))
        assert max_abs(got, want, "get_velocity") <= TOL


# -------------------------------------------------------------------------------- config
def test_config_from_json_ignores_unknown_keys_and_uses_class_defaults(tmp_path):
    sd15 = dict(SD, _class_name="PNDMScheduler", _diffusers_version="0.6.0", trained_betas=None, unknown_key=3)
    path = tmp_path / "scheduler_config.json"
    path.write_text(json.dumps(sd15))
    c = SchedulerConfig.from_json(path)
    assert (c.kind, c.beta_schedule, c.steps_offset, c.timestep_spacing) == ("PNDMScheduler", "scaled_linear", 1,
                                                                            "leading")
    # Swapping the class (diffusers' DDIMScheduler.from_config(pndm.config)): DDIM's defaults fill the rest.
    d = SchedulerConfig.from_diffusers(sd15, kind="DDIMScheduler")
    assert d.kind == "DDIMScheduler" and d.clip_sample is False and d.set_alpha_to_one is False
    e = SchedulerConfig.from_diffusers(dict(SD, _class_name="EulerDiscreteScheduler", clip_sample=True))
    assert e.clip_sample is False and e.timestep_spacing == "linspace"   # Euler takes no clip_sample
    hash(c)  # static jit argument


@pytest.mark.parametrize("cfg,name", [
    (dict(SD, _class_name="LMSDiscreteScheduler"), "LMSDiscreteScheduler"),
    (dict(SD), "None"),
    (_cfg("DDIMScheduler", timestep_spacing="uniform"), "uniform"),
    (_cfg("DDIMScheduler", beta_schedule="sigmoid"), "sigmoid"),
    (_cfg("DDIMScheduler", thresholding=True), "thresholding"),
    (_cfg("DDPMScheduler", variance_type="learned_range"), "learned_range"),
    (_cfg("PNDMScheduler", skip_prk_steps=False), "skip_prk_steps"),
    (_cfg("PNDMScheduler", prediction_type="sample"), "sample"),
    (_cfg("EulerDiscreteScheduler", use_exponential_sigmas=True), "use_exponential_sigmas"),
    (_cfg("EulerDiscreteScheduler", interpolation_type="log_linear"), "log_linear"),
    (_cfg("DPMSolverMultistepScheduler", algorithm_type="sde-dpmsolver++"), "sde-dpmsolver++"),
    (_cfg("DPMSolverMultistepScheduler", solver_order=3), "solver_order"),
])
def test_config_rejects_unsupported(cfg, name):
    with pytest.raises(ValueError, match=name) as e:
        SchedulerConfig.from_diffusers(cfg)
    assert "supported" in str(e.value)


def test_too_many_steps():
    with pytest.raises(ValueError, match="num_inference_steps"):
        make_schedule(SchedulerConfig.from_diffusers(_cfg("DDIMScheduler")), 1001)
