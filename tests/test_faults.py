"""Nothing silent: one test per defect found by trying the tiny profile as a hostile but
honest user would. Each of these failed on the code before the fix. Fast: synthetic configs, tmp dirs,
fake notebooks; the tiny model only where a cache key or a checkpoint needs one."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

import refusal_rank.config as C
from refusal_rank.config import ProfileError, load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = (ROOT / "configs" / "tiny.toml").read_text()


# ---- 1. a validated config: bad values stop at load with one sentence (file, dotted key, range) ----------

def _profile(tmp_path: Path, monkeypatch, old: str, new: str) -> Path:
    """A copy of configs/tiny.toml with one edit, as the profile 'tiny' of a private config dir."""
    assert old in TINY, old
    d = tmp_path / "configs"
    d.mkdir(exist_ok=True)
    (d / "tiny.toml").write_text(TINY.replace(old, new, 1))
    monkeypatch.setattr(C, "CONFIG_DIR", d)
    return d / "tiny.toml"


BAD_CONFIGS = [  # (what the issue found, the edit, the dotted key and the allowed range the sentence must name)
    ("typo ignored", "iterated_k_max = 2", "iterated_kmax = 2", r"unknown key sweep\.iterated_kmax \(did you mean sweep\.iterated_k_max\?\)"),
    ("negative batch size", "fwd_batch_size = 8", "fwd_batch_size = -8", r"eval\.fwd_batch_size = -8 .*integer >= 1"),
    ("zero batch size", "gen_batch_size = 8", "gen_batch_size = 0", r"eval\.gen_batch_size = 0 .*integer >= 1"),
    ("threshold outside (0, 1)", "threshold = 0.30", "threshold = -0.1", r"sweep\.threshold = -0\.1 .*number in \(0, 1\)"),
    ("wrong type", "threshold = 0.30", 'threshold = "0.3"', r"sweep\.threshold = \"0\.3\" .*number in \(0, 1\)"),
    ("empty grid", "k_grid = [1, 2, 3, 4]", "k_grid = []", r"sweep\.k_grid = \[\] .*strictly increasing list"),
    ("unsorted grid", "k_grid = [1, 2, 3, 4]", "k_grid = [1, 4, 2]", r"sweep\.k_grid = \[1, 4, 2\] .*strictly increasing"),
    ("n_train above its pool", "n_train = 12", "n_train = 40", r"data\.n_train = 40 .*\[1, data\.train_pool = 16\]"),
    ("unknown estimator", '"iterated", "dim-svd"', '"iteratd", "dim-svd"', r"sweep\.estimators = .*\"iteratd\" is not"),
    ("unknown variant in run", 'run = ["defended"', 'run = ["defendd"', r"defense\.run = .*'defendd' is not"),
    ("unknown variant in budget_curve", 'budget_curve = ["kl_only"', 'budget_curve = ["klonly"', r"defense\.budget_curve = .*'klonly' is not"),
    ("unknown sweep model", 'models = ["base", "defended"', 'models = ["base", "defnded"', r"sweep\.models = .*'defnded' is not"),
    ("non-integer size", "n_val = 8", "n_val = 7.5", r"data\.n_val = 7\.5 .*an integer"),
    ("bad choice", 'gen_engine = "fast"', 'gen_engine = "fastest"', r"eval\.gen_engine = \"fastest\" .*one of 'fast', 'refill', 'hf'"),
]


@pytest.mark.parametrize("what,old,new,message", BAD_CONFIGS, ids=[b[0] for b in BAD_CONFIGS])
def test_bad_config_stops_at_load_with_one_sentence(tmp_path, monkeypatch, what, old, new, message):
    path = _profile(tmp_path, monkeypatch, old, new)
    with pytest.raises(ProfileError, match=message) as e:
        load_config("tiny")
    text = str(e.value)
    assert text.startswith(f"{path}: ") and "\n" not in text and text.endswith(".")


def test_every_profile_satisfies_the_schema():
    for name in ("tiny", "cpu", "cpu-small", "paper"):
        assert load_config(name)["profile"] == name


def test_size_larger_than_the_recorded_split_stops_at_load(tmp_path, monkeypatch):
    # the pool may be larger than the split (it is capped), but n_train may not exceed what the split holds
    _profile(tmp_path, monkeypatch, "train_pool = 16\nn_train = 12", "train_pool = 400\nn_train = 300")
    with pytest.raises(ProfileError, match=r"data\.n_train = 300 .*\[1, 200\] \(data/splits\.json"):
        load_config("tiny")


# ---- 2. the reading never claims more than the K reached -------------------------------------------------

def test_reading_does_not_claim_the_target_beyond_the_k_reached():
    from refusal_rank import sweep_run as S

    # threshold = -0.1: nothing breaks, on a grid that stops at K = 4
    kb = {"base": {"iterated": None, "dim-svd": None}, "base_star": None,
          "defended": {"iterated": None, "dim-svd": None}, "defended_star": None}
    reached = {m: {"iterated": 2, "dim-svd": 4} for m in ("base", "defended")}
    line = [l for l in S.reading(kb, reached=reached) if l.startswith("defended:")][0]
    assert "(meets the paper" not in line and "cannot tell" in line and "K = 2" in line
    reached["defended"] = {"iterated": 16, "dim-svd": 32}
    assert "(meets the paper's >= 16)" in S.reading(kb, reached=reached)[1]
    # one estimator broke at 20, another stopped unbroken at 4: K*_break could be anywhere in 5..20
    kb["defended"] = {"iterated": None, "dim-svd": 20}
    kb["defended_star"] = 20
    reached["defended"] = {"iterated": 4, "dim-svd": 20}
    assert "cannot tell" in S.reading(kb, reached=reached)[1]
    # the mean-matching rows against the paper's K = 11: a break below it misses, a grid that stopped short cannot tell
    kb.update({"paper_mean": {"iterated": 1, "dim-svd": 4}, "paper_mean_star": 1,
               "mean_matched": {"iterated": None, "dim-svd": 12}, "mean_matched_star": 12})
    reached.update({"paper_mean": {"iterated": 1, "dim-svd": 4}, "mean_matched": {"iterated": 8, "dim-svd": 12}})
    lines = S.reading(kb, reached=reached)
    assert "mean matching (paper_mean, against the paper's L1 + KD row): K*_break = 1, misses the paper's >= 11" in lines
    assert [l for l in lines if l.startswith("mean matching (mean_matched")][0].endswith(
        "K*_break = 12, cannot tell whether it meets the paper's >= 11: the attack stopped at K = 8")


# ---- 3. run_all.sh: safe flags, a selective --fresh, resume that checks outputs -------------------------

from test_run_all import _nb  # noqa: E402  (the fake notebooks run_all.sh's own tests write)


def _run_all(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["./run_all.sh", *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **(env or {})})


# A fake notebook: caches one value through the library (recorded as its product) and writes one summary
# section, as the real notebooks do; it logs whether its cache entry was there already.
FAKE = """
import json, os
from pathlib import Path
import refusal_rank.results as R
from refusal_rank.results import run_cache, update_summary
note_product = getattr(R, "note_product", lambda p: None)  # (absent before the fix: the tests then fail on run_all.sh)
cfg = {{"profile": profile, "model": {{"name": "fake"}}}}
p = run_cache(cfg, "{sub}") / "{name}.txt"
log = Path(os.environ["FAKE_LOG"])
log.write_text(log.read_text() + ("{name}:reused\\n" if p.is_file() else "{name}:computed\\n") if log.is_file() else
               ("{name}:reused\\n" if p.is_file() else "{name}:computed\\n"))
if not p.is_file():
    p.write_text("value of {name}")
    note_product(p)
update_summary(cfg, **{{"section_{name}": 1}})
"""


@pytest.fixture(scope="module")
def fake_series(tmp_path_factory):
    """A two-notebook series run once to the end (private runs, results, figures and cache); each test
    below leaves it complete again, so that they share the one first run (kernels start slowly)."""
    tmp_path = tmp_path_factory.mktemp("series")
    nbs = tmp_path / "nbs"
    nbs.mkdir()
    _nb(nbs / "01_one.ipynb", FAKE.format(sub="acts", name="one"))
    _nb(nbs / "02_two.ipynb", FAKE.format(sub="gen", name="two"))
    env = {"REFUSAL_RANK_NOTEBOOKS": str(nbs), "REFUSAL_RANK_RUNS": str(tmp_path / "runs"),
           "REFUSAL_RANK_RESULTS": str(tmp_path / "results"), "REFUSAL_RANK_FIGURES": str(tmp_path / "figures"),
           "REFUSAL_RANK_CACHE": str(tmp_path / "cache"), "FAKE_LOG": str(tmp_path / "log.txt")}
    r = _run_all("--profile", "tiny", env=env)
    assert r.returncode == 0, r.stderr
    return tmp_path, env


def test_run_all_flag_without_value_is_one_sentence():
    for flag in ("--profile", "--only", "--from", "--to"):
        r = _run_all(flag)
        assert r.returncode == 2 and "unbound variable" not in r.stderr, r.stderr
        assert r.stderr.strip() == f"run_all.sh: {flag} needs a value, e.g. {flag} {'tiny' if flag == '--profile' else '03'} (see --help)."
    r = _run_all("--profile", "--fresh")  # a flag where the value should be is not a value
    assert r.returncode == 2 and "--profile needs a value" in r.stderr


def test_run_all_selection_matching_nothing_is_an_error_before_anything_is_deleted(fake_series):
    tmp, env = fake_series
    kept = tmp / "cache" / "runs" / "tiny" / "defense" / "variant-abc" / "ckpt.pt"
    kept.parent.mkdir(parents=True, exist_ok=True)
    kept.write_text("hours of training")
    for sel in (("--only", "4"), ("--from", "07"), ("--to", "00")):
        r = _run_all("--profile", "tiny", "--fresh", *sel, env=env)
        assert r.returncode == 2 and "matches no notebook" in r.stderr and "(they are: 01 02)" in r.stderr, r.stderr
        assert kept.is_file()


def test_run_all_fresh_only_empties_what_the_selected_notebooks_produced(fake_series):
    tmp, env = fake_series
    cache = tmp / "cache" / "runs" / "tiny"
    trained = cache / "defense" / "variant-abc" / "ckpt.pt"  # notebook 03's variant, trained in the background
    trained.parent.mkdir(parents=True, exist_ok=True)
    trained.write_text("hours of training")
    assert (cache / "acts" / "one.txt").is_file() and (cache / "gen" / "two.txt").is_file()
    (tmp / "log.txt").write_text("")
    r = _run_all("--profile", "tiny", "--fresh", "--only", "02", env=env)
    assert r.returncode == 0, r.stderr
    assert (tmp / "log.txt").read_text() == "two:computed\n"  # 02 started from scratch, 01 did not run
    assert (cache / "acts" / "one.txt").is_file() and trained.is_file()  # the others' values survive
    assert (tmp / "runs" / "tiny" / "01_one.ipynb").is_file() and (tmp / "runs" / "tiny" / "01_one.stamp").is_file()


def test_run_all_resume_reruns_a_notebook_whose_outputs_are_gone(fake_series):
    tmp, env = fake_series
    summary = tmp / "results" / "tiny" / "summary.json"
    assert summary.is_file()
    summary.unlink()
    r = _run_all("--profile", "tiny", env=env)
    assert r.returncode == 0, r.stderr
    assert "skipped" not in r.stdout and "summary.json is missing: running it again" in r.stdout
    import json
    assert {"section_one", "section_two"} <= set(json.loads(summary.read_text()))
    # everything there: a resume skips both
    r = _run_all("--profile", "tiny", env=env)
    assert r.stdout.count("up to date, skipped") == 2, r.stdout


# ---- 4. prompt files validated at load: unique ids, non-empty text, file and line in every error --------

PROMPT_FILES = [
    ("duplicate id", ['{"id": "a", "prompt": "one"}', '{"id": "b", "prompt": "two"}', '{"id": "a", "prompt": "three"}'],
     r":3: id 'a' is already used on line 1"),
    ("empty prompt", ['{"id": "a", "prompt": "one"}', '{"id": "b", "prompt": "   "}'], r":2: prompt 'b' has no text"),
    ("malformed line", ['{"id": "a", "prompt": "one"}', '{"id": "b", "prompt": "two"'], r":2: not valid JSON"),
    ("missing id", ['{"prompt": "one"}'], r":1: \"id\" must be a non-empty string"),
]


@pytest.mark.parametrize("what,lines,message", PROMPT_FILES, ids=[p[0] for p in PROMPT_FILES])
def test_prompt_file_errors_name_file_and_line(tmp_path, what, lines, message):
    import re

    from refusal_rank import data as D

    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(D.DataError, match=re.escape(str(path)) + message):
        D.load_jsonl(path, "harmless")


def test_prompt_ids_unique_across_sets(tmp_path, monkeypatch):
    from refusal_rank import data as D

    (tmp_path / "harmless.jsonl").write_text('{"id": "x-1", "prompt": "one"}\n')
    (tmp_path / "overrefusal.jsonl").write_text('{"id": "x-1", "prompt": "two"}\n')
    monkeypatch.setattr(D, "DATA_DIR", tmp_path)
    monkeypatch.setattr(D, "load_harmful_sources", lambda: {})
    with pytest.raises(D.DataError, match=r"overrefusal\.jsonl: id 'x-1' is already used by .*harmless\.jsonl"):
        D.load_all_prompts()


# ---- 5. cache keys from content; integrity on every file a number comes from ---------------------------

@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("REFUSAL_RANK_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_editing_one_prompt_text_recomputes_exactly_its_dependent_values(tiny, tiny_cfg, private_cache, monkeypatch):
    from refusal_rank import data as D
    from refusal_rank import pipeline as P
    from refusal_rank.config import override

    cfg = override(tiny_cfg, **{"eval.max_new_tokens": 2})
    from refusal_rank import generation as G

    calls = []  # the model's work: forward passes for log-probs, generated batches
    real_lp, real_gen = P.last_token_logprobs, G._generate_batch
    monkeypatch.setattr(P, "last_token_logprobs", lambda b, texts, *a, **k: calls.append(("lp", tuple(texts))) or real_lp(b, texts, *a, **k))
    monkeypatch.setattr(G, "_generate_batch", lambda b, texts, *a, **k: calls.append(("gen", tuple(texts))) or real_gen(b, texts, *a, **k))
    pool = D.split_prompts("harmless_val", 4, 0)
    a, b = pool[:2], pool[2:]
    for s in (a, b):
        P.scores_cached(cfg, tiny, s)
        P.completions(cfg, tiny, s)
    assert len(calls) == 4  # two forward passes, two generated batches
    calls.clear()
    edited = [D.Prompt(a[0].id, a[0].text + " Answer in one word.", a[0].source), a[1]]
    P.scores_cached(cfg, tiny, edited)  # the edited text: computed anew
    P.completions(cfg, tiny, edited)
    P.scores_cached(cfg, tiny, b)  # an untouched set: reused
    P.completions(cfg, tiny, b)
    # the edited set's log-probs and completions (one batch of both prompts), nothing of the other set
    assert sorted((k, frozenset(t)) for k, t in calls) == [("gen", frozenset(p.text for p in edited)),
                                                            ("lp", frozenset(p.text for p in edited))]


def test_tiny_model_identity_names_its_seed_and_tokenizer_corpus(tiny_cfg, monkeypatch):
    import types

    from refusal_rank import data as D
    from refusal_rank import pipeline as P
    from refusal_rank.config import override

    stand_in = types.SimpleNamespace(name="tiny-llama", edit="")
    tag = P.model_tag(tiny_cfg, stand_in)
    assert P.model_tag(override(tiny_cfg, seed=1), stand_in) != tag
    corpus = D.tokenizer_corpus(tiny_cfg)
    monkeypatch.setattr(D, "tokenizer_corpus", lambda cfg: corpus[:-1] + [corpus[-1] + " (edited)"])
    P._IDENTITY.clear()
    assert P.model_tag(tiny_cfg, stand_in) != tag
    P._IDENTITY.clear()


def test_cache_file_without_its_sidecar_is_rebuilt_never_certified(tmp_path):
    import torch

    from refusal_rank import pipeline as P

    path = tmp_path / "direction.pt"
    P.save_cached(path, torch.tensor([0.0, 1.0]))
    torch.save(torch.tensor([2.0, 0.0]), path)  # corrupted ...
    path.with_name(path.name + ".sha256").unlink()  # ... and its hash file gone with it
    logged = []
    value = P.cached_value(path, lambda: torch.tensor([0.0, 1.0]), log=logged.append)
    assert value.tolist() == [0.0, 1.0] and "no sha256 sidecar" in logged[0]
    assert P.load_cached(path).tolist() == [0.0, 1.0]  # the rebuilt value, with its own sidecar


def test_edited_completion_in_the_cache_is_regenerated(tiny, tmp_path):
    import json

    from refusal_rank import pipeline as P
    from refusal_rank.generation import generate

    prompts = ["Write a haiku about rain.", "Name a prime number."]
    path = tmp_path / "gen.jsonl"
    first = generate(tiny, prompts, 3, 2, cache_file=path)
    rows = [json.loads(l) for l in path.read_text().splitlines()]
    rows[0]["text"] = "I cannot help with that."  # a refusal planted in the cache
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(FileNotFoundError, match="failed their digest"):
        P.read_completions(path, 2)
    again = generate(tiny, prompts, 3, 2, cache_file=path)
    assert again == first and P.read_completions(path, 2) == first


def _train_tiny(tiny_cfg, ckpt, **kw):
    from refusal_rank.models import bundle_from_pretrained, checkpoint_dir
    from refusal_rank.training import Variant, attach_lora, teacher_cache, train
    from refusal_rank import data as D

    b = bundle_from_pretrained(checkpoint_dir(tiny_cfg, log=lambda *_: None), tiny_cfg)
    harm = [p.text for p in D.split_prompts("harmful_defense", 8, 0)]
    ok = [p.text for p in D.split_prompts("harmless_defense", 8, 0)]
    layers = list(range(b.n_layers))
    teacher = kw.pop("teacher", None) or teacher_cache(b, harm + ok, layers, 8)
    attach_lora(b.model, tiny_cfg["defense"]["lora"], seed=0)
    b._nnsight = None
    v = Variant.from_cfg("kl_only", tiny_cfg["defense"]["variants"]["kl_only"])
    tcfg = dict(tiny_cfg["defense"]["train"], ckpt_every=1, eval_every=100, diag_prompts=0)
    log = []
    state = train(b, v, tcfg, harm, ok, teacher, layers, ckpt, log=log.append, **kw)
    return state, log, teacher


@pytest.mark.parametrize("damage", ["truncated", "flipped bytes"])
def test_damaged_checkpoint_falls_back_to_the_previous_good_one(tiny_cfg, tmp_path, damage):
    ckpt = tmp_path / "ckpt.pt"
    state, _, teacher = _train_tiny(tiny_cfg, ckpt, stop_after=3)
    assert state.step == 3
    data = ckpt.read_bytes()
    mid = len(data) // 2  # inside the weights: a flip there loads without complaint unless a digest is checked
    ckpt.write_bytes(data[:mid] if damage == "truncated" else data[:mid] + bytes(b ^ 0x40 for b in data[mid:mid + 8]) + data[mid + 8:])
    state, log, _ = _train_tiny(tiny_cfg, ckpt, teacher=teacher)  # a rerun: no crash, no damaged weights
    assert state.step == tiny_cfg["defense"]["train"]["steps"]
    assert any("resuming from the previous one, ckpt.prev.pt, at step 2" in l for l in log), log


def test_divergence_message_names_no_checkpoint_that_does_not_exist(tiny_cfg, tmp_path):
    import copy

    from refusal_rank.training import TrainingDiverged

    state, _, teacher = _train_tiny(tiny_cfg, tmp_path / "warm.pt", stop_after=1)
    bad = copy.deepcopy(teacher)
    bad.logits[:] = float("nan")
    with pytest.raises(TrainingDiverged) as e:
        _train_tiny(tiny_cfg, tmp_path / "ckpt.pt", teacher=bad)
    assert "No last checkpoint was saved" in str(e.value) and str(tmp_path / "ckpt.pt") not in str(e.value)


def test_k1_export_has_a_digest_and_a_damaged_or_unverifiable_one_is_rebuilt(tiny, tiny_cfg, private_cache):
    """Notebook 02's K=1 export is written atomically with a sha256 manifest of every file; an intact one is
    reused, a corrupted one or one without its manifest is rebuilt on the next run, never trusted."""
    import json

    import torch

    from refusal_rank import pipeline as P
    from refusal_rank.data import Prompt
    from refusal_rank.models import sha256_file, verify_manifest
    from refusal_rank.results import run_cache

    u = torch.nn.functional.normalize(torch.randn(tiny.d_model, 1, generator=torch.Generator().manual_seed(3)), dim=0)
    out = run_cache(tiny_cfg, "export_k1")
    logged: list[str] = []

    def export():
        return P.export_check(tiny_cfg, tiny, u, [Prompt("x", "Say hello.", "harmless")], out, log=logged.append)

    first = export()
    w = out / "model.safetensors"
    manifest = json.loads((out / "MANIFEST.json").read_text())
    assert verify_manifest(out) and {"model.safetensors", "config.json", "README.md"} <= set(manifest)
    assert not out.with_name("export_k1.partial").exists()
    good, written = sha256_file(w), w.stat().st_mtime_ns
    assert export() == first and w.stat().st_mtime_ns == written and not logged  # intact: reused as it is

    def flip():
        data = bytearray(w.read_bytes())
        data[-3] ^= 0xFF  # a weight byte: the file still loads, with another weight
        w.write_bytes(bytes(data))

    flip()
    assert export() == first and "does not match its digest manifest" in logged[-1]
    assert verify_manifest(out) and sha256_file(w) == good
    flip()
    (out / "MANIFEST.json").unlink()  # an export without its digest (as every export was before)
    assert export() == first and "no digest manifest" in logged[-1]
    assert verify_manifest(out) and sha256_file(w) == good
    v = torch.nn.functional.normalize(torch.randn(tiny.d_model, 1, generator=torch.Generator().manual_seed(4)), dim=0)
    P.export_check(tiny_cfg, tiny, v, [Prompt("x", "Say hello.", "harmless")], out, log=logged.append)
    assert "another model, basis or card" in logged[-1] and sha256_file(w) != good and verify_manifest(out)


# ---- 6. one sentence and a non-zero exit for bad input; portable summaries; scripts run as plain Python ---

BAD_TOOL_INPUTS = [
    ("compare_summaries missing file", ["tools/compare_summaries.py", "/nonexistent/a.json", "/nonexistent/b.json"],
     "compare_summaries.py: /nonexistent/a.json cannot be read"),
    ("judge_sample unknown profile", ["tools/judge_sample.py", "--profile", "nope", "--out", "/tmp/never.jsonl"],
     "judge_sample.py: Unknown profile 'nope'"),
    ("pilot_moments unknown profile", ["tools/pilot_moments.py", "--profile", "nope"], "pilot_moments.py: Unknown profile 'nope'"),
    ("train_variant bad --until", ["tools/train_variant.py", "--profile", "tiny", "--variant", "kl_only", "--until", "abc"],
     "--until abc: not a milestone"),
    ("cli report unknown profile", ["-m", "refusal_rank.cli", "report", "--profile", "nope"], "refusal-rank report: unknown profile 'nope'"),
    ("cli figures unknown profile", ["-m", "refusal_rank.cli", "figures", "--profile", "nope"], "refusal-rank figures: unknown profile 'nope'"),
    ("report module unknown profile", ["-m", "refusal_rank.report", "--profile", "nope"], "refusal-rank report: unknown profile 'nope'"),
]


@pytest.mark.parametrize("what,args,message", BAD_TOOL_INPUTS, ids=[b[0] for b in BAD_TOOL_INPUTS])
def test_tool_bad_input_is_one_sentence_and_nonzero_exit(what, args, message, tmp_path):
    import sys

    r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "REFUSAL_RANK_RESULTS": str(tmp_path / "results"),
                            "REFUSAL_RANK_FIGURES": str(tmp_path / "figures")})
    lines = [l for l in r.stderr.splitlines() if l.strip() and "Warning" not in l and not l.startswith("  warnings.warn")]
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert not (ROOT / "results" / "nope").exists() and not (ROOT / "figures" / "nope").exists()


def test_summary_stores_no_absolute_cache_path(tiny, tiny_cfg, private_cache):
    import torch

    from refusal_rank import pipeline as P
    from refusal_rank.data import Prompt
    from refusal_rank.results import run_cache

    u = torch.nn.functional.normalize(torch.randn(tiny.d_model, dtype=torch.float64), dim=0)[:, None]
    check = P.export_check(tiny_cfg, tiny, u, [Prompt("x", "Say hello.", "harmless")], run_cache(tiny_cfg, "export_k1"))
    assert check["path"] == "<cache>/runs/tiny/export_k1"


def test_notebook_sources_use_no_undefined_name():
    """Each notebook's source runs under plain Python too (`python notebooks/src/02_k1_attack.py`): no name
    that only Jupyter defines (``display``) and nothing else undefined at module level."""
    import builtins
    import symtable

    for path in sorted((ROOT / "notebooks" / "src").glob("*.py")):
        top = symtable.symtable(path.read_text(), str(path), "exec")
        defined = {s.get_name() for s in top.get_symbols() if s.is_assigned() or s.is_imported() or s.is_namespace()}
        undefined = set()

        def walk(t):
            for s in t.get_symbols():
                n = s.get_name()
                if s.is_referenced() and (t is top or s.is_global()) and n not in defined and not hasattr(builtins, n):
                    undefined.add(n)
            for c in t.get_children():
                walk(c)

        walk(top)
        assert not undefined, (path.name, undefined)


# ---- 7. two clones sharing one virtual environment: the clone run from is the one used -----------------

def _second_clone(tmp_path: Path) -> Path:
    """Another clone of the project, whose ``.venv`` is this clone's (a symlink): the editable install in it
    imports this clone's library."""
    import shutil

    clone = tmp_path / "clone2"
    clone.mkdir()
    for d in ("configs", "data", "lib", "scripts", "tools"):
        shutil.copytree(ROOT / d, clone / d, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for f in ("run_all.sh", "pyproject.toml"):
        shutil.copy2(ROOT / f, clone / f)
    (clone / ".venv").symlink_to(ROOT / ".venv")
    return clone


def _in_clone(clone: Path, *args: str, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess:
    """``python ARGS`` by the shared .venv's Python from ``cwd`` (the clone), with the environment ``env`` adds."""
    base = {k: v for k, v in os.environ.items()
            if k not in ("REFUSAL_RANK_ROOT", "PYTHONPATH", "REFUSAL_RANK_RESULTS", "REFUSAL_RANK_FIGURES")}
    return subprocess.run([str(clone / ".venv" / "bin" / "python"), *args], cwd=cwd or clone, capture_output=True,
                          text=True, timeout=300, env={**base, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **env})


def _sentence(r: subprocess.CompletedProcess) -> str:
    lines = [l for l in r.stderr.splitlines() if l.strip() and "Warning" not in l and not l.startswith("  warnings.warn")]
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(lines) == 1, r.stderr + r.stdout
    return lines[0]


def test_second_clone_sharing_the_venv_uses_its_own_files_or_stops_with_one_sentence(tmp_path):
    import json

    import refusal_rank

    clone = _second_clone(tmp_path)
    lib_clone = Path(refusal_rank.__file__).resolve().parents[2]  # whose library the shared .venv imports
    cache = str(tmp_path / "cache")
    # from the second clone, with nothing set: which clone was meant cannot be known, so one sentence
    # naming both (before: exit 0, the first clone's report, configs and results)
    for args in (["-m", "refusal_rank.cli", "report", "--profile", "tiny"],
                 ["tools/judge_sample.py", "--profile", "tiny", "--out", str(tmp_path / "s.jsonl")],
                 ["tools/train_variant.py", "--profile", "tiny", "--variant", "kl_only", "--until", "abc"]):
        line = _sentence(_in_clone(clone, *args, REFUSAL_RANK_CACHE=cache))
        assert f"in the clone {clone}" in line and str(lib_clone) in line, line
        assert f"REFUSAL_RANK_ROOT={clone}" in line and "own .venv" in line, line
    where = ("import json, refusal_rank, refusal_rank.config as C; cfg = C.load_config('tiny'); "
             "print(json.dumps([refusal_rank.__file__, str(C.REPO_ROOT), cfg['_path'], str(C.results_dir('tiny')), "
             "str(C.figures_dir('tiny'))]))")
    r = _in_clone(clone, "-c", where, cwd=clone / "data", REFUSAL_RANK_CACHE=cache)  # a notebook's view, below the root
    assert r.returncode != 0 and "CloneError" in r.stderr and f"in the clone {clone}" in r.stderr, r.stderr
    # the fix the sentence names (what run_all.sh sets): every path in the second clone
    r = _in_clone(clone, "-c", where, PYTHONPATH=str(clone / "lib"), REFUSAL_RANK_ROOT=str(clone))
    assert r.returncode == 0, r.stderr
    lib, root, config, results, figures = json.loads(r.stdout)
    assert Path(lib).is_relative_to(clone / "lib") and Path(root) == clone
    assert Path(config) == clone / "configs" / "tiny.toml"
    assert Path(results) == clone / "results" / "tiny" and Path(figures) == clone / "figures" / "tiny"
    # REFUSAL_RANK_ROOT alone: its files, but another clone's library; a root that is no clone
    line = _sentence(_in_clone(clone, "-m", "refusal_rank.cli", "report", "--profile", "tiny", REFUSAL_RANK_ROOT=str(clone)))
    assert f"REFUSAL_RANK_ROOT is {clone}" in line and str(lib_clone / "lib") in line and f"PYTHONPATH={clone}/lib" in line
    line = _sentence(_in_clone(clone, "-m", "refusal_rank.cli", "report", "--profile", "tiny",
                               cwd=tmp_path, REFUSAL_RANK_ROOT=str(tmp_path / "nowhere")))
    assert "nowhere is not a clone of this project" in line, line


def test_run_all_in_a_second_clone_runs_that_clones_library_and_files(tmp_path):
    """run_all.sh of the second clone, run by the shared .venv: its notebooks import the second clone's
    library and read its configs (before: the first clone's, through the editable install)."""
    import hashlib
    import json

    stamp = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + (ROOT / "scripts" / "setup_env.sh").read_bytes())
    if not (ROOT / ".venv" / f".stamp-{stamp.hexdigest()[:16]}").is_file():
        pytest.skip("the .venv is not set up for this checkout: setup_env.sh would reinstall the shared environment")
    clone = _second_clone(tmp_path)
    (clone / "notebooks").mkdir()
    log = tmp_path / "where.json"
    _nb(clone / "notebooks" / "01_where.ipynb",
        "import json, os, refusal_rank, refusal_rank.config as C\n"
        "cfg = C.load_config(profile)\n"
        "open(os.environ['WHERE_LOG'], 'w').write(json.dumps([refusal_rank.__file__, str(C.REPO_ROOT), cfg['_path']]))")
    env = {k: v for k, v in os.environ.items() if not k.startswith("REFUSAL_RANK_") and k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", WHERE_LOG=str(log), REFUSAL_RANK_CACHE=str(tmp_path / "cache"),
               REFUSAL_RANK_RESULTS=str(tmp_path / "results"), REFUSAL_RANK_FIGURES=str(tmp_path / "figures"))
    r = subprocess.run(["./run_all.sh", "--profile", "tiny"], cwd=clone, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    lib, root, config = json.loads(log.read_text())
    assert Path(lib).resolve().is_relative_to(clone / "lib") and Path(root) == clone
    assert Path(config) == clone / "configs" / "tiny.toml"
    kernel = json.loads((ROOT / ".venv" / "share" / "jupyter" / "kernels" / "refusal-rank" / "kernel.json").read_text())
    assert kernel["argv"][0] == str((ROOT / ".venv" / "bin").resolve() / "python")  # the shared kernel names no clone
