"""Learn-to-Steer (jaxdiff.steer.relation_maps, jaxdiff.steer.learn_to_steer, train.relation_data) on tiny random
SD1/SD2/SDXL-shaped models: token positions (BOS, multi-token words, first occurrence), the map layout's channel
order and renormalisation, PyTorch's bilinear resize, the test-time optimisation (its gradient against finite
differences, eta 0 = no steering bit for bit, per-row stopping, relation cycling, no retrace) and dual-inversion
data (labels, shards, resume)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.hooks import NO_EDITS, AttnEdit, HSpaceEdit, UNetEdits
from jaxdiff.steer import learn_to_steer as l2s
from jaxdiff.steer.relation_classifier import ClassifierConfig, init_params
from jaxdiff.steer.relation_maps import (MapLayout, bilinear_matrix, map_layout, object_maps, token_weights,
                                         word_span)
from jaxdiff.steering import StepContext, cond_half_edits
from jaxdiff.tokenizer import load_tokenizer
from sample.pipeline import cast_and_encode, generate, make_plan
from sample.spec import SampleSpec, schedule_for
from sample.text import prompt_ids, sdxl_time_ids
from tests.test_concepts import tiny

SPEC = SampleSpec(steps=4, guidance=7.5, scheduler="ddim")
PROMPTS = ["a red circle left of a blue square", "a green triangle above a red circle"]
WORDS = [("circle", "square"), ("triangle", "circle")]
TARGETS = [[0], [2]]        # left of, above


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("l2s_models")
    return {k: tiny(k, root) for k in ("sd1", "sd2", "sdxl")}


def tok_of(model):
    return load_tokenizer(model.tokenizer_dirs["tokenizer"])


def small_classifier(layout: MapLayout, seed: int = 0):
    cfg = ClassifierConfig(channels=layout.channels, grid=layout.grid, d_model=16, extractor_ff=16, head_ff=16,
                           mlp_hidden=(16, 8), dropout=0.0)
    return cfg, init_params(cfg, jax.random.PRNGKey(seed))


def setup(model, prompts=PROMPTS, words=WORDS, targets=TARGETS, *, eta=7.5, tto_steps=2, loss="learned", **kw):
    layout = map_layout(model.params["unet"], model.configs["unet"], (16, 16), grid=8)
    cfg, cparams = small_classifier(layout)
    tok = tok_of(model)
    w = np.stack([token_weights(tok, p, ws)[None] for p, ws in zip(prompts, words)])
    n = len(schedule_for(model, SPEC))
    p = l2s.relation_params(w, np.asarray(targets), np.ones(len(prompts)), num_steps=n, tto_steps=tto_steps, eta=eta,
                            tau=np.full(n, 5, np.int32), classifier=cparams, **kw)
    return l2s.RelationTTO(layout, cfg if loss == "learned" else None, loss), p, layout


def context(model, prompts):
    """A StepContext of step 0 without guidance (the conditional denoiser), as the sampler builds it."""
    sched = schedule_for(model, SPEC)
    plan = make_plan(model)
    time_ids = sdxl_time_ids(128, 128) if model.is_sdxl else None
    params, cond = cast_and_encode(dict(model.params), prompt_ids(model, prompts, guided=False, time_ids=time_ids),
                                   plan)
    from sample.model_fns import unet_denoiser
    den = unet_denoiser(params["unet"], plan.unet, cond)
    return StepContext(i=jnp.int32(0), t=sched.timesteps[0], schedule=sched, key=jax.random.PRNGKey(0), cond=cond,
                       model=den, cond_model=den, edits=NO_EDITS, guided=False, guidance=jnp.float32(1.0))


# ------------------------------------------------------------------------------------------------ tokens
def test_word_span_counts_bos_and_averages_multi_token_words(models):
    tok = tok_of(models["sd1"])
    ids = tok("a red circle")["input_ids"]
    assert word_span(tok, "a red circle", "circle") == [3]          # BOS 0, a 1, red 2, circle 3
    assert ids[3] == tok("circle", add_special_tokens=False)["input_ids"][0]
    prompt = "a teddy bear left of a circle"
    span = word_span(tok, prompt, "teddy bear")
    sub = tok("teddy bear", add_special_tokens=False)["input_ids"]
    assert len(sub) > 1 and span[0] == 2 and tok(prompt)["input_ids"][span[0]:span[-1] + 1] == sub
    w = token_weights(tok, prompt, ("teddy bear", "circle"))
    np.testing.assert_allclose(w[0, span], 1.0 / len(span))
    assert w[0].sum() == pytest.approx(1.0) and np.count_nonzero(w[0]) == len(span)


def test_second_object_is_searched_after_the_first(models):
    tok = tok_of(models["sd1"])
    w = token_weights(tok, "a red circle above a blue circle", ("circle", "circle"))
    assert np.flatnonzero(w[0]).tolist() == [3] and np.flatnonzero(w[1]).tolist() == [7]
    assert word_span(tok, "a circle above a square", "circle", after=5) == [2]     # none later: first anywhere
    with pytest.raises(ValueError, match="does not occur"):
        token_weights(tok, "a red circle", ("circle", "square"))


# ------------------------------------------------------------------------------------------------ maps
def test_bilinear_matrix_matches_pytorch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    for n_in, n_out in ((4, 16), (8, 16), (16, 16), (64, 16), (6, 4)):
        x = rng.random((n_in, n_in)).astype(np.float32)
        ref = torch.nn.functional.interpolate(torch.from_numpy(x)[None, None], size=(n_out, n_out), mode="bilinear",
                                              align_corners=False)[0, 0].numpy()
        m = bilinear_matrix(n_in, n_out)
        np.testing.assert_allclose(m @ x @ m.T, ref, atol=1e-6)


def test_layout_order_and_renormalised_maps(models):
    for kind, model in models.items():
        layout = map_layout(model.params["unet"], model.configs["unet"], (16, 16), grid=8)
        res = [s.height * s.width for s in layout.sites]
        assert res == sorted(res), kind
        for r in set(res):
            parts = [s.site.part for s in layout.sites if s.height * s.width == r]
            assert parts == sorted(parts, key={"down": 0, "mid": 1, "up": 2}.get), kind
        assert layout.channels == sum(s.heads for s in layout.sites)
    # Each site's maps land in its own channel block, renormalised: site k gets constant probabilities.
    layout = map_layout(models["sd1"].params["unet"], models["sd1"].configs["unet"], (16, 16), grid=8)
    rng = np.random.default_rng(1)
    probs = {}
    for ms in layout.sites:
        p = rng.random((2, ms.heads, ms.height * ms.width, 77)).astype(np.float32)
        probs[ms.site] = jnp.asarray(p / p.sum(-1, keepdims=True))
    w = np.zeros((2, 2, 77), np.float32)
    w[:, 0, 3], w[:, 1, 5:7] = 1.0, 0.5
    maps = np.asarray(object_maps(probs, layout, w))
    assert maps.shape == (2, 2, layout.channels, 8, 8)
    np.testing.assert_allclose(maps.sum((-2, -1)), 1.0, rtol=1e-5)
    c = 0
    for ms in layout.sites:
        raw = np.asarray(probs[ms.site])[1, :, :, 5:7].mean(-1).reshape(ms.heads, ms.height, ms.width)
        m = bilinear_matrix(ms.height, 8)
        ref = np.einsum("yi,hij,xj->hyx", m, raw, bilinear_matrix(ms.width, 8))
        np.testing.assert_allclose(maps[1, 1, c:c + ms.heads], ref / ref.sum((-2, -1), keepdims=True), rtol=1e-5)
        c += ms.heads


def test_cond_half_edits_keeps_the_conditional_rows():
    rows = np.array([True, False, True, True])
    e = UNetEdits(hspace=HSpaceEdit(lambda h, t, p: h + p, jnp.arange(4.0), rows=rows, per_row_params=True),
                  attn={"s": AttnEdit(prob_scale=jnp.ones((4, 77)), token_keep=jnp.ones((1, 77)), rows=rows)})
    half = cond_half_edits(e, 4)
    assert half.hspace.rows.tolist() == [True, True] and half.hspace.params.tolist() == [2.0, 3.0]
    a = half.attn["s"]
    assert a.prob_scale.shape == (2, 77) and a.token_keep.shape == (1, 77) and a.rows.tolist() == [True, True]


# ------------------------------------------------------------------------------------------------ losses
def test_centroid_hinge_on_hand_made_maps():
    maps = np.zeros((1, 2, 3, 8, 8), np.float32)
    maps[0, 0, :, 3, 1] = 1.0        # A on the left
    maps[0, 1, :, 3, 6] = 1.0        # B on the right, same row
    losses = [float(l2s.centroid_hinge(jnp.asarray(maps), jnp.asarray([k]))[0]) for k in range(5)]
    assert losses[0] == 0.0                                    # left of: satisfied
    assert losses[1] == pytest.approx(0.1 + 5 / 8)             # right of: margin + offset
    assert losses[2] == pytest.approx(0.1) and losses[3] == pytest.approx(0.1)   # same height
    assert losses[4] == 0.0                                    # "is": no geometry


def test_classifier_steps_rounds_up_to_trained_indices():
    t50 = np.arange(981, 0, -20)
    tau = l2s.classifier_steps(t50, t50, (5, 10, 15, 20, 25, 49))
    assert tau[:6].tolist() == [5] * 6 and tau[6:11].tolist() == [10] * 5 and tau[26:].tolist() == [49] * 24
    t30 = np.arange(967, 0, -33)[:30]
    assert l2s.classifier_steps(t30, t50, (5, 10, 15, 20, 25, 49))[:4].tolist() == [5, 5, 5, 10]


@pytest.mark.parametrize("loss", ["learned", "centroid"])
def test_tto_gradient_matches_finite_differences(models, loss):
    model = models["sd1"]
    hook, p, _ = setup(model, loss=loss)
    ctx = context(model, PROMPTS)
    z = jax.random.normal(jax.random.PRNGKey(3), (2, 16, 16, 4))
    f = jax.jit(lambda z: hook.row_losses(z, ctx, p, jnp.int32(0))[0])
    g = jax.grad(f)(z)
    assert np.isfinite(np.asarray(g)).all() and float(jnp.abs(g).max()) > 0
    # float32 losses: step along unit directions that carry the gradient (random ones give changes below the
    # loss's rounding), the gradient's own and one half-way to a random direction.
    gn = g / jnp.linalg.norm(g)
    r = jax.random.normal(jax.random.PRNGKey(10), z.shape)
    for v in (gn, (gn + r / jnp.linalg.norm(r)) / np.sqrt(2)):
        eps = 0.5      # a unit direction: 0.01 per latent element
        fd = (f(z + eps * v) - f(z - eps * v)) / (2 * eps)
        assert float(fd) == pytest.approx(float(jnp.vdot(g, v)), rel=2e-2)


def test_relations_cycle_with_the_iteration(models):
    model = models["sd1"]
    tok = tok_of(model)
    prompt = "a red circle left of a blue square above a green triangle"
    w = np.stack([token_weights(tok, prompt, ("circle", "square")), token_weights(tok, prompt, ("square", "triangle"))])
    hook, _, layout = setup(model)
    cfg, cparams = small_classifier(layout)
    n = len(schedule_for(model, SPEC))
    both = l2s.relation_params(w[None], np.asarray([[0, 2]]), np.asarray([2]), num_steps=n, tto_steps=2, eta=1.0,
                               tau=np.full(n, 5), classifier=cparams)
    ctx = context(model, [prompt])
    z = jax.random.normal(jax.random.PRNGKey(0), (1, 16, 16, 4))
    for k, r in ((0, 0), (1, 1), (2, 0)):
        one = l2s.relation_params(w[None, r:r + 1], np.asarray([[(0, 2)[r]]]), np.asarray([1]), num_steps=n,
                                  tto_steps=2, eta=1.0, tau=np.full(n, 5), classifier=cparams)
        a = hook.row_losses(z, ctx, both, jnp.int32(k))[1][0]
        b = hook.row_losses(z, ctx, one, jnp.int32(0))[1][0]
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ------------------------------------------------------------------------------------------------ sampling
def test_eta_zero_equals_unsteered_sampling_bitwise(models):
    model = models["sd1"]
    hook, p, _ = setup(model, eta=0.0)
    plain = generate(model, PROMPTS, spec=SPEC, seed=0)
    steered = generate(model, PROMPTS, spec=SPEC, seed=0, edits=l2s.relation_steering(hook, p))
    np.testing.assert_array_equal(steered.latents, plain.latents)
    np.testing.assert_array_equal(steered.images, plain.images)
    used = np.asarray(steered.aux["hooks"]["relations"]["refinements"])
    assert used[:2].sum() > 0 and used[2:].sum() == 0          # the loop ran (updates of size 0) on steps 0, 1


def test_rows_stop_independently(models):
    model = models["sd1"]
    hook, p, _ = setup(model, tto_steps=1)
    ctx = context(model, PROMPTS)
    sched = schedule_for(model, SPEC)
    noise = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 4)))
    ce = np.asarray(hook.row_losses(jnp.asarray(noise) * sched.init_noise_sigma, ctx, p, jnp.int32(0))[1][0])
    low = int(np.argmin(ce))
    thresholds = (float(ce.mean()),)                           # between the two rows' step-0 losses
    hook, p, _ = setup(model, tto_steps=1, thresholds=thresholds, eta=50.0)
    steered = generate(model, PROMPTS, spec=SPEC, init_latents=noise, edits=l2s.relation_steering(hook, p))
    plain = generate(model, PROMPTS, spec=SPEC, init_latents=noise)
    used = np.asarray(steered.aux["hooks"]["relations"]["refinements"])[0]
    assert used[low] == 0 and used[1 - low] > 0
    np.testing.assert_array_equal(steered.latents[low], plain.latents[low])   # already below: untouched
    assert np.abs(steered.latents[1 - low] - plain.latents[1 - low]).max() > 1e-4
    # The steered row does what it does alone (batch 1): rows never see each other.
    k = 1 - low
    hook1, p1, _ = setup(model, [PROMPTS[k]], [WORDS[k]], [TARGETS[k]], tto_steps=1, thresholds=thresholds, eta=50.0)
    alone = generate(model, [PROMPTS[k]], spec=SPEC, init_latents=noise[k:k + 1],
                     edits=l2s.relation_steering(hook1, p1))
    assert int(np.asarray(alone.aux["hooks"]["relations"]["refinements"])[0, 0]) == used[k]
    np.testing.assert_allclose(alone.latents[0], steered.latents[k], atol=1e-4)


def test_new_relations_and_settings_do_not_retrace(models):
    model = models["sd1"]
    hook, p, _ = setup(model)
    generate(model, PROMPTS, spec=SPEC, seed=0, edits=l2s.relation_steering(hook, p))
    hook2, p2, _ = setup(model, PROMPTS[::-1], WORDS[::-1], [[3], [1]], eta=2.0, tto_steps=1)
    again = generate(model, PROMPTS[::-1], spec=SPEC, seed=1, edits=l2s.relation_steering(hook2, p2))
    assert hook2 == hook and again.timings["compiled"] == 0.0


@pytest.mark.parametrize("kind, loss", [("sd1", "centroid"), ("sd2", "learned"), ("sdxl", "learned")])
def test_steered_sample_on_each_family(models, kind, loss):
    """(SD1 with the learned loss: the sampling tests above.)"""
    model = models[kind]
    hook, p, _ = setup(model, loss=loss)
    res = generate(model, PROMPTS, spec=SPEC, seed=0, edits=l2s.relation_steering(hook, p))
    stats = res.aux["hooks"]["relations"]
    assert np.isfinite(res.latents).all() and res.images.shape[0] == 2
    assert np.asarray(stats["refinements"]).shape == (len(schedule_for(model, SPEC)), 2)
    assert np.isfinite(np.asarray(stats["loss"])[:2]).all()


# ------------------------------------------------------------------------------------------------ data
def test_dual_inversion_rows_carry_the_true_label():
    from jaxdiff.shapesworld import make_eval_scene, parse_caption
    from jaxdiff.steer.relation_prompts import RELATION_CLASSES
    from train.relation_data import shapesworld_rows
    for i in range(1, 5):
        rows = shapesworld_rows(i, seed=0)
        truth = make_eval_scene(i, split="test").spec.relation
        assert [r.prompt_kind for r in rows] == [0, 1]
        assert all(RELATION_CLASSES[r.label] == truth for r in rows)
        assert parse_caption(rows[0].prompt).relation == truth and parse_caption(rows[1].prompt).relation != truth
        assert rows[0].image is rows[1].image and rows[0].words == rows[1].words
    single = shapesworld_rows(0, seed=0)
    assert len(single) == 1 and RELATION_CLASSES[single[0].label] == "is"
    assert single[0].words[1] in single[0].prompt.split()     # (shape noun, colour word)
    assert shapesworld_rows(5, seed=0) == []                     # 3 objects: no relation


def test_folder_data_shards_and_resume(models, tmp_path, monkeypatch, capsys):
    from PIL import Image

    import sample.cli
    from train import relation_data

    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    lines = []
    for k, (rel, obj) in enumerate([("left of", "square"), ("on top of", "square"), ("is", "red")]):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / f"{k}.png")
        lines.append(json.dumps({"image": f"{k}.png", "subject": "circle", "relation": rel, "object": obj}))
    (folder / "triplets.jsonl").write_text("\n".join(lines) + "\n")
    monkeypatch.setattr(sample.cli, "load_model", lambda path, dtype: models["sd1"])
    out = tmp_path / "data"
    argv = ["--out", str(out), "--model", "tiny", "--images", str(folder), "--scenes-per-shard", "2",
            "--psnr-min", "0"]
    assert relation_data.main(argv) == 0
    shards = sorted(out.glob("shard_*.npz"))
    assert len(shards) == 2
    meta = json.loads((out / "meta.json").read_text())
    z = np.load(shards[0])
    k = len(meta["step_indices"])
    assert z["maps"].shape == (4 * k, 2, meta["channels"], 16, 16)           # 2 triplets x 2 prompts x k steps
    assert z["label"].tolist() == [0] * 2 * k + [2] * 2 * k                  # true labels for both prompts
    assert z["prompt_kind"].tolist() == ([0] * k + [1] * k) * 2
    np.testing.assert_allclose(z["maps"].astype(np.float32).sum((-2, -1)), 1.0, atol=2e-3)
    assert np.load(shards[1])["label"].tolist() == [4] * k                   # "is": the true prompt only
    before = shards[0].stat().st_mtime_ns
    assert relation_data.main(argv) == 0                                     # resume: nothing redone
    assert shards[0].stat().st_mtime_ns == before
    assert relation_data.main(argv[:-1] + ["19.5"]) == 2                     # other settings: refused
    assert "other settings" in capsys.readouterr().err
    (folder / "triplets.jsonl").write_text('{"image": "0.png", "subject": "circle"}\n')
    assert relation_data.main(["--out", str(tmp_path / "d2"), "--model", "tiny", "--images", str(folder)]) == 2
    assert "bad triplet" in capsys.readouterr().err
