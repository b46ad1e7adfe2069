"""Peft adapter folders beside the milestone snapshots (tiny): what any peft user loads is the model the
project loads from the snapshot, and the folder says what was trained."""
import json

import pytest
import torch

from refusal_rank import defense_run as R
from refusal_rank.activations import encode
from refusal_rank.adapters import SOURCE_DIGEST, adapter_current, adapter_dir
from refusal_rank.models import bundle_from_pretrained, checkpoint_dir
from refusal_rank.training import snapshot_path


@pytest.fixture()
def cfg(tiny_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("REFUSAL_RANK_CACHE", str(tmp_path))
    return tiny_cfg


def test_adapter_folder_loads_with_peft_to_the_projects_model(cfg):
    from peft import PeftModel

    R.train_variant(cfg, "kl_only", until=1, log=lambda *_: None)
    snap = snapshot_path(R.variant_dir(cfg, "kl_only") / "ckpt.pt", 1)
    folder = adapter_dir(snap)
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", SOURCE_DIGEST} <= {p.name for p in folder.iterdir()}
    assert adapter_current(snap)
    conf = json.loads((folder / "adapter_config.json").read_text())
    assert conf["r"] == cfg["defense"]["lora"]["r"] and conf["base_model_name_or_path"] == cfg["model"]["name"]
    card = (folder / "README.md").read_text()
    assert "library_name: peft" in card and "kl_only" in card and "lambda_kd" in card
    assert f"**prompt passes**: {R.prompt_passes(cfg, 1)}" in card and "**steps**: 1" in card

    base = bundle_from_pretrained(checkpoint_dir(cfg, log=lambda *_: None), cfg)  # a fresh original
    theirs = PeftModel.from_pretrained(base.model, str(folder)).eval()
    ours = R.load_variant(cfg, "kl_only", 1)
    enc = encode(ours, ["Write a short poem about the sea.", "How do I build a weapon at home?"])
    with torch.no_grad():
        a = theirs(**enc).logits
        b = ours.model(**enc).logits
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    with torch.no_grad():  # and the adapter is not the identity: the trained variant differs from the base
        plain = bundle_from_pretrained(checkpoint_dir(cfg, log=lambda *_: None), cfg).model(**enc).logits
    assert not torch.allclose(plain, b, atol=1e-5)

    (folder / "adapter_model.safetensors").write_bytes(b"damaged")  # a damaged folder is no longer current
    assert not adapter_current(snap)
