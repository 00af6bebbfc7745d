"""Learn-to-Steer relation classifier (methods.md §4.2) and its training CLI (§4.3) on synthetic maps: shapes,
determinism, gradients, the file format, training to high accuracy, bit-exact resume, the dual-inversion
ablation and one-line errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.steer.relation_classifier import (ClassifierConfig, RelationClassifier, RelationClassifierError,
                                               check_layout, init_params, load_classifier, param_shapes, predict,
                                               save_classifier)
from train import relation_classifier as rc

C, G = 6, 4
# a small classifier (one encoder layer per part) keeps compile times of the CPU tests low
ARCH = {"d_model": 32, "extractor_layers": 1, "extractor_ff": 32, "head_layers": 1, "head_ff": 32,
        "mlp_hidden": [32, 16], "dropout": 0.1}
LAYOUT = [{"site": "down.0", "heads": 2, "height": 8, "width": 8, "grid": G},
          {"site": "up.0", "heads": 4, "height": 4, "width": 4, "grid": G}]
# label -> (peak of object 0, peak of object 1) on the G x G grid: separable by where the mass is
PEAKS = {0: ((1, 0), (1, 3)), 1: ((1, 3), (1, 0)), 2: ((0, 1), (3, 1)), 3: ((3, 1), (0, 1)), 4: ((2, 2), (2, 2))}


def small_config(**kw) -> ClassifierConfig:
    return ClassifierConfig(channels=C, grid=G, **{**ARCH, "mlp_hidden": (32, 16), **kw})


def write_data(folder: Path, *, scenes: int = 100, channels: int = C, meta_channels: int = C, seed: int = 0,
               splits=(0, 0, 0, 0, 0, 0, 0, 1, 1, 2)) -> Path:
    """Rows = scenes x 2 prompt kinds x 2 steps; scene s has label s % 5 and split splits[(s // 5) % 10] (so
    every split holds every class)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = {k: [] for k in ("maps", "step", "label", "prompt_kind", "scene", "split", "psnr")}
    for s in range(scenes):
        label = s % 5
        for kind in (0, 1):
            for step in (5, 49):
                m = rng.random((2, channels, G, G)) * 0.3
                for obj, (y, x) in enumerate(PEAKS[label]):
                    m[obj, :, y, x] += 1.0 + 0.3 * rng.random(channels)
                m /= m.mean(axis=(2, 3), keepdims=True)         # O(1) values: a few epochs suffice
                for k, v in (("maps", m), ("step", step), ("label", label), ("prompt_kind", kind),
                             ("scene", s), ("split", splits[s // 5 % len(splits)]), ("psnr", 25.0)):
                    rows[k].append(v)
    dtypes = {"maps": np.float16, "step": np.int32, "label": np.int32, "prompt_kind": np.int8, "scene": np.int64,
              "split": np.int8, "psnr": np.float32}
    arrays = {k: np.asarray(v, dtypes[k]) for k, v in rows.items()}
    n = len(arrays["label"])
    for i, part in enumerate(np.array_split(np.arange(n), 2)):
        np.savez(folder / f"shard_{i:03d}.npz", **{k: v[part] for k, v in arrays.items()})
    (folder / ".shard_002.npz.tmp.npz").write_bytes(b"partial")       # a killed writer's temp file: ignored
    layout = LAYOUT if meta_channels == C else [LAYOUT[0], {**LAYOUT[1], "heads": meta_channels - 2}]
    meta = {"layout": layout, "grid": G, "channels": meta_channels, "step_indices": [5, 49], "num_steps": 50,
            "classes": ["left of", "right of", "above", "below", "is"], "model_sha256": "a" * 64}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


SETTINGS = rc.TrainSettings(epochs=4, batch=32, lr=2e-3, patience=20, eval_batch=64)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_data(tmp_path_factory.mktemp("relations") / "data")


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    """One uninterrupted run (shared by the accuracy, file and resume tests)."""
    out = tmp_path_factory.mktemp("run_full")
    ship = tmp_path_factory.mktemp("ship")
    result = rc.train(rc.load_data(data_dir), out, SETTINGS, arch=ARCH, ship=ship, log=lambda s: None)
    return out, ship, result


# ------------------------------------------------------------------------------------------------ model
def test_forward_shapes_deterministic_and_dropout():
    cfg = small_config()
    params = init_params(cfg, jax.random.PRNGKey(0))
    maps = jnp.asarray(np.random.default_rng(0).random((3, 2, C, G, G)), jnp.float32)
    step = jnp.array([5, 10, 49], jnp.int32)
    fwd = jax.jit(lambda p, m, s: predict(p, cfg, m, s))
    a = fwd(params, maps, step)
    assert a.shape == (3, 5) and a.dtype == jnp.float32 and bool(jnp.isfinite(a).all())
    np.testing.assert_array_equal(np.asarray(a), np.asarray(fwd(params, maps, step)))
    train_fwd = jax.jit(lambda p, m, s, k: RelationClassifier(cfg).apply({"params": p}, m, s, train=True,
                                                                         rngs={"dropout": k}))
    d1, d2 = (train_fwd(params, maps, step, jax.random.PRNGKey(k)) for k in (1, 2))
    assert not np.array_equal(np.asarray(d1), np.asarray(d2))          # dropout on in training mode
    # the step embedding matters: the same maps at another step give other logits
    assert not np.array_equal(np.asarray(a), np.asarray(fwd(params, maps, jnp.array([0, 0, 0]))))


def test_default_architecture_shapes():
    shapes = param_shapes(ClassifierConfig(channels=128))
    assert shapes["extractor/input_proj/kernel"] == (256, 256)
    assert shapes["extractor/step_embed/embedding"] == (50, 256)
    assert shapes["extractor/query"] == (1, 1, 256)
    assert shapes["extractor/layer_1/ff_in/kernel"] == (256, 128)
    assert shapes["extractor/pool/query/kernel"] == (256, 2, 128)
    assert shapes["extractor/output_proj/kernel"] == (256, 256)
    assert shapes["head/proj/kernel"] == (512, 256)
    assert shapes["head/layer_1/self_attn/query/kernel"] == (256, 4, 64)
    assert shapes["head/step_embed/embedding"] == (50, 16)
    assert shapes["head/mlp_0/kernel"] == (272, 256) and shapes["head/mlp_1/kernel"] == (256, 128)
    assert shapes["head/logits/kernel"] == (128, 5)
    assert "extractor/layer_2/ff_in/kernel" not in shapes and "head/layer_2/ff_in/kernel" not in shapes


def test_gradient_wrt_maps_finite_and_nonzero():
    cfg = small_config()
    params = init_params(cfg, jax.random.PRNGKey(1))
    maps = jnp.asarray(np.random.default_rng(1).random((2, 2, C, G, G)), jnp.float32)
    step = jnp.array([5, 49], jnp.int32)

    def loss(m):
        logits = predict(params, cfg, m, step)
        return -jax.nn.log_softmax(logits)[:, 2].sum()
    g = np.asarray(jax.jit(jax.grad(loss))(maps))
    assert np.isfinite(g).all() and np.abs(g).max() > 0
    assert np.abs(g[:, 0]).max() > 0 and np.abs(g[:, 1]).max() > 0    # both objects feed the loss


def test_config_validation():
    with pytest.raises(ValueError, match="not divisible by head_heads"):
        ClassifierConfig(channels=4, d_model=30, extractor_heads=2, pool_heads=2, head_heads=4)
    with pytest.raises(ValueError, match="step_indices"):
        ClassifierConfig(channels=4, step_indices=(5, 50))


# ------------------------------------------------------------------------------------------------ files
def test_save_load_round_trip_and_errors(tmp_path):
    cfg = small_config()
    params = jax.device_get(init_params(cfg, jax.random.PRNGKey(2)))
    save_classifier(tmp_path / "clf", params, cfg, LAYOUT, {"model_sha256": "a" * 64, "accuracy": 0.5})
    p2, cfg2, layout2, meta2 = load_classifier(tmp_path / "clf")
    assert cfg2 == cfg and layout2 == LAYOUT and meta2 == {"model_sha256": "a" * 64, "accuracy": 0.5}
    assert jax.tree.structure(p2) == jax.tree.structure(params)
    for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(p2)):
        assert x.dtype == y.dtype and np.array_equal(x, y)

    with pytest.raises(ValueError, match=r"classifier.json: no such file"):
        load_classifier(tmp_path / "nowhere")
    st = tmp_path / "clf" / "classifier.safetensors"
    good = st.read_bytes()
    st.write_bytes(good[:len(good) // 2])
    with pytest.raises(ValueError, match=r"classifier.safetensors: corrupt or truncated") as e:
        load_classifier(tmp_path / "clf")
    assert "\n" not in str(e.value)
    st.write_bytes(good)
    js = tmp_path / "clf" / "classifier.json"
    doc = json.loads(js.read_text())
    js.write_text(json.dumps({**doc, "config": {**doc["config"], "grid": G + 1}}))
    with pytest.raises(ValueError, match=r"classifier.safetensors: params do not match its config"):
        load_classifier(tmp_path / "clf")
    js.write_text("{not json")
    with pytest.raises(ValueError, match=r"classifier.json: corrupt"):
        load_classifier(tmp_path / "clf")
    with pytest.raises(ValueError, match="do not match the classifier config"):
        save_classifier(tmp_path / "bad", params, small_config(d_model=16), LAYOUT, {})


def test_check_layout():
    check_layout(LAYOUT, [dict(e) for e in LAYOUT])
    check_layout(LAYOUT, tuple(LAYOUT))                                 # tuples vs lists: same layout
    fewer = [LAYOUT[0], {**LAYOUT[1], "heads": 3}]
    with pytest.raises(ValueError, match=r"^classifier was trained on another site layout: 6 channels per object, "
                                         r"this model gives 5$"):
        check_layout(LAYOUT, fewer)
    swapped = [{**LAYOUT[0], "site": "down.1"}, LAYOUT[1]]
    with pytest.raises(ValueError, match=r"first difference at site 0: trained on down.0 .*, this model has "
                                         r"down.1"):
        check_layout(LAYOUT, swapped)
    with pytest.raises(RelationClassifierError, match="^the L2S loss was trained"):
        check_layout(LAYOUT, fewer, what="the L2S loss")


# ------------------------------------------------------------------------------------------------ training
def test_load_data_ignores_partial_files(data_dir):
    data = rc.load_data(data_dir)
    assert [s[0] for s in data["shards"]] == ["shard_000.npz", "shard_001.npz"]
    assert data["maps"].shape == (400, 2, C, G, G) and data["maps"].dtype == np.float16
    assert set(np.unique(data["split"])) == {0, 1, 2}


def test_training_reaches_high_accuracy_and_writes_files(trained, data_dir):
    out, ship, result = trained
    report = json.loads((out / "report.json").read_text())
    test = report["test"]
    assert test["accuracy"] >= 0.9, report
    assert test["n"] == 40 and test["n_true_prompt"] == 20 and test["n_wrong_prompt"] == 20
    assert test["accuracy_true_prompt"] is not None and test["accuracy_wrong_prompt"] is not None
    assert set(test["per_class"]) == {"left of", "right of", "above", "below", "is"}
    assert all(v["n"] == 8 and v["accuracy"] >= 0.75 for v in test["per_class"].values()), test["per_class"]
    assert set(test["per_step"]) == {"5", "49"} and all(v["n"] == 20 for v in test["per_step"].values())
    assert report["epochs_run"] == 4 and 1 <= report["best_epoch"] <= 4
    params, cfg, layout, meta = load_classifier(out)
    assert cfg == result.config and layout == LAYOUT
    assert meta["model_sha256"] == "a" * 64 and meta["dual_inversion"] is True and meta["grid"] == G
    assert meta["step_indices"] == [5, 49] and meta["best_epoch"] == report["best_epoch"]
    assert meta["test_accuracy"] == test["accuracy"]
    for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(result.best_params)):
        np.testing.assert_array_equal(x, y)
    for name in ("classifier.safetensors", "classifier.json"):
        assert (ship / name).read_bytes() == (out / name).read_bytes()
    # evaluate() agrees with the report
    again = rc.evaluate(params, cfg, rc.load_data(data_dir))
    assert again["accuracy"] == test["accuracy"]


def test_resume_equals_uninterrupted(trained, data_dir, tmp_path, capsys):
    out_full, _, full = trained
    data = rc.load_data(data_dir)
    killed = rc.train(data, tmp_path, SETTINGS, arch=ARCH, stop_after=2, log=lambda s: None)
    assert killed.report is None and killed.epochs_run == 2 and not (tmp_path / "report.json").exists()
    lines = []
    resumed = rc.train(data, tmp_path, SETTINGS, arch=ARCH, log=lines.append)
    assert lines[0].startswith("[relation_classifier] resumed at epoch 2")
    assert sum("epoch" in l and "samples/s" in l for l in lines) == 2
    for a, b in ((full.params, resumed.params), (full.best_params, resumed.best_params)):
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_array_equal(x, y)
    assert resumed.history == full.history
    assert (tmp_path / "classifier.safetensors").read_bytes() == (out_full / "classifier.safetensors").read_bytes()
    # a finished run re-run: nothing to train, same outputs
    assert rc.train(data, tmp_path, SETTINGS, arch=ARCH, log=lambda s: None).history == full.history
    # other settings are refused (epochs may grow)
    code = rc.main(["--data", str(data_dir), "--out", str(tmp_path), "--arch", json.dumps(ARCH), "--epochs", "4",
                    "--batch", "32", "--lr", "1e-3", "--patience", "20"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "checkpoint was written with other data or settings (settings.lr)" in err


def test_plateau_and_early_stopping_controller():
    s = rc.TrainSettings(lr=1e-4, patience=10, plateau_patience=5, min_lr=1e-6)
    ctl = {"lr": 1e-4, "best_val": None, "best_epoch": 0, "bad_epochs": 0, "plateau_bad": 0, "stopped": False}
    lrs = []
    for epoch, loss in enumerate([1.0] + [2.0] * 12, start=1):
        ctl, _ = rc._controller_update(ctl, loss, s, epoch)
        lrs.append(ctl["lr"])
        if ctl["stopped"]:
            break
    assert ctl["best_epoch"] == 1 and epoch == 11                       # 10 epochs without improvement
    assert lrs[:6] == [1e-4] * 6 and lrs[6] == 5e-5                      # 6th bad epoch (> patience 5) halves
    ctl = {**ctl, "lr": 1.5e-6, "plateau_bad": 5, "stopped": False, "bad_epochs": 0}
    ctl, _ = rc._controller_update(ctl, 3.0, s, 20)
    assert ctl["lr"] == 1e-6                                             # floored at min_lr


def test_no_dual_inversion_drops_wrong_prompt_rows(data_dir, tmp_path, capsys):
    data = rc.load_data(data_dir)
    tr, va = rc.training_splits(data, dual_inversion=False)
    assert (data["prompt_kind"][tr] == 0).all() and (data["prompt_kind"][va] == 0).all()
    assert (data["split"][tr] == 0).all() and (data["split"][va] == 1).all()
    assert len(tr) == 140 and len(va) == 40
    tr2, va2 = rc.training_splits(data, dual_inversion=True)
    assert len(tr2) == 280 and len(va2) == 80 and set(data["prompt_kind"][tr2]) == {0, 1}
    code = rc.main(["--data", str(data_dir), "--out", str(tmp_path), "--no-dual-inversion", "--epochs", "1",
                    "--batch", "32", "--lr", "2e-3", "--arch", json.dumps(ARCH)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "held-out accuracy" in captured.out and "wrong-prompt maps" in captured.out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["dual_inversion"] is False and report["test"]["n_wrong_prompt"] == 20   # test keeps both kinds
    assert json.loads((tmp_path / "classifier.json").read_text())["meta"]["dual_inversion"] is False


def _bad(tmp_path: Path, name: str, **kw) -> Path:
    return write_data(tmp_path / name, scenes=50, **kw)


@pytest.mark.parametrize("case, message", [
    ("missing", "no such folder"),
    ("no_shards", "no shard_*.npz files"),
    ("empty_val", "no validation (split 1) rows"),
    ("channels", "maps have 6 channels per object, meta.json says 5"),
    ("arch", "--arch: unknown or data-determined fields ['channels']"),
    ("model", "is not the data's model aaaaaaaaaaaa"),
])
def test_bad_inputs_exit_2(tmp_path, capsys, monkeypatch, case, message):
    args = ["--out", str(tmp_path / "out"), "--epochs", "1"]
    if case == "missing":
        args += ["--data", str(tmp_path / "nope")]
    elif case == "no_shards":
        d = _bad(tmp_path, "d")
        for p in d.glob("shard_*.npz"):
            p.unlink()
        args += ["--data", str(d)]
    elif case == "empty_val":
        args += ["--data", str(_bad(tmp_path, "d", splits=(0, 0, 0, 0, 0, 0, 0, 0, 2, 2)))]
    elif case == "channels":
        args += ["--data", str(_bad(tmp_path, "d", meta_channels=5))]
    elif case == "arch":
        args += ["--data", str(_bad(tmp_path, "d")), "--arch", '{"channels": 3}']
    elif case == "model":
        import sample.cli
        monkeypatch.setattr(sample.cli, "load_model",
                            lambda path, dtype: SimpleNamespace(manifest={"source_sha256": "b" * 64}))
        args += ["--data", str(_bad(tmp_path, "d")), "--model", str(tmp_path)]
    code = rc.main(args)
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_import_jaxdiff_module_does_not_import_torch_or_sample():
    import subprocess
    code = ("import sys, jaxdiff.steer.relation_classifier; "
            "bad = [m for m in ('torch', 'sample', 'train') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_flip_augment_mirrors_maps_and_swaps_labels():
    """Left-right mirroring swaps "left of"/"right of", top-bottom swaps "above"/"below", "is" stays."""
    from train.relation_classifier import flip_augment

    classes = ("left of", "right of", "above", "below", "is")
    maps = np.zeros((400, 2, 1, 4, 4), np.float32)
    maps[:, 0, 0, 0, 0] = 1.0                         # object 1 at the top-left corner
    labels = np.tile(np.arange(5), 80)
    out, new = flip_augment(maps, labels, classes, np.random.default_rng(0))
    fx = out[:, 0, 0, :, 3].sum(-1) > 0               # mass moved to the right column: mirrored left-right
    fy = out[:, 0, 0, 3, :].sum(-1) > 0               # ... to the bottom row: mirrored top-bottom
    assert 0.3 < fx.mean() < 0.7 and 0.3 < fy.mean() < 0.7
    want = labels.copy()
    want[fx & (labels == 0)], want[fx & (labels == 1)] = 1, 0
    want[fy & (labels == 2)], want[fy & (labels == 3)] = 3, 2
    np.testing.assert_array_equal(new, want)
    assert maps[:, 0, 0, 0, 0].all()                  # inputs untouched
