"""``python -m sample --steer-relations``: a steered run records its settings and per-image refinements and final
classifier probability, composes with concept steering, reproduces from run.json; every bad input is a
one-line error with exit status 2; the classifier shipped with the embedded model works from a fresh install."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from jaxdiff.steer.relation_classifier import ClassifierConfig, init_params, save_classifier
from jaxdiff.steer.relation_maps import map_layout
from sample.cli import load_model, main

PROMPT = "a red circle to the left of a blue square on grass"


@pytest.fixture(scope="module")
def classifiers(tmp_path_factory):
    """A random classifier for the embedded model, one for another model, one for another site layout."""
    model = load_model(None, "float32")
    layout = map_layout(model.params["unet"], model.configs["unet"], (16, 16))
    cfg = ClassifierConfig(channels=layout.channels, d_model=16, extractor_ff=16, head_ff=16, mlp_hidden=(16, 8))
    params = init_params(cfg, jax.random.PRNGKey(0))
    root = tmp_path_factory.mktemp("clf")
    sha = model.manifest.get("source_sha256")
    save_classifier(root / "ok", params, cfg, layout, {"model_sha256": sha, "eta": 100.0})
    save_classifier(root / "other_model", params, cfg, layout, {"model_sha256": "f" * 64})
    moved = layout.to_json()
    moved[0], moved[1] = moved[1], moved[0]
    save_classifier(root / "other_layout", params, cfg, moved, {"model_sha256": sha})
    return {k: str(root / k) for k in ("ok", "other_model", "other_layout")}


def run_cli(capsys, *args) -> tuple[int, str]:
    code = main(["--quiet", "--no-compile-cache", "--steps", "4", "--tto-steps", "2", *args])
    return code, capsys.readouterr().err


def test_steered_run_records_refinements_and_reproduces(classifiers, tmp_path, capsys):
    out = tmp_path / "run"
    code, err = run_cli(capsys, "--prompt", PROMPT, "--steer-relations", classifiers["ok"], "--num-images", "2",
                        "--out", str(out))
    assert code == 0, err
    side = json.loads((out / "run.json").read_text())
    rec = side["relation_steering"]
    assert rec["loss"] == "learned" and rec["tto_steps"] == 2 and rec["eta"] == 100.0
    assert rec["triplets"] == [[["circle", "left of", "square"]]] * 2
    for im in side["images"]:
        r = im["relations"]
        assert r["refinements"] == sum(r["refinements_per_step"]) and 0 < r["refinements"] <= 30
        assert 0.0 < r["final_prob"] < 1.0
    code, err = run_cli(capsys, "--from-json", str(out / "run.json"), "--out", str(tmp_path / "again"))
    assert code == 0, err
    again = json.loads((tmp_path / "again" / "run.json").read_text())
    assert [im["relations"] for im in again["images"]] == [im["relations"] for im in side["images"]]


def test_composes_with_concepts_and_explicit_relations(classifiers, tmp_path, capsys):
    out = tmp_path / "both"
    code, err = run_cli(capsys, "--prompt", "a circle to the left of a square on grass", "--steer-relations",
                        classifiers["ok"], "--relation-loss", "centroid", "--relation", "square,right of,circle",
                        "--concepts", "sdisc", "--fair", "colour", "--num-images", "2", "--out", str(out))
    assert code == 0, err
    side = json.loads((out / "run.json").read_text())
    assert all("concepts" in im and "relations" in im for im in side["images"])
    assert side["relation_steering"]["triplets"][0] == [["square", "right of", "circle"]]
    assert side["images"][0]["relations"]["final_prob"] is None          # the centroid loss has no probability


@pytest.mark.parametrize("args, message", [
    (["--prompt", "a red circle on grass", "--steer-relations", "K"], "prompt has no spatial relation"),
    (["--prompt", PROMPT, "--steer-relations", "K", "--relation", "dog,left of,circle"], "'dog'"),
    (["--prompt", PROMPT, "--steer-relations", "K", "--relation", "circle,near,square"], "unknown relation"),
    (["--prompt", PROMPT, "--steer-relations", "K", "--relation", "circle,is,red"], "cannot be steered"),
    (["--prompt", PROMPT, "--steer-relations", "other_model"], "trained on another model"),
    (["--prompt", PROMPT, "--steer-relations", "other_layout"], "another site layout"),
    (["--prompt", PROMPT, "--steer-relations", "nosuch"], "nosuch"),
    (["--prompt", PROMPT, "--tto-lr", "3"], "need --steer-relations"),
    (["--prompt", PROMPT, "--steer-relations", "K", "--tto-steps", "9"], "--tto-steps 9: must be in 0..4"),
])
def test_bad_relation_inputs(classifiers, tmp_path, capsys, args, message):
    args = [classifiers.get(a, a) if a in classifiers else (classifiers["ok"] if a == "K" else a) for a in args]
    code, err = run_cli(capsys, *args, "--out", str(tmp_path / "x"))
    assert code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1, err


def test_shipped_classifier_works_with_the_embedded_model(tmp_path, capsys):
    out = tmp_path / "shipped"
    code, err = run_cli(capsys, "--prompt", PROMPT, "--steer-relations", "--out", str(out))
    assert code == 0, err
    side = json.loads((out / "run.json").read_text())
    assert side["relation_steering"]["classifier"].endswith("relations/shapesworld")
    assert np.isfinite(side["images"][0]["relations"]["final_prob"])
