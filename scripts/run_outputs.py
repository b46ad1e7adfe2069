"""What a notebook of run_all.sh produced, so that resume checks outputs as well as inputs.

    run_outputs.py snapshot SNAP RESULTS_DIR FIGURES_DIR   # before a notebook runs
    run_outputs.py record SNAP OUTPUTS [SECTIONS_LOG]      # after it finished: what it wrote, into OUTPUTS
    run_outputs.py check OUTPUTS                           # exit 1 (one line on stdout) if any is gone

A notebook's outputs are the files under results/<profile> and figures/<profile> it created or changed,
and the top-level sections of summary.json it wrote (each notebook merges its own into the shared file;
``refusal_rank.results.update_summary`` logs them to SECTIONS_LOG, ``$REFUSAL_RANK_SECTIONS_LOG``).
Plain Python, no project import: run_all.sh calls it between notebooks.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

VOLATILE = {"profile", "model", "commit", "created"}  # rewritten by every notebook: they name no notebook's work


def _files(dirs: list[str]) -> dict[str, list[int]]:
    out = {}
    for d in dirs:
        for p in Path(d).rglob("*"):
            if p.is_file() and not p.name.endswith(".tmp"):
                st = p.stat()
                out[str(p)] = [st.st_mtime_ns, st.st_size]
    return out


def _sections(summary: Path) -> dict[str, str]:
    try:
        s = json.loads(summary.read_text())
    except (OSError, ValueError):
        return {}
    return {k: hashlib.sha256(json.dumps(v, sort_keys=True).encode()).hexdigest() for k, v in s.items()
            if k not in VOLATILE}


def snapshot(snap: str, results: str, figures: str) -> int:
    summary = Path(results) / "summary.json"
    Path(snap).write_text(json.dumps({"dirs": [results, figures], "summary": str(summary),
                                      "files": _files([results, figures]), "sections": _sections(summary)}))
    return 0


def record(snap: str, outputs: str, sections_log: str | None = None) -> int:
    before = json.loads(Path(snap).read_text())
    now = _files(before["dirs"])
    sections = _sections(Path(before["summary"]))
    files = sorted(p for p, v in now.items() if before["files"].get(p) != v)  # summary.json too, when it was written
    keys = {k for k, h in sections.items() if before["sections"].get(k) != h}
    if sections_log and Path(sections_log).is_file():  # what update_summary wrote, changed or not
        keys |= {k for k in Path(sections_log).read_text().split() if k in sections}
        Path(sections_log).unlink()
    keys = sorted(keys)
    Path(outputs).write_text(json.dumps({"files": files, "summary": before["summary"], "sections": keys}, indent=1) + "\n")
    Path(snap).unlink()
    return 0


def check(outputs: str) -> int:
    try:
        rec = json.loads(Path(outputs).read_text())
    except (OSError, ValueError):
        print(f"its record of outputs ({outputs}) is missing or unreadable")
        return 1
    gone = [p for p in rec["files"] if not Path(p).is_file()]
    if gone:
        print(f"its output {gone[0]} is missing")
        return 1
    if rec["sections"]:
        have = _sections(Path(rec["summary"]))
        lost = [k for k in rec["sections"] if k not in have]
        if lost:
            print(f"{rec['summary']} lacks its section(s) {', '.join(lost)}" if have else f"its output {rec['summary']} is missing")
            return 1
    return 0


if __name__ == "__main__":
    cmd, *args = sys.argv[1:] or [""]
    fns = {"snapshot": (snapshot, (3,)), "record": (record, (2, 3)), "check": (check, (1,))}
    if cmd not in fns or len(args) not in fns[cmd][1]:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        sys.exit(2)
    sys.exit(fns[cmd][0](*args))
