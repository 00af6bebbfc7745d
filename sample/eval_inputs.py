"""Inputs of ``python -m sample.eval_concepts`` checked before any sampling: attribute phrases (given, or recorded in
a concept table), the image size, the CLIP scorer, file hashes. Every problem is a one-line :class:`CLIError`."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from sample.cli import CLIError


def table_files(source: str) -> tuple[Path, Path]:
    """(safetensors, json) of a table given as a path or a shipped name (as :func:`sample.concepts.resolve_table`)."""
    from jaxdiff.steer.concepts import table_paths
    from sample.concepts import SHIPPED

    st, js = table_paths(source)
    return (st, js) if js.is_file() else table_paths(SHIPPED / source)


def table_phrases(source: str, members) -> dict[str, str] | None:
    """Attribute phrases of a table's concepts, when its JSON records them: a top-level ``phrases`` object, else the
    training data's first template filled with each concept's word ("a photo of a {}" + "woman")."""
    meta = json.loads(table_files(source)[1].read_text())
    phrases = meta.get("phrases")
    if not isinstance(phrases, dict):
        data = (meta.get("training") or {}).get("data_settings") or {}
        words, templates = data.get("concepts"), data.get("templates")
        if not isinstance(words, dict) or not templates:
            return None
        phrases = {name: templates[0].replace("{}", str(word)) for name, word in words.items()}
    return {m: str(phrases[m]) for m in members} if all(m in phrases for m in members) else None


def parse_attributes(text: str | None, table, table_source: str | None, group: str | None):
    """``--attributes`` -> (phrases, {concept: phrase}). Entries are phrases, or ``CONCEPT=PHRASE`` to tie a phrase
    to a table concept; without the flag, the table group's recorded phrases."""
    from jaxdiff.steer.concepts import ConceptTableError

    members = table.group(group) if table is not None else ()
    if text is None:
        if table is None:
            raise CLIError("--attributes is required without --concepts (e.g. --attributes \"a woman,a man\")")
        tied = table_phrases(table_source, members)
        if tied is None:
            raise CLIError(f"--concepts {table_source}: the table records no attribute phrases for group {group!r}; "
                           "give --attributes \"PHRASE,PHRASE\"")
        return list(tied.values()), tied
    phrases, tied = [], {}
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            raise CLIError(f"--attributes {text!r}: empty attribute phrase")
        name, eq, phrase = entry.partition("=")
        if eq:
            if table is None:
                raise CLIError(f"--attributes {entry!r}: CONCEPT=PHRASE needs --concepts")
            try:
                table.index(name.strip())
            except ConceptTableError as e:
                raise CLIError(f"--attributes {entry!r}: {e}") from None
            if name.strip() not in members:
                raise CLIError(f"--attributes {entry!r}: concept {name.strip()!r} is not in group {group!r} "
                               f"({', '.join(members)})")
            tied[name.strip()] = phrase.strip()
            entry = phrase.strip()
        phrases.append(entry)
    if len(phrases) < 2:
        raise CLIError(f"--attributes {text!r}: need at least 2 attribute phrases, got {len(phrases)}")
    if len(set(phrases)) != len(phrases):
        raise CLIError(f"--attributes {text!r}: repeated attribute phrase")
    return phrases, tied


def parse_size(text: str | None) -> tuple[int | None, int | None]:
    """``512`` or ``HxW`` -> (height, width); None -> the model's default."""
    if text is None:
        return None, None
    m = re.fullmatch(r"(\d+)(?:x(\d+))?", text.strip())
    if not m:
        raise CLIError(f"--size {text!r}: expected PIXELS or HEIGHTxWIDTH")
    h = int(m.group(1))
    return h, int(m.group(2) or h)


def load_scorer(folder: str, allow_pickle: bool):
    """(CLIPScorer, weights sha256) of a transformers CLIPModel folder; any problem is a CLIError."""
    from jaxdiff.clip_preprocess import CLIPImagePreprocess, PreprocessConfigError
    from jaxdiff.eval.clip_metrics import CLIPScorer
    from jaxdiff.tokenizer import TokenizerError, load_tokenizer
    from weights_convert.clip_model import clip_model_config, clip_weight_files, load_clip_model
    from weights_convert.convert import ConversionError
    from weights_convert.pipeline import sha256_files
    from weights_convert.readers import CheckpointError

    try:
        config = clip_model_config(folder)
        tok = load_tokenizer(folder, model_max_length=config.text.max_position_embeddings)
        preprocess = CLIPImagePreprocess.from_folder(folder)
        config, params = load_clip_model(folder, allow_pickle=allow_pickle)
        sha = sha256_files(clip_weight_files(folder, allow_pickle))
    except (CheckpointError, TokenizerError, PreprocessConfigError) as e:
        raise CLIError(f"--clip: {e}") from None
    except ConversionError as e:
        raise CLIError(f"--clip {folder}: not a CLIPModel checkpoint ({len(e.missing)} missing, {len(e.unused)} "
                       f"unused, {len(e.mismatched)} mismatched parameters; e.g. "
                       f"{(e.missing + e.unused + e.mismatched)[:2]})") from None
    return CLIPScorer(config, params, tok, preprocess), sha


def file_sha256(paths) -> str | None:
    from weights_convert.pipeline import sha256_files

    paths = [Path(p) for p in paths]
    return sha256_files(paths) if paths and all(p.is_file() for p in paths) else None


@dataclass(frozen=True, eq=False)
class EvalInputs:
    """Everything a run needs besides the diffusion model, checked: prompt groups, the table (or None), attribute
    phrases and their concepts, the CLIP scorer and its weights' hash, the image size (None: the model's)."""

    groups: tuple
    table: object
    attributes: list
    tied: dict
    scorer: object
    clip_sha256: str
    height: int | None
    width: int | None


def check_inputs(s: dict) -> EvalInputs:
    """The settings dict's inputs, cheapest checks first (numbers, prompts, table, attributes, CLIP folder)."""
    from jaxdiff.eval.prompts import PromptFileError, load_prompt_groups
    from jaxdiff.steer.concepts import ConceptTableError
    from sample.concepts import resolve_table

    for k in ("images_per_prompt", "steps", "batch"):
        if s[k] < 1:
            raise CLIError(f"--{k.replace('_', '-')} {s[k]}: must be >= 1")
    if not math.isfinite(s["guidance"]):
        raise CLIError(f"--guidance {s['guidance']}: must be finite")
    height, width = parse_size(s.get("size"))
    try:
        groups = load_prompt_groups(s["prompts"], s.get("template_set"))
    except PromptFileError as e:
        raise CLIError(str(e)) from None
    table = None
    if s.get("concepts"):
        if not s.get("fair"):
            raise CLIError("--concepts needs --fair GROUP (one concept of the group per image)")
        try:
            table = resolve_table(s["concepts"])
            table.group(s["fair"])
        except ConceptTableError as e:
            raise CLIError(str(e)) from None
    elif s.get("fair") or s.get("lowpass") is not None or s.get("concept_scale") is not None:
        raise CLIError("--fair/--lowpass/--concept-scale need a concept table: --concepts PATH|NAME")
    attributes, tied = parse_attributes(s.get("attributes"), table, s.get("concepts"), s.get("fair"))
    scorer, clip_sha = load_scorer(s["clip"], s.get("allow_pickle", False))
    return EvalInputs(groups, table, attributes, tied, scorer, clip_sha, height, width)
