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
export REFUSAL_RANK_PROFILE="$PROFILE" PYTHONUNBUFFERED=1
mkdir -p "runs/$PROFILE"
CACHE_ROOT="${REFUSAL_RANK_CACHE:-$HOME/.cache/refusal_rank}"
if [ "$FRESH" = 1 ]; then rm -rf "$CACHE_ROOT/runs/$PROFILE" "runs/$PROFILE"/*.ipynb; fi
export REFUSAL_RANK_FRESH="$FRESH"
start=$(date +%s)
for nb in notebooks/[0-9][0-9]_*.ipynb; do
  name=$(basename "$nb" .ipynb); num=${name%%_*}
  if [ -n "$ONLY" ] && [ "$num" != "$ONLY" ]; then continue; fi
  if [ -n "$FROM" ] && [ "$num" \< "$FROM" ]; then continue; fi
  if [ -n "$TO" ] && [ "$num" \> "$TO" ]; then continue; fi
  echo "== $name ($PROFILE)"
  if ! .venv/bin/papermill "$nb" "runs/$PROFILE/$name.ipynb" -p profile "$PROFILE" --cwd notebooks \
       --log-output --progress-bar --no-report-mode 2> >(grep --line-buffered -v "TCP without encryption" >&2); then
    echo "run_all.sh: notebook $name failed for profile $PROFILE; the executed copy with the error is runs/$PROFILE/$name.ipynb" >&2
    exit 1
  fi
done
echo "== done in $(( $(date +%s) - start )) s; figures in figures/$PROFILE:"
for f in "figures/$PROFILE"/*.png; do
  [ -f "$f" ] && printf '  %-45s %8s bytes  %s\n' "$(basename "$f")" "$(stat -c %s "$f")" "$(sha256sum "$f" | cut -c1-16)"
done
exit 0
