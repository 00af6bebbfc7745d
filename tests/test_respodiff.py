"""RespoDiff on tiny random SD1/SD2/SDXL-shaped models: the anchor rollout is the sampler's trajectory, the two
optimizers each move their own module, training lowers both losses, kill + resume, one step and a sampling run
per architecture, and the CLI-level safety concept (training images with a negative prompt, merge, --fair +
safety)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.schedulers import make_schedule
from jaxdiff.steer import respodiff
from jaxdiff.steer.concepts import (ConceptTable, ConceptTableError, concept_deltas, concept_steering, load_table,
                                    merge_tables, save_table)
from sample.pipeline import generate
from sample.spec import SampleSpec, scheduler_config
from tests.test_concepts import h_shape, table_of, tiny, train_cfg

ROLL = 4   # anchor schedule length in these tests (50 in the paper)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("respodiff_models")
    return {k: tiny(k, root) for k in ("sd1", "sd2", "sdxl")}


def rcfg(**over):
    return train_cfg("respodiff", rollout_steps=ROLL, **over)


def setup(model, cfg):
    """frozen arrays, batch_fn and the Update of ``cfg`` on ``model`` (the CLI's code path)."""
    from train.concepts import RespoDiffUpdate, frozen_arrays, respodiff_batches, respodiff_captions
    from sample.spec import latent_shape
    rows = respodiff_captions(cfg)
    caps = sorted({r[k] for r in rows for k in ("neutral", "pos", "base")} | {""})
    frozen = frozen_arrays(model, caps, (32, 32))
    frozen["schedule"] = make_schedule(scheduler_config(model, "ddim"), ROLL)
    mc = cfg.respodiff
    t = respodiff.RespoDiffTraining(lam=mc.lam, ram_lr=mc.loop.lr, sam_lr=mc.sam_lr)
    update = RespoDiffUpdate(model.configs["unet"], t, latent_shape(model, 32, 32))
    return frozen, respodiff_batches(rows, caps, len(cfg.concepts), mc.loop.batch, 0), update, caps


def test_anchor_rollout_is_the_samplers_trajectory(models):
    """The rollout inside the training step = the sampler's DDIM run of the neutral prompt, guidance 3, with the
    same modules on the conditional rows: one step to float32 rounding (<= 1e-6), the whole 4-step trajectory to
    1e-5 (the two compiled programs round differently and this random model amplifies it: without any edit the
    gap is the same), and 0 steps returns the noise."""
    from train.concepts import frozen_arrays
    model = models["sd1"]
    t = table_of(model)
    w = np.eye(3)[[0, 2]]
    z = np.random.default_rng(0).standard_normal((2, 16, 16, 4)).astype(np.float32)
    neutral = "a circle"
    frozen = frozen_arrays(model, ["", neutral], (32, 32))
    deltas = concept_deltas(t.vectors, w, t.scale)
    for n, tol in ((1, 1e-6), (ROLL, 1e-5)):
        frozen["schedule"] = make_schedule(scheduler_config(model, "ddim"), n)
        spec = SampleSpec(steps=n, guidance=3.0, scheduler="ddim")
        want = np.asarray(generate(model, [neutral] * 2, spec=spec, init_latents=z,
                                   edits=concept_steering(t, w)).latents)
        roll = jax.jit(lambda k: respodiff.anchor_rollout(deltas, z, k, frozen, unet=model.configs["unet"],
                                                          neutral=jnp.array([1, 1]), uncond=jnp.array([0, 0]),
                                                          guidance=3.0))
        np.testing.assert_allclose(np.asarray(roll(n)), want, rtol=0, atol=tol * np.abs(want).max())
        np.testing.assert_array_equal(np.asarray(roll(0)), z)


def test_sem_loss_zero_and_optimizers_touch_their_own_module(models):
    model = models["sd1"]
    cfg = rcfg()
    frozen, batch_fn, update, _ = setup(model, cfg)
    batch = jax.tree.map(jnp.asarray, batch_fn(0))
    z = jnp.asarray(np.random.default_rng(1).standard_normal((4, 16, 16, 4)), jnp.float32)
    zero = respodiff.init_modules(2, h_shape(model))
    v = respodiff.sem_loss(zero["ram"], zero["sam"], z, jnp.int32(500), z, batch, frozen,
                           unet=model.configs["unet"], lam=0.0)
    assert float(v) == 0.0
    key = jax.random.PRNGKey(3)
    start = {"ram": jnp.asarray(zero["ram"]) + 0.1, "sam": jnp.asarray(zero["sam"])}

    def one(u):
        return jax.jit(u.apply)(start, u.init(start), batch, key, frozen)
    base = one(update)
    slow_sam = one(dataclasses.replace(update, cfg=dataclasses.replace(update.cfg, sam_lr=1e-6)))
    np.testing.assert_array_equal(np.asarray(base[0]["ram"]), np.asarray(slow_sam[0]["ram"]))   # RAM: own optimizer
    assert float(jnp.abs(base[0]["sam"] - slow_sam[0]["sam"]).max()) > 0
    ram_only = one(dataclasses.replace(update, cfg=dataclasses.replace(update.cfg, lam=0.0)))
    np.testing.assert_array_equal(np.asarray(ram_only[0]["sam"]), np.asarray(start["sam"]))    # lambda 0: SAM idle
    assert float(jnp.abs(ram_only[0]["ram"] - start["ram"]).max()) > 0


def test_training_lowers_both_losses(models):
    """On a fixed draw (batch, anchor depth, noise): L_resp falls as RAM trains, and the trained SAM gives a lower
    L_sem than SAM = 0 at the same RAM (L_sem itself starts at 0 and grows as RAM moves away: SAM's job is to
    pull it back)."""
    model = models["sd1"]
    frozen, batch_fn, update, _ = setup(model, rcfg(lr=1e-2, sam_lr=1e-2))
    step = jax.jit(update.apply)
    m = jax.tree.map(jnp.asarray, respodiff.init_modules(2, h_shape(model)))
    opt = update.init(m)
    fixed = jax.tree.map(jnp.asarray, batch_fn(0)), jax.random.PRNGKey(7)
    history = []
    for _ in range(6):
        m, opt, _, metrics = step(m, opt, *fixed, frozen)
        history.append(float(metrics["l_resp"]))
    last = step(m, opt, *fixed, frozen)[3]
    no_sam = step({"ram": m["ram"], "sam": jnp.zeros_like(m["sam"])}, opt, *fixed, frozen)[3]
    print(f"L_resp {history[0]:.3e} -> {float(last['l_resp']):.3e}; L_sem with SAM {float(last['l_sem']):.3e} vs "
          f"SAM = 0 {float(no_sam['l_sem']):.3e}")
    assert float(last["l_resp"]) < 0.8 * history[0]
    assert float(last["l_sem"]) < float(no_sam["l_sem"])


def test_kill_and_resume_equals_uninterrupted(models, tmp_path):
    from train.concepts import train_table
    model = models["sd1"]
    cfg = rcfg()
    full = train_table(model, cfg, "respodiff", tmp_path / "a", "respodiff", log=lambda m: None)
    assert train_table(model, cfg, "respodiff", tmp_path / "b", "respodiff", stop_after=4, log=lambda m: None) is None
    resumed = train_table(model, cfg, "respodiff", tmp_path / "b", "respodiff", log=lambda m: None)
    a, b = load_table(full), load_table(resumed)
    np.testing.assert_array_equal(a.vectors, b.vectors)
    assert a.method == "respodiff" and a.kind == "spatial" and a.rows == "cond"
    assert a.training["lam"] == cfg.respodiff.lam and np.isfinite(a.training["final_l_resp_mean"])


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
def test_one_step_and_a_sampling_run_each_family(models, kind):
    """Modules sized from the model's real h shape (SDXL included), one training step, and the table samples."""
    model = models[kind]
    cfg = rcfg()
    frozen, batch_fn, update, _ = setup(model, cfg)
    m = respodiff.init_modules(2, h_shape(model))
    assert m["ram"].shape == (2, *h_shape(model))
    new, _, loss, metrics = jax.jit(update.apply)(m, update.init(m), jax.tree.map(jnp.asarray, batch_fn(0)),
                                                   jax.random.PRNGKey(0), frozen)
    assert np.isfinite(float(loss)) and float(jnp.abs(new["ram"]).max()) > 0
    table = ConceptTable(vectors=respodiff.table_vectors(new), names=("red", "blue"), method="respodiff",
                         kind="spatial", h_shape=h_shape(model), groups={"colour": ("red", "blue")})
    spec = SampleSpec(steps=3, guidance=5.0, scheduler="ddim")
    res = generate(model, ["a circle", "a square"], spec=spec, edits=concept_steering(table, np.eye(2)))
    assert res.images.shape == (2, 32, 32, 3)


# ------------------------------------------------------------------------------------- safety concepts
def test_safety_data_uses_the_negative_prompt(models, tmp_path):
    """SDisc/LWIM safety data: neutral prompts generated with the unsafe word as negative prompt (= the
    sampler's negative-prompt run of the same noise); the concept's token mask is empty."""
    from sample.shapesworld_eval import caption_noise
    from train.concepts import generate_data, load_data, read_config
    model = models["sd1"]
    cfg = dataclasses.replace(read_config(None, {"group": "safety"}), templates=("a {} circle",),
                              images_per_concept=2, steps=3, batch=2, judge_filter=False)
    assert cfg.negatives == {"no-red": "red"} and cfg.lwim.target == "noise" and cfg.respodiff.target_guidance == 12
    folder = cfg.data_folder(tmp_path)
    assert folder.name == "data_safety" and cfg.table_name("sdisc") == "sdisc_safety"
    generate_data(model, cfg, folder, log=lambda m: None)
    d = load_data(folder)
    assert d["token_mask"].sum() == 0
    spec = SampleSpec(steps=3, guidance=cfg.guidance)
    want = generate(model, ["a circle"] * 2, spec=spec, negative_prompts=["red"] * 2,
                    init_latents=caption_noise(model, spec, 0, [0, 1])).latents
    np.testing.assert_allclose(d["latents"], np.asarray(want), atol=1e-6)


def test_safety_target_and_merge(models, tmp_path):
    from train.concepts import read_config, respodiff_captions
    cfg = read_config(None, {"group": "safety"})
    rows = respodiff_captions(cfg)
    assert {(r["pos"], r["base"], r["w"]) for r in rows[:1]} == {("a shape", "red", 12.0)}
    model = models["sd1"]
    colour = table_of(model)
    safety = dataclasses.replace(table_of(model, seed=4), names=("no-red", "no-x", "no-y"),
                                 groups={"safety": ("no-red",)}, training={"steps": 3})
    merged = merge_tables(colour, safety)
    assert merged.names == ("red", "green", "blue", "no-red", "no-x", "no-y")
    assert set(merged.groups) == {"colour", "safety"} and set(merged.training["groups"]) == {"colour", "safety"}
    save_table(tmp_path / "m", merged)
    np.testing.assert_array_equal(load_table(tmp_path / "m").vectors, merged.vectors)
    with pytest.raises(ConceptTableError, match="twice"):
        merge_tables(colour, colour)
    with pytest.raises(ConceptTableError, match="method"):
        merge_tables(colour, dataclasses.replace(safety, method="lwim"))


def test_fair_with_safety_concept(models):
    from sample.concepts import ConceptRequest
    model = models["sd1"]
    t = dataclasses.replace(table_of(model), names=("red", "blue", "no-red"),
                            groups={"colour": ("red", "blue"), "safety": ("no-red",)})
    w, per = ConceptRequest(concepts=(("no-red", 1.0),), fair="colour").per_image(t, 4, 0)
    assert w.shape == (4, 3) and (w[:, 2] == 1).all() and (w[:, :2].sum(1) == 1).all()
    assert all(p["no-red"] == 1.0 for p in per)
    with pytest.raises(ConceptTableError, match="only safety concepts"):
        ConceptRequest(concepts=(("red", 1.0),), fair="colour").per_image(t, 4, 0)


@pytest.mark.parametrize("args, message", [
    (["--method", "sdisc", "--lam", "0.5"], "--lam is a RespoDiff setting"),
    (["--method", "respodiff", "--gamma-a", "0.5"], "are LWIM switches"),
    (["--method", "respodiff", "--data-only"], "RespoDiff has no data stage"),
    (["--method", "sdisc", "--group", "gender"], "--group 'gender' has no preset (colour, safety)"),
])
def test_training_cli_bad_flags(tmp_path, capsys, args, message):
    from train.concepts import main
    assert main([*args, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
