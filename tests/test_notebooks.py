"""The committed notebooks and their percent-format sources agree (jupytext pairing, both directions),
carry no outputs, and tag papermill's parameters cell the standard way."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]


def build_tool():
    spec = importlib.util.spec_from_file_location("build_notebooks", ROOT / "tools" / "build_notebooks.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_notebooks_match_sources():
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "build_notebooks.py"), "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_notebooks_are_stripped_paired_and_have_parameters():
    nbs = sorted((ROOT / "notebooks").glob("*.ipynb"))
    assert nbs
    for nb in nbs:
        data = json.loads(nb.read_text())
        cells = data["cells"]
        assert not any(c.get("outputs") for c in cells if c["cell_type"] == "code"), nb.name
        assert sum("parameters" in c.get("metadata", {}).get("tags", []) for c in cells) == 1, nb.name
        assert data["metadata"]["jupytext"]["formats"] == "ipynb,src//py:percent"
        assert data["metadata"]["kernelspec"]["name"] == "refusal-rank"
    for src in (ROOT / "notebooks" / "src").glob("*.py"):
        assert '# %% tags=["parameters"]' in src.read_text(), src.name


def test_an_edit_made_in_the_notebook_flows_back_to_its_source(tmp_path, monkeypatch):
    bn = build_tool()
    (tmp_path / "src").mkdir()
    shutil.copy(ROOT / "notebooks" / "src" / "01_directions.py", tmp_path / "src")
    shutil.copy(ROOT / "notebooks" / "01_directions.ipynb", tmp_path)
    monkeypatch.setattr(bn, "ROOT", tmp_path)
    monkeypatch.setattr(bn, "SRC", tmp_path / "src")
    monkeypatch.setattr(bn, "OUT", tmp_path)
    assert bn.check() == 0
    # as JupyterLab without the pairing would save it: an edited cell, outputs, new ids, a later mtime
    nb = nbformat.read(tmp_path / "01_directions.ipynb", as_version=4)
    nb.cells[0].source += "\n\nA sentence added in JupyterLab."
    extra = nbformat.v4.new_code_cell("print('added')", outputs=[nbformat.v4.new_output("stream", text="added\n")])
    nb.cells.append(extra)
    nbformat.write(nb, tmp_path / "01_directions.ipynb")
    later = (tmp_path / "src" / "01_directions.py").stat().st_mtime + 10
    os.utime(tmp_path / "01_directions.ipynb", (later, later))
    assert bn.check() == 1
    bn.sync()
    assert bn.check() == 0
    src = (tmp_path / "src" / "01_directions.py").read_text()
    assert "# A sentence added in JupyterLab." in src and "print('added')" in src
    rebuilt = json.loads((tmp_path / "01_directions.ipynb").read_text())
    assert not any(c.get("outputs") for c in rebuilt["cells"] if c["cell_type"] == "code")
