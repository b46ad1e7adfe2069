#!/usr/bin/env bash
# Run the notebook series with papermill for one profile and regenerate every figure.
#   ./run_all.sh [--profile NAME] [--from NN] [--to NN] [--only NN] [--fresh]
# Profiles: tiny, cpu (default), cpu-small, paper. Executed notebooks go to runs/<profile>/,
# results to results/<profile>/summary.json, figures to figures/<profile>/.
# --fresh reruns the selected notebooks from scratch: with every notebook selected it empties the profile's
# run cache; with --only/--from/--to only what the selected notebooks cached. A notebook is skipped when
# its inputs are unchanged since it last finished and its outputs (files, summary sections) still exist.
set -euo pipefail
cd "$(dirname "$0")"
PROFILE="${REFUSAL_RANK_PROFILE:-cpu}"; FROM=""; TO=""; ONLY=""; FRESH=0
need_value() {  # $1: the flag, $2: what follows it (absent, empty or another flag: an error)
  case "${2-}" in
    ""|-*) echo "run_all.sh: $1 needs a value, e.g. $1 ${3} (see --help)." >&2; exit 2;;
  esac
}
while [ $# -gt 0 ]; do
  case "$1" in
    --profile) need_value "$1" "${2-}" tiny; PROFILE="$2"; shift 2;;
    --from) need_value "$1" "${2-}" 03; FROM="$2"; shift 2;;
    --to) need_value "$1" "${2-}" 03; TO="$2"; shift 2;;
    --only) need_value "$1" "${2-}" 03; ONLY="$2"; shift 2;;
    --profile=*) PROFILE="${1#*=}"; need_value --profile "$PROFILE" tiny; shift;;
    --from=*) FROM="${1#*=}"; need_value --from "$FROM" 03; shift;;
    --to=*) TO="${1#*=}"; need_value --to "$TO" 03; shift;;
    --only=*) ONLY="${1#*=}"; need_value --only "$ONLY" 03; shift;;
    --fresh) FRESH=1; shift;;
    -h|--help) sed -n '2,8p' "$0"; exit 0;;
    *) echo "run_all.sh: unknown argument $1 (see --help)" >&2; exit 2;;
  esac
done
if [ ! -f "configs/$PROFILE.toml" ]; then
  echo "run_all.sh: unknown profile '$PROFILE': choose one of $(ls configs | sed 's/\.toml$//' | tr '\n' ' ')" >&2
  exit 2
fi
NB_DIR="${REFUSAL_RANK_NOTEBOOKS:-notebooks}"   # tests point these elsewhere
OUT="${REFUSAL_RANK_RUNS:-runs}/$PROFILE"
RESULTS="${REFUSAL_RANK_RESULTS:-results}/$PROFILE"
FIGURES="${REFUSAL_RANK_FIGURES:-figures}/$PROFILE"
CACHE_ROOT="${REFUSAL_RANK_CACHE:-$HOME/.cache/refusal_rank}"
RUN_CACHE="$CACHE_ROOT/runs/$PROFILE"
# The selection is settled before anything is deleted: one that matches no notebook is an error.
selected() {  # $1: a notebook's number
  if [ -n "$ONLY" ] && [ "$1" != "$ONLY" ]; then return 1; fi
  if [ -n "$FROM" ] && [[ "$1" < "$FROM" ]]; then return 1; fi
  if [ -n "$TO" ] && [[ "$1" > "$TO" ]]; then return 1; fi
  return 0
}
ALL=(); SEL=(); NUMS=""
for nb in "$NB_DIR"/[0-9][0-9]_*.ipynb; do
  [ -f "$nb" ] || continue
  name=$(basename "$nb" .ipynb); num=${name%%_*}
  ALL+=("$nb"); NUMS="$NUMS $num"
  if selected "$num"; then SEL+=("$name"); fi
done
if [ ${#SEL[@]} -eq 0 ]; then
  echo "run_all.sh: the selection (${ONLY:+--only $ONLY }${FROM:+--from $FROM }${TO:+--to $TO }) matches no notebook in $NB_DIR (they are:${NUMS:- none}); nothing was run or deleted." >&2
  exit 2
fi
# This clone's library, configs, data and results, whichever clone's .venv runs them (two clones may share
# one, whose editable install imports the clone that installed it): PYTHONPATH puts this lib/ first for
# every Python started from here (papermill's kernel included), REFUSAL_RANK_ROOT names this clone
# (refusal_rank.config reads it and stops with one sentence if it does not match).
export REFUSAL_RANK_ROOT="$PWD" PYTHONPATH="$PWD/lib${PYTHONPATH:+:$PYTHONPATH}"
scripts/setup_env.sh "$PROFILE"
# The kernel papermill runs and JupyterLab offers for these notebooks: this .venv's Python (idempotent),
# named by its physical path, so that a clone sharing the .venv through a symlink writes the same kernel.
KERNEL=refusal-rank
"$(cd .venv/bin && pwd -P)/python" -m ipykernel install --sys-prefix --name "$KERNEL" --display-name "refusal-rank (.venv)" >/dev/null
export REFUSAL_RANK_PROFILE="$PROFILE" PYTHONUNBUFFERED=1
# Progress bars are for people at a notebook: in these unattended runs they would only fill the executed
# notebooks with fragments. TQDM_DISABLE switches off the library's bars (refusal_rank.progress), the
# HF variable those of transformers and huggingface_hub; a bar that forces itself on updates once a minute.
export TQDM_DISABLE=1 TQDM_MININTERVAL=60 HF_HUB_DISABLE_PROGRESS_BARS=1
mkdir -p "$OUT"
if [ "$FRESH" = 1 ]; then
  if [ ${#SEL[@]} -eq ${#ALL[@]} ]; then
    rm -rf "$RUN_CACHE"   # every notebook selected: the whole profile cache
  else
    # only what the selected notebooks produced (recorded per notebook by refusal_rank.results.note_product):
    # the other notebooks' cached values (notebook 03's trained variants) survive
    for name in "${SEL[@]}"; do
      manifest="$RUN_CACHE/.produced/$name.txt"
      if [ ! -f "$manifest" ]; then
        echo "== $name ($PROFILE): no record of what it cached (none yet, or a run before records were kept): its cache entries are kept"
        continue
      fi
      n=0
      while IFS= read -r rel; do
        case "$rel" in ""|/*|..|../*|*/../*|*/..) continue;; esac
        rm -rf "${RUN_CACHE:?}/$rel" "${RUN_CACHE:?}/$rel.sha256"; n=$((n + 1))
      done < "$manifest"
      rm -f "$manifest"
      echo "== $name ($PROFILE): --fresh emptied the $n cache entries it produced"
    done
  fi
  for name in "${SEL[@]}"; do rm -f "$OUT/$name.ipynb" "$OUT/$name.stamp" "$OUT/$name.outputs"; done
fi
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
outputs_ok() {  # $1: notebook name; prints why not on stdout
  if [ -f "$OUT/$1.outputs" ]; then
    .venv/bin/python scripts/run_outputs.py check "$OUT/$1.outputs"
  elif [ ! -f "$RESULTS/summary.json" ]; then  # a stamp from before outputs were recorded: every notebook writes the summary
    echo "its output $RESULTS/summary.json is missing"; return 1
  fi
}
for nb in "${ALL[@]}"; do
  name=$(basename "$nb" .ipynb); num=${name%%_*}
  stamp=$(inputs_hash "$nb" "$prev"); prev="$stamp"   # every notebook's, selected or not: one chain
  if ! selected "$num"; then continue; fi
  if [ -f "$OUT/$name.stamp" ] && [ "$(cat "$OUT/$name.stamp")" = "$stamp" ] && [ -f "$OUT/$name.ipynb" ]; then
    if why=$(outputs_ok "$name"); then
      echo "== $name ($PROFILE): up to date, skipped (inputs unchanged since its last run; --fresh reruns it)"
      continue
    fi
    echo "== $name ($PROFILE): inputs unchanged but $why: running it again"
  fi
  rm -f "$OUT/$name.stamp"
  echo "== $name ($PROFILE)"
  t_nb=$(date +%s)
  mkdir -p "$RESULTS" "$FIGURES"
  .venv/bin/python scripts/run_outputs.py snapshot "$OUT/$name.snap" "$RESULTS" "$FIGURES"
  rm -f "$OUT/$name.sections"
  if ! REFUSAL_RANK_NOTEBOOK="$name" REFUSAL_RANK_SECTIONS_LOG="$(cd "$OUT" && pwd)/$name.sections" .venv/bin/papermill "$nb" "$OUT/$name.ipynb" -k "$KERNEL" -p profile "$PROFILE" --cwd "$NB_DIR" \
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
  .venv/bin/python scripts/run_outputs.py record "$OUT/$name.snap" "$OUT/$name.outputs" "$OUT/$name.sections"
  echo "$stamp" > "$OUT/$name.stamp"
  echo "== $name finished in $(( $(date +%s) - t_nb )) s"
done
echo "== done in $(( $(date +%s) - start )) s"
if [ -f "$RESULTS/summary.json" ]; then .venv/bin/python -m refusal_rank.report --profile "$PROFILE" --headline || true; fi
echo "== figures in $FIGURES:"
for f in "$FIGURES"/*.png; do
  [ -f "$f" ] && printf '  %-45s %8s bytes  %s\n' "$(basename "$f")" "$(stat -c %s "$f")" "$(sha256sum "$f" | cut -c1-16)"
done
exit 0
