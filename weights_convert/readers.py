"""Checkpoint readers -> ``dict[str, numpy.ndarray]``. Safetensors is parsed here without torch.

Safetensors layout: 8-byte little-endian header length N, N bytes of JSON ``{name: {dtype, shape,
data_offsets: [begin, end]}, "__metadata__": {...}}``, then the raw little-endian tensor bytes. We parse it
ourselves (numpy has no bfloat16; ``ml_dtypes`` provides it) so that truncated or corrupt files give an error
that names the file and the problem rather than a Rust panic.

Pickled checkpoints (``.ckpt``, ``.bin``, ``.pt``) run arbitrary code when unpickled, so reading one needs an
explicit ``allow_pickle=True`` (and torch installed); it is loaded with ``weights_only=True`` on top.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import ml_dtypes
import numpy as np


class CheckpointError(ValueError):
    """A checkpoint file or folder is missing, unreadable, corrupt, or not what was asked for."""


class PickleNotAllowedError(CheckpointError):
    """A pickled checkpoint was given without ``allow_pickle=True``."""


_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read every tensor of a ``.safetensors`` file into numpy (float types kept as stored)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes; truncated or empty)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100 * 2**20:
            raise CheckpointError(f"{path}: corrupt or truncated safetensors header (header length {n}, "
                                  f"file size {size})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
        data = np.memmap(f, dtype=np.uint8, mode="r", offset=8 + n) if size > 8 + n else np.zeros(0, np.uint8)
    header.pop("__metadata__", None)
    out = {}
    for name, info in header.items():
        try:
            dtype = _ST_DTYPES[info["dtype"]]
            shape = tuple(info["shape"])
            begin, end = info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors entry for {name!r}: {info!r}") from None
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if end - begin != nbytes:
            raise CheckpointError(f"{path}: tensor {name!r} has {end - begin} bytes, expected {nbytes} for "
                                  f"{info['dtype']}{list(shape)}")
        if end > data.size:
            raise CheckpointError(f"{path}: truncated: tensor {name!r} ends at byte {end} of the data section "
                                  f"but the file has only {data.size} data bytes")
        out[name] = np.frombuffer(data[begin:end].tobytes(), dtype=dtype).reshape(shape)
    return out


def read_pickle_checkpoint(path: str | os.PathLike, allow_pickle: bool = False) -> dict[str, np.ndarray]:
    """Read a pickled PyTorch checkpoint. Refused unless ``allow_pickle=True``: unpickling runs code."""
    path = Path(path)
    if not allow_pickle:
        raise PickleNotAllowedError(
            f"{path}: pickled checkpoint refused. Unpickling can run arbitrary code; convert it to "
            f".safetensors, or pass allow_pickle=True (CLI: --allow-pickle) if you trust the file.")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        import torch  # only here: reading pickles needs torch, nothing else in the project does
    except ImportError:
        raise CheckpointError(f"{path}: reading pickled checkpoints needs torch installed") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for bad pickles
        raise CheckpointError(f"{path}: cannot read pickled checkpoint: {e}") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: pickled object is a {type(obj).__name__}, not a state dict")
    out = {}
    for k, v in obj.items():
        if hasattr(v, "detach"):
            v = v.detach().cpu()
            out[k] = v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
    return out


def read_checkpoint(path: str | os.PathLike, allow_pickle: bool = False) -> dict[str, np.ndarray]:
    """Read ``.safetensors`` (always) or a pickled checkpoint (only with ``allow_pickle``)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    if path.suffix in PICKLE_SUFFIXES:
        return read_pickle_checkpoint(path, allow_pickle)
    raise CheckpointError(f"{path}: unknown checkpoint format {path.suffix!r}; expected .safetensors "
                          f"(or {', '.join(PICKLE_SUFFIXES)} with allow_pickle)")
