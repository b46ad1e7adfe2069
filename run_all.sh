#!/usr/bin/env bash
# Run the notebook series with papermill for one profile and regenerate every figure.
#   ./run_all.sh [--profile NAME] [--from NN] [--to NN] [--only NN] [--fresh]
# Profiles: tiny, cpu (default), cpu-small, paper. Executed notebooks go to runs/<profile>/,
# results to results/<profile>/summary.json, figures to figures/<profile>/.
set -euo pipefail
cd "$(dirname "$0")"
PROFILE="${REFUSAL_RANK_PROFILE:-cpu}"; FROM=""; TO=""; ONLY=""; FRESH=0
while [ $# -gt 0 ]; do
  case "$1" in
    --profile) PROFILE="$2"; shift 2;;
    --profile=*) PROFILE="${1#*=}"; shift;;
    --from) FROM="$2"; shift 2;;
    --to) TO="$2"; shift 2;;
    --only) ONLY="$2"; shift 2;;
    --fresh) FRESH=1; shift;;
    -h|--help) sed -n '2,6p' "$0"; exit 0;;
    *) echo "run_all.sh: unknown argument $1 (see --help)" >&2; exit 2;;
  esac
done
if [ ! -f "configs/$PROFILE.toml" ]; then
  echo "run_all.sh: unknown profile '$PROFILE': choose one of $(ls configs | sed 's/\.toml$//' | tr '\n' ' ')" >&2
  exit 2
fi
scripts/setup_env.sh "$PROFILE"
# The kernel papermill runs and JupyterLab offers for these notebooks: this .venv's Python (idempotent).
KERNEL=refusal-rank
.venv/bin/python -m ipykernel install --sys-prefix --name "$KERNEL" --display-name "refusal-rank (.venv)" >/dev/null
export REFUSAL_RANK_PROFILE="$PROFILE" PYTHONUNBUFFERED=1
# Progress bars are for people at a notebook: in these unattended runs they would only fill the executed
# notebooks with fragments. TQDM_DISABLE switches off the library's bars (refusal_rank.progress), the
# HF variable those of transformers and huggingface_hub; a bar that forces itself on updates once a minute.
export TQDM_DISABLE=1 TQDM_MININTERVAL=60 HF_HUB_DISABLE_PROGRESS_BARS=1
NB_DIR="${REFUSAL_RANK_NOTEBOOKS:-notebooks}"   # tests point these two elsewhere
OUT="${REFUSAL_RANK_RUNS:-runs}/$PROFILE"
mkdir -p "$OUT"
CACHE_ROOT="${REFUSAL_RANK_CACHE:-$HOME/.cache/refusal_rank}"
if [ "$FRESH" = 1 ]; then rm -rf "$CACHE_ROOT/runs/$PROFILE" "$OUT"/*.ipynb "$OUT"/*.stamp; fi
export REFUSAL_RANK_FRESH="$FRESH"
start=$(date +%s)
# A notebook whose inputs did not change since it last finished is skipped. Its inputs: the profile's
# config, the library, the data splits and prompt sets, the notebook itself, and the stamp of the
# notebook before it (so a change upstream reruns everything downstream).
inputs_hash() {  # $1: notebook, $2: previous stamp
  { sha256sum "configs/$PROFILE.toml" "$1" data/*.json data/*.jsonl lib/refusal_rank/*.py | cut -c1-64; echo "$2"; } \
    | sha256sum | cut -c1-64
}
prev=""
for nb in "$NB_DIR"/[0-9][0-9]_*.ipynb; do
  name=$(basename "$nb" .ipynb); num=${name%%_*}
  if [ -n "$ONLY" ] && [ "$num" != "$ONLY" ]; then continue; fi
  if [ -n "$FROM" ] && [ "$num" \< "$FROM" ]; then continue; fi
  if [ -n "$TO" ] && [ "$num" \> "$TO" ]; then continue; fi
  stamp=$(inputs_hash "$nb" "$prev"); prev="$stamp"
  if [ -f "$OUT/$name.stamp" ] && [ "$(cat "$OUT/$name.stamp")" = "$stamp" ] && [ -f "$OUT/$name.ipynb" ]; then
    echo "== $name ($PROFILE): up to date, skipped (inputs unchanged since its last run; --fresh reruns it)"
    continue
  fi
  rm -f "$OUT/$name.stamp"
  echo "== $name ($PROFILE)"
  t_nb=$(date +%s)
  if ! .venv/bin/papermill "$nb" "$OUT/$name.ipynb" -k "$KERNEL" -p profile "$PROFILE" --cwd "$NB_DIR" \
       --log-output --no-progress-bar --no-report-mode 2> >(grep --line-buffered -v "TCP without encryption" >&2); then
    cell=$(.venv/bin/python - "$OUT/$name.ipynb" <<'PY'
import json, sys
try:
    nb = json.load(open(sys.argv[1]))
except Exception:
    sys.exit(0)
code = [c for c in nb["cells"] if c["cell_type"] == "code"]
for i, c in enumerate(code, 1):
    for o in c.get("outputs", []):
        if o.get("output_type") == "error":
            first = "".join(c["source"]).strip().splitlines()[:1]
            print(f"code cell {i} ({first[0][:60] if first else ''!r}): {o['ename']}: {o['evalue'][:200]}")
            sys.exit(0)
PY
)
    echo "run_all.sh: notebook $name failed for profile $PROFILE${cell:+ in $cell}." >&2
    echo "run_all.sh: the executed copy with the error is $OUT/$name.ipynb; notebooks before it are kept and will be skipped on rerun." >&2
    exit 1
  fi
  echo "$stamp" > "$OUT/$name.stamp"
  echo "== $name finished in $(( $(date +%s) - t_nb )) s"
done
echo "== done in $(( $(date +%s) - start )) s"
if [ -f "results/$PROFILE/summary.json" ]; then .venv/bin/python -m refusal_rank.report --profile "$PROFILE" --headline || true; fi
echo "== figures in figures/$PROFILE:"
for f in "figures/$PROFILE"/*.png; do
  [ -f "$f" ] && printf '  %-45s %8s bytes  %s\n' "$(basename "$f")" "$(stat -c %s "$f")" "$(sha256sum "$f" | cut -c1-16)"
done
exit 0
