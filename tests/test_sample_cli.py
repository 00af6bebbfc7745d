"""``python -m sample``: files written, exact reproduction from the JSON sidecar, heat maps, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from sample.cli import main
from sample.demo import random_demo_model
from weights_convert.export import export_diffusers_folder

PROMPT = "a red circle above a blue square on grass"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli_model")
    export_diffusers_folder(random_demo_model(d, seed=3), d / "diffusers")
    return d / "diffusers"


def _run(args, capsys=None):
    rc = main([*args, "--quiet", "--no-compile-cache"])
    err = capsys.readouterr().err if capsys else ""
    return rc, err


def test_writes_pngs_grid_sidecar_and_reproduces(model_dir, tmp_path):
    out = tmp_path / "a"
    rc, _ = _run(["--model", str(model_dir), "--prompt", PROMPT, "--prompt", "a shape on sand", "--num-images", "2",
                  "--steps", "3", "--seed", "7", "--scheduler", "ddim", "--out", str(out)])
    assert rc == 0
    side = json.loads((out / "run.json").read_text())
    assert [i["file"] for i in side["images"]] == ["000.png", "001.png", "002.png", "003.png"]
    assert [i["prompt"] for i in side["images"]] == [PROMPT, PROMPT, "a shape on sand", "a shape on sand"]
    assert side["settings"]["seed"] == 7 and side["settings"]["steps"] == 3 and side["model_sha256"]
    imgs = [np.asarray(Image.open(out / i["file"])) for i in side["images"]]
    assert imgs[0].shape == (32, 32, 3) and not np.array_equal(imgs[0], imgs[1])   # per-image noise differs
    assert Image.open(out / "grid.png").size[0] > 2 * 32
    assert np.load(out / "init_latents.npy").shape == (4, 4, 16, 16)                # diffusers NCHW layout
    assert side["heatmaps"] == []


def test_heatmap_overlay_files(model_dir, tmp_path):
    out = tmp_path / "h"
    assert _run(["--model", str(model_dir), "--prompt", PROMPT, "--steps", "2", "--heatmap", "red",
                 "--out", str(out)])[0] == 0
    side = json.loads((out / "run.json").read_text())
    assert side["heatmaps"] == ["000_heatmap_red.png"]
    assert np.asarray(Image.open(out / "000_heatmap_red.png")).shape == (32, 32, 3)


def test_rerun_from_json_is_pixel_identical(model_dir, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert _run(["--model", str(model_dir), "--prompt", PROMPT, "--steps", "3", "--seed", "11", "--guidance", "5",
                 "--negative-prompt", "a green triangle", "--out", str(a)])[0] == 0
    assert _run(["--from-json", str(a / "run.json"), "--out", str(b)])[0] == 0
    assert np.array_equal(np.asarray(Image.open(a / "000.png")), np.asarray(Image.open(b / "000.png")))


def test_init_latents_and_img2img(model_dir, tmp_path):
    z = np.random.default_rng(0).standard_normal((1, 4, 16, 16)).astype(np.float32)
    np.save(tmp_path / "z.npy", z)
    a, b = tmp_path / "a", tmp_path / "b"
    assert _run(["--model", str(model_dir), "--prompt", PROMPT, "--steps", "2", "--init-latents",
                 str(tmp_path / "z.npy"), "--out", str(a)])[0] == 0
    assert np.array_equal(np.load(a / "init_latents.npy"), z)
    assert _run(["--model", str(model_dir), "--prompt", PROMPT, "--steps", "4", "--init-image", str(a / "000.png"),
                 "--strength", "0.5", "--out", str(b)])[0] == 0
    assert (b / "000.png").exists()


@pytest.mark.parametrize("args, message", [
    (["--scheduler", "heun"], "heun"),
    (["--height", "37"], "multiple of 2 (this model's VAE downsamples by 2)"),
    (["--model", "/nonexistent/model"], "no such file"),
    (["--init-image", "NOTANIMAGE"], "not a readable image"),
    (["--init-image", "/nonexistent.png"], "no such file"),
    (["--heatmap", "zebra"], "zebra"),
    (["--steps", "0"], "--steps"),
    (["--strength", "1.5", "--init-image", "IMG"], "strength"),
    (["--init-latents", "LAT"], "--init-latents"),
])
def test_bad_arguments_exit_2_with_message(model_dir, tmp_path, capsys, args, message):
    bad = tmp_path / "bad.png"
    bad.write_text("this is not a PNG")
    img = tmp_path / "ok.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(img)
    lat = tmp_path / "lat.npy"
    np.save(lat, np.zeros((2, 4, 16, 16), np.float32))        # wrong batch
    subs = {"NOTANIMAGE": str(bad), "IMG": str(img), "LAT": str(lat)}
    args = [subs.get(a, a) for a in args]
    base = ["--model", str(model_dir)] if "--model" not in args else []
    rc, err = _run([*base, "--prompt", PROMPT, "--steps", "2", "--out", str(tmp_path / "o"), *args], capsys)
    assert rc == 2 and err.startswith("error: ") and message in err, err
    assert "Traceback" not in err


def test_no_prompt_is_an_error(model_dir, capsys):
    rc, err = _run(["--model", str(model_dir)], capsys)
    assert rc == 2 and "no prompt" in err
