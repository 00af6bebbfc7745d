"""Template-driven conversion of a PyTorch state dict into a jaxdiff parameter pytree, with strict accounting.

The template (a nested dict of ``jax.ShapeDtypeStruct``, from ``init_*(template_maker(), config)``) says
exactly which leaves must exist. Conversion succeeds only if

* every template leaf is filled exactly once,
* every source key is used or matched by an explicit ignore pattern,
* every converted array has the template's shape;

otherwise one :class:`ConversionError` lists every missing, unused, duplicated and mismatched name
(big_vision's ``merge_params`` discipline), so a wrong checkpoint is diagnosed in one go.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import jax
import numpy as np
from flax import traverse_util

from weights_convert.rules import IGNORE_ALWAYS, LAYOUT_OPS, LEAF_RULES, LeafRule, Rename, apply_renames, match_leaf


class ConversionError(ValueError):
    """The source state dict does not fit the model template. Attributes list the offending names."""

    def __init__(self, what: str, missing=(), unused=(), mismatched=(), duplicated=()):
        self.missing, self.unused, self.mismatched, self.duplicated = (
            sorted(missing), sorted(unused), sorted(mismatched), sorted(duplicated))
        parts = [f"cannot convert {what}:"]

        def block(title, names):
            if names:
                shown = "\n    ".join(names[:40])
                more = f"\n    ... and {len(names) - 40} more" if len(names) > 40 else ""
                parts.append(f"  {len(names)} {title}:\n    {shown}{more}")

        block("missing parameters (in the model, not in the checkpoint)", self.missing)
        block("unused checkpoint keys (in the checkpoint, not in the model)", self.unused)
        block("shape mismatches", self.mismatched)
        block("parameters filled more than once", self.duplicated)
        super().__init__("\n".join(parts))


@dataclass(frozen=True)
class ComponentRules:
    """How one component's source keys map onto its template."""

    renames: tuple[Rename, ...] = ()
    leaf_rules: tuple[LeafRule, ...] = LEAF_RULES
    ignore: tuple[str, ...] = IGNORE_ALWAYS


@dataclass
class ConversionReport:
    used: int = 0
    ignored: list = field(default_factory=list)
    filled: int = 0


def flatten_template(template: dict) -> dict[str, object]:
    return traverse_util.flatten_dict(template, sep="/")


def to_device(a: np.ndarray) -> jax.Array:
    """The loaders' ``put``: each converted leaf goes to the default device as soon as it is made."""
    return jax.device_put(a)


def shape_stand_in(value) -> np.ndarray:
    """A zero-byte array with ``value``'s shape and dtype (every element aliases one scalar): layout views run on
    it to check shapes without reading the tensor."""
    return np.broadcast_to(np.zeros((), np.dtype(value.dtype)), tuple(value.shape))


def _is_float(a) -> bool:
    return np.issubdtype(a.dtype, np.floating) or a.dtype.kind == "V" or str(a.dtype) == "bfloat16"


def state_dict_to_params(state_dict, template: dict, rules: ComponentRules = ComponentRules(), *,
                         what: str = "checkpoint", dtype=np.float32, put=None) -> tuple[dict, ConversionReport]:
    """Convert ``state_dict`` (PyTorch names -> arrays) into a params pytree shaped like ``template``.

    Returns ``(params, report)``; raises :class:`ConversionError` listing every problem at once.
    Floating-point arrays are cast to ``dtype`` (float32 by default: checkpoints are often fp16/bf16).

    Two passes, so that a model's weights are never held twice: the first checks every name and shape on
    zero-byte stand-ins (nothing is read), the second reads one source tensor at a time (values may be
    :class:`weights_convert.readers.LazyTensor`), lays it out, casts it in the same copy and hands it to
    ``put`` (e.g. ``jax.device_put``; default: keep the numpy array, which may then be the source array itself
    when no layout change or cast was needed) before the next is read.
    """
    slots = flatten_template(template)
    plan: list[tuple[str, LeafRule, tuple[str, ...]]] = []
    claimed: set[str] = set()
    unused, mismatched, duplicated = [], [], []
    report = ConversionReport()
    for key in sorted(state_dict):
        value = state_dict[key]
        if any(re.search(p, key) for p in rules.ignore):
            report.ignored.append(key)
            continue
        renamed = apply_renames(key, rules.renames)
        hit = match_leaf(renamed, len(value.shape), rules.leaf_rules)
        if hit is None:
            unused.append(f"{key} {list(value.shape)}")
            continue
        rule, targets = hit
        if not all(t in slots for t in targets):
            unused.append(f"{key} {list(value.shape)} (would be {', '.join(targets)})")
            continue
        try:
            pieces = LAYOUT_OPS[rule.op](shape_stand_in(value))
        except ValueError as e:
            mismatched.append(f"{key}: {e}")
            continue
        ok = True
        for target, piece in zip(targets, pieces):
            want = tuple(slots[target].shape)
            if piece.shape != want:
                mismatched.append(f"{key} -> {target}: checkpoint {list(piece.shape)} (after {rule.op}), "
                                  f"model {list(want)}")
                ok = False
            elif target in claimed:
                duplicated.append(f"{target} (again from {key})")
                ok = False
            else:
                claimed.add(target)
        if ok:
            plan.append((key, rule, targets))
        report.used += 1
    missing = [f"{k} {list(v.shape)}" for k, v in slots.items() if k not in claimed and not _is_mismatch(k, mismatched)]
    if missing or unused or mismatched or duplicated:
        raise ConversionError(what, missing, unused, mismatched, duplicated)
    put = put or (lambda a: a)
    filled = {}
    for key, rule, targets in plan:
        for target, piece in zip(targets, LAYOUT_OPS[rule.op](np.asarray(state_dict[key]))):
            filled[target] = put(np.asarray(piece, dtype if _is_float(piece) else None, order="C"))
    report.filled = len(filled)
    return traverse_util.unflatten_dict(filled, sep="/"), report


def _is_mismatch(target: str, mismatched: list[str]) -> bool:
    return any(f"-> {target}:" in m for m in mismatched)
