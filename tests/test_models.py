"""Clear errors when a model cannot be obtained; the offline assembly's hash check."""
import hashlib

import pytest

from refusal_rank import models as Mo
from refusal_rank.config import load_config


def test_missing_model_package_is_clear():
    with pytest.raises(Mo.ModelSourceError, match="is not installed: run"):
        Mo.gguf_part_paths("no-such-model-part", 2, "0.1.0")


def test_assembly_rejects_wrong_hash(tmp_path):
    parts = []
    for i in range(3):
        p = tmp_path / f"part{i}.bin"
        p.write_bytes(bytes([i]) * 1000)
        parts.append(p)
    good = hashlib.sha256(b"".join(p.read_bytes() for p in parts)).hexdigest()
    out = Mo.assemble_gguf(parts, tmp_path / "m.gguf", good)
    assert out.read_bytes()[:1000] == bytes([0]) * 1000
    with pytest.raises(Mo.ModelSourceError, match="not the pinned"):
        Mo.assemble_gguf(parts, tmp_path / "bad.gguf", "0" * 64)
    assert not (tmp_path / "bad.gguf").exists() and not (tmp_path / "bad.gguf.partial").exists()


def test_manifest_detects_corruption(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"hello")
    Mo.write_manifest(tmp_path)
    assert Mo.verify_manifest(tmp_path)
    (tmp_path / "a.bin").write_bytes(b"hellO")
    assert not Mo.verify_manifest(tmp_path)


def test_paper_profile_without_gpu_is_clear(monkeypatch):
    monkeypatch.setattr(Mo.torch.cuda, "is_available", lambda: False)
    with pytest.raises(Mo.ModelSourceError, match="needs a CUDA GPU"):
        Mo.load_model(load_config("paper"))


def test_unreachable_hub_is_clear_and_quick(monkeypatch):
    cfg = load_config("paper")
    monkeypatch.setattr(Mo, "hub_reachable", lambda *a, **k: False)
    with pytest.raises(Mo.ModelSourceError, match="hub is unreachable"):
        Mo.resolve_hub(cfg["model"])


def test_gated_model_without_token_is_clear(monkeypatch):
    cfg = load_config("paper")
    monkeypatch.setattr(Mo, "hub_reachable", lambda *a, **k: True)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(Mo.ModelSourceError, match="gated.*HF_TOKEN"):
        Mo.resolve_hub(cfg["model"])


def test_unknown_source_is_clear(tiny_cfg):
    from refusal_rank.config import override

    with pytest.raises(Mo.ModelSourceError, match="Unknown model source"):
        Mo.checkpoint_dir(override(tiny_cfg, **{"model.source": "ftp"}))
