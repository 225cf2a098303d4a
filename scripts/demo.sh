#!/usr/bin/env bash
# Fresh machine -> .venv -> LocalMIM pre-training of a tiny ViT on the embedded real images (CPU, minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh
PY=.venv/bin/python
OUT=${OUT:-output/demo}
EPOCHS=${EPOCHS:-10}

$PY run_pretrain.py --model MIM_vit_tiny_patch8 --input_size 64 --batch_size 64 --epochs "$EPOCHS" \
  --warmup_epochs 2 --blr 1.5e-3 --num_workers 2 --save_freq 5 --output_dir "$OUT/pretrain"

echo
echo "Pre-training log:   $OUT/pretrain/log.txt   (TensorBoard: .venv/bin/tensorboard --logdir $OUT)"
echo "Checkpoint:         $OUT/pretrain/checkpoint-last.pth"
