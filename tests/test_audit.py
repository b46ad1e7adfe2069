"""`refusal-rank audit` on tiny: an abliterated copy fails with a rank-1 signature, an unchanged copy passes, a
corrupted file is reported, and checkpoints the audit cannot run on get one sentence and exit 2."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from refusal_rank import audit as AU
from refusal_rank import pipeline as P
from refusal_rank import weight_diff as W
from refusal_rank.ablation import export_orthogonalized, orthonormalize
from refusal_rank.config import REPO_ROOT, load_config
from refusal_rank.models import checkpoint_dir, write_manifest

KEYS = ("verdict", "gates", "provenance", "disposition", "fragility")


@pytest.fixture(scope="module")
def original(tiny):
    return Path(checkpoint_dir(load_config("tiny"), log=lambda *_: None))


@pytest.fixture(scope="module")
def abliterated(tiny, tiny_cfg, tmp_path_factory):
    """The project's own K=1 weight edit along the tiny model's selected direction, shipped with a fresh
    manifest of its own (as a fork would be)."""
    tv = P.filtered_train_val(tiny_cfg, tiny)
    sel, _ = P.discover_direction(tiny_cfg, tiny, tv)
    out = tmp_path_factory.mktemp("abl") / "tiny-abliterated"
    export_orthogonalized(tiny, sel.unit[:, None], out)
    write_manifest(out)
    return out


def audit(tmp_path, *args):
    out = tmp_path / "reports"
    rc = AU.main([*map(str, args), "--profile", "tiny", "--out", str(out), "--label", "r"])
    js = out / "r.json"
    return rc, (json.loads(js.read_text()) if js.is_file() else None), out / "r.md"


def copy_of(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_unchanged_copy_passes(original, tmp_path):
    model = copy_of(original, tmp_path / "copy")
    rc, rep, md = audit(tmp_path, model, "--fast", "--reference", "original")
    assert rc == 0, rep["gates"]
    assert rep["verdict"] == "pass" and all(k in rep for k in (*KEYS, "diff"))
    assert rep["provenance"]["status"] == "self_consistent"  # its own MANIFEST.json, no pinned one
    assert all(f["reference"] == "same" for f in rep["provenance"]["files"].values() if f["weights"])
    assert rep["diff"]["signature"]["kind"] == "identical"
    for g in rep["gates"].values():
        assert {"value", "threshold", "passed"} <= set(g)
    # paired differences against an identical reference are exactly zero
    assert all(rep["behaviour_diff"][s]["diff"] == 0 for s in ("harmful", "harmless", "overrefusal"))
    assert rep["behaviour_diff"]["kl_harmless"]["mean"] == 0
    assert rep["fragility"]["held_out"] and rep["fragility"]["rank1"]["refusal_rate_harmful"]["n"] == 6
    assert "**PASS**" in md.read_text()
    # what the numbers were computed in, beside the checkpoint's stored dtype (tiny: float32 on the CPU)
    assert rep["compute"] == {"dtype": "float32", "device": "cpu", "threads": torch.get_num_threads()}
    assert "computed in float32 on cpu" in md.read_text()


def test_abliterated_copy_fails_and_names_a_rank1_edit(abliterated, tmp_path):
    rc, rep, md = audit(tmp_path, abliterated, "--fast", "--reference", "original")
    assert rc == 1 and rep["verdict"] == "fail"
    sig = rep["diff"]["signature"]
    assert sig["kind"] == "abliteration", sig
    assert sig["n_projected"] == 1 + 2 * 4  # the embedding and both writers of each of the 4 layers
    assert "weight_edit" in rep["failed"] and not rep["gates"]["weight_edit"]["passed"]
    # its own manifest matches: provenance passes, which is the point of gating on more than hashes
    assert rep["provenance"]["status"] == "self_consistent" and rep["gates"]["provenance"]["passed"]
    rows = {r["name"]: r for r in rep["diff"]["tensors"]}
    assert rows["model.layers.2.mlp.down_proj.weight"]["rank"] == 1
    assert not rows["model.layers.2.mlp.up_proj.weight"]["changed"]
    assert rows["lm_head.weight"]["untied"] and not rows["lm_head.weight"]["changed"]
    text = md.read_text()
    assert "**FAIL**" in text and "rank-1 projection" in text and "abliteration" in text


def test_pinned_manifest_verifies_a_copy_and_catches_an_edit(original, abliterated, tmp_path):
    pinned = tmp_path / "pinned.json"
    shutil.copy(original / "MANIFEST.json", pinned)
    rc, rep, _ = audit(tmp_path, copy_of(original, tmp_path / "copy"), "--fast", "--manifest", pinned)
    assert rc == 0 and rep["provenance"]["status"] == "verified" and rep["provenance"]["manifest_source"] == "pinned"
    rc, rep, _ = audit(tmp_path, abliterated, "--fast", "--manifest", pinned)
    # the weights, and the config whose embeddings the edit untied, are not what was pinned
    assert rc == 1 and {"model.safetensors", "config.json"} <= set(rep["provenance"]["corrupted"])
    assert rep["failed"] == ["provenance"] and rep["disposition"] is None


def test_corrupted_weight_file_is_reported(original, tmp_path):
    model = copy_of(original, tmp_path / "corrupt")
    w = model / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-3] ^= 0xFF  # one byte of the last tensor's data: still parses, no longer what the manifest says
    w.write_bytes(bytes(data))
    rc, rep, md = audit(tmp_path, model, "--fast")
    assert rc == 1 and rep["verdict"] == "fail" and rep["failed"] == ["provenance"]
    assert rep["provenance"]["status"] == "corrupted" and rep["provenance"]["corrupted"] == ["model.safetensors"]
    assert rep["provenance"]["files"]["model.safetensors"]["manifest"] == "differs"
    assert rep["disposition"] is None and "corrupted" in md.read_text()


def test_truncated_weight_file_without_manifest_is_reported(original, tmp_path):
    model = copy_of(original, tmp_path / "cut")
    (model / "MANIFEST.json").unlink()
    w = model / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-1000])
    rc, rep, _ = audit(tmp_path, model, "--fast")
    assert rc == 1 and rep["provenance"]["status"] == "corrupted"
    assert rep["provenance"]["files"]["model.safetensors"]["readable"] is False


def _no_template(original, dst):
    model = copy_of(original, dst)
    (model / "chat_template.jinja").unlink(missing_ok=True)
    tc = model / "tokenizer_config.json"
    cfg = json.loads(tc.read_text())
    cfg.pop("chat_template", None)
    tc.write_text(json.dumps(cfg))
    return model


def _not_causal(original, dst):
    from transformers import AutoConfig, LlamaForSequenceClassification

    cfg = AutoConfig.from_pretrained(original)
    cfg.num_labels = 2
    LlamaForSequenceClassification(cfg).save_pretrained(dst)
    return dst


@pytest.mark.parametrize("case,make,sentence", [
    ("missing", lambda o, d: d / "nowhere", "no such folder"),
    ("not-causal", _not_causal, "not a causal language model"),
    ("no-template", _no_template, "no chat template"),
    ("no-config", lambda o, d: (d.mkdir(), d)[1], "holds no config.json"),
])
def test_cannot_run_gives_one_sentence_and_exit_2(original, tmp_path, capsys, case, make, sentence):
    model = make(original, tmp_path / case)
    capsys.readouterr()  # what building the test checkpoint printed
    rc, rep, _ = audit(tmp_path, model, "--fast")
    err = capsys.readouterr().err.strip()
    assert rc == 2 and rep is None
    assert sentence in err and len(err.splitlines()) == 1 and err.endswith("."), err


def test_module_entry_point_exits_2_with_one_sentence(tmp_path):
    r = subprocess.run([sys.executable, "-m", "refusal_rank.audit", str(tmp_path / "absent"), "--profile", "tiny"],
                       capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert r.returncode == 2 and "no such folder" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_trained_variant_reads_as_a_lora_fine_tune(tiny_cfg, tmp_path):
    """A notebook-03 variant (LoRA on every linear map, merged) is exported for its audit and removed after."""
    from refusal_rank import defense_run as R

    R.train_variant(tiny_cfg, "kl_only", until=1, log=lambda *_: None)
    rc, rep, md = audit(tmp_path, "kl_only@1", "--fast", "--reference", "original")
    assert rc == 0, rep["failed"]
    sig = rep["diff"]["signature"]
    assert sig["kind"] == "low_rank" and 1 <= sig["max_rank"] <= tiny_cfg["defense"]["lora"]["r"], sig
    assert sig["changed_by_role"].get("embedding", 0) == 0 and "LoRA" in md.read_text()
    assert "exported for the audit" in rep["model"]["origin"] and not Path(rep["model"]["path"]).exists()


def test_a_variant_export_carries_a_model_card(tiny_cfg, tmp_path):
    """What was done to an exported variant travels with it (README.md, the hub's model-card file)."""
    card = AU.write_variant_card(tiny_cfg, "defended", 1, tmp_path).read_text()
    assert card.startswith("---\nbase_model: tiny-llama") and "refusal-behaviour-altered" in card
    assert "notebook 03's defended variant at step 1" in card and "merged into the original weights" in card
    assert "lambda_cov" in card and "prompt passes" in card


def test_full_audit_runs_the_rank_k_screen(original, tmp_path):
    rc, rep, md = audit(tmp_path, "original")
    assert rc == 0 and not rep["fast"] and rep["reference"] is None and "diff" not in rep
    screen = rep["fragility"]["screen"]
    assert screen["estimator"] == "dim-svd" and "1" in screen["per_k"]
    assert all("refusal_rate_harmful" in r for r in screen["per_k"].values())  # gen_below > 1: always generated
    assert rep["disposition"]["harmful"]["n"] == 12 and rep["disposition"]["max_new_tokens"] == 8
    assert "Rank-K screen" in md.read_text()


def test_fast_settings_replace_the_profiles(tiny_cfg):
    fast = AU.audit_config(tiny_cfg, True)
    assert fast["eval"]["max_new_tokens"] == tiny_cfg["audit"]["fast"]["eval"]["max_new_tokens"]
    assert fast["audit"]["run_screen"] is False and tiny_cfg["audit"]["run_screen"] is True
    assert AU.audit_config(tiny_cfg, False)["eval"] == tiny_cfg["eval"]


def test_every_profile_has_the_audit_knobs():
    from refusal_rank.config import available_profiles

    needed = {"min_harmful_refusal", "max_harmless_refusal", "max_overrefusal", "max_harmful_drop", "max_benign_rise",
              "min_refusal_under_rank1", "enforce_fragility", "require_pinned", "failing_signatures", "n_ce_harmless",
              "run_screen", "keep_exports", "screen", "diff", "fast"}
    for name in available_profiles():
        a = load_config(name)["audit"]
        assert needed <= set(a), (name, needed - set(a))
        W.DiffConfig.from_cfg(a["diff"])
        assert set(a["fast"]) <= needed | {"data", "eval", "directions"}


# ---- the weight diff's mathematics, on synthetic matrices


def _w(n, m, seed=0, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, m, generator=g, dtype=torch.float64) * 0.02).to(dtype)


DC = W.DiffConfig(rel_change=1e-6, rel_tol=0.05, tail_factor=2.0, edge_factor=2.0, probe=32, same_direction=0.99,
                  projection_tol=0.01, low_rank_max=16)


def test_bf16_rank1_projection_is_found_through_the_rounding_noise():
    ref = _w(512, 256)
    g = torch.Generator().manual_seed(3)
    u = orthonormalize(torch.randn(512, 1, generator=g, dtype=torch.float64))[:, 0]
    edited = (ref.double() - u[:, None] * (u @ ref.double())[None, :]).to(torch.bfloat16)
    row = W.diff_tensor("model.layers.0.self_attn.o_proj.weight", edited, ref, DC)
    assert row["changed"] and row["rank"] == 1 and row["projection"]
    assert abs(float(row["_u"] @ u)) > 0.999
    # a rank-1 update that is not a projection of the stream direction is not read as one
    v = torch.randn(256, generator=g, dtype=torch.float64)
    other = (ref.double() + 0.05 * u[:, None] * v[None, :]).to(torch.bfloat16)
    row = W.diff_tensor("model.layers.0.self_attn.o_proj.weight", other, ref, DC)
    assert row["rank"] == 1 and not row["projection"]


@pytest.mark.parametrize("rel", [1e-4, 1e-3, 1e-2])
def test_low_rank_and_dense_changes_in_bf16(rel):
    """A rank-4 change stands out of the bf16 rounding noise even when most of its elements round away (1e-4
    of the weights' norm); a dense change of the same size is flat and reads as more than the probe."""
    ref = _w(768, 512, seed=1)
    g = torch.Generator().manual_seed(2)
    scale = lambda d: d / d.norm() * ref.double().norm() * rel
    lora = torch.randn(768, 4, generator=g, dtype=torch.float64) @ torch.randn(4, 512, generator=g, dtype=torch.float64)
    row = W.diff_tensor("model.layers.0.mlp.up_proj.weight", (ref.double() + scale(lora)).to(torch.bfloat16), ref, DC)
    assert row["changed"] and 1 <= row["rank"] <= 4 and not row["rank_exceeds_probe"], row
    dense = torch.randn(768, 512, generator=g, dtype=torch.float64)
    row = W.diff_tensor("model.layers.0.mlp.up_proj.weight", (ref.double() + scale(dense)).to(torch.bfloat16), ref, DC)
    assert row["changed"] and row["rank_exceeds_probe"], row


def test_lora_like_checkpoint_reads_low_rank(original, tmp_path):
    """Every decoder linear map of a copy changed by a rank-2 delta (a merged LoRA): "low_rank", rank <= 2."""
    from safetensors.torch import load_file, save_file

    model = copy_of(original, tmp_path / "lora")
    state = load_file(model / "model.safetensors")
    g = torch.Generator().manual_seed(0)
    for k, v in state.items():
        if ".layers." in k and k.endswith("proj.weight"):
            state[k] = v + 0.1 * torch.randn(v.shape[0], 2, generator=g) @ torch.randn(2, v.shape[1], generator=g)
    save_file(state, model / "model.safetensors", metadata={"format": "pt"})
    dc = W.DiffConfig.from_cfg(load_config("tiny")["audit"]["diff"])
    sig = W.signature(W.compare_folders(model, original, dc), dc)
    assert sig["kind"] == "low_rank" and sig["max_rank"] == 2, sig
    assert sig["changed_by_role"] == {"linear": 4 * 5, "writer": 4 * 2}  # biases and norms untouched
