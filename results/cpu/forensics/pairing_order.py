"""Ran once (2026-12-05) with the library at d2c9044 against the `defended` run trained at that commit (cache
folder defended-c00d0f3d6a24021bb9c8, step 70) and the original model; output pairing_order.json. The
covariance term (defense.cov_matching_loss) pairs neighbouring rows: on the first 96 + 96 training prompts,
in a random order (20 draws), in length order, and in the data set's order. Does the order of rows (length-sorted neighbours) bias the pair-difference covariance term?"""
import sys, json, torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[3] / "lib"))
from refusal_rank.config import load_config
from refusal_rank import defense_run as DR
from refusal_rank.training import Variant, moment_sites, _save_sites, _site_vectors, token_rows
from refusal_rank.models import bundle_from_pretrained, checkpoint_dir
from refusal_rank.activations import encode
from refusal_rank.defense import cov_matching_loss, mean_matching_loss

torch.set_num_threads(2)
cfg = load_config("cpu")
N = int(sys.argv[1]) if len(sys.argv) > 1 else 96
harm, ok = DR.defense_prompts(cfg)
H, O = [p.text for p in harm[:N]], [p.text for p in ok[:N]]
out = {}
for label in ["defended@70", "original"]:
    if label == "original":
        b = bundle_from_pretrained(checkpoint_dir(cfg), cfg, name="orig")
    else:
        b = DR.load_variant(cfg, "defended", 70)
    layers = DR.defense_layers(cfg, b.n_layers)
    teacher = DR.cached_teacher(cfg, b, [p.text for p in harm + ok], layers, False)
    v = Variant("defended", moment_sites="pooled", moment_depth=1.0)
    m_layers, std = moment_sites(b, v, teacher, layers)
    def vecs(texts):
        res = []
        for i in range(0, len(texts), 16):
            enc = encode(b, texts[i:i+16]); saved = []
            with torch.no_grad(), b.lm.trace(enc, logits_to_keep=1):
                _save_sites(b.lm, "pooled", m_layers, b.n_post, saved)
            res.append(_site_vectors([t.float() for t in saved], "pooled", enc["attention_mask"], std).float())
        return torch.cat(res)
    zh, zo = vecs(H), vecs(O)
    lh = torch.tensor([len(r) for r in token_rows(b, H)]); lo = torch.tensor([len(r) for r in token_rows(b, O)])
    g = torch.Generator().manual_seed(0)
    rnd = [float(cov_matching_loss(zh[torch.randperm(N, generator=g)], zo[torch.randperm(N, generator=g)])) for _ in range(20)]
    srt = float(cov_matching_loss(zh[lh.argsort(stable=True)], zo[lo.argsort(stable=True)]))
    r = {"cov_random_mean": sum(rnd)/len(rnd), "cov_random_sd": float(torch.tensor(rnd).std()), "cov_length_sorted": srt,
         "cov_dataset_order": float(cov_matching_loss(zh, zo)), "mean": float(mean_matching_loss(zh, zo)),
         "len_h": [float(lh.float().mean()), float(lh.float().std())], "len_o": [float(lo.float().mean()), float(lo.float().std())]}
    print(label, json.dumps(r), flush=True)
    out[label] = r
    del b
json.dump(out, open("/work/scratch/pairing_diag.json", "w"), indent=1)
