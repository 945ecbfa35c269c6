#!/usr/bin/env bash
# The CPU-scale reproduction behind docs/results.md: baseline vs DLFA (D_4, D_8, D_10), seeds 1-3, on the
# embedded multilingual-e5-small and the real data in ../shared/data. About 2.5 h on 2 CPU cores.
#   bash benchmarks/reproduce_cpu.sh [OUTPUT_DIR]      (default: repro-cpu/, outside git via .gitignore)
# Cells are resumable: run it again after an interruption and finished cells are skipped.
set -euo pipefail
DATA=${DLFA_SHARED_DATA:-../shared/data}
OUT=${1:-repro-cpu}
DLFA=${DLFA:-dlfa}
[ -d "$DATA/udpos" ] && [ -d "$DATA/panx" ] || { echo "reproduce_cpu.sh: no $DATA/udpos or $DATA/panx; nothing to do"; exit 0; }

# Both tasks: frozen word embeddings (the 250k x 384 embedding matrix dominates the optimizer step on CPU),
# batch 16, lr 1e-4, English-dev evaluation every 100 steps on the first 1000 dev sentences (selection), and
# the first N sentences of every evaluation file.
COMMON=(--data-root "$DATA" --output "$OUT/sweep" --layers 4,8,10 --seeds 1,2,3 --parallel 2
        --batch-size 16 --learning-rate 1e-4 --freeze-embeddings --eval-every 100 --max-dev-examples 1000)

# UD-POS: 300 steps (4,800 sentences, 38% of one epoch of the full EWT train); all 21 test treebanks, 500 sentences each.
"$DLFA" sweep --tasks udpos "${COMMON[@]}" --max-steps 300 --max-eval-examples 500
# PAN-X: 200 steps (3,200 of the 20,000 English train sentences); all 40 labeled dev sets, 300 sentences each.
"$DLFA" sweep --tasks panx "${COMMON[@]}" --max-steps 200 --max-eval-examples 300

"$DLFA" report "$OUT/sweep" --output "$OUT/report"
