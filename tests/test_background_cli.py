"""``python -m sample --keep-background``: on the embedded model with a reference PNG from ``python -m
sample.background``, a run writes mask overlays and records its settings, reproduces from run.json, composes with
concepts and Learn-to-Steer in one call; every bad input is a one-line error with exit status 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from sample.background import main as reference_main
from sample.cli import main

PROMPT = "a red circle on grass"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    path = tmp_path_factory.mktemp("reference") / "ref.png"
    assert reference_main(["--reference", "0", "--out", str(path)]) == 0
    return str(path)


def run_cli(capsys, *args) -> tuple[int, str]:
    code = main(["--quiet", "--no-compile-cache", "--steps", "4", "--strength", "1.0", *args])
    return code, capsys.readouterr().err


def test_keep_background_writes_masks_and_reproduces(reference, tmp_path, capsys):
    out = tmp_path / "run"
    code, err = run_cli(capsys, "--prompt", PROMPT, "--init-image", reference, "--keep-background",
                        "--num-images", "2", "--out", str(out))
    assert code == 0, err
    side = json.loads((out / "run.json").read_text())
    rec = side["background_keeping"]
    assert rec["subjects"] == [["circle"], ["circle"]] and rec["replace_steps"] == [1, 2] and rec["run_steps"] == 4
    assert rec["sites"] == ["up_blocks_2/attentions_2/transformer_blocks_0/attn2"] and rec["variant"] == "abs"
    assert side["masks"] == ["000_mask.png", "001_mask.png"]
    for im in side["images"]:
        frac = im["background"]["subject_fraction"]
        assert len(frac) == 2 and all(0 < f < 1 for f in frac)
        overlay = np.asarray(Image.open(out / im["background"]["mask"]))
        assert overlay.shape[1] > overlay.shape[0]                       # one panel per replacement step
    code, err = run_cli(capsys, "--from-json", str(out / "run.json"), "--out", str(tmp_path / "again"))
    assert code == 0, err
    assert np.array_equal(np.asarray(Image.open(out / "000.png")), np.asarray(Image.open(tmp_path / "again" /
                                                                                          "000.png")))


def test_all_methods_in_one_call(reference, tmp_path, capsys):
    out = tmp_path / "all"
    code, err = run_cli(capsys, "--prompt", "a circle to the left of a square on grass", "--init-image", reference,
                        "--keep-background", "--subject", "circle", "--subject", "square", "--steer-relations",
                        "--tto-steps", "1", "--tto-iters", "2", "--concepts", "sdisc", "--fair", "colour",
                        "--num-images", "2", "--replace-steps", "2", "--out", str(out))
    assert code == 0, err
    side = json.loads((out / "run.json").read_text())
    for im in side["images"]:
        assert "concepts" in im and "relations" in im and len(im["background"]["subject_fraction"]) == 1
    assert side["background_keeping"]["subjects"][0] == ["circle", "square"]


@pytest.mark.parametrize("args, message", [
    (["--prompt", PROMPT, "--keep-background"], "--keep-background needs the reference image"),
    (["--prompt", PROMPT, "--subject", "circle"], "--subject need --keep-background"),
    (["--prompt", PROMPT, "REF", "--keep-background", "--subject", "dog"], "'dog' does not occur"),
    (["--prompt", PROMPT, "REF", "--keep-background", "--replace-steps", "4"], "must be in 1..3"),
    (["--prompt", PROMPT, "REF", "--keep-background", "--replace-steps", "a,b"], "comma-separated"),
    (["--prompt", PROMPT, "REF", "--keep-background", "--saliency-site",
      "up_blocks_2/attentions_2/transformer_blocks_0/attn1"], "self-attention site has no text tokens"),
    (["--prompt", PROMPT, "REF", "--keep-background", "--saliency-site", "up_blocks_0/attn2"],
     "no such attention site"),
    (["--prompt", "a red on grass", "REF", "--keep-background"], "no subject for"),
])
def test_bad_inputs_are_one_line_errors(reference, tmp_path, capsys, args, message):
    args = [a for a in args if a != "REF"] + (["--init-image", reference] if "REF" in args else [])
    code, err = run_cli(capsys, *args, "--out", str(tmp_path / "x"))
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
