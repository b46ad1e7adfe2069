"""A notebook executed by a Jupyter kernel on tiny, as papermill runs it for run_all.sh: its figures are
image outputs in the notebook, no warning is left unhandled, progress bars stay out of it, and its
figures are redrawn from results/tiny/ alone."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """Notebook 01 as a Jupyter kernel executed it. run_tests.sh runs the tiny series with papermill and the
    registered kernel before pytest and names that executed copy in REFUSAL_RANK_EXECUTED_01 (executing it
    a second time here would double CI's longest step); run alone, this fixture executes it itself."""
    import os

    import papermill

    done = os.environ.get("REFUSAL_RANK_EXECUTED_01")
    if done:
        path = Path(done)
        assert path.is_file(), f"REFUSAL_RANK_EXECUTED_01 names {path}, which does not exist"
        return json.loads(path.read_text())
    out = tmp_path_factory.mktemp("nb") / "01_directions.ipynb"
    env = {"TQDM_DISABLE": "1", "TQDM_MININTERVAL": "60", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}  # as run_all.sh sets them
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        papermill.execute_notebook(str(ROOT / "notebooks" / "01_directions.ipynb"), str(out), parameters={"profile": "tiny"},
                                   kernel_name="python3", cwd=str(ROOT / "notebooks"), progress_bar=False)
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return json.loads(out.read_text())


def outputs(nb):
    return [o for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])]


def test_figures_are_image_outputs_where_they_are_saved(executed):
    saving = [c for c in executed["cells"] if c["cell_type"] == "code" and "plotting.save(" in "".join(c["source"])]
    assert len(saving) == 2
    for c in saving:
        pngs = [o for o in c["outputs"] if "image/png" in o.get("data", {})]
        assert len(pngs) == 1, "".join(c["source"])[:80]
        assert not any("figures/tiny" in "".join(o.get("data", {}).get("text/plain", "")) and o["output_type"] == "execute_result"
                       for o in c["outputs"]), "the cell shows a list of paths"


def test_no_warning_and_no_progress_bar_fragments(executed):
    for o in outputs(executed):
        text = "".join(o.get("text", "")) + "".join(o.get("data", {}).get("text/plain", ""))
        assert "Warning" not in text, text[:300]
        assert "it/s]" not in text and "\r" not in text, text[:300]
        assert "application/vnd.jupyter.widget-view+json" not in o.get("data", {})


def test_its_figures_redraw_from_results_alone(executed, tmp_path):
    from refusal_rank import plotting

    names = ["01_2_refusal_score_heatmap", "01_3_direction_norms"]
    done = plotting.redraw("tiny", out_dir=tmp_path, names=names)
    assert sorted(done) == names
    for n in names:
        assert (tmp_path / f"{n}.png").read_bytes() == (ROOT / "figures" / "tiny" / f"{n}.png").read_bytes()


def test_the_series_executed_on_tiny_shows_no_warning():
    """Every notebook of the tiny series, as run_tests.sh executed it into runs/tiny/ just before pytest
    (REFUSAL_RANK_EXECUTED_01 says that it did): no warning on stderr, no progress-bar fragment, no widget."""
    import os
    import re

    if not os.environ.get("REFUSAL_RANK_EXECUTED_01"):
        pytest.skip("reads the series run_tests.sh executes before pytest")
    executed = sorted((ROOT / "runs" / "tiny").glob("[0-9][0-9]_*.ipynb"))
    assert executed, "run_tests.sh executed no notebook into runs/tiny/"
    for path in executed:
        for o in outputs(json.loads(path.read_text())):
            text = "".join(o.get("text", ""))
            assert not (o.get("name") == "stderr" and re.search(r"\w*Warning: ", text)), f"{path.name}: {text[:300]}"
            assert "it/s]" not in text and "\r" not in text, f"{path.name}: {text[:300]}"
            assert "application/vnd.jupyter.widget-view+json" not in o.get("data", {}), path.name
