#!/usr/bin/env bash
# Fresh machine -> .venv -> on the embedded real images, on CPU in a few minutes:
# LocalMIM pre-training of a tiny ViT, then fine-tuning and linear probing of its encoder.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh
PY=.venv/bin/python
OUT=${OUT:-output/demo}
EPOCHS=${EPOCHS:-10}
COMMON=(--input_size 64 --num_workers 2 --print_freq 100)

$PY run_pretrain.py --model MIM_vit_tiny_patch8 "${COMMON[@]}" --batch_size 64 --epochs "$EPOCHS" \
  --warmup_epochs 2 --blr 1.5e-3 --save_freq 5 --output_dir "$OUT/pretrain"
CKPT=$OUT/pretrain/checkpoint-last.pth
# 1000 images: RandAugment only (no random erasing / mixup, which need ImageNet-length schedules)
$PY run_finetune.py --model vit_tiny_patch8 "${COMMON[@]}" --finetune "$CKPT" --batch_size 64 --epochs 8 \
  --warmup_epochs 1 --blr 2e-3 --layer_decay 0.75 --reprob 0 --output_dir "$OUT/finetune"
# LARS moves weights by about lr * 0.001 per step: a short probe needs a large lr (ImageNet's is 6.4)
$PY run_linprobe.py --model vit_tiny_patch8 "${COMMON[@]}" --finetune "$CKPT" --batch_size 128 --epochs 10 \
  --warmup_epochs 1 --blr 20 --output_dir "$OUT/linprobe"

best() { $PY -c "import sys; from util.metrics import read_json_lines; print(f\"{max(r['test_acc1'] for r in read_json_lines(sys.argv[1])):.1f}%\")" "$1"; }
echo
echo "Embedded data (10 classes, 300 val images): fine-tuned top-1 $(best "$OUT/finetune/log.txt"), linear probe top-1 $(best "$OUT/linprobe/log.txt")"
echo "Logs: $OUT/{pretrain,finetune,linprobe}/log.txt   TensorBoard: .venv/bin/tensorboard --logdir $OUT"
echo "Pre-trained encoder: $CKPT   (export for timm: $PY -m tools.export_timm $CKPT $OUT/export)"
