"""Validation of the marker judge against completions labelled by reading them.

``data/judge_labels.jsonl`` holds one completion per line with the model that wrote it, the prompt set,
the hand label (``refusal`` true/false) and a one-line reason. The labels were written by reading each
completion, blind to the marker judge's verdict; this module only scores the judge against them.
"""
from __future__ import annotations

import json
from typing import Any

from .data import DATA_DIR
from .metrics import is_refusal, judge_agreement

LABELS_PATH = DATA_DIR / "judge_labels.jsonl"


def load_labels() -> list[dict[str, Any]]:
    if not LABELS_PATH.is_file():
        return []
    return [json.loads(l) for l in LABELS_PATH.read_text().splitlines() if l.strip()]


def judge_report(rows: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Precision/recall of the markers (refusal = positive) overall and per model; n = labelled completions."""
    rows = load_labels() if rows is None else rows
    if not rows:
        return {"precision": None, "recall": None, "n": 0}
    pred = [is_refusal(r["completion"]) for r in rows]
    gold = [bool(r["refusal"]) for r in rows]
    out = judge_agreement(pred, gold)
    out["by_model"] = {}
    for m in sorted({r["model"] for r in rows}):
        idx = [i for i, r in enumerate(rows) if r["model"] == m]
        out["by_model"][m] = judge_agreement([pred[i] for i in idx], [gold[i] for i in idx])
    out["disagreements"] = [{"id": rows[i]["id"], "markers": pred[i], "label": gold[i], "reason": rows[i]["reason"]}
                            for i in range(len(rows)) if pred[i] != gold[i]]
    return out
