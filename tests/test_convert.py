"""Converter core: rules, strict accounting, readers, and bad inputs (each error type and message checked)."""

import json
import struct
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import save_file

from jaxdiff import nn
from weights_convert import (CheckpointError, ConversionError, PickleNotAllowedError, read_checkpoint,
                             read_safetensors, state_dict_to_params)
from weights_convert.export import params_to_state_dict, torch_key
from weights_convert.pipeline import load_any
from weights_convert.rules import module_path


def small_template(mk):
    return {"time_embedding": {"linear_1": nn.init_dense(mk, 3, 4)},
            "down_blocks_0": {"resnets_0": {"conv1": nn.init_conv(mk, 2, 5, 3), "norm1": nn.init_norm(mk, 2)}},
            "embeddings": {"token_embedding": nn.init_embedding(mk, 7, 4)}}


@pytest.fixture
def sd():
    """A state dict with diffusers names, made by the exporter from random params (PyTorch layouts)."""
    return params_to_state_dict(small_template(nn.random_maker(1)))


def test_names_round_trip(sd):
    assert sorted(sd) == sorted([
        "time_embedding.linear_1.weight", "time_embedding.linear_1.bias",
        "down_blocks.0.resnets.0.conv1.weight", "down_blocks.0.resnets.0.conv1.bias",
        "down_blocks.0.resnets.0.norm1.weight", "down_blocks.0.resnets.0.norm1.bias",
        "embeddings.token_embedding.weight"])
    assert sd["down_blocks.0.resnets.0.conv1.weight"].shape == (5, 2, 3, 3)  # OIHW
    assert sd["time_embedding.linear_1.weight"].shape == (4, 3)              # (out, in)
    assert module_path("down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_out.0") == \
        "down_blocks_0/attentions_1/transformer_blocks_0/attn1/to_out_0"
    assert torch_key("time_embedding/linear_1/kernel") == "time_embedding.linear_1.weight"


def test_convert_inverts_export(sd):
    src = small_template(nn.random_maker(1))
    params, report = state_dict_to_params(sd, small_template(nn.template_maker()))
    assert report.filled == 7 and report.used == 7
    for a, b in zip(*(sorted(nn_flat(t).items()) for t in (src, params))):
        assert a[0] == b[0]
        np.testing.assert_array_equal(np.asarray(a[1]), b[1])


def nn_flat(tree):
    from flax import traverse_util
    return traverse_util.flatten_dict(tree, sep="/")


def test_conv_layout_matches_torch(sd):
    import torch
    params, _ = state_dict_to_params(sd, small_template(nn.template_maker()))
    conv = torch.nn.Conv2d(2, 5, 3, padding=1)
    conv.load_state_dict({"weight": torch.tensor(sd["down_blocks.0.resnets.0.conv1.weight"]),
                          "bias": torch.tensor(sd["down_blocks.0.resnets.0.conv1.bias"])})
    x = np.random.default_rng(0).standard_normal((1, 2, 6, 6)).astype(np.float32)
    ref = conv(torch.tensor(x)).detach().numpy().transpose(0, 2, 3, 1)
    ours = nn.conv2d(params["down_blocks_0"]["resnets_0"]["conv1"], x.transpose(0, 2, 3, 1))
    assert np.max(np.abs(np.asarray(ours) - ref)) < 1e-5


# ------------------------------------------------------------------------------------- bad inputs
def test_missing_key_named(sd):
    del sd["time_embedding.linear_1.bias"]
    with pytest.raises(ConversionError) as e:
        state_dict_to_params(sd, small_template(nn.template_maker()))
    assert "time_embedding/linear_1/bias" in str(e.value) and "missing" in str(e.value)
    assert e.value.missing == ["time_embedding/linear_1/bias [4]"]


def test_extra_key_named(sd):
    sd["down_blocks.0.resnets.0.conv9.weight"] = np.zeros((5, 2, 3, 3), np.float32)
    with pytest.raises(ConversionError) as e:
        state_dict_to_params(sd, small_template(nn.template_maker()))
    assert "down_blocks.0.resnets.0.conv9.weight" in str(e.value) and "unused" in str(e.value)


def test_wrong_shape_named(sd):
    sd["time_embedding.linear_1.weight"] = np.zeros((4, 5), np.float32)
    with pytest.raises(ConversionError) as e:
        state_dict_to_params(sd, small_template(nn.template_maker()))
    msg = str(e.value)
    assert "time_embedding.linear_1.weight" in msg and "[5, 4]" in msg and "[3, 4]" in msg
    assert not e.value.missing  # a mismatch is reported once, not also as missing


def test_all_problems_in_one_error(sd):
    del sd["embeddings.token_embedding.weight"]
    sd["bogus.weight"] = np.zeros((3,), np.float32)
    sd["down_blocks.0.resnets.0.norm1.bias"] = np.zeros((9,), np.float32)
    with pytest.raises(ConversionError) as e:
        state_dict_to_params(sd, small_template(nn.template_maker()))
    assert e.value.missing and e.value.unused and e.value.mismatched


def test_position_ids_ignored(sd):
    sd["embeddings.position_ids"] = np.arange(7)[None]
    _, report = state_dict_to_params(sd, small_template(nn.template_maker()))
    assert report.ignored == ["embeddings.position_ids"]


def test_half_precision_cast(sd, tmp_path):
    import ml_dtypes
    f = tmp_path / "w.safetensors"
    save_file({k: v.astype(np.float16) for k, v in sd.items()}, str(f))
    back = read_safetensors(f)
    assert back["time_embedding.linear_1.weight"].dtype == np.float16
    params, _ = state_dict_to_params(back, small_template(nn.template_maker()))
    assert params["time_embedding"]["linear_1"]["kernel"].dtype == np.float32
    # bfloat16 (numpy has none; we parse it via ml_dtypes)
    bf = {k: v.astype(ml_dtypes.bfloat16) for k, v in sd.items()}
    write_raw_safetensors(tmp_path / "bf.safetensors", bf, "BF16")
    back = read_safetensors(tmp_path / "bf.safetensors")
    np.testing.assert_array_equal(back["time_embedding.linear_1.weight"].astype(np.float32),
                                  bf["time_embedding.linear_1.weight"].astype(np.float32))


def write_raw_safetensors(path, tensors, dtype_name):
    header, blobs, off = {}, [], 0
    for k, v in tensors.items():
        b = np.ascontiguousarray(v).tobytes()
        header[k] = {"dtype": dtype_name, "shape": list(v.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def test_truncated_safetensors(sd, tmp_path):
    f = tmp_path / "w.safetensors"
    save_file(sd, str(f))
    data = f.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match="truncated"):
        read_safetensors(tmp_path / "cut.safetensors")
    (tmp_path / "tiny.safetensors").write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="truncated or empty"):
        read_safetensors(tmp_path / "tiny.safetensors")


def test_corrupt_header(tmp_path):
    f = tmp_path / "bad.safetensors"
    f.write_bytes(struct.pack("<Q", 12) + b"{not json!!}" + b"\0" * 8)
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        read_safetensors(f)
    g = tmp_path / "huge.safetensors"
    g.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(CheckpointError, match="header length"):
        read_safetensors(g)


def test_pickle_needs_opt_in(tmp_path):
    f = tmp_path / "model.ckpt"
    f.write_bytes(b"not even read")
    with pytest.raises(PickleNotAllowedError, match="allow_pickle"):
        read_checkpoint(f)


def test_pickle_with_opt_in(sd, tmp_path):
    import torch
    f = tmp_path / "model.ckpt"
    torch.save({"state_dict": {k: torch.tensor(v) for k, v in sd.items()}}, f)
    back = read_checkpoint(f, allow_pickle=True)
    assert sorted(back) == sorted(sd)


def test_unknown_format(tmp_path):
    f = tmp_path / "model.onnx"
    f.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="unknown checkpoint format '.onnx'"):
        read_checkpoint(f)


def test_wrong_folder(tmp_path):
    with pytest.raises(CheckpointError, match="neither a converted jaxdiff model"):
        load_any(tmp_path)
    with pytest.raises(CheckpointError, match="no such file or folder"):
        load_any(tmp_path / "nope")


def test_unsupported_pipeline_class(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(CheckpointError, match="FluxPipeline"):
        load_any(tmp_path)


def test_missing_component_folder(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}))
    with pytest.raises(CheckpointError, match="unet"):
        load_any(tmp_path)


def test_cli_reports_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "weights_convert", str(tmp_path / "nope"), str(tmp_path / "out")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "no such file or folder" in r.stderr and "Traceback" not in r.stderr


def test_import_jaxdiff_has_no_torch():
    code = ("import sys, jaxdiff, jaxdiff.checkpoint, jaxdiff.attention, jaxdiff.nn, jaxdiff.hooks;"
            "import importlib;"
            "[importlib.import_module(m) for m in ('jaxdiff.unet', 'jaxdiff.vae', 'jaxdiff.clip',"
            " 'jaxdiff.tokenizer', 'jaxdiff.schedulers')];"
            "assert 'torch' not in sys.modules, 'torch imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_lazy_conversion_reads_each_tensor_once_after_checking(sd, tmp_path, monkeypatch):
    """Loaders convert leaf by leaf from the file (the load peak is one copy of the weights): the lazy path gives
    the same params as the eager one, reads every tensor exactly once, and reads nothing when the checkpoint
    does not fit (all names and shapes are checked on zero-byte stand-ins first)."""
    import jax

    from weights_convert.convert import to_device
    from weights_convert.readers import LazyTensor, open_safetensors

    f = tmp_path / "w.safetensors"
    save_file({k: v.astype(np.float16) for k, v in sd.items()}, str(f))
    reads = []
    real = LazyTensor.__array__
    monkeypatch.setattr(LazyTensor, "__array__", lambda self, *a, **k: reads.append(self.offset) or real(self, *a, **k))
    lazy = open_safetensors(f)
    assert all(isinstance(v, LazyTensor) for v in lazy.values()) and not reads
    params, report = state_dict_to_params(lazy, small_template(nn.template_maker()), put=to_device)
    assert sorted(reads) == sorted(t.offset for t in lazy.values())    # each tensor read once
    eager, _ = state_dict_to_params(read_safetensors(f), small_template(nn.template_maker()))
    for (ka, a), (kb, b) in zip(sorted(nn_flat(params).items()), sorted(nn_flat(eager).items())):
        assert ka == kb and isinstance(a, jax.Array) and a.dtype == np.float32
        np.testing.assert_array_equal(np.asarray(a), b)
    reads.clear()
    bad = dict(lazy)
    bad.pop("time_embedding.linear_1.bias")
    with pytest.raises(ConversionError, match="missing"):
        state_dict_to_params(bad, small_template(nn.template_maker()), put=to_device)
    assert not reads
