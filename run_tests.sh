#!/usr/bin/env bash
# Install what the tests need (.venv), run the test suite, then a papermill smoke run of every
# notebook on the tiny profile (a random small model: checks that the series runs, not its numbers),
# twice from an empty cache: the two summary.json files must agree bitwise (reproducibility), and a
# third run right after must skip every notebook (resume).
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup_env.sh tiny
.venv/bin/python -m pytest "$@"
./run_all.sh --profile tiny --fresh
cp results/tiny/summary.json runs/tiny/summary.first.json
./run_all.sh --profile tiny --fresh
.venv/bin/python tools/compare_summaries.py runs/tiny/summary.first.json results/tiny/summary.json
./run_all.sh --profile tiny | tee runs/tiny/resume.log
if grep -q "^== [0-9][0-9]_[a-z0-9_]* (tiny)$" runs/tiny/resume.log; then
  echo "run_tests.sh: a notebook ran again although nothing changed (resume is broken)" >&2; exit 1
fi
