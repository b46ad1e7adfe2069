"""Standard peft adapter folders beside the milestone snapshots of a LoRA-trained variant.

The project itself loads a variant from its snapshot (``snapshot-NNNNN.pt``: the trainable tensors, with a
sha256 sidecar checked on load) and merges it into the original in memory. A snapshot is a plain dict of
tensors named by this project's module paths, which no other tool reads. So each milestone also gets an
``adapter-NNNNN/`` folder written by ``PeftModel.save_pretrained`` (``adapter_config.json`` and
``adapter_model.safetensors``), which anyone loads with ``PeftModel.from_pretrained(base, folder)``, and a
model card (``README.md``) saying what was trained. The snapshot stays the verified source: a folder is
built *from* a snapshot, records that snapshot's digest (``snapshot.sha256``) and a manifest of its own
files, and is rebuilt whenever either no longer matches. Nothing is merged here; merging stays an export.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable

from .model_card import write_model_card
from .models import verify_manifest, write_manifest
from .training import load_snapshot, snapshot_digest

SNAPSHOT_PREFIX = "snapshot-"
ADAPTER_PREFIX = "adapter-"
SOURCE_DIGEST = "snapshot.sha256"  # inside the folder: the digest of the snapshot it was built from
PARTIAL_SUFFIX = ".partial"


def adapter_dir(snapshot: Path) -> Path:
    """The adapter folder of a snapshot: ``snapshot-00070.pt`` -> ``adapter-00070/`` beside it."""
    snapshot = Path(snapshot)
    if not snapshot.name.startswith(SNAPSHOT_PREFIX) or snapshot.suffix != ".pt":
        raise ValueError(f"{snapshot} is not a milestone snapshot (expected a file named {SNAPSHOT_PREFIX}NNNNN.pt).")
    return snapshot.with_name(ADAPTER_PREFIX + snapshot.stem[len(SNAPSHOT_PREFIX):])


def adapter_current(snapshot: Path) -> bool:
    """Whether the snapshot's adapter folder exists, matches its own manifest and was built from the
    snapshot as it is now (so an adapter of a retrained or replaced snapshot is never reused)."""
    folder = adapter_dir(snapshot)
    side = folder / SOURCE_DIGEST
    if not folder.is_dir() or not side.is_file() or not verify_manifest(folder):
        return False
    return side.read_text().strip() == snapshot_digest(snapshot)


def missing_adapters(snapshots: list[Path]) -> list[Path]:
    """The snapshots (among those that exist) whose adapter folder is missing, damaged or stale."""
    return [s for s in snapshots if Path(s).is_file() and not adapter_current(s)]


def write_adapter(peft_model: Any, snapshot: Path, card: dict[str, Any], base_model: str) -> Path:
    """Load ``snapshot`` into ``peft_model`` (the PeftModel it was trained as: its weights are overwritten)
    and save it as a peft adapter folder beside the snapshot, atomically: written into ``*.partial`` with
    the model card, the snapshot's digest and a manifest, then renamed into place.

    ``base_model`` (a hub id or a name) replaces the local cache path peft would record in
    ``adapter_config.json``, which means nothing on another machine. Embedding layers are never saved:
    LoRA here adapts linear maps only, and peft's automatic check for a resized vocabulary asks the hub."""
    snapshot = Path(snapshot)
    # the digest is read before the weights: if the snapshot were replaced in between, the folder would
    # record the older digest and be rebuilt at the next check, never certified with the wrong one
    digest = snapshot_digest(snapshot)
    load_snapshot(snapshot, peft_model.get_base_model())  # checks the snapshot against its sidecar first
    out = adapter_dir(snapshot)
    tmp = out.with_name(out.name + PARTIAL_SUFFIX)
    shutil.rmtree(tmp, ignore_errors=True)
    for conf in peft_model.peft_config.values():
        conf.base_model_name_or_path = base_model
    peft_model.save_pretrained(str(tmp), safe_serialization=True, save_embedding_layers=False)
    write_model_card(tmp, card)  # replaces the template card peft writes
    (tmp / SOURCE_DIGEST).write_text(digest + "\n")
    write_manifest(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def export_adapters(peft_model: Any, snapshots: list[Path], card_for: Callable[[Path], dict[str, Any]],
                    base_model: str, log: Callable[[str], None] = print) -> list[Path]:
    """Write the adapter folder of every snapshot in ``snapshots`` that lacks a current one (see
    :func:`adapter_current`); ``card_for(snapshot)`` gives its model card's facts. Returns the folders
    written (an empty list when all were current). ``peft_model`` ends holding the last one's weights."""
    written = []
    for snap in missing_adapters(snapshots):
        written.append(write_adapter(peft_model, snap, card_for(snap), base_model))
        log(f"wrote peft adapter {written[-1]}")
    return written
