"""Keep the committed notebooks and their percent-format sources in step, in both directions (jupytext).

Each ``notebooks/NN_name.ipynb`` is paired with ``notebooks/src/NN_name.py`` (jupytext's ``py:percent``
format): the .py is what diffs and reviews read, the .ipynb what readers open and papermill executes.
In JupyterLab (jupytext's extension comes with the ``jupytext`` package) saving a notebook writes both
files; an editor that writes only one of them is caught up by this tool:

    python tools/build_notebooks.py            # sync: the newer of each pair wins, both are rewritten
    python tools/build_notebooks.py --from-src # the .py files win
    python tools/build_notebooks.py --check    # exit 1 if a pair disagrees or a notebook carries outputs

papermill's parameters cell is tagged the standard way (``# %% tags=["parameters"]`` in the source, the
cell tag ``parameters`` in the notebook). Written notebooks carry no outputs, fixed cell ids and the
project's kernel (``refusal-rank``, registered by ``run_all.sh``).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jupytext
import nbformat

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "notebooks" / "src"
OUT = ROOT / "notebooks"
FORMAT = "py:percent"
KERNEL = {"name": "refusal-rank", "display_name": "refusal-rank (.venv)", "language": "python"}
# the pairing JupyterLab's jupytext reads from each notebook: sources in src/, no metadata header in them
JUPYTEXT = {"formats": "ipynb,src//py:percent", "notebook_metadata_filter": "-all", "cell_metadata_filter": "tags,-all"}


def content(nb: nbformat.NotebookNode) -> list[tuple[str, str, tuple[str, ...]]]:
    """What a reader and papermill see of a notebook: each cell's kind, text and tags."""
    return [(c.cell_type, c.source.strip("\n"), tuple(c.get("metadata", {}).get("tags", []))) for c in nb.cells]


def canonical(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """The committed form: no outputs, fixed ids, the project's kernel and the pairing metadata."""
    out = nbformat.v4.new_notebook()
    out.metadata = {"kernelspec": dict(KERNEL), "language_info": {"name": "python"}, "jupytext": dict(JUPYTEXT)}
    for i, c in enumerate(nb.cells):
        tags = list(c.get("metadata", {}).get("tags", []))
        src = c.source.strip("\n")
        cell = nbformat.v4.new_markdown_cell(src) if c.cell_type == "markdown" else nbformat.v4.new_code_cell(src)
        if tags:
            cell.metadata["tags"] = tags
        cell["id"] = f"c{i:02d}"
        out.cells.append(cell)
    return out


def ipynb_text(nb: nbformat.NotebookNode) -> str:
    return json.dumps(canonical(nb), indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def py_text(nb: nbformat.NotebookNode) -> str:
    return jupytext.writes(canonical(nb), fmt=FORMAT)


def read_py(path: Path) -> nbformat.NotebookNode:
    return jupytext.reads(path.read_text(encoding="utf-8"), fmt=FORMAT)


def read_ipynb(path: Path) -> nbformat.NotebookNode:
    return nbformat.reads(path.read_text(encoding="utf-8"), as_version=4)


def pairs() -> list[tuple[Path, Path]]:
    stems = sorted({p.stem for p in SRC.glob("*.py")} | {p.stem for p in OUT.glob("[0-9][0-9]_*.ipynb")})
    return [(SRC / f"{s}.py", OUT / f"{s}.ipynb") for s in stems]


def check() -> int:
    bad = 0
    for py, nb in pairs():
        if not py.is_file() or not nb.is_file():
            print(f"{(nb if py.is_file() else py).relative_to(ROOT)} is missing: run python tools/build_notebooks.py")
            bad = 1
            continue
        a, b = read_py(py), read_ipynb(nb)
        if content(a) != content(b):
            print(f"{nb.relative_to(ROOT)} and {py.relative_to(ROOT)} disagree: run python tools/build_notebooks.py "
                  f"(the newer one wins; --from-src to take the source)")
            bad = 1
        elif nb.read_text(encoding="utf-8") != ipynb_text(b) or py.read_text(encoding="utf-8") != py_text(a):
            print(f"{nb.relative_to(ROOT)} carries outputs, ids or metadata that the committed form has not: "
                  f"run python tools/build_notebooks.py")
            bad = 1
    return bad


def sync(from_src: bool = False) -> int:
    for py, nb in pairs():
        if not py.is_file():
            chosen = read_ipynb(nb)
        elif not nb.is_file() or from_src:
            chosen = read_py(py)
        else:
            a, b = read_py(py), read_ipynb(nb)
            chosen = a if content(a) == content(b) or py.stat().st_mtime >= nb.stat().st_mtime else b
        for path, text in ((py, py_text(chosen)), (nb, ipynb_text(chosen))):
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                path.write_text(text, encoding="utf-8")
                print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--from-src", action="store_true")
    a = ap.parse_args()
    sys.exit(check() if a.check else sync(a.from_src))
