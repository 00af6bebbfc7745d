"""``python -m sample.eval_concepts`` end to end on the tiny SD1 model and a tiny random CLIP folder: files, CSVs,
summary, resume (nothing regenerated), and a one-line error with exit status 2 for every bad input."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from jaxdiff.steer.concepts import ConceptTable, h_shape_of, save_table
from sample.eval_concepts import main
from tests.test_clip_metrics import write_tiny_clip_folder
from tests.test_sample_fixture import tiny_sd  # noqa: F401 - fixture

CLIP_WORDS = ["a", "photo", "of", "woman", "man", "nurse", "construction", "worker", "person"]


@pytest.fixture(scope="module")
def setup(tiny_sd, tmp_path_factory):
    """(SD folder, CLIP folder, gender table, prompt file, text-only CLIP folder, table of another model)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    model, folder = tiny_sd
    root = tmp_path_factory.mktemp("eval_concepts")
    clip = write_tiny_clip_folder(root / "clip", CLIP_WORDS)
    hs = h_shape_of(model.params["unet"], model.configs["unet"], (16, 16))
    v = np.random.default_rng(0).standard_normal((2, *hs)).astype(np.float32)
    training = {"data_settings": {"concepts": {"female": "woman", "male": "man"}, "templates": ["a photo of a {}"]}}
    table = ConceptTable(vectors=v, names=("female", "male"), method="sdisc", kind="spatial", h_shape=hs,
                         groups={"gender": ("female", "male")}, training=training)
    save_table(root / "gender", table)
    bare = ConceptTable(vectors=v, names=("female", "male"), method="sdisc", kind="spatial", h_shape=hs,
                        groups={"gender": ("female", "male")})
    save_table(root / "bare", bare)
    other = ConceptTable(vectors=np.zeros((2, 4, 4, 32), np.float32), names=("female", "male"), method="sdisc",
                         kind="spatial", h_shape=(4, 4, 32), groups={"gender": ("female", "male")})
    save_table(root / "other", other)
    prompts = root / "prompts.json"
    prompts.write_text(json.dumps({"format": "jaxdiff-prompts/1", "subjects": ["Nurse", "Construction worker"],
                                   "template_sets": {"0": ["Photo of {}"]}, "lowercase_subject": True}))
    text_only = root / "text_only"
    CLIPTextModel(CLIPTextConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2)).save_pretrained(text_only, safe_serialization=True)
    return {"model": folder, "clip": str(clip), "table": str(root / "gender"), "bare": str(root / "bare"),
            "other": str(root / "other"), "prompts": str(prompts), "text_only": str(text_only)}


def run_cli(capsys, setup, out, *extra, table=True, quiet=True):
    args = ["--model", setup["model"], "--clip", setup["clip"], "--prompts", setup["prompts"],
            "--images-per-prompt", "2", "--steps", "2", "--batch", "2", "--scheduler", "ddim",
            "--no-compile-cache", "--out", str(out)] + (["--quiet"] if quiet else [])
    if table:
        args += ["--concepts", setup["table"], "--fair", "gender"]
    code = main(args + list(extra))
    return code, capsys.readouterr().err


def test_end_to_end_and_resume(setup, tmp_path, capsys):
    out = tmp_path / "run"
    code, err = run_cli(capsys, setup, out)
    assert code == 0, err
    pngs = sorted(p.relative_to(out).as_posix() for p in (out / "images").rglob("*.png"))
    assert pngs == ["images/Construction_worker/0_0.png", "images/Construction_worker/0_1.png",
                    "images/Nurse/0_0.png", "images/Nurse/0_1.png"]
    assert not list(out.rglob(".*"))                         # no temporary files left
    s = json.loads((out / "summary.json").read_text())
    # attribute phrases derived from the table's training record (first template + the concept's word)
    assert s["attributes"] == ["a photo of a woman", "a photo of a man"]
    assert s["concept_phrases"] == {"female": "a photo of a woman", "male": "a photo of a man"}
    for k in ("mean_deviation_ratio", "winoalign", "settings", "model", "clip", "concept_table", "prompts",
              "protocol", "versions", "timings"):
        assert k in s, k
    assert s["images"] == 4 and s["generated_this_run"] == 4 and s["professions"] == 2
    assert s["model"]["sha256"] and s["clip"]["weights_sha256"] and s["concept_table"]["sha256"]
    assert 0.0 <= s["mean_deviation_ratio"] <= 1.0 and np.isfinite(s["winoalign"])
    with open(out / "professions.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["profession"] for r in rows] == ["Nurse", "Construction worker"]
    for r in rows:
        counts = [int(r["a photo of a woman"]), int(r["a photo of a man"])]
        assert sum(counts) >= 2 and float(r["deviation_ratio"]) == pytest.approx(
            abs(counts[0] / sum(counts) - 0.5) / 0.5, abs=1e-6)
    assert np.mean([float(r["deviation_ratio"]) for r in rows]) == pytest.approx(s["mean_deviation_ratio"], abs=1e-6)
    with open(out / "per_image.csv") as f:
        images = list(csv.DictReader(f))
    assert len(images) == 4 and sorted(r["concept"] for r in images[:2]) == ["female", "male"]   # balanced
    assert images[0]["prompt"] == "Photo of nurse" and images[2]["prompt"] == "Photo of construction worker"
    assert np.mean([float(r["clip_score"]) for r in images]) == pytest.approx(s["winoalign"], abs=1e-3)
    # same noise for both professions (running index restarts per profession), different prompts
    assert [r["index"] for r in images] == ["0", "1", "0", "1"]

    mtimes = {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.png")}
    code, err = run_cli(capsys, setup, out)
    assert code == 0, err
    s2 = json.loads((out / "summary.json").read_text())
    assert s2["generated_this_run"] == 0 and s2["reused_from_disk"] == 4
    assert {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.png")} == mtimes
    assert s2["mean_deviation_ratio"] == s["mean_deviation_ratio"]
    # a missing image is regenerated alone, bit for bit
    nurse1 = out / "images" / "Nurse" / "0_1.png"
    before = nurse1.read_bytes()
    nurse1.unlink()
    code, err = run_cli(capsys, setup, out)
    assert code == 0 and json.loads((out / "summary.json").read_text())["generated_this_run"] == 1
    assert nurse1.read_bytes() == before
    # other generation settings in the same folder are refused
    code, err = run_cli(capsys, setup, out, "--seed", "1")
    assert code == 2 and "holds images made with other settings (differs in: seed)" in err
    assert len(err.strip().splitlines()) == 1


def test_unsteered_baseline(setup, tmp_path, capsys):
    out = tmp_path / "base"
    code, err = run_cli(capsys, setup, out, "--attributes", "a woman,a man", "--images-per-prompt", "1",
                        table=False, quiet=False)
    assert code == 0, err
    assert "generated 2/2" in err and "scored 2/2 Construction worker" in err        # progress lines
    s = json.loads((out / "summary.json").read_text())
    assert s["concept_table"] is None and s["attributes"] == ["a woman", "a man"] and s["images"] == 2
    assert s["mean_concept_hit_rate"] is None
    with open(out / "per_image.csv") as f:
        assert [r["concept"] for r in csv.DictReader(f)] == ["", ""]


@pytest.mark.parametrize("extra, table, message", [
    (["--attributes", "a woman"], True, "need at least 2 attribute phrases, got 1"),
    (["--attributes", "a woman,,a man"], True, "empty attribute phrase"),
    (["--attributes", "pink=a pink person,male=a man"], True, "unknown concept 'pink'"),
    (["--fair", "race"], True, "unknown concept group 'race'"),
    ([], False, "--attributes is required without --concepts"),
    (["--fair", "gender"], False, "need a concept table"),
    (["--prompts", "/nonexistent/prompts.txt", "--attributes", "a woman,a man"], True, "no such file"),
    (["--template-set", "9", "--attributes", "a woman,a man"], True, "no template set '9'"),
    (["--images-per-prompt", "0"], True, "--images-per-prompt 0: must be >= 1"),
    (["--size", "big"], True, "--size 'big': expected PIXELS or HEIGHTxWIDTH"),
])
def test_bad_inputs(setup, tmp_path, capsys, extra, table, message):
    code, err = run_cli(capsys, setup, tmp_path / "x", *extra, table=table)
    assert code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("which, message", [
    ("text_only", "has no vision tower"),
    ("bare", "records no attribute phrases for group 'gender'"),
    ("other", "vectors have shape (4, 4, 32) but this model's h-space at this size is (8, 8, 64)"),
])
def test_bad_folders(setup, tmp_path, capsys, which, message):
    extra = ["--clip", setup["text_only"]] if which == "text_only" else ["--concepts", setup[which]]
    if which == "other":
        extra += ["--attributes", "female=a woman,male=a man"]
    code, err = run_cli(capsys, setup, tmp_path / "x", *extra)
    assert code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1
