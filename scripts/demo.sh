#!/usr/bin/env bash
# The whole SS-ACL pipeline on the built-in synthetic chest X-rays, on a CPU (about 15 minutes on 2 cores):
#   environment -> synthetic data -> pretraining (all losses) -> report fine-tuning -> test evaluation -> summary.
# Nothing is downloaded but the Python packages of requirements.txt. Re-running skips the data when present.
#   bash scripts/demo.sh
# Outputs: output/demo/ (pretraining), output/demo_report/ (fine-tuning: checkpoints, tensorboard/,
# eval_test/{metrics.json,generated.jsonl,overlays/,summary.json}), output/demo_timings.json.
# Environment overrides: DATA (folder), N (studies), SIZE (pixels), OUT (output folder).
set -euo pipefail
cd "$(dirname "$0")/.."

DATA=${DATA:-data/synthetic}
N=${N:-12000}
SIZE=${SIZE:-64}
OUT=${OUT:-output}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}
PY=.venv/bin/python
SETS=("data.annotation=$DATA/annotation.json" "data.image_root=$DATA/images" "output_dir=$OUT")

T0=$SECONDS
declare -A TIMES
stage() { echo; echo "[demo] $(date +%T) (+$((SECONDS - T0)) s) $*"; }
timed() {  # timed NAME command...: runs the command, records its seconds
  local name=$1 t=$SECONDS; shift
  "$@"
  TIMES[$name]=$((SECONDS - t))
}

stage "1/6 environment (.venv from requirements.txt; a few minutes the first time)"
timed setup bash scripts/setup_env.sh

stage "2/6 synthetic chest X-rays: $N studies at ${SIZE}px in $DATA (2.5% val, 2.5% test)"
if [ -f "$DATA/annotation.json" ]; then
  echo "[demo] $DATA/annotation.json exists: skipping generation (delete it to regenerate)"
  TIMES[data]=0
else
  timed data "$PY" -m datasets.synthetic --out "$DATA" --n "$N" --size "$SIZE" --val-frac 0.025 --test-frac 0.025
fi

stage "3/6 pretraining with every SS-ACL loss (configs/demo.yaml)"
timed pretrain "$PY" main_pretrain.py --config configs/demo.yaml --set "${SETS[@]}"

stage "4/6 report-generation fine-tuning from the pretraining checkpoint (configs/demo_report.yaml)"
timed finetune "$PY" main_report.py --config configs/demo_report.yaml \
  --set "${SETS[@]}" "train.pretrained=$OUT/demo/checkpoint-best.pth"

stage "5/6 evaluation on the held-out synthetic test split (reports, clinical efficacy, grounding, overlays)"
timed eval "$PY" main_report.py --config configs/demo_report.yaml --eval \
  --checkpoint "$OUT/demo_report/checkpoint-best.pth" --set "${SETS[@]}"

stage "6/6 summary: the model beside a trivial baseline, against the demo targets"
timed summary "$PY" scripts/demo_summary.py --config configs/demo_report.yaml --set "${SETS[@]}" \
  --eval-dir "$OUT/demo_report/eval_test"

TOTAL=$((SECONDS - T0))
{
  printf '{"total_s": %d, "threads": %d, "cpu": "%s"' "$TOTAL" "$OMP_NUM_THREADS" \
    "$(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2 | sed 's/^ *//;s/"//g')"
  for k in setup data pretrain finetune eval summary; do printf ', "%s_s": %d' "$k" "${TIMES[$k]:-0}"; done
  printf '}\n'
} > "$OUT/demo_timings.json"
echo
echo "[demo] done in $((TOTAL / 60)) min $((TOTAL % 60)) s: $(cat "$OUT/demo_timings.json")"
echo "[demo] reports: $OUT/demo_report/eval_test/generated.jsonl   heatmaps: $OUT/demo_report/eval_test/overlays/"
echo "[demo] TensorBoard: .venv/bin/tensorboard --logdir $OUT"
