"""Ran once (2026-12-05) with the library at a9897a2 on the `defended` run trained with the whole-batch terms and
no spread anchor (commits e3b05e6 to a9897a2, one computation; cache folder defended-8dec3f3421f2da1efc49,
checkpoint at step 30, where it was stopped); output spread_inflation.json (a per-site gradient norm it also
printed read 0, a bug of this script, and was dropped from the JSON).
Which sites blow up the covariance term's gradient? defended checkpoint (step from ckpt.pt), one training batch."""
import sys, json, torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[3] / "lib"))
from refusal_rank.config import load_config
from refusal_rank import defense_run as DR
from refusal_rank.models import bundle_from_pretrained, checkpoint_dir
from refusal_rank.training import (Variant, moment_sites, token_rows, batch_indices, micro_batches, _micro_batch_pass)
from refusal_rank.defense import class_cov_gap, shuffle_rows, _total_variance, _per_site

torch.set_num_threads(2)
cfg = load_config("cpu"); tc = cfg["defense"]["train"]
harm, ok = DR.defense_prompts(cfg); H, O = [p.text for p in harm], [p.text for p in ok]
vdir = DR.variant_dir(cfg, "defended")
ck = torch.load(vdir / "ckpt.pt", weights_only=False)
step = ck["state"]["step"]; print("step", step, flush=True)
res = {"step": step}
for label in ["original", "student"]:
    b = bundle_from_pretrained(checkpoint_dir(cfg), cfg, name="x")
    peft = DR._trainable(cfg, b)
    if label == "student":
        params = dict(b.model.named_parameters())
        with torch.no_grad():
            for n, w in ck["weights"].items():
                params[n].copy_(w)
    b.model.eval()
    layers = DR.defense_layers(cfg, b.n_layers)
    teacher = DR.cached_teacher(cfg, b, H + O, layers, False)
    v = Variant("defended", lambda_cov=100.0)
    m_layers, std = moment_sites(b, v, teacher, layers)
    rows = token_rows(b, H + O); L = [len(r) for r in rows]
    out = {}
    for s in [step, step + 1]:
        hi, oi = batch_indices(s, tc["seed"], len(H), len(O), tc["batch_per_class"])
        mbs = micro_batches(hi, oi, L[:len(H)], L[len(H):], tc["micro_batches"])
        zh, zo = [], []
        with torch.no_grad():
            for mh, mo in mbs:
                z = _micro_batch_pass(b, [rows[i] for i in mh] + [rows[len(H) + i] for i in mo], [H[i] for i in mh] + [O[i] for i in mo],
                                      True, "pooled", m_layers, std, True, logits=False)[2]
                zh.append(z[:len(mh)]); zo.append(z[len(mh):])
        zh = torch.cat(zh).requires_grad_(True); zo = torch.cat(zo).requires_grad_(True)
        g = torch.Generator().manual_seed(s)
        vals = []
        for _ in range(8):
            gap, scale = class_cov_gap(shuffle_rows(zh, g), shuffle_rows(zo, g))
            vals.append(gap / scale)
        r = torch.stack(vals).mean(0)  # per site
        r.mean().backward()
        gn = (zh.grad.pow(2).sum((0, 2)) + zo.grad.pow(2).sum((0, 2))).sqrt()
        tv = (_total_variance(_per_site(zh.detach())) + _total_variance(_per_site(zo.detach()))) / 2
        rownorm = torch.cat([zh.detach(), zo.detach()]).norm(dim=2)  # (32, S)
        out[s] = {"ratio_per_site": [round(float(x), 4) for x in r], "grad_norm_per_site": [round(float(x), 3) for x in gn],
                  "total_var_per_site": [round(float(x), 1) for x in tv],
                  "max_row_norm_over_median": [round(float(x), 2) for x in (rownorm.max(0).values / rownorm.median(0).values)]}
        print(label, s, json.dumps(out[s]), flush=True)
    res[label] = out
    del b, peft
json.dump(res, open("/work/scratch/site_forensic.json", "w"), indent=1)
