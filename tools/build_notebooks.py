"""Build the committed notebooks from their percent-format sources in notebooks/src/.

The .py sources are what we edit and review (clean diffs); the .ipynb files are what readers open
and papermill executes. Cells are separated by ``# %%`` lines; ``# %% [markdown]`` starts a prose
cell (its lines lose the leading ``# ``), ``# %% parameters`` starts papermill's parameters cell.
``--check`` exits 1 if a committed notebook differs from what its source builds (a test runs it).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "notebooks" / "src"
OUT = ROOT / "notebooks"


def parse(text: str) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                   "language_info": {"name": "python"}}
    cells, kind, lines, tags = [], None, [], []

    def flush():
        if kind is None:
            return
        body = "\n".join(lines).strip("\n")
        if kind == "markdown":
            body = "\n".join(l[2:] if l.startswith("# ") else l.lstrip("#") for l in body.splitlines())
            cells.append(nbformat.v4.new_markdown_cell(body))
        else:
            cell = nbformat.v4.new_code_cell(body)
            if tags:
                cell.metadata["tags"] = list(tags)
            cells.append(cell)

    for line in text.splitlines():
        if line.startswith("# %%"):
            flush()
            rest = line[4:].strip()
            kind = "markdown" if rest == "[markdown]" else "code"
            tags = ["parameters"] if rest == "parameters" else []
            lines = []
        else:
            lines.append(line)
    flush()
    for i, c in enumerate(cells):
        c["id"] = f"c{i:02d}"
    nb.cells = cells
    return nb


def build(check: bool = False) -> int:
    bad = 0
    for src in sorted(SRC.glob("*.py")):
        target = OUT / (src.stem + ".ipynb")
        text = json.dumps(parse(src.read_text()), indent=1, sort_keys=True, ensure_ascii=False) + "\n"
        if check:
            if not target.is_file() or target.read_text() != text:
                print(f"{target.name} is out of date with {src.relative_to(ROOT)}: run python tools/build_notebooks.py")
                bad = 1
        else:
            target.write_text(text)
    return bad


if __name__ == "__main__":
    sys.exit(build(check="--check" in sys.argv))
