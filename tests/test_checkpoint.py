"""Converted model folders: CLI conversion, strict Orbax restore, atomic overwrite, manifest, and the demo."""

import json
import shutil

import jax
import numpy as np
import pytest

from jaxdiff.checkpoint import ModelLoadError, load_model, save_model
from sample.demo import random_demo_model
from weights_convert.__main__ import main as convert_main
from weights_convert.convert import ConversionError
from weights_convert.export import export_diffusers_folder
from weights_convert.pipeline import load_any


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    d = tmp_path_factory.mktemp("demo")
    model = random_demo_model(d, seed=3)
    export_diffusers_folder(model, d / "diffusers")
    return d, model


def assert_same_params(a, b):
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (_, x), (_, y) in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_cli_convert_and_load(demo, capsys):
    d, model = demo
    assert convert_main([str(d / "diffusers"), str(d / "converted")]) == 0
    assert "wrote" in capsys.readouterr().out
    loaded = load_model(d / "converted")
    for name in ("unet", "vae", "text_encoder"):
        assert_same_params(loaded.params[name], model.params[name])
        assert loaded.configs[name] == model.configs[name]
    m = json.loads((d / "converted" / "manifest.json").read_text())
    assert m["format_version"] == 1 and len(m["source_sha256"]) == 64 and m["source_kind"] == "diffusers"
    assert m["components"]["unet"]["num_params"] > 0
    assert (d / "converted" / "tokenizer" / "vocab.json").is_file()
    assert loaded.scheduler_config["_class_name"] == "PNDMScheduler"
    # a dtype is applied by Orbax while restoring: equal to the float32 load rounded, leaf for leaf
    import jax
    import jax.numpy as jnp
    bf16 = load_model(d / "converted", dtype=jnp.bfloat16)
    for a, b in zip(jax.tree.leaves(bf16.params), jax.tree.leaves(loaded.params)):
        assert a.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b.astype(jnp.bfloat16)))


def test_on_the_fly_equals_converted(demo):
    d, model = demo
    fly = load_any(d / "diffusers")
    assert_same_params(fly.params["unet"], model.params["unet"])


def test_overwrite_is_atomic(demo, tmp_path):
    d, model = demo
    dst = tmp_path / "model"
    save_model(dst, model)
    broken = type(model)(model.configs, model.params, model.config_dicts, model.scheduler_config,
                         {"tokenizer": str(tmp_path / "does-not-exist")})
    with pytest.raises(FileNotFoundError):
        save_model(dst, broken)
    assert_same_params(load_model(dst).params["vae"], model.params["vae"])  # the old model survived intact
    assert [p.name for p in tmp_path.iterdir()] == ["model"]                # no temporary left behind


def test_manifest_version_checked(demo, tmp_path):
    d, model = demo
    dst = save_model(tmp_path / "m", model)
    m = json.loads((dst / "manifest.json").read_text())
    m["format_version"] = 99
    (dst / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ModelLoadError, match="format_version 99"):
        load_model(dst)


def test_params_not_matching_manifest(demo, tmp_path):
    d, model = demo
    dst = save_model(tmp_path / "m", model)
    m = json.loads((dst / "manifest.json").read_text())
    m["components"]["unet"]["config"]["block_out_channels"] = [32, 32]
    (dst / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ModelLoadError, match="does not match"):
        load_model(dst)


def test_wrong_component_is_named(demo, tmp_path):
    """A VAE's weights in the unet/ folder: one error listing missing and unused names."""
    d, _ = demo
    bad = tmp_path / "bad"
    shutil.copytree(d / "diffusers", bad)
    shutil.copy(bad / "vae" / "diffusion_pytorch_model.safetensors", bad / "unet" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ConversionError) as e:
        load_any(bad)
    msg = str(e.value)
    assert "as unet" in msg and "missing parameters" in msg and "unused checkpoint keys" in msg
    assert "down_blocks_0/" in msg and "decoder.conv_in.weight" in msg


def test_demo_writes_png_and_json(tmp_path):
    from PIL import Image

    from sample.demo import main
    assert main(["--out", str(tmp_path / "out")]) == 0
    img = Image.open(tmp_path / "out" / "heatmap.png")
    assert img.size == (128, 128) and img.mode == "RGB"
    summary = json.loads((tmp_path / "out" / "heatmap.json").read_text())
    assert summary["h_shape"] == [1, 8, 8, 64] and summary["word"] == "red" and len(summary["captured_sites"]) == 4
