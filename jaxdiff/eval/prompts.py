"""Prompt sets for evaluation runs, as groups of prompts (a group = one row of the results, e.g. one profession).

Sources, by :func:`load_prompt_groups`:

* a shipped set by name (``jaxdiff/assets/prompts/NAME.json``; ``winobias``: Li et al. 2024 / RespoDiff's 36
  professions x 5 templates, :func:`winobias_prompts`);
* a templated JSON file like the shipped ones: ``{"format": "jaxdiff-prompts/1", "subjects": [...],
  "template_sets": {"0": ["Photo of {}", ...]}, "default_template_set": "0", "lowercase_subject": true}``; group
  = subject, its prompts = every template of the chosen set with the (lower-cased) subject in ``{}``;
* a JSON list of prompts, or an object ``{group: [prompts] | prompt}`` (optionally under ``"groups"``);
* a text file, one prompt per line (blank lines and ``#`` comments skipped).

In the last two forms without groups, every prompt is its own group.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import jaxdiff

FORMAT = "jaxdiff-prompts/1"
SHIPPED = Path(jaxdiff.__file__).resolve().parent / "assets" / "prompts"


class PromptFileError(ValueError):
    """A prompt source that is missing, unreadable or malformed (one line)."""


@dataclass(frozen=True)
class PromptGroup:
    name: str
    prompts: tuple[str, ...]


def shipped_prompt_sets() -> list[str]:
    return sorted(p.stem for p in SHIPPED.glob("*.json"))


def _templated(d: dict, where: str, template_set: str | None) -> tuple[PromptGroup, ...]:
    sets = d.get("template_sets")
    subjects = d.get("subjects")
    if not isinstance(sets, dict) or not isinstance(subjects, list) or not subjects:
        raise PromptFileError(f"{where}: a {FORMAT} file needs 'subjects' (a list) and 'template_sets' (an object)")
    key = template_set if template_set is not None else d.get("default_template_set", next(iter(sets), None))
    if key not in sets:
        raise PromptFileError(f"{where}: no template set {key!r}; it has: {', '.join(sets)}")
    templates = sets[key]
    if not templates or not all(isinstance(t, str) and t.count("{}") == 1 for t in templates):
        raise PromptFileError(f"{where}: template set {key!r} must be a list of strings each with one '{{}}'")
    lower = bool(d.get("lowercase_subject", False))
    return tuple(PromptGroup(str(s), tuple(t.replace("{}", str(s).lower() if lower else str(s)) for t in templates))
                 for s in subjects)


def _plain(data, where: str) -> tuple[PromptGroup, ...]:
    if isinstance(data, dict) and isinstance(data.get("groups"), dict):
        data = data["groups"]
    if isinstance(data, list):
        data = {p: [p] for p in data if isinstance(p, str)} if all(isinstance(p, str) for p in data) else None
    if not isinstance(data, dict):
        raise PromptFileError(f"{where}: expected a list of prompts, an object {{group: [prompts]}} or a "
                              f"{FORMAT} templated file")
    groups = []
    for name, prompts in data.items():
        prompts = [prompts] if isinstance(prompts, str) else prompts
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise PromptFileError(f"{where}: group {name!r} must be a non-empty list of non-empty prompts")
        groups.append(PromptGroup(str(name), tuple(p.strip() for p in prompts)))
    return tuple(groups)


def load_prompt_groups(source: str, template_set: str | None = None) -> tuple[PromptGroup, ...]:
    """Prompt groups of ``source`` (a shipped set's name or a file; see the module docstring). ``template_set`` picks
    a templated file's set (default: its ``default_template_set``); it is an error for other sources."""
    path = Path(source)
    if not path.exists() and source in shipped_prompt_sets():
        path = SHIPPED / f"{source}.json"
    if not path.is_file():
        shipped = ", ".join(shipped_prompt_sets()) or "none"
        raise PromptFileError(f"prompts {source!r}: no such file, and not a shipped prompt set ({shipped})")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise PromptFileError(f"prompts {path}: cannot read ({e})") from None
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except ValueError as e:
            raise PromptFileError(f"prompts {path}: not valid JSON ({e})") from None
        if isinstance(data, dict) and data.get("format") == FORMAT:
            groups = _templated(data, f"prompts {path}", template_set)
        else:
            groups = _plain(data, f"prompts {path}")
            _no_template_set(template_set, path)
    else:
        _no_template_set(template_set, path)
        lines = [ln.strip() for ln in text.splitlines()]
        groups = tuple(PromptGroup(ln, (ln,)) for ln in lines if ln and not ln.startswith("#"))
    if not groups:
        raise PromptFileError(f"prompts {path}: no prompts")
    names = [g.name for g in groups]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise PromptFileError(f"prompts {path}: repeated group names {dup}")
    return groups


def _no_template_set(template_set: str | None, path: Path) -> None:
    if template_set is not None:
        raise PromptFileError(f"prompts {path}: a template set ({template_set!r}) applies only to {FORMAT} "
                              "templated files")


def winobias_prompts(template_set: str = "0") -> tuple[PromptGroup, ...]:
    """The 36 Winobias professions, each with the 5 prompts of ``template_set`` ("0": "Image of nurse", ...;
    "1": "Image of a successful nurse", ...), as in Li et al.'s ``winobias_cfg.py``."""
    return load_prompt_groups("winobias", template_set)
