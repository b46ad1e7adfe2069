#!/usr/bin/env bash
# Install what the tests need (.venv), then a papermill smoke run of every notebook on the `tiny` profile
# (a random small model: checks that the series runs, not its numbers), twice from an empty cache: the two
# summary.json files must agree bitwise (reproducibility), and a third run right after must skip every
# notebook (resume). Then the test suite, which also reads the first notebook as the Jupyter kernel
# executed it in that run (its figures must be image outputs), instead of executing it once more.
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup_env.sh tiny
t0=$(date +%s)
./run_all.sh --profile tiny --fresh
mkdir -p runs/tiny/first
cp results/tiny/summary.json runs/tiny/summary.first.json
cp runs/tiny/01_directions.ipynb runs/tiny/first/01_directions.ipynb
t1=$(date +%s)
./run_all.sh --profile tiny --fresh
.venv/bin/python tools/compare_summaries.py runs/tiny/summary.first.json results/tiny/summary.json
./run_all.sh --profile tiny | tee runs/tiny/resume.log
if grep -q "^== [0-9][0-9]_[a-z0-9_]* (tiny)$" runs/tiny/resume.log; then
  echo "run_tests.sh: a notebook ran again although nothing changed (resume is broken)" >&2; exit 1
fi
t2=$(date +%s)
echo "run_tests.sh: tiny series $((t1 - t0)) s, its fresh rerun and the resume $((t2 - t1)) s"
REFUSAL_RANK_EXECUTED_01="$PWD/runs/tiny/first/01_directions.ipynb" .venv/bin/python -m pytest "$@"
