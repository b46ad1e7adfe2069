#!/usr/bin/env bash
# The whole cpu profile's compute, as one resumable background queue (one model job at a time: the machine
# has 2 cores and a training step needs ~12-19 GB). Every stage resumes from its caches and checkpoints, so
# after an interruption the same command picks up where it stopped; a finished stage is skipped in seconds.
#
#   1. every variant of [defense] run to 1x, each checkpoint measured (utility + attack screen) as it lands
#   2. the budget curve: the budget_curve variants milestone by milestone to 8x, each measured (one at a time, in
#      budget_curve order, where queue_progress.json holds their lower milestones already: defense_run.train_plan).
#      It comes before the notebooks and audits, which it does not need, so that on a new machine the first 8x
#      checkpoint lands hours sooner
#   3. notebooks 01 and 02 (directions, the K=1 attack and its export), then the generation and training
#      benchmarks (benchmarks/bench_generation.py, bench_training.py: they must run alone, and a queue stage is
#      the one place they do), then the moment diagnostics of the trained milestones recomputed with the top
#      eigenvalue split into its parts (tools/moment_decomposition.py -> results/<profile>/moment_decomposition.json)
#   4. the audit reports (results/<profile>/audit/): the original, the K=1 export, the variants whose final
#      checkpoint exists
#   5. notebooks 03, 04 and 05 (they reuse every trained and measured checkpoint)
#   6. the audit reports again, now with the budget-curve variants at 8x, the moment decomposition of their
#      milestones, and the cache's size measured (results/<profile>/cache_size.json)
#
# Before any compute it checks that this machine computes the profile in the dtype its committed progress was
# measured in (refusal-rank progress --check-dtype): an AVX2-only CPU resolves dtype = "auto" to float32, and a
# queue there would retrain every variant from scratch in float32, 5-10x slower, beside the committed bf16 run.
# --allow-dtype-change starts such a separate run on purpose.
#
# Usage: nohup scripts/cpu_queue.sh [--profile NAME] [--from N] [--allow-dtype-change] > logs/queue.log 2>&1 &
# The body is one function, read whole before it runs: bash reads a plain script as it goes, so editing it
# during a run of many hours would make the running queue execute shifted text.
main() {
set -euo pipefail
cd "$(dirname "$0")/.."
PROFILE=cpu
FROM=1
CHECK_DTYPE=1
while [ $# -gt 0 ]; do
  case "$1" in
    --profile) [ $# -ge 2 ] || { echo "cpu_queue.sh: --profile needs a value" >&2; exit 2; }; PROFILE="$2"; shift ;;
    --from) [ $# -ge 2 ] &&  [[ "$2" =~ ^[1-6]$ ]] || { echo "cpu_queue.sh: --from needs a stage 1-6" >&2; exit 2; }; FROM="$2"; shift ;;
    --allow-dtype-change) CHECK_DTYPE=0 ;;
    *) echo "cpu_queue.sh: unknown argument $1 (use --profile NAME, --from N, --allow-dtype-change)" >&2; exit 2 ;;
  esac
  shift
done
PY=${PYTHON:-.venv/bin/python}
# this clone's library, configs and results, even with a .venv shared between clones (as run_all.sh does)
export REFUSAL_RANK_ROOT="$PWD" PYTHONPATH="$PWD/lib${PYTHONPATH:+:$PYTHONPATH}"
export TQDM_MININTERVAL=${TQDM_MININTERVAL:-60}
if [ "$CHECK_DTYPE" = 1 ]; then "$PY" -m refusal_rank.cli progress --profile "$PROFILE" --check-dtype || exit 2; fi
stage() { echo "== stage $1 ($(date -u +%H:%M)): $2"; }
if [ "$FROM" -le 1 ]; then stage 1 "every variant to 1x, measured"; "$PY" tools/train_variant.py --profile "$PROFILE" --plan --until 1x --evaluate; fi
if [ "$FROM" -le 2 ]; then stage 2 "the budget curve, measured"; "$PY" tools/train_variant.py --profile "$PROFILE" --plan --evaluate; fi
if [ "$FROM" -le 3 ]; then stage 3 "notebooks 01-02, generation and training benchmarks, the moment decomposition"; ./run_all.sh --profile "$PROFILE" --from 01 --to 02
  "$PY" tools/moment_decomposition.py --profile "$PROFILE"
  "$PY" benchmarks/bench_generation.py --profile "$PROFILE"
  "$PY" benchmarks/bench_training.py --profile "$PROFILE"; fi
# an audit's verdict is a result, not a failure of the queue: an unexpected one is reported and the queue goes on
if [ "$FROM" -le 4 ]; then stage 4 "audit reports"; scripts/audit_cpu.sh --profile "$PROFILE" || echo "cpu_queue.sh: the audit stage stopped (exit $?): see results/$PROFILE/audit/; the queue goes on"; fi
if [ "$FROM" -le 5 ]; then stage 5 "notebooks 03-05"; ./run_all.sh --profile "$PROFILE" --from 03 --to 05; fi
if [ "$FROM" -le 6 ]; then stage 6 "audit reports with every variant, cache size"; scripts/audit_cpu.sh --profile "$PROFILE"
  "$PY" tools/moment_decomposition.py --profile "$PROFILE"
  "$PY" tools/cache_size.py --profile "$PROFILE"; fi
stage done "the queue is finished"
}
main "$@"
exit
