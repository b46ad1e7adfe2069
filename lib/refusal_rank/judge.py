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


def label_group(row: dict[str, Any]) -> str:
    """The model a labelled row is scored under: its name, and its dtype where the row records one. The same
    checkpoint name trained in float32 and in bf16 is two models (``variant@1x attacked`` in float32 left
    1 of 50 refusing by hand, in bf16 5 of 50), so they are never pooled. Rows written before the dtype was
    recorded keep the bare name."""
    return f"{row['model']} [{row['dtype']}]" if row.get("dtype") else row["model"]


def judge_report(rows: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Precision/recall of the markers (refusal = positive) overall and per model (``label_group``);
    n = labelled completions."""
    rows = load_labels() if rows is None else rows
    if not rows:
        return {"precision": None, "recall": None, "n": 0}
    pred = [is_refusal(r["completion"]) for r in rows]
    gold = [bool(r["refusal"]) for r in rows]
    out = judge_agreement(pred, gold)
    out["by_model"] = {}
    groups = [label_group(r) for r in rows]
    for m in sorted(set(groups)):
        idx = [i for i, g in enumerate(groups) if g == m]
        out["by_model"][m] = judge_agreement([pred[i] for i in idx], [gold[i] for i in idx])
    out["disagreements"] = [{"id": rows[i]["id"], "markers": pred[i], "label": gold[i], "reason": rows[i]["reason"]}
                            for i in range(len(rows)) if pred[i] != gold[i]]
    return out
