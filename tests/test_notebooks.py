"""The committed notebooks are built from their sources, stripped, and parameterised for papermill."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_notebooks_match_sources():
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "build_notebooks.py"), "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


def test_notebooks_are_stripped_and_have_parameters():
    nbs = sorted((ROOT / "notebooks").glob("*.ipynb"))
    assert nbs
    for nb in nbs:
        cells = json.loads(nb.read_text())["cells"]
        assert not any(c.get("outputs") for c in cells if c["cell_type"] == "code"), nb.name
        assert any("parameters" in c.get("metadata", {}).get("tags", []) for c in cells), nb.name
