#!/usr/bin/env bash
# The longer CPU reproduction (issue 14; docs/results.md): one full epoch of English training per cell on UD-POS and
# PAN-X, where benchmarks/reproduce_cpu.sh stops at 38% (UD-POS) and 16% (PAN-X) of one. Rows: the baseline, and
# for each of the TOP layers that `dlfa rank-layers` ranks first, D_x with the gate started as the paper does
# (--gate-init average) and at the baseline (--gate-init baseline); seeds 1-3. Everything else is reproduce_cpu.sh's.
#   bash benchmarks/reproduce_cpu_long.sh [OUTPUT_DIR]      (default: repro-cpu-long/, outside git via .gitignore)
#   TOP=1 (default): layers per task (9 cells per task; TOP=2: 15). RANKING_UDPOS / RANKING_PANX: an existing
#   rank-layers ranking.json to take them from (benchmarks/validate_rank_layers.py writes rank/<task>/joint/);
#   otherwise rank-layers runs here first (joint mode, seeds 1 and 2).
# Cells are resumable: run it again after an interruption; finished cells are skipped and interrupted ones continue
# from their last checkpoint. The run goes seed by seed, so that an interrupted run holds whole seeds of every row.
# Per seed, two one-cell-at-a-time sweeps run side by side (one torch thread per cell), each with half of the
# seed's cells of both tasks, which keeps both cores busy (a task's three cells per seed would leave one idle).
set -euo pipefail
DATA=${DLFA_SHARED_DATA:-../shared/data}
OUT=${1:-repro-cpu-long}
DLFA=${DLFA:-dlfa}
TOP=${TOP:-1}
export DLFA_THREADS=1
[ -d "$DATA/udpos" ] && [ -d "$DATA/panx" ] || {
  echo "reproduce_cpu_long.sh: no $DATA/udpos or $DATA/panx; nothing to do"; exit 0; }

# The short reproduction's settings, with --epochs 1 in place of --max-steps and English-dev selection every 200
# steps (785 steps per epoch on UD-POS, about 1,250 on PAN-X).
COMMON=(--data-root "$DATA" --output "$OUT/sweep" --parallel 1 --epochs 1
        --batch-size 16 --learning-rate 1e-4 --freeze-embeddings --eval-every 200 --max-dev-examples 1000
        --no-keep-weights)
declare -A EVAL=([udpos]=200 [panx]=300)   # the first N sentences of every evaluation file, as reproduce_cpu.sh
declare -A PROXY_STEPS=([udpos]=300 [panx]=200)

top_layers() {  # the TOP layers a ranking.json ranks first, as "10,9"
  "${PYTHON:-python3}" - "$1" "$TOP" <<'EOF'
import json, sys
ranking = json.load(open(sys.argv[1], encoding="utf-8"))["ranking"]
print(",".join(str(x) for x in ranking[: int(sys.argv[2])]))
EOF
}

declare -A LAYERS
for TASK in udpos panx; do
  VAR="RANKING_${TASK^^}"
  RANKING=${!VAR:-}
  if [ -z "$RANKING" ]; then
    RANKING="$OUT/rank/$TASK/ranking.json"
    [ -f "$RANKING" ] || "$DLFA" rank-layers --task "$TASK" --data-dir "$DATA/$TASK" --output "$OUT/rank/$TASK" \
      --seeds 1,2 --max-steps "${PROXY_STEPS[$TASK]}" --overwrite
  fi
  LAYERS[$TASK]=$(top_layers "$RANKING")
  echo "reproduce_cpu_long.sh: $TASK layers ${LAYERS[$TASK]} (the first $TOP of $RANKING)"
done

rows() {  # TASK SEED average|baseline: the sweep of that task's rows with one gate start (average: with the baseline)
  local args=(--tasks "$1" --max-eval-examples "${EVAL[$1]}" --layers "${LAYERS[$1]}" --seeds "$2" "${COMMON[@]}")
  if [ "$3" = average ]; then "$DLFA" sweep "${args[@]}"
  else "$DLFA" sweep "${args[@]}" --no-baseline --gate-init baseline; fi
}

for SEED in 1 2 3; do
  # A failed cell is recorded in its folder, its sweep goes on; the other rows still run, then the script stops.
  (s=0; rows udpos "$SEED" average || s=$?; rows panx "$SEED" baseline || s=$?; exit "$s") & FIRST=$!
  (s=0; rows udpos "$SEED" baseline || s=$?; rows panx "$SEED" average || s=$?; exit "$s") & SECOND=$!
  status=0
  wait "$FIRST" || status=$?
  wait "$SECOND" || status=$?
  [ "$status" = 0 ] || exit "$status"
done

"$DLFA" report "$OUT/sweep" --output "$OUT/report"
