"""h-space concept methods (SDisc, LWIM) on tiny random SD1/SD2/SDXL-shaped models: tables and their files,
the h-space edit (zero concept = no edit, conditional rows only), training (loss falls, kill + resume), LWIM's
suppression and Haar low-pass, no retracing for new values, and a concept sampling run per architecture."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.checkpoint import StableDiffusionModel, config_from_dict, param_template
from jaxdiff.hooks import UNetEdits
from jaxdiff.nn import random_maker
from jaxdiff.steer import lwim, sdisc
from jaxdiff.steer.concepts import (ConceptTable, ConceptTableError, check_fits, concept_edits, concept_steering,
                                    fair_assignment, h_shape_of, load_table, save_table)
from jaxdiff.unet import apply_unet
from jaxdiff.vocab import write_clip_vocab
from sample.demo import DEMO_CONFIGS, DEMO_SCHEDULER, DEMO_WORDS
from sample.pipeline import generate
from sample.spec import SampleSpec
from tests.test_sample_fixture import damp_unet_output

SD2_UNET = {**DEMO_CONFIGS["unet"], "attention_head_dim": [2, 4], "use_linear_projection": True}
SD2_SCHEDULER = {**DEMO_SCHEDULER, "_class_name": "DDIMScheduler", "prediction_type": "v_prediction"}
SDXL_TEXT = dict(model_type="clip_text_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=77, layer_norm_eps=1e-5)
SDXL = {"unet": {"_class_name": "UNet2DConditionModel", "sample_size": 16, "block_out_channels": [32, 64],
                 "layers_per_block": 1, "norm_num_groups": 8, "cross_attention_dim": 64, "attention_head_dim": [2, 4],
                 "use_linear_projection": True, "transformer_layers_per_block": [1, 2],
                 "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
                 "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "addition_embed_type": "text_time",
                 "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 24 + 6 * 8},
        "text_encoder": {**SDXL_TEXT, "architectures": ["CLIPTextModel"], "hidden_act": "quick_gelu",
                         "projection_dim": 32},
        "text_encoder_2": {**SDXL_TEXT, "architectures": ["CLIPTextModelWithProjection"], "hidden_act": "gelu",
                           "projection_dim": 24}}
CONFIG = {"concepts": {"red": "red", "blue": "blue"}, "templates": ["a {} circle", "a {} square on grass"],
          "images_per_concept": 4, "steps": 3, "batch": 8, "judge_filter": False}
METHOD = {"steps": 6, "batch": 4, "save_every": 3, "log_every": 3}


def tiny(kind: str, root) -> StableDiffusionModel:
    """A tiny random model of the given family (in memory, loaded like a real one)."""
    tok = write_clip_vocab(root / f"tok_{kind}", DEMO_WORDS)
    vocab = json.loads((tok / "vocab.json").read_text())
    dicts = json.loads(json.dumps(DEMO_CONFIGS))
    scheduler = dict(DEMO_SCHEDULER)
    if kind == "sd2":
        dicts["unet"] = json.loads(json.dumps(SD2_UNET))
        dicts["text_encoder"]["hidden_act"] = "gelu"
        scheduler = dict(SD2_SCHEDULER)
    if kind == "sdxl":
        dicts = {**json.loads(json.dumps(SDXL)), "vae": dicts["vae"]}
    for name in ("text_encoder", "text_encoder_2"):
        if name in dicts:
            dicts[name].update(vocab_size=len(vocab), bos_token_id=vocab["<|startoftext|>"],
                               eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"])
    configs = {n: config_from_dict(n, d) for n, d in dicts.items()}
    params = {n: param_template(n, c, random_maker(3, std=0.05)) for n, c in configs.items()}
    dirs = {"tokenizer": str(tok), **({"tokenizer_2": str(tok)} if kind == "sdxl" else {})}
    return damp_unet_output(StableDiffusionModel(configs, params, dicts, scheduler, dirs,
                                                 {"source_sha256": f"tiny-{kind}"}))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("concept_models")
    return {k: tiny(k, root) for k in ("sd1", "sd2", "sdxl")}


def h_shape(model) -> tuple:
    return h_shape_of(model.params["unet"], model.configs["unet"], (16, 16))


def table_of(model, kind="spatial", seed=0, method="sdisc", rows="cond", scale=1.0) -> ConceptTable:
    hs = h_shape(model)
    shape = hs if kind == "spatial" else hs[-1:]
    v = np.random.default_rng(seed).standard_normal((3, *shape)).astype(np.float32)
    return ConceptTable(vectors=v, names=("red", "green", "blue"), method=method, kind=kind, h_shape=hs,
                        groups={"colour": ("red", "green", "blue")}, scale=scale, rows=rows,
                        model_sha256=model.manifest["source_sha256"])


def unet_call(model, x, edits, b=2):
    c = model.configs["unet"]
    ctx = jnp.asarray(np.random.default_rng(1).standard_normal((x.shape[0], 77, c.cross_attention_dim)), jnp.float32)
    added = None
    if model.is_sdxl:
        added = {"text_embeds": jnp.ones((x.shape[0], 24)), "time_ids": jnp.ones((x.shape[0], 6)) * 32}
    return jax.jit(lambda x, e: apply_unet(model.params["unet"], x, jnp.float32(500), ctx, config=c, edits=e,
                                           added_cond=added)[0])(x, edits)


# ------------------------------------------------------------------------------------- tables and the edit
def test_file_round_trip_and_errors(models, tmp_path):
    model = models["sd1"]
    t = table_of(model, "channel", method="lwim", rows="both", scale=2.0)
    save_table(tmp_path / "t", t)
    back = load_table(tmp_path / "t.json")
    np.testing.assert_array_equal(back.vectors, t.vectors)
    assert (back.names, back.kind, back.rows, back.scale, back.h_shape) == (t.names, "channel", "both", 2.0, t.h_shape)
    with pytest.raises(ConceptTableError, match="no such file"):
        load_table(tmp_path / "missing")
    st = tmp_path / "t.safetensors"
    st.write_bytes(st.read_bytes()[:40])
    with pytest.raises(ConceptTableError, match="corrupt or truncated"):
        load_table(tmp_path / "t")
    with pytest.raises(ConceptTableError, match="unknown concept 'pink'; this lwim table has: red, green, blue"):
        t.weights({"pink": 1.0})
    with pytest.raises(ConceptTableError, match="unknown concept group 'gender'"):
        t.group("gender")


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
def test_h_shape_check_and_hash_warning(models, kind):
    model = models[kind]
    t = table_of(model)
    assert check_fits(t, h_shape(model), "tiny-" + kind) == []
    assert "trained on model" in check_fits(t, h_shape(model), "another")[0]
    with pytest.raises(ConceptTableError, match="h-space at this size"):
        check_fits(t, (h_shape(model)[0] * 2, h_shape(model)[1] * 2, h_shape(model)[2]))
    with pytest.raises(ConceptTableError, match="needs"):
        check_fits(table_of(model, "channel"), (4, 4, h_shape(model)[2] + 1))


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_zero_concept_is_no_edit_and_cond_rows_only(models, kind):
    model = models[kind]
    x = jnp.asarray(np.random.default_rng(2).standard_normal((4, 16, 16, 4)), jnp.float32)
    plain = np.asarray(unet_call(model, x, UNetEdits()))
    t = table_of(model)
    zero = concept_edits(t.vectors, np.zeros((2, 3)), 2.0, rows="both", guided=True)
    np.testing.assert_array_equal(np.asarray(unet_call(model, x, zero)), plain)      # bitwise
    w = np.array([[1.0, 0, 0], [0, 0.5, 1.0]], np.float32)
    cond = np.asarray(unet_call(model, x, concept_edits(t.vectors, w, 1.0, rows="cond", guided=True)))
    np.testing.assert_array_equal(cond[:2], plain[:2])                                  # uncond rows untouched
    assert np.abs(cond[2:] - plain[2:]).max() > 1e-4
    both = np.asarray(unet_call(model, x, concept_edits(t.vectors, w, 1.0, rows="both", guided=True)))
    assert np.abs(both[:2] - plain[:2]).max() > 1e-4
    np.testing.assert_allclose(both[2:], cond[2:], atol=1e-6)


def test_fair_assignment_is_balanced():
    names = fair_assignment(("a", "b", "c"), 12, seed=5)
    assert sorted(names) == sorted(["a", "b", "c"] * 4) and names[:3] == names[3:6]
    assert fair_assignment(("a", "b", "c"), 12, seed=5) == names


def test_haar_lowpass_is_block_mean():
    h = np.random.default_rng(0).standard_normal((2, 8, 6, 5)).astype(np.float32)
    direct = np.zeros_like(h)
    for i in range(0, 8, 2):
        for j in range(0, 6, 2):
            direct[:, i:i + 2, j:j + 2] = h[:, i:i + 2, j:j + 2].mean(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(np.asarray(lwim.haar_lowpass(jnp.asarray(h))), direct, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="even"):
        lwim.haar_lowpass(jnp.zeros((1, 3, 4, 2)))


def test_suppression_removes_the_token(models):
    """gamma_a = 0: the output no longer depends on the suppressed token's context embedding."""
    model = models["sd1"]
    c = model.configs["unet"]
    x = jnp.asarray(np.random.default_rng(4).standard_normal((2, 16, 16, 4)), jnp.float32)
    ctx = np.random.default_rng(5).standard_normal((2, 77, c.cross_attention_dim)).astype(np.float32)
    other = ctx.copy()
    other[:, 2] = np.random.default_rng(6).standard_normal(other[:, 2].shape) * 3
    mask = np.zeros((2, 77), bool)
    mask[:, 2] = True

    def run(ctx, gamma):
        edits = UNetEdits(attn=lwim.suppression_edits(c, jnp.asarray(mask), gamma))
        return np.asarray(apply_unet(model.params["unet"], x, jnp.float32(300), jnp.asarray(ctx), config=c,
                                     edits=edits)[0])
    np.testing.assert_allclose(run(ctx, 0.0), run(other, 0.0), rtol=0, atol=1e-6)
    assert np.abs(run(ctx, 0.5) - run(other, 0.5)).max() > 1e-4


# ------------------------------------------------------------------------------------- training
def train_cfg(method, **over):
    from train.concepts import ConceptConfig
    mc = getattr(ConceptConfig(), method).with_settings(**METHOD, **over)
    return dataclasses.replace(ConceptConfig(), **{k: tuple(v) if k == "templates" else v for k, v in CONFIG.items()},
                               **{method: mc})


@pytest.fixture(scope="module")
def trained(models, tmp_path_factory):
    """Data + a few steps of each method on the SD1-shaped model (the CLI's code path)."""
    from train.concepts import generate_data, train_table
    out = tmp_path_factory.mktemp("concept_train")
    model = models["sd1"]
    cfg = train_cfg("sdisc")
    generate_data(model, cfg, out / "data", log=lambda m: None)
    paths = {"sdisc": train_table(model, cfg, "sdisc", out, "sdisc", log=lambda m: None),
             "lwim": train_table(model, train_cfg("lwim"), "lwim", out, "lwim", log=lambda m: None)}
    return out, paths


def test_data_set_is_complete(trained):
    from train.concepts import load_data
    out, _ = trained
    d = load_data(out / "data")
    assert d["latents"].shape == (8, 16, 16, 4) and d["maps"].shape == (8, 16, 16)
    assert np.allclose(d["maps"].max(axis=(1, 2)), 1.0) and d["token_mask"].sum(1).tolist() == [1] * 8
    assert sorted(d["label"].tolist()) == [0] * 4 + [1] * 4


@pytest.mark.parametrize("method", ["sdisc", "lwim"])
def test_training_lowers_the_loss_and_writes_a_table(models, trained, method):
    from train.concepts import frozen_arrays, load_data, make_loss, training_batches, data_items
    out, paths = trained
    table = load_table(paths[method])
    model = models["sd1"]
    cfg = train_cfg(method)
    data = load_data(out / "data")
    items = [data_items(cfg)[int(i)] for i in data["index"]]
    prompts, neutrals = [i["prompt"] for i in items], [i["neutral"] for i in items]
    caps = sorted(set(prompts) | set(neutrals))
    frozen = frozen_arrays(model, caps, (32, 32))
    loss = jax.jit(make_loss(method, model, getattr(cfg, method)))
    init = getattr({"sdisc": sdisc, "lwim": lwim}[method], "init_vectors")(2, table.h_shape)
    batch = training_batches(data, caps, prompts, neutrals, 8, 0)(0)
    keys = jnp.stack([jax.random.PRNGKey(k) for k in range(3)])

    def mean_loss(v):   # the objective on a fixed batch and fixed noise draws
        return jnp.mean(jax.vmap(lambda k: loss(v, batch, k, frozen)[0])(keys))
    import optax
    opt = optax.adam(getattr(cfg, method).loop.lr)
    v, state = jnp.asarray(init), opt.init(jnp.asarray(init))
    before = float(mean_loss(v))
    step = jax.jit(lambda v, s: (lambda g: (lambda u, s2: (v + u, s2))(*opt.update(g, s)))(jax.grad(mean_loss)(v)))
    for _ in range(10):
        v, state = step(v, state)
    after = float(mean_loss(v))
    print(f"{method}: loss {before:.6f} -> {after:.6f} after 10 steps on a fixed batch")
    assert after < before
    assert table.training["steps"] == METHOD["steps"] and table.kind == {"sdisc": "spatial", "lwim": "channel"}[method]


def test_kill_and_resume_equals_uninterrupted(models, trained, tmp_path):
    import shutil
    from train.concepts import train_table
    out, paths = trained
    model = models["sd1"]
    shutil.copytree(out / "data", tmp_path / "data")
    assert train_table(model, train_cfg("sdisc"), "sdisc", tmp_path, "sdisc", stop_after=4, log=lambda m: None) is None
    resumed = train_table(model, train_cfg("sdisc"), "sdisc", tmp_path, "sdisc", log=lambda m: None)
    np.testing.assert_array_equal(load_table(resumed).vectors, load_table(paths["sdisc"]).vectors)


def test_lwim_ablation_switches(models):
    from train.concepts import make_loss
    model = models["sd1"]
    base = train_cfg("lwim").lwim
    for over in ({"gamma_a": None}, {"gamma_h": 1.0}, {"beta": 0.0}, {"target": "noise"}):
        cfg = make_loss("lwim", model, base.with_settings(**over)).keywords["cfg"]
        assert getattr(cfg, next(iter(over))) == next(iter(over.values()))
    with pytest.raises(ValueError, match="target"):
        lwim.LWIMTraining(target="teacher")


# ------------------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
def test_concept_sampling_runs_on_each_family(models, kind):
    """A fair concept run and a low-pass run; a zero weight row equals the plain run bit for bit."""
    from sample.concepts import concept_run
    model = models[kind]
    spec = SampleSpec(steps=4, guidance=5.0, scheduler="ddim")
    x = np.random.default_rng(8).standard_normal((2, 16, 16, 4)).astype(np.float32)
    prompts = ["a red circle", "a blue square"]
    plain = generate(model, prompts, spec=spec, init_latents=x).latents
    t = table_of(model, "spatial")
    zero, _ = concept_run(model, prompts, spec=spec, seed=0, table=t, weights=np.zeros((2, 3)), init_latents=x)
    np.testing.assert_array_equal(zero.latents, plain)
    lw = table_of(model, "channel", method="lwim", rows="both", scale=2.0)
    steered, ref = concept_run(model, prompts, spec=spec, seed=0, table=lw, weights=np.eye(3)[:2], lowpass=1.0,
                               init_latents=x)
    np.testing.assert_array_equal(ref.latents, plain)            # the reference run is the unsteered run
    assert np.abs(steered.latents - plain).max() > 1e-3
    assert steered.images.shape == (2, 32, 32, 3)


def test_new_concept_values_and_scales_do_not_retrace(models):
    from sample.pipeline import sample_program
    model = models["sd1"]
    spec = SampleSpec(steps=3, guidance=5.0, scheduler="ddim")
    prompts = ["a red circle", "a blue square"]

    def run(seed, scale, w):
        t = table_of(model, seed=seed)
        return generate(model, prompts, spec=spec, seed=0, edits=concept_steering(t, w, scale=scale)).latents
    a = run(0, 1.0, np.eye(3)[:2])
    size = sample_program._cache_size()
    b = run(1, 3.0, np.array([[0.5, 0.5, 0], [0, 0, 2.0]]))
    assert sample_program._cache_size() == size
    assert np.abs(a - b).max() > 1e-4


def test_lowpass_steering_rows_and_padding():
    ref = jnp.arange(3 * 4 * 2 * 2 * 1, dtype=jnp.float32).reshape(3, 4, 2, 2, 1)
    s = lwim.lowpass_steering(ref, 0.5, guided=True, row="cond", num_steps=5)
    p = s.edits.hspace.params
    assert p["ref"].shape == (5, 4, 2, 2, 1) and float(jnp.abs(p["ref"][:2]).max()) == 0.0
    np.testing.assert_array_equal(np.asarray(p["ref"][2:, 0]), np.asarray(ref[:, 2]))   # cond half -> every row
    e = s.edits_at(jnp.int32(4), jnp.float32(10), 4)
    h = jnp.zeros((4, 2, 2, 1))
    out = e.hspace.apply(h, jnp.float32(10))
    np.testing.assert_allclose(np.asarray(out[0]), 0.5 * np.asarray(lwim.haar_lowpass(ref[2, 2])))


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("method", ["sdisc", "lwim"])
def test_one_training_step_each_family(models, kind, method):
    """The loss of each method differentiates on SD1 (eps), SD2 (v-prediction, linear projections) and SDXL
    (two text encoders, text_time conditioning) shapes, and one Adam step on a fixed draw lowers it."""
    from train.concepts import frozen_arrays, make_loss
    model = models[kind]
    cfg = train_cfg(method)
    frozen = frozen_arrays(model, ["a red circle", "a circle", "a blue circle"], (32, 32))
    rng = np.random.default_rng(9)
    mask = np.zeros((4, 77), bool)
    mask[:, 2] = True
    batch = {"latents": jnp.asarray(rng.standard_normal((4, 16, 16, 4)), jnp.float32),
             "label": jnp.array([0, 1, 0, 1]), "neutral": jnp.array([1, 1, 1, 1]), "attribute": jnp.array([0, 2, 0, 2]),
             "token_mask": jnp.asarray(mask), "map": jnp.asarray(rng.uniform(size=(4, 16, 16)), jnp.float32)}
    loss = make_loss(method, model, getattr(cfg, method))
    mod = {"sdisc": sdisc, "lwim": lwim}[method]
    v = jnp.asarray(mod.init_vectors(2, h_shape(model)))
    key = jax.random.PRNGKey(0)
    f = jax.jit(lambda v: loss(v, batch, key, frozen)[0])
    value, grad = jax.value_and_grad(f)(v)
    assert np.isfinite(float(value)) and float(jnp.abs(grad).max()) > 0
    assert float(f(v - 1e-2 * jnp.sign(grad))) < float(value)
