"""run_all.sh: clear failures, a failing notebook named with its cell, resume by skipping finished notebooks."""
import os
import subprocess
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]


def _nb(path: Path, *cells: str) -> None:
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell("profile = None")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params] + [nbformat.v4.new_code_cell(c) for c in cells]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


def _run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["./run_all.sh", *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def test_unknown_profile_is_clear():
    r = _run("--profile", "nope")
    assert r.returncode == 2 and "unknown profile 'nope'" in r.stderr and "tiny" in r.stderr


def test_failing_notebook_is_named_with_its_cell_and_finished_ones_resume(tmp_path):
    nbs, runs = tmp_path / "nbs", tmp_path / "runs"
    nbs.mkdir()
    _nb(nbs / "01_ok.ipynb", "x = 1 + 1", "print('ok', x)")
    _nb(nbs / "02_fail.ipynb", "y = 2", "raise RuntimeError('planted failure')")
    env = {"REFUSAL_RANK_NOTEBOOKS": str(nbs), "REFUSAL_RANK_RUNS": str(runs)}
    r = _run("--profile", "tiny", env=env)
    assert r.returncode == 1
    assert "notebook 02_fail failed" in r.stderr and "code cell 4 (\"raise RuntimeError" in r.stderr and "planted failure" in r.stderr  # cell 2 is papermill's injected parameters
    assert (runs / "tiny" / "01_ok.ipynb").is_file() and (runs / "tiny" / "01_ok.stamp").is_file()
    assert not (runs / "tiny" / "02_fail.stamp").exists()
    # fixed: the finished notebook is skipped, the fixed one runs
    _nb(nbs / "02_fail.ipynb", "y = 2", "print(y)")
    r = _run("--profile", "tiny", env=env)
    assert r.returncode == 0, r.stderr
    assert "01_ok (tiny): up to date, skipped" in r.stdout and "== 02_fail (tiny)\n" in r.stdout
    # a change upstream reruns everything after it
    _nb(nbs / "01_ok.ipynb", "x = 3", "print('ok', x)")
    r = _run("--profile", "tiny", env=env)
    assert r.returncode == 0 and "skipped" not in r.stdout
