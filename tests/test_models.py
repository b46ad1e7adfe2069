"""Clear errors when a model cannot be obtained; the offline assembly's hash check; memory handed back."""
import hashlib
import os
import platform
import sys

import pytest
import torch

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


def test_hub_check_asks_through_huggingface_hub_and_honours_its_endpoint(monkeypatch):
    """A local server answering 404 counts as reachable, a closed port as unreachable, each within seconds:
    the check asks the endpoint huggingface_hub is configured with (HF_ENDPOINT), through its own client."""
    import http.server
    import threading
    import time

    from huggingface_hub import constants

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        for endpoint, want in ((f"http://127.0.0.1:{srv.server_port}", True), ("http://127.0.0.1:9", False)):
            monkeypatch.setattr(constants, "ENDPOINT", endpoint)  # what HF_ENDPOINT sets when huggingface_hub loads
            t = time.perf_counter()
            assert Mo.hub_reachable("org/model", timeout=3) is want, endpoint
            assert time.perf_counter() - t < 10
    finally:
        srv.shutdown()


def test_model_card_says_what_was_done(tmp_path):
    from refusal_rank.model_card import write_model_card

    p = write_model_card(tmp_path / "export", {"base_model": "org/base", "title": "A test export", "rank": 3,
                                                "edit": "weight orthogonalisation", "basis": {"layer": 2}})
    text = p.read_text()
    assert p.name == "README.md" and text.startswith("---\nbase_model: org/base\n")
    assert "# A test export" in text and "- **rank**: 3" in text and "- **edit**: weight orthogonalisation" in text
    assert "refusal behaviour was changed on purpose" in text and '`{"layer": 2}`' in text


def test_k1_export_carries_a_model_card(tiny_cfg, tiny, tmp_path):
    import torch

    from refusal_rank import pipeline as P
    from refusal_rank.data import Prompt

    u = torch.nn.functional.normalize(torch.randn(tiny.d_model, 1, generator=torch.Generator().manual_seed(0)), dim=0)
    P.export_check(tiny_cfg, tiny, u, [Prompt("x", "Say hello.", "harmless")], tmp_path / "k1")
    card = (tmp_path / "k1" / "README.md").read_text()
    assert "rank-1 refusal ablation" in card and "- **rank**: 1" in card and "orthogonalisation" in card


def test_head_input_gets_row_major_strides_at_batch_one():
    """The batch-1 last-token slice counts as contiguous to torch but keeps a batch stride of P x d, which
    makes the unembedding's matmul copy its whole weight; the head's pre-hook must hand it row-major strides."""
    import torch

    from refusal_rank.models import canonical_strides, contiguous_head_input

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(8, 5, bias=False)

        def get_output_embeddings(self):
            return self.head

    toy = Toy()
    contiguous_head_input(toy)
    contiguous_head_input(toy)  # registering twice keeps one hook
    seen = []
    toy.head.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    for b in (1, 3):
        h = torch.randn(b, 6, 8)
        x = h[:, -1:, :]
        assert x.stride() == (48, 8, 1)
        out = toy.head(x)
        assert seen[-1].stride() == (8, 8, 1)
        torch.testing.assert_close(out, x @ toy.head.weight.T)
    assert len(toy.head._forward_pre_hooks) == 2
    y = torch.randn(2, 3, 4)
    assert canonical_strides(y) is y  # row-major already: no copy
    t = torch.randn(4, 3).T
    assert canonical_strides(t).stride() == (4, 1) and torch.equal(canonical_strides(t), t)


def _rss_mib() -> float:
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="malloc_trim is glibc's")
def test_release_freed_memory_returns_a_held_heap():
    """The pattern that grew notebook 04 to 16 GB: blocks below glibc's (raised) mmap threshold come from the
    heap, and once freed under a live block they stay resident until trimmed."""
    from refusal_rank.models import release_freed_memory

    big = torch.ones(30 * 2**20 // 4)  # a freed 30 MB block raises the mmap threshold above the 8 MB below
    del big
    blocks = [torch.ones(8 * 2**20 // 4) for _ in range(40)]  # 320 MB, written, from the heap
    top = blocks[-1]  # alive above the others: the heap cannot shrink from its top by itself
    del blocks
    held = _rss_mib()
    assert release_freed_memory()
    assert held - _rss_mib() > 200, "the freed blocks stayed resident"
    del top


def test_weight_edits_and_packing_release_their_copies_on_exit(tiny, monkeypatch):
    """orthogonalized (a copy of every residual writer) and packed_linears (a packed copy of every weight)
    each hand their copies back when they end, on an error too."""
    import copy

    from refusal_rank import ablation, models

    calls = []
    monkeypatch.setattr(ablation, "release_freed_memory", lambda: calls.append("edit") or True)
    monkeypatch.setattr(models, "release_freed_memory", lambda: calls.append("pack") or True)
    U = torch.linalg.qr(torch.randn(tiny.d_model, 2, dtype=torch.float64))[0]
    with ablation.orthogonalized(tiny, U):
        pass
    with pytest.raises(KeyError):
        with ablation.orthogonalized(tiny, U):
            raise KeyError("inside")
    assert calls == ["edit", "edit"]
    bf16 = copy.deepcopy(tiny.model).to(torch.bfloat16)
    if models.can_pack_linears(bf16):
        with pytest.raises(KeyError):
            with models.packed_linears(bf16):
                raise KeyError("inside")
        assert calls == ["edit", "edit", "pack"]
