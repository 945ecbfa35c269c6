#!/usr/bin/env bash
# The longer CPU reproduction (issue 14; docs/results.md): one full epoch of English training per cell on UD-POS and
# PAN-X, where benchmarks/reproduce_cpu.sh stops at 38% (UD-POS) and 16% (PAN-X) of one. Rows: the baseline, and
# for each of the TOP layers that `dlfa rank-layers` ranks first, D_x with the gate started as the paper does
# (--gate-init average) and at the baseline (--gate-init baseline); seeds 1-3. Everything else is reproduce_cpu.sh's.
#   bash benchmarks/reproduce_cpu_long.sh [OUTPUT_DIR]      (default: repro-cpu-long/, outside git via .gitignore)
#   TOP=1 (default): layers per task (9 cells per task; TOP=2: 15). RANKING_UDPOS / RANKING_PANX: an existing
#   rank-layers ranking.json to take them from (benchmarks/validate_rank_layers.py writes rank/<task>/joint/);
#   otherwise rank-layers runs here first (joint mode, seeds 1 and 2).
# Cells are resumable: run it again after an interruption and finished cells are skipped. The run goes seed by seed,
# so that an interrupted run holds whole seeds of every row.
set -euo pipefail
DATA=${DLFA_SHARED_DATA:-../shared/data}
OUT=${1:-repro-cpu-long}
DLFA=${DLFA:-dlfa}
TOP=${TOP:-1}
[ -d "$DATA/udpos" ] && [ -d "$DATA/panx" ] || { echo "reproduce_cpu_long.sh: no $DATA/udpos or $DATA/panx; nothing to do"; exit 0; }

# The short reproduction's settings, with --epochs 1 in place of --max-steps and English-dev selection every 200
# steps (784 steps per epoch on UD-POS, 1,250 on PAN-X).
COMMON=(--data-root "$DATA" --output "$OUT/sweep" --parallel 2 --epochs 1
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

for SEED in 1 2 3; do
  for TASK in udpos panx; do
    ARGS=(--tasks "$TASK" --max-eval-examples "${EVAL[$TASK]}" --layers "${LAYERS[$TASK]}" --seeds "$SEED" "${COMMON[@]}")
    "$DLFA" sweep "${ARGS[@]}"
    "$DLFA" sweep "${ARGS[@]}" --no-baseline --gate-init baseline
  done
done

"$DLFA" report "$OUT/sweep" --output "$OUT/report"
