#!/usr/bin/env bash
# Install what the tests need (.venv), run the test suite, then a papermill smoke run of every
# notebook on the tiny profile (a random small model: checks that the series runs, not its numbers).
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup_env.sh tiny
.venv/bin/python -m pytest "$@"
./run_all.sh --profile tiny --fresh
