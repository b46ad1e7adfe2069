#!/usr/bin/env bash
# The committed audit reports of a profile (default cpu) in results/<profile>/audit/:
#   original          the profile's original model, --fast: must pass
#   original_full     the same, full audit (rank-K screen, the profile's test sets): with --full only
#   k1_export         notebook 02's K=1 export against the original, --fast: must fail, with the abliteration signature
#   <variant>         each trained notebook-03 variant (at its target milestone: [defense] run and budget_curve)
#                     against the original, --fast: whatever it reads; each is exported for its audit and removed after
# Needs notebooks 01-03 to have run on the profile (the K=1 export and the variants' snapshots live in its run cache).
# Usage: scripts/audit_cpu.sh [--full] [--profile NAME]
set -euo pipefail
cd "$(dirname "$0")/.."
PROFILE=cpu
FULL=0
while [ $# -gt 0 ]; do
  case "$1" in
    --full) FULL=1 ;;
    --profile) [ $# -ge 2 ] || { echo "audit_cpu.sh: --profile needs a value" >&2; exit 2; }; PROFILE="$2"; shift ;;
    *) echo "audit_cpu.sh: unknown argument $1 (use --full, --profile NAME)" >&2; exit 2 ;;
  esac
  shift
done
PY=${PYTHON:-.venv/bin/python}
# this clone's library, configs and results, even with a .venv shared between clones (as run_all.sh does)
export REFUSAL_RANK_ROOT="$PWD" PYTHONPATH="$PWD/lib${PYTHONPATH:+:$PYTHONPATH}"
OUT=results/$PROFILE/audit
audit() {  # label expected-exit args...: run one audit, stop the script if its exit status is not the expected one
  local label=$1 want=$2 rc=0
  shift 2
  echo "== audit $label ($PROFILE): $*"
  "$PY" -m refusal_rank.audit "$@" --profile "$PROFILE" --out "$OUT" --label "$label" || rc=$?
  if [ "$want" != any ] && [ "$rc" != "$want" ]; then
    echo "audit_cpu.sh: $label exited $rc, expected $want (see $OUT/$label.md)" >&2; exit 1
  fi
  if [ "$rc" = 2 ]; then echo "audit_cpu.sh: $label could not run" >&2; exit 1; fi
}
audit original 0 original --fast
[ "$FULL" = 1 ] && audit original_full 0 original
audit k1_export 1 k1_export --reference original --fast
"$PY" - "$OUT/k1_export.json" <<'PY'
import json, sys
rep = json.load(open(sys.argv[1]))
kind = rep["diff"]["signature"]["kind"]
if kind != "abliteration":
    sys.exit(f"audit_cpu.sh: the K=1 export's weight diff reads {kind!r}, not the abliteration signature")
print("k1_export:", rep["diff"]["signature"]["sentence"])
PY
VARIANTS=$("$PY" - "$PROFILE" <<'PY'
import sys
from refusal_rank.config import load_config
from refusal_rank.defense_run import default_variants, target_step, variant_path
from refusal_rank.training import snapshot_path
cfg = load_config(sys.argv[1])
names = list(dict.fromkeys(default_variants(cfg) + list(cfg["defense"].get("budget_curve") or [])))
print(" ".join(v for v in names if snapshot_path(variant_path(cfg, v) / "ckpt.pt", target_step(cfg, v)).is_file()))
PY
)
for v in $VARIANTS; do
  audit "$v" any "$v" --reference original --fast
done
echo "reports in $OUT: original k1_export $VARIANTS$([ "$FULL" = 1 ] && echo ' original_full')"
