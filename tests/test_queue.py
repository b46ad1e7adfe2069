"""scripts/cpu_queue.sh: bad arguments get one sentence and exit 2 before anything runs; the body is parsed
whole before it runs (editing the script cannot derail a running queue)."""
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
QUEUE = ROOT / "scripts" / "cpu_queue.sh"


@pytest.mark.parametrize("args, says", [(["--from", "9"], "--from needs a stage 1-6"),
                                        (["--from"], "--from needs a stage 1-6"),
                                        (["--profile"], "--profile needs a value"),
                                        (["--bogus"], "unknown argument --bogus")])
def test_bad_arguments_stop_with_one_sentence(args, says):
    r = subprocess.run(["bash", str(QUEUE), *args], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and says in r.stderr and r.stdout == ""  # no stage started


@pytest.mark.parametrize("args, says", [(["--profile"], "--profile needs a value"), (["--bogus"], "unknown argument --bogus")])
def test_audit_script_bad_arguments_stop_with_one_sentence(args, says):
    r = subprocess.run(["bash", str(ROOT / "scripts" / "audit_cpu.sh"), *args], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and says in r.stderr and r.stdout == ""  # no audit started


def test_queue_stops_before_any_stage_when_the_committed_run_has_another_dtype(tmp_path):
    """The queue's first step: a committed progress file measured in another dtype than this machine computes
    stops it with one sentence and exit 2, before any stage; --allow-dtype-change skips the check. Run on a
    copy of the repository's scripts, configs and a planted results folder (tiny computes in float32)."""
    import shutil
    import sys

    for d in ("scripts", "configs", "lib"):
        shutil.copytree(ROOT / d, tmp_path / d, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "run_all.sh", tmp_path)
    (tmp_path / "results" / "tiny").mkdir(parents=True)
    progress = tmp_path / "results" / "tiny" / "queue_progress.json"
    progress.write_text('{"profile": "tiny", "original": {"dtype": "bfloat16"}, "variants": {}}')
    env = {"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "REFUSAL_RANK_CACHE": str(tmp_path / "cache")}
    q = tmp_path / "scripts" / "cpu_queue.sh"
    r = subprocess.run(["bash", str(q), "--profile", "tiny", "--from", "6"], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 2 and "measured in bfloat16" in r.stderr and "--allow-dtype-change" in r.stderr
    assert "== stage" not in r.stdout  # nothing started
    progress.write_text('{"profile": "tiny", "original": {"dtype": "float32"}, "variants": {}}')
    r = subprocess.run([sys.executable, "-m", "refusal_rank.cli", "progress", "--profile", "tiny", "--check-dtype"],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path,
                       env={**env, "REFUSAL_RANK_ROOT": str(tmp_path), "PYTHONPATH": str(tmp_path / "lib")})
    assert r.returncode == 0 and "as the committed progress" in r.stdout


def test_the_body_is_one_function_called_at_the_end():
    lines = [l for l in QUEUE.read_text().splitlines() if l.strip() and not l.startswith("#")]
    assert lines[0] == "main() {" and lines[-3:] == ["}", 'main "$@"', "exit"]


def test_cache_size_counts_every_file_once_by_kind(tmp_path, monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("cache_size", ROOT / "tools" / "cache_size.py")
    cs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cs)
    monkeypatch.setenv("REFUSAL_RANK_CACHE", str(tmp_path))
    (tmp_path / "runs" / "tiny" / "gen" / "sub").mkdir(parents=True)
    (tmp_path / "runs" / "tiny" / "gen" / "a.pt").write_bytes(b"x" * 1000)
    (tmp_path / "runs" / "tiny" / "gen" / "sub" / "b.pt").write_bytes(b"x" * 24)
    (tmp_path / "runs" / "tiny" / "defense").mkdir()
    (tmp_path / "runs" / "tiny" / "defense" / "link").symlink_to(tmp_path / "runs" / "tiny" / "gen" / "a.pt")
    (tmp_path / "models" / "m").mkdir(parents=True)
    (tmp_path / "models" / "m" / "w").write_bytes(b"x" * 2**20)
    assert cs.tree_bytes(tmp_path / "runs" / "tiny") == 1024  # the link is not counted twice
    out = cs.measure("tiny")
    assert out["runs_gib"]["gen"] == round(1024 / 2**30, 3) and out["runs_gib"]["defense"] == 0
    assert out["models_gib"]["m"] == round(2**20 / 2**30, 3) and "runs" not in out["other_gib"]
