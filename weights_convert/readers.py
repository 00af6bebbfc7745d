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
from dataclasses import dataclass
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


@dataclass(frozen=True)
class LazyTensor:
    """One tensor of a safetensors file, read from disk only when converted to an array (``np.asarray``).

    The loaders convert leaf by leaf from these, so a model's weights are never held twice: each tensor is read
    with a plain ``read`` into its own buffer (not a memory map, whose touched pages would count in the
    process's resident set until the kernel drops them), laid out, cast, handed on and freed.
    """

    path: Path
    offset: int          # of the tensor's first byte in the file
    dtype: np.dtype
    shape: tuple[int, ...]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def __array__(self, dtype=None, copy=None):
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            buf = np.empty(self.nbytes, np.uint8)
            if f.readinto(memoryview(buf)) != self.nbytes:
                raise CheckpointError(f"{self.path}: truncated while reading a tensor at byte {self.offset}")
        out = buf.view(self.dtype).reshape(self.shape)
        return out if dtype is None else out.astype(dtype, copy=False)


def open_safetensors(path: str | os.PathLike) -> dict[str, LazyTensor]:
    """Every tensor of a ``.safetensors`` file as a :class:`LazyTensor` (header parsed and checked, no data
    read). Corrupt or truncated files raise :class:`CheckpointError` naming the file and the problem."""
    path = Path(path).absolute()
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
    data_size = size - 8 - n
    header.pop("__metadata__", None)
    out = {}
    for name, info in header.items():
        try:
            dtype = np.dtype(_ST_DTYPES[info["dtype"]])
            shape = tuple(int(d) for d in info["shape"])
            begin, end = info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors entry for {name!r}: {info!r}") from None
        tensor = LazyTensor(path, 8 + n + begin, dtype, shape)
        if end - begin != tensor.nbytes:
            raise CheckpointError(f"{path}: tensor {name!r} has {end - begin} bytes, expected {tensor.nbytes} "
                                  f"for {info['dtype']}{list(shape)}")
        if end > data_size:
            raise CheckpointError(f"{path}: truncated: tensor {name!r} ends at byte {end} of the data section "
                                  f"but the file has only {data_size} data bytes")
        out[name] = tensor
    return out


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read every tensor of a ``.safetensors`` file into numpy (float types kept as stored)."""
    return {name: np.asarray(t) for name, t in open_safetensors(path).items()}


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


def read_checkpoint(path: str | os.PathLike, allow_pickle: bool = False, *, lazy: bool = False) -> dict:
    """Read ``.safetensors`` (always) or a pickled checkpoint (only with ``allow_pickle``).

    ``lazy=True``: safetensors tensors come as :class:`LazyTensor` (read when converted); pickles are always read
    whole (unpickling cannot be done tensor by tensor).
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        return open_safetensors(path) if lazy else read_safetensors(path)
    if path.suffix in PICKLE_SUFFIXES:
        return read_pickle_checkpoint(path, allow_pickle)
    raise CheckpointError(f"{path}: unknown checkpoint format {path.suffix!r}; expected .safetensors "
                          f"(or {', '.join(PICKLE_SUFFIXES)} with allow_pickle)")
