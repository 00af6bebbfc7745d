"""``python -m sample`` concept flags: a fair run writes per-image concepts and reproduces from run.json; every
bad input is a one-line error with exit status 2; the shipped tables work with the embedded model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxdiff.steer.concepts import ConceptTable, h_shape_of, save_table
from sample.cli import main
from tests.test_sample_fixture import tiny_sd  # noqa: F401 - fixture


@pytest.fixture(scope="module")
def table(tiny_sd, tmp_path_factory):
    model, folder = tiny_sd
    hs = h_shape_of(model.params["unet"], model.configs["unet"], (16, 16))
    v = np.random.default_rng(0).standard_normal((3, *hs)).astype(np.float32)
    t = ConceptTable(vectors=v, names=("red", "green", "blue"), method="sdisc", kind="spatial", h_shape=hs,
                     groups={"colour": ("red", "green", "blue")}, scale=1.0, rows="cond", model_sha256="x" * 64)
    path = tmp_path_factory.mktemp("cli_table") / "colours"
    save_table(path, t)
    return folder, str(path)


def run_cli(capsys, *args) -> tuple[int, str]:
    code = main(["--quiet", "--no-compile-cache", "--steps", "2", *args])
    err = capsys.readouterr().err
    return code, err


def test_fair_run_records_and_reproduces(table, tmp_path, capsys):
    folder, path = table
    out = tmp_path / "fair"
    code, err = run_cli(capsys, "--model", folder, "--prompt", "a circle on the grass", "--concepts", path,
                        "--fair", "colour", "--num-images", "3", "--lowpass", "--out", str(out))
    assert code == 0, err
    assert "trained on model xxxxxxxxxxxx" in err            # another model's hash warns
    side = json.loads((out / "run.json").read_text())
    got = sorted(next(iter(im["concepts"])) for im in side["images"])
    assert got == ["blue", "green", "red"] and side["settings"]["lowpass"] == 1.0
    assert (out / "reference_grid.png").exists()
    code, _ = run_cli(capsys, "--from-json", str(out / "run.json"), "--out", str(tmp_path / "again"))
    assert code == 0
    a, b = (np.asarray(__import__("PIL.Image").Image.open(p / "grid.png")) for p in (out, tmp_path / "again"))
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("args, message", [
    (["--concept", "pink"], "unknown concept 'pink'; this sdisc table has: red, green, blue"),
    (["--fair", "gender"], "unknown concept group 'gender'; this sdisc table has: colour"),
    (["--fair", "colour", "--concept", "red"], "--fair draws one concept per image: only safety concepts"),
    (["--concept", "red=strong"], "--concept 'red=strong': scale 'strong' is not a number"),
    (["--concept", "red=inf"], "scale must be finite"),
    (["--height", "64", "--width", "64", "--concept", "red"], "h-space at this size is (16, 16, 64)"),
    ([], "choose --concept NAME[=SCALE] (repeatable) or --fair GROUP"),
])
def test_bad_concept_inputs(table, tmp_path, capsys, args, message):
    folder, path = table
    code, err = run_cli(capsys, "--model", folder, "--prompt", "a circle", "--concepts", path, *args,
                        "--out", str(tmp_path / "x"))
    assert code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1


def test_bad_table_files(table, tmp_path, capsys):
    folder, path = table
    code, err = run_cli(capsys, "--model", folder, "--prompt", "a circle", "--concepts", "nosuch", "--fair", "colour")
    assert code == 2 and "no concept table 'nosuch'" in err and "shipped tables are" in err
    broken = tmp_path / "broken"
    (tmp_path / "broken.json").write_text(open(path + ".json").read())
    (tmp_path / "broken.safetensors").write_bytes(open(path + ".safetensors", "rb").read()[:100])
    code, err = run_cli(capsys, "--model", folder, "--prompt", "a circle", "--concepts", str(broken), "--fair", "colour")
    assert code == 2 and "corrupt or truncated" in err
    code, err = run_cli(capsys, "--model", folder, "--prompt", "a circle", "--fair", "colour")
    assert code == 2 and "need a concept table" in err


def test_sizes_follow_the_vae_factor_and_unknown_words_warn(tmp_path, capsys):
    """The embedded model's VAE downsamples by 4: 36 px is allowed, 34 px is refused; a word outside its
    caption vocabulary is named in a warning."""
    code, err = run_cli(capsys, "--prompt", "a red hexagon", "--height", "36", "--width", "36", "--steps", "1",
                        "--out", str(tmp_path / "s"))
    assert code == 0, err
    assert "'hexagon' not in this model's vocabulary" in err
    code, err = run_cli(capsys, "--prompt", "a red circle", "--height", "34", "--out", str(tmp_path / "t"))
    assert code == 2 and "multiple of 4" in err


@pytest.mark.parametrize("name", ["sdisc", "lwim", "respodiff"])
def test_shipped_tables_work_with_the_embedded_model(name, tmp_path, capsys):
    """Every shipped table: fair colour + the always-on safety concept no-red, from a fresh install."""
    code, err = run_cli(capsys, "--prompt", "a shape on grass", "--concepts", name, "--fair", "colour",
                        "--concept", "no-red", "--num-images", "6", "--out", str(tmp_path / name))
    assert code == 0, err
    side = json.loads((tmp_path / name / "run.json").read_text())
    fair = [[c for c in im["concepts"] if c != "no-red"] for im in side["images"]]
    assert sorted(c for cs in fair for c in cs) == sorted(["red", "orange", "yellow", "green", "blue", "purple"])
    assert all(im["concepts"]["no-red"] == 1.0 and len(im["concepts"]) == 2 for im in side["images"])
    assert side["concept_table"]["method"] == name and "warning" not in err
