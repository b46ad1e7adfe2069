"""Ran once (2026-12-05) with the library at d2c9044, against the `defended` run trained at that commit
(cache folder defended-c00d0f3d6a24021bb9c8, moment memory 128, step 70); output stale_memory.json. It needs
that commit's library (the run's cache key, `moment_memory` in the config); kept as the record of how the
numbers were made. Reproduce the per-step covariance term at step 70 of `defended`: real (stale) memory vs memory recomputed at
the step-70 weights, training's length-sorted order vs shuffled rows."""
import sys, json, torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[3] / "lib"))
from refusal_rank.config import load_config
from refusal_rank import defense_run as DR
from refusal_rank.training import Variant, moment_sites, _save_sites, _site_vectors, token_rows, batch_indices, micro_batches
from refusal_rank.activations import encode
from refusal_rank.defense import cov_matching_loss

torch.set_num_threads(2)


def shuffle_rows(z, g):  # as defense.shuffle_rows (e3b05e6)
    return z[torch.randperm(z.shape[0], generator=g)]


class MomentMemory:  # the memory train() used until e3b05e6: newest first, the last `size` vectors, detached
    def __init__(self, size):
        self.size, self.bank = size, {"harmful": None, "harmless": None}

    def with_batch(self, c, cur):
        return cur if self.bank[c] is None else torch.cat([cur, self.bank[c]], 0)

    def push(self, c, cur):
        old = self.bank[c]
        self.bank[c] = (cur.detach() if old is None else torch.cat([cur.detach(), old], 0))[: self.size].clone()
DR.TRAIN_CODE = "mb-sorted"  # the run trained before the pairing fix
cfg = load_config("cpu"); tc = cfg["defense"]["train"]
harm, ok = DR.defense_prompts(cfg)
H, O = [p.text for p in harm], [p.text for p in ok]
run = DR.variant_dir(cfg, "defended"); print(run.name, flush=True)
ck = torch.load(run / "ckpt.pt", weights_only=False)
assert ck["state"]["step"] == 70, ck["state"]["step"]
bank = ck["state"]["moment_memory"]["bank"]
del ck
b = DR.load_variant(cfg, "defended", 70)
layers = DR.defense_layers(cfg, b.n_layers)
teacher = DR.cached_teacher(cfg, b, H + O, layers, False)
m_layers, std = moment_sites(b, Variant("defended"), teacher, layers)
rows = token_rows(b, H + O); L = [len(r) for r in rows]; hl, ol = L[:len(H)], L[len(H):]
P, n_micro = tc["batch_per_class"], tc["micro_batches"]
steps = list(range(62, 71))
plan = {s: micro_batches(*batch_indices(s, tc["seed"], len(H), len(O), P), hl, ol, n_micro) for s in steps}
need_h = sorted({i for s in steps for mh, _ in plan[s] for i in mh}); need_o = sorted({i for s in steps for _, mo in plan[s] for i in mo})
def vecs(texts):
    res = []
    for i in range(0, len(texts), 16):
        enc = encode(b, texts[i:i+16]); saved = []
        with torch.no_grad(), b.lm.trace(enc, logits_to_keep=1):
            _save_sites(b.lm, "pooled", m_layers, b.n_post, saved)
        res.append(_site_vectors([t.float() for t in saved], "pooled", enc["attention_mask"], std).float())
        print("fwd", i, flush=True)
    return torch.cat(res)
zh = dict(zip(need_h, vecs([H[i] for i in need_h]))); zo = dict(zip(need_o, vecs([O[i] for i in need_o])))
mem = MomentMemory(tc["moment_memory"])
for s in steps[:-1]:
    for mh, mo in plan[s]:
        mem.push("harmful", torch.stack([zh[i] for i in mh])); mem.push("harmless", torch.stack([zo[i] for i in mo]))
# staleness: the real bank against the same rows recomputed now
for c in ("harmful", "harmless"):
    real, now = bank[c], mem.bank[c]
    cos = torch.nn.functional.cosine_similarity(real.flatten(1), now.flatten(1), dim=1)
    rel = (real - now).flatten(1).norm(dim=1) / now.flatten(1).norm(dim=1)
    print(c, "stale vs now: cos", round(float(cos.mean()), 4), "min", round(float(cos.min()), 4), "rel diff", round(float(rel.mean()), 4), flush=True)
g = torch.Generator().manual_seed(0)
out = {}
for label, bk in [("real_memory", bank), ("fresh_memory", mem.bank)]:
    vals = {"sorted": [], "shuffled": []}
    m = MomentMemory(tc["moment_memory"]); m.bank = {k: v.clone() for k, v in bk.items()}
    for mh, mo in plan[70]:
        fh, fo = torch.stack([zh[i] for i in mh]), torch.stack([zo[i] for i in mo])
        a, c = m.with_batch("harmful", fh), m.with_batch("harmless", fo)
        vals["sorted"].append(float(cov_matching_loss(a, c)))
        vals["shuffled"].append(sum(float(cov_matching_loss(shuffle_rows(a, g), shuffle_rows(c, g))) for _ in range(10)) / 10)
        m.push("harmful", fh); m.push("harmless", fo)
    out[label] = {k: [round(x, 5) for x in v] + [round(sum(v) / len(v), 5)] for k, v in vals.items()}
    print(label, out[label], flush=True)
json.dump(out, open("/work/scratch/memory_sim.json", "w"), indent=1)
