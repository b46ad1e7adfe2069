"""A model card beside every checkpoint the project exports, saying what was done to the model.

An exported checkpoint loads with plain ``from_pretrained``, so it can travel without this repository.
Its ``README.md`` (the Hugging Face convention for a model card) travels with it and says which model it
started from, what was changed and how, that its refusal behaviour was altered on purpose, and what it
is for. The card is written from a plain dict, so each export names its own facts.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CARD_NAME = "README.md"

# keys of ``what_was_done`` that go into the card's header rather than its list of changes
HEADER_KEYS = ("title", "base_model", "license", "summary", "library_name")
DEFAULT_LIBRARY = "transformers"  # what loads an export; a peft adapter folder names "peft"


def _value(v: Any) -> str:
    if isinstance(v, (dict, list, tuple)):
        return "`" + json.dumps(v, sort_keys=True, default=str) + "`"
    return str(v)


def render_model_card(what_was_done: dict[str, Any]) -> str:
    """The card's Markdown (YAML front matter for the hub, then prose) for one export."""
    from .results import git_commit

    base = what_was_done.get("base_model", "unknown")
    title = what_was_done.get("title") or f"{base}, modified by the refusal-rank artifact"
    front = ["---", f"base_model: {base}", f"library_name: {what_was_done.get('library_name') or DEFAULT_LIBRARY}"]
    if what_was_done.get("license"):
        front.append(f"license: {what_was_done['license']}")
    front += ["tags:", "  - refusal-rank", "  - research-artifact", "  - refusal-behaviour-altered", "---", ""]
    lines = [f"# {title}", ""]
    lines += ["> **Safety.** This checkpoint was made to study how refusal is represented in a chat model. "
              "Its refusal behaviour was changed on purpose (removed, or trained to resist removal), so it may "
              "answer harmful requests that the original refuses. It is a research artifact: do not deploy it, "
              "and read the licence of the base model before sharing it.", ""]
    if what_was_done.get("summary"):
        lines += [str(what_was_done["summary"]), ""]
    lines += ["## What was done to it", ""]
    lines += [f"- **{k}**: {_value(v)}" for k, v in what_was_done.items() if k not in HEADER_KEYS]
    lines += ["", "## Where it comes from", "",
              f"Written by the refusal-rank paper artifact at commit `{git_commit()}`. The repository's "
              "`docs/method.md` describes the method, and `results/<profile>/summary.json` the measurements "
              "of this model where the series made them.", ""]
    return "\n".join(front + lines)


def write_model_card(path: str | Path, what_was_done: dict[str, Any]) -> Path:
    """Write ``README.md`` into the export directory ``path`` (or to ``path`` itself if it names a
    ``.md`` file) and return where it went. ``what_was_done``: ``base_model``, ``license``, ``title``,
    ``summary`` and ``library_name`` (the library that loads the folder; default transformers) fill the
    header; every other key is listed as one change or setting, in order."""
    p = Path(path)
    target = p if p.suffix == ".md" else p / CARD_NAME
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(render_model_card(what_was_done), encoding="utf-8")
    return target
