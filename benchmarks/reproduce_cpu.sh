#!/usr/bin/env bash
# The CPU-scale reproduction behind docs/results.md: baseline vs DLFA (D_4, D_8, D_10) with the gate started as the
# paper does (--gate-init average) and at the baseline (--gate-init baseline), seeds 1-3, on the embedded
# multilingual-e5-small and the real data in ../shared/data. 42 cells; wall times of the last run in docs/results.md.
#   bash benchmarks/reproduce_cpu.sh [OUTPUT_DIR]      (default: repro-cpu/, outside git via .gitignore)
# Cells are resumable: run it again after an interruption and finished cells are skipped.
set -euo pipefail
DATA=${DLFA_SHARED_DATA:-../shared/data}
OUT=${1:-repro-cpu}
DLFA=${DLFA:-dlfa}
[ -d "$DATA/udpos" ] && [ -d "$DATA/panx" ] || { echo "reproduce_cpu.sh: no $DATA/udpos or $DATA/panx; nothing to do"; exit 0; }

# Both tasks: frozen word embeddings, batch 16, lr 1e-4, English-dev evaluation every 100 steps on the first 1000
# dev sentences (selection), the first N sentences of every evaluation file, and the weights deleted once a cell
# is scored (17 MB per cell instead of 490 MB; the report needs only metrics). Precision, AdamW kernel and scorer
# are dlfa's defaults (bf16 autocast on a CPU with native bf16, fused AdamW; UD-POS scorer xtreme-2020).
COMMON=(--data-root "$DATA" --output "$OUT/sweep" --layers 4,8,10 --parallel 2
        --batch-size 16 --learning-rate 1e-4 --freeze-embeddings --eval-every 100 --max-dev-examples 1000
        --no-keep-weights)
PANX=(--tasks panx --max-steps 200 --max-eval-examples 300)    # 3,200 of the 20,000 English train sentences; 39 dev sets
UDPOS=(--tasks udpos --max-steps 300 --max-eval-examples 200)  # 38% of one epoch of English-EWT; 21 test treebanks

# PAN-X: baseline, D_4, D_8, D_10, then gate-baseline+D_4, +D_8, +D_10.
"$DLFA" sweep "${PANX[@]}" "${COMMON[@]}" --seeds 1,2,3
"$DLFA" sweep "${PANX[@]}" "${COMMON[@]}" --seeds 1,2,3 --no-baseline --gate-init baseline
# UD-POS: seed by seed, so that an interrupted run holds whole seeds of every row.
for SEED in 1 2 3; do
  "$DLFA" sweep "${UDPOS[@]}" "${COMMON[@]}" --seeds "$SEED"
  "$DLFA" sweep "${UDPOS[@]}" "${COMMON[@]}" --seeds "$SEED" --no-baseline --gate-init baseline
done

"$DLFA" report "$OUT/sweep" --output "$OUT/report"
