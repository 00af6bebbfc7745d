"""Concept tables: learned h-space concept vectors as plain pytrees, their file format, and the sampler
steering that adds them.

A table holds one vector per concept, stacked ``(N, *shape)``:

* ``"spatial"`` (Li et al. 2024, "Self-Discovering Interpretable Diffusion Latent Directions", SDisc; RespoDiff):
  one (h, w, C) tensor per concept, the size of the model's h-space at the trained resolution;
* ``"channel"`` (LWIM, Shokrolahi et al., TMLR 2026): one per-channel (C,) bias broadcast over h's grid.

Composition is multi-hot (Li et al.): image b gets ``delta_b = scale * sum_n w[b, n] v_n``, added to h at the
mid-block seam, ``h <- h + delta_b``, on the conditional rows of the guidance batch only (SDisc's default:
the unconditional branch untouched) or on both rows (LWIM's released default). A zero weight row adds an
exact zero, i.e. equals no edit bit for bit.

File format: ``NAME.safetensors`` (one tensor per concept, keyed by name) + ``NAME.json``::

    {"format": "jaxdiff-concepts/1", "method": "sdisc", "kind": "spatial", "h_shape": [h, w, C],
     "names": {"red": 0, ...}, "groups": {"colour": ["red", ...]}, "scale": 1.0, "rows": "cond",
     "model_sha256": "...", "training": {...}}
"""

from __future__ import annotations

import json
import os
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.checkpoint import write_bytes_atomic
from jaxdiff.hooks import CaptureSpec, HSpaceEdit, UNetEdits
from jaxdiff.steering import Steering

Array = jax.Array
FORMAT = "jaxdiff-concepts/1"
KINDS = ("spatial", "channel")
ROWS = ("cond", "both")
SAFETY_GROUP = "safety"   # concepts that remove an attribute: always on when selected, also under fair sampling


class ConceptTableError(ValueError):
    """A concept table file that cannot be used (missing, corrupt, or not fitting the model)."""


@dataclass(frozen=True)
class ConceptTable:
    """Concept vectors ``(N, *shape)`` and what they mean. ``vectors`` is the only array; everything else is
    metadata (``training`` is the JSON training record)."""

    vectors: np.ndarray
    names: tuple[str, ...]
    method: str
    kind: str
    h_shape: tuple[int, int, int]
    groups: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    scale: float = 1.0
    rows: str = "cond"
    model_sha256: str | None = None
    training: Mapping = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ConceptTableError(f"concept kind must be one of {KINDS}, got {self.kind!r}")
        if self.rows not in ROWS:
            raise ConceptTableError(f"concept rows must be one of {ROWS}, got {self.rows!r}")
        want = (len(self.names), *concept_shape(self.kind, self.h_shape))
        if tuple(np.shape(self.vectors)) != want:
            raise ConceptTableError(f"{self.method} table: vectors have shape {tuple(np.shape(self.vectors))}, "
                                    f"expected {want} for {len(self.names)} {self.kind} concepts of h {self.h_shape}")
        for g, members in self.groups.items():
            unknown = [m for m in members if m not in self.names]
            if unknown:
                raise ConceptTableError(f"group {g!r} names unknown concepts {unknown}")

    def index(self, name: str) -> int:
        if name not in self.names:
            raise ConceptTableError(f"unknown concept {name!r}; this {self.method} table has: "
                                    f"{', '.join(self.names)}")
        return self.names.index(name)

    def group(self, name: str) -> tuple[str, ...]:
        if name not in self.groups:
            known = ", ".join(self.groups) or "none"
            raise ConceptTableError(f"unknown concept group {name!r}; this {self.method} table has: {known}")
        return tuple(self.groups[name])

    def weights(self, selection: Mapping[str, float]) -> np.ndarray:
        """(N,) multi-hot weights of ``{name: weight}``."""
        w = np.zeros(len(self.names), np.float32)
        for name, v in selection.items():
            w[self.index(name)] += v
        return w


def concept_shape(kind: str, h_shape: Sequence[int]) -> tuple[int, ...]:
    """Shape of one concept vector: (h, w, C) for ``"spatial"``, (C,) for ``"channel"``."""
    h_shape = tuple(int(d) for d in h_shape)
    return h_shape if kind == "spatial" else h_shape[-1:]


def h_shape_of(unet_params: dict, unet_config, latent_hw: tuple[int, int]) -> tuple[int, int, int]:
    """(h, w, C) of the UNet's h-space for latents of ``latent_hw``, by abstract evaluation (no compute)."""
    from jaxdiff.unet import apply_unet

    c = unet_config
    x = jax.ShapeDtypeStruct((1, *latent_hw, c.in_channels), jnp.float32)
    ctx = jax.ShapeDtypeStruct((1, 77, c.cross_attention_dim), jnp.float32)
    added = None
    if c.addition_time_embed_dim > 0:            # SDXL's text_time added conditioning
        added = {"text_embeds": jax.ShapeDtypeStruct((1, c.projection_class_embeddings_input_dim
                                                      - 6 * c.addition_time_embed_dim), jnp.float32),
                 "time_ids": jax.ShapeDtypeStruct((1, 6), jnp.float32)}
    out = jax.eval_shape(lambda p, x, ctx, a: apply_unet(p, x, jnp.float32(0), ctx, config=c, added_cond=a,
                                                          capture=CaptureSpec(hspace=True))[1]["h"],
                         unet_params, x, ctx, added)
    return tuple(out.shape[1:])


def check_fits(table: ConceptTable, h_shape: Sequence[int], model_sha256: str | None = None) -> list[str]:
    """Raise :class:`ConceptTableError` if the table's vectors cannot be added to an h of ``h_shape``; return
    warnings (a table trained on another model)."""
    h_shape = tuple(int(d) for d in h_shape)
    need = concept_shape(table.kind, h_shape)
    have = concept_shape(table.kind, table.h_shape)
    if need != have:
        raise ConceptTableError(f"the {table.method} table's {table.kind} vectors have shape {have} but this model's "
                                f"h-space at this size is {h_shape} (needs {need}); train a table for this "
                                "model and resolution")
    warnings = []
    if model_sha256 and table.model_sha256 and model_sha256 != table.model_sha256:
        warnings.append(f"the {table.method} concept table was trained on model {table.model_sha256[:12]}, "
                        f"this model is {model_sha256[:12]}: its concepts may not transfer")
    return warnings


# ------------------------------------------------------------------------------------------- the edit
def _add_delta(h, t, params):
    # delta is (h, w, C) or (C,); the latter broadcasts over the grid (LWIM's per-channel bias).
    return h + params["delta"].astype(h.dtype)


def concept_deltas(vectors: Array, weights: Array, scale: Array | float) -> Array:
    """(B, *shape) per-image deltas ``scale * weights @ vectors`` from (B, N) weights and (N, *shape) vectors."""
    v = jnp.asarray(vectors, jnp.float32)
    return jnp.asarray(scale, jnp.float32) * jnp.tensordot(jnp.asarray(weights, jnp.float32), v, axes=1)


def delta_edit(deltas: Array, rows_mask: Array | None = None) -> HSpaceEdit:
    """``h <- h + deltas[r]`` per UNet row ``r`` (deltas (R, *shape)); rows where ``rows_mask`` is False are
    left unedited."""
    return HSpaceEdit(_add_delta, {"delta": deltas}, rows_mask, per_row_params=True)


def guidance_layout(per_image: Array, guided: bool) -> Array:
    """(B, ...) per-image values -> (R, ...) per UNet row: repeated for ``[uncond, cond]`` when guided."""
    return jnp.concatenate([per_image, per_image]) if guided else per_image


def row_mask(batch: int, rows: str, guided: bool) -> np.ndarray | None:
    """None (every row) for ``"both"`` or without guidance; the conditional half for ``"cond"``."""
    if rows not in ROWS:
        raise ConceptTableError(f"concept rows must be one of {ROWS}, got {rows!r}")
    if rows == "both" or not guided:
        return None
    return np.concatenate([np.zeros(batch, bool), np.ones(batch, bool)])


def concept_edits(vectors: Array, weights: Array, scale: Array | float, *, rows: str, guided: bool) -> UNetEdits:
    """UNet edits adding image b's concept mix ``scale * weights[b] @ vectors`` to h (see module docstring)."""
    weights = jnp.asarray(weights, jnp.float32)
    deltas = guidance_layout(concept_deltas(vectors, weights, scale), guided)
    return UNetEdits(hspace=delta_edit(deltas, row_mask(weights.shape[0], rows, guided)))


def concept_steering(table: ConceptTable, weights, *, scale: float | None = None, rows: str | None = None,
                     guided: bool = True) -> Steering:
    """The sampler steering of ``table`` with per-image weights (B, N) (or one (N,) row for all images).
    ``scale``/``rows`` default to the table's (each method's default)."""
    weights = np.asarray(weights, np.float32)
    if weights.ndim == 1:
        weights = weights[None]
    if weights.shape[-1] != len(table.names):
        raise ConceptTableError(f"concept weights have {weights.shape[-1]} entries, the table has "
                                f"{len(table.names)} concepts")
    return Steering(edits=concept_edits(jnp.asarray(table.vectors), weights,
                                        table.scale if scale is None else scale,
                                        rows=table.rows if rows is None else rows, guided=guided))


def merge_tables(*tables: ConceptTable) -> ConceptTable:
    """One table holding the concepts and groups of several tables of one method and model (e.g. a fairness
    group and a safety group trained separately); the training records are kept per group."""
    first = tables[0]
    for t in tables[1:]:
        for attr in ("method", "kind", "h_shape", "scale", "rows", "model_sha256"):
            if getattr(t, attr) != getattr(first, attr):
                raise ConceptTableError(f"cannot merge concept tables with different {attr}: "
                                        f"{getattr(first, attr)!r} vs {getattr(t, attr)!r}")
    names = [n for t in tables for n in t.names]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConceptTableError(f"cannot merge concept tables: concepts {dup} occur twice")
    groups, training = {}, {}
    for t in tables:
        for g, members in t.groups.items():
            if g in groups:
                raise ConceptTableError(f"cannot merge concept tables: group {g!r} occurs twice")
            groups[g] = tuple(members)
        by_group = t.training.get("groups") if "groups" in t.training else {g: dict(t.training) for g in t.groups}
        training.update(by_group)
    return dataclasses.replace(first, vectors=np.concatenate([np.asarray(t.vectors, np.float32) for t in tables]),
                               names=tuple(names), groups=groups, training={"groups": training})


def fair_assignment(members: Sequence[str], n_images: int, seed: int) -> list[str]:
    """Balanced per-image concepts: image k gets the (k mod n)-th concept of a seed-shuffled order."""
    order = list(members)
    np.random.default_rng(seed).shuffle(order)
    return [order[k % len(order)] for k in range(n_images)]


# ------------------------------------------------------------------------------------------- files
def table_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """(``NAME.safetensors``, ``NAME.json``) of a table given either file or the stem."""
    p = Path(path)
    stem = p.with_suffix("") if p.suffix in (".safetensors", ".json") else p
    return stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")


def save_table(path: str | os.PathLike, table: ConceptTable) -> tuple[Path, Path]:
    """Write ``NAME.safetensors`` + ``NAME.json`` (each atomically; the tensors first, so a JSON on disk always
    has its tensors)."""
    from safetensors.numpy import save

    st, js = table_paths(path)
    st.parent.mkdir(parents=True, exist_ok=True)
    vectors = np.asarray(table.vectors, np.float32)
    write_bytes_atomic(st, save({n: np.ascontiguousarray(vectors[i]) for i, n in enumerate(table.names)}))
    meta = {"format": FORMAT, "method": table.method, "kind": table.kind, "h_shape": list(table.h_shape),
            "names": {n: i for i, n in enumerate(table.names)},
            "groups": {g: list(m) for g, m in table.groups.items()}, "scale": table.scale, "rows": table.rows,
            "model_sha256": table.model_sha256, "training": dict(table.training)}
    write_bytes_atomic(js, (json.dumps(meta, indent=1) + "\n").encode())
    return st, js


def load_table(path: str | os.PathLike) -> ConceptTable:
    """Read a table written by :func:`save_table`; any problem is a one-line :class:`ConceptTableError`."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    st, js = table_paths(path)
    for p in (st, js):
        if not p.is_file():
            raise ConceptTableError(f"concept table {p}: no such file")
    try:
        meta = json.loads(js.read_text())
        if meta.get("format") != FORMAT:
            raise ConceptTableError(f"concept table {js}: not a {FORMAT} file")
        names = sorted(meta["names"], key=meta["names"].get)
        tensors = load_file(st)
    except ConceptTableError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError, OSError, SafetensorError) as e:
        raise ConceptTableError(f"concept table {st.with_suffix('')}: corrupt or truncated ({type(e).__name__}: "
                                f"{e})") from None
    missing = [n for n in names if n not in tensors]
    if missing:
        raise ConceptTableError(f"concept table {st}: no tensor for concepts {missing}")
    try:
        return ConceptTable(vectors=np.stack([np.asarray(tensors[n], np.float32) for n in names]),
                            names=tuple(names), method=meta["method"], kind=meta["kind"],
                            h_shape=tuple(meta["h_shape"]),
                            groups={g: tuple(m) for g, m in meta.get("groups", {}).items()},
                            scale=float(meta.get("scale", 1.0)), rows=meta.get("rows", "cond"),
                            model_sha256=meta.get("model_sha256"), training=meta.get("training", {}))
    except (ValueError, KeyError) as e:
        if isinstance(e, ConceptTableError):
            raise
        raise ConceptTableError(f"concept table {js}: bad metadata ({e})") from None
