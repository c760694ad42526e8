#!/usr/bin/env bash
# The downstream suite on the synthetic counterparts of NIH, RSNA, SIIM, CheXpert 5x200 and MS-CXR:
# the demo's pretraining checkpoint against the same architecture at random init, same budget.
#   bash scripts/downstream.sh              # about 20 minutes on 2 CPU cores when output/demo exists
# Fine-tuning (seeds $SEEDS): NIH-like at 1% of the labels, a linear probe on all of them, SIIM-like
# segmentation at 10%; model selection on val, test scored once. Zero-shot: classification (NIH-,
# RSNA-, 5x200-like), 5x200-like retrieval, MS-CXR-like phrase grounding. Prints the table and writes
# $OUT/summary.json (scripts/downstream_summary.py). Finished runs are skipped on a re-run.
# Environment overrides: CKPT (pretraining checkpoint), DATA, OUT, SEEDS.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=.venv/bin/python
CKPT=${CKPT:-output/demo/checkpoint-best.pth}
DATA=${DATA:-data/synthetic_downstream}
OUT=${OUT:-output/downstream}
SEEDS=${SEEDS:-"0 1 2"}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}
T0=$SECONDS
stage() { echo; echo "[downstream] $(date +%T) (+$((SECONDS - T0)) s) $*"; }
logged() {  # logged LOG command...: appends the command's output to LOG; on failure shows its tail
  local log=$1
  shift
  "$@" >> "$log" 2>&1 || { echo "[downstream] FAILED: $* (last lines of $log:)" >&2; tail -n 5 "$log" >&2; exit 1; }
}

[ -x "$PY" ] || bash scripts/setup_env.sh
if [ ! -f "$DATA/mscxr/MS_CXR_Local_Alignment_v1.0.0.json" ]; then
  stage "synthetic downstream data sets in $DATA"
  "$PY" -m datasets.synthetic_downstream --out "$DATA" --size 64
fi
if [ ! -f "$CKPT" ]; then
  stage "no $CKPT: the demo's pretraining (scripts/demo.sh steps 2-3)"
  [ -f data/synthetic/annotation.json ] || "$PY" -m datasets.synthetic --out data/synthetic --n 12000 \
    --size 64 --val-frac 0.025 --test-frac 0.025
  run_dir=$(dirname "$CKPT")
  "$PY" main_pretrain.py --config configs/demo.yaml \
    --set "output_dir=$(dirname "$run_dir")" "run_name=$(basename "$run_dir")"
fi

finetune() {  # finetune NAME CONFIG INIT SEED [key=value ...]: train, then score test once
  local name=$1 config=$2 init=$3 seed=$4
  shift 4
  local sets=("output_dir=$OUT" "run_name=$name" "seed=$seed" "train.pretrained=$init" "$@")
  [ -f "$OUT/$name/eval_test/metrics.json" ] && return 0
  : > "$OUT/$name.log"
  logged "$OUT/$name.log" "$PY" main_finetune.py --config "$config" --set "${sets[@]}"
  logged "$OUT/$name.log" "$PY" main_finetune.py --config "$config" --eval \
    --checkpoint "$OUT/$name/checkpoint-best.pth" --set "${sets[@]}"
  echo "  $name: $(grep -m1 '^\[test\]' "$OUT/$name.log")"
}

mkdir -p "$OUT"
NIH="finetune.root=$DATA/nih"
for seed in $SEEDS; do
  stage "fine-tuning, seed $seed (SS-ACL init, then random init)"
  for init in ssacl random; do
    path=$([ "$init" = ssacl ] && echo "$CKPT" || echo "")
    finetune "cls1_${init}_s$seed" configs/finetune_demo_cls.yaml "$path" "$seed" "$NIH"
    finetune "probe_${init}_s$seed" configs/finetune_demo_probe.yaml "$path" "$seed" "$NIH"
    finetune "seg10_${init}_s$seed" configs/finetune_demo_seg.yaml "$path" "$seed" "finetune.root=$DATA/siim"
  done
done

stage "zero-shot classification, retrieval and phrase grounding (SS-ACL, then random init)"
ZS=("output_dir=$OUT" "run_name=zeroshot" "zeroshot.data_root=$DATA")
for flag in "" --random-init; do
  metrics="$OUT/zeroshot/zeroshot_test${flag:+_random_init}/metrics.json"
  [ -f "$metrics" ] || logged "$OUT/zeroshot${flag:+_random_init}.log" "$PY" main_zeroshot.py \
    --config configs/zeroshot_demo.yaml --checkpoint "$CKPT" $flag --set "${ZS[@]}"
done

stage "summary"
"$PY" scripts/downstream_summary.py --out "$OUT" --seeds "$SEEDS"
echo "[downstream] done in $(((SECONDS - T0) / 60)) min $(((SECONDS - T0) % 60)) s"
