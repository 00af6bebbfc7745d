"""Converted checkpoints: an Orbax checkpoint of every component's params plus a JSON manifest.

Layout of a converted model folder (written by ``python -m weights_convert SRC DST``)::

    DST/manifest.json        format version, source path + sha256, per-component diffusers config dicts,
                             leaf/parameter counts, converter key accounting
    DST/params/              Orbax (StandardCheckpointer) pytree {component: params}
    DST/tokenizer[_2]/       copied tokenizer files (vocab.json + merges.txt or tokenizer.json)
    DST/scheduler/scheduler_config.json

Writes are atomic: everything is written into a sibling temporary folder that is renamed onto ``DST`` only
when complete, so an interrupted conversion never leaves a half-written model where a good one was.
Restoring is strict: the manifest's configs give the template, and Orbax refuses any tree mismatch.
This module knows nothing about PyTorch names (that is ``weights_convert``'s job).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import jax
import numpy as np

from jaxdiff.nn import template_maker

FORMAT_VERSION = 1
MANIFEST = "manifest.json"

# component kind -> (module, config class, init function); configs are rebuilt from diffusers dicts.
COMPONENT_MODELS = {
    "unet": ("jaxdiff.unet", "UNetConfig", "init_unet"),
    "vae": ("jaxdiff.vae", "VAEConfig", "init_vae"),
    "text_encoder": ("jaxdiff.clip", "CLIPTextConfig", "init_clip_text"),
}


class ModelLoadError(ValueError):
    """A converted model folder is missing, incomplete, or of an unknown format version."""


def component_kind(name: str) -> str:
    """``text_encoder_2`` -> ``text_encoder``; other names are their own kind."""
    return "text_encoder" if name.startswith("text_encoder") else name


def config_from_dict(name: str, d: dict):
    module, cls, _ = COMPONENT_MODELS[component_kind(name)]
    return getattr(importlib.import_module(module), cls).from_diffusers(d)


def param_template(name: str, config, mk=None) -> dict:
    """The component's parameter tree built by maker ``mk`` (default: shape-only template)."""
    module, _, init = COMPONENT_MODELS[component_kind(name)]
    return getattr(importlib.import_module(module), init)(mk or template_maker(), config)


def count_params(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


@dataclass(frozen=True)
class StableDiffusionModel:
    """Everything needed to run one SD model: configs and params per component, tokenizers, scheduler.

    ``configs``/``params``/``config_dicts`` are keyed by component name (``unet``, ``vae``, ``text_encoder``,
    ``text_encoder_2``). ``tokenizer_dirs`` maps ``tokenizer``/``tokenizer_2`` to folders to load them from.
    """

    configs: Mapping[str, Any]
    params: Mapping[str, Any]
    config_dicts: Mapping[str, dict]
    scheduler_config: dict
    tokenizer_dirs: Mapping[str, str] = field(default_factory=dict)
    manifest: dict = field(default_factory=dict)

    @property
    def is_sdxl(self) -> bool:
        return "text_encoder_2" in self.params


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder + rename: a kill never leaves half a
    file. Mode 0644 (``mkstemp`` makes 0600; what we write are shareable artefacts)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_folder(dst: str | os.PathLike) -> Iterator[Path]:
    """Write a folder atomically: yields an empty temporary sibling of ``dst``; when the block completes it
    replaces ``dst`` (an existing ``dst`` is moved aside first and removed only after the swap), and when the
    block raises (or the process is killed) ``dst`` is untouched and the temporary folder is removed.
    Temporaries left by a killed writer (``.NAME.tmp-*``) are cleared on entry (one writer per ``dst``)."""
    dst = Path(dst).absolute()
    dst.parent.mkdir(parents=True, exist_ok=True)
    for stale in dst.parent.glob(f".{dst.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        yield tmp
        if dst.exists():
            old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
            os.replace(dst, old)
            os.replace(tmp, dst)
            shutil.rmtree(old)
        else:
            os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_model(dst: str | os.PathLike, model: StableDiffusionModel, manifest_extra: dict | None = None) -> Path:
    """Write ``model`` to ``dst`` atomically (Orbax params + manifest + tokenizer/scheduler files)."""
    import orbax.checkpoint as ocp

    dst = Path(dst).absolute()
    with atomic_folder(dst) as tmp:
        ckpt = ocp.StandardCheckpointer()
        ckpt.save(tmp / "params", {k: jax.tree.map(np.asarray, v) for k, v in model.params.items()})
        ckpt.wait_until_finished()
        for name, folder in model.tokenizer_dirs.items():
            shutil.copytree(folder, tmp / name)
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(model.scheduler_config, indent=2))
        manifest = {
            "format_version": FORMAT_VERSION,
            "components": {
                name: {"config": model.config_dicts[name], "num_params": count_params(p),
                       "num_leaves": len(jax.tree.leaves(p))}
                for name, p in model.params.items()},
            "tokenizers": sorted(model.tokenizer_dirs),
            **(manifest_extra or {}),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return dst


def is_converted_model(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST).is_file()


def load_model(path: str | os.PathLike, dtype=None) -> StableDiffusionModel:
    """Restore a folder written by :func:`save_model`. ``dtype`` optionally casts float params (e.g. bf16)."""
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise ModelLoadError(f"{path}: no {MANIFEST}; not a converted jaxdiff model "
                             f"(convert it with `python -m weights_convert SRC {path}`)")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{mpath}: corrupt manifest ({e})") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ModelLoadError(f"{mpath}: format_version {manifest.get('format_version')!r}, this jaxdiff reads "
                             f"{FORMAT_VERSION}; re-convert the model")
    config_dicts = {n: c["config"] for n, c in manifest["components"].items()}
    configs = {n: config_from_dict(n, d) for n, d in config_dicts.items()}
    template = {n: param_template(n, c) for n, c in configs.items()}
    if dtype is not None:   # Orbax casts while restoring: the float32 weights are never all held beside the cast
        template = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype)
                                if np.issubdtype(s.dtype, np.floating) else s, template)
    try:
        params = ocp.StandardCheckpointer().restore(path / "params", template)
    except (ValueError, FileNotFoundError) as e:
        raise ModelLoadError(f"{path}/params: checkpoint does not match the manifest's configs: {e}") from None
    sched = path / "scheduler" / "scheduler_config.json"
    scheduler_config = json.loads(sched.read_text()) if sched.is_file() else {}
    tokenizer_dirs = {n: str(path / n) for n in manifest.get("tokenizers", [])}
    return StableDiffusionModel(configs, params, config_dicts, scheduler_config, tokenizer_dirs, manifest)
