"""Estimates to plan a run with, computed from measured figures in results/ (each one says what it rests on):
the hours of LocalMIM ViT-B pre-training on 8 GPUs, the GPU memory at a recipe's batch, and the checkpoints' disk.

  python bench/estimate.py                    # prints the table; --output results/estimates.md writes it

- Hours: the images of the run over 8 x the GPU's measured images/s (bench_pretrain.py's synthetic batches: the
  GPU bound, every H200 run in results/ for the spread), and over 8 x the loader's measured images/s per core x the
  cores per GPU (the input bound). A run takes at least the larger of the two.
- Memory: the measured peak at batch 128 = a fixed part (weights, gradients, AdamW's two moments: 16 bytes per
  fp32 parameter, counted here) + activations per image; the activations scale with the batch.
- Disk: a checkpoint holds the weights and AdamW's two moments (12 bytes per parameter, counted) and is kept
  per --save_freq epochs, unless --keep_last bounds them.
"""
import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import models_mim  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
IMAGENET_TRAIN = 1_281_167


def get_args_parser():
    p = argparse.ArgumentParser('planning estimates from measured figures')
    p.add_argument('--model', default='MIM_vit_base_patch16')
    p.add_argument('--gpus', type=int, default=8)
    p.add_argument('--cores_per_gpu', type=int, default=8)
    p.add_argument('--batch_sizes', type=int, nargs='+', default=[128, 256], help='per-GPU batches for memory')
    p.add_argument('--output', help='write the markdown table here')
    return p


def measured_runs(model, pattern):
    """(images/s, peak MB at its batch, the file) of `model` in every results/<GPU run>/<pattern>."""
    found = []
    for path in sorted(REPO.glob(f'results/gpu_*/{pattern}')):
        for row in json.loads(path.read_text())['rows']:
            if row['config'] == model:
                found.append((row['images_per_s'], row['memory_mb'], path.relative_to(REPO)))
    return found


def loader_rates():
    """The loader's measured images/s per core (--loader fast, one process) of every GPU check in results/."""
    rates = []
    for path in sorted(REPO.glob('results/gpu_*/gpu_check.json')):
        part = json.loads(path.read_text())['parts'].get('loader_per_core') or {}
        if part.get('json'):
            rates.append((part['json']['img_per_s_per_core'], path.relative_to(REPO)))
    return rates


def main(args):
    with torch.device('meta'):
        model = models_mim.build(argparse.Namespace(**{**models_mim.BUILD_DEFAULTS, 'model': args.model}))
    params = sum(p.numel() for p in model.parameters())
    rows = []
    for amp, pattern in (('bf16, compiled', 'bench_pretrain_bf16_compiled.json'), ('fp16', 'bench_pretrain_fp16.json')):
        runs = measured_runs(args.model, pattern)
        if not runs:
            continue
        rates = [r for r, _, _ in runs]
        for epochs in (800, 1600):
            hours = [IMAGENET_TRAIN * epochs / (args.gpus * r) / 3600 for r in rates]
            rows.append((f'{epochs} epochs on {args.gpus} GPUs, GPU bound ({amp}, H200)',
                         f'{min(hours):.1f}-{max(hours):.1f} h' if len(hours) > 1 else f'{hours[0]:.1f} h',
                         f'{len(runs)} run(s): ' + ', '.join(str(p) for *_, p in runs)))
        fixed = params * 16 / 2 ** 20
        per_image = (statistics.median(m for _, m, _ in runs) - fixed) / 128
        for batch in args.batch_sizes:
            rows.append((f'GPU memory at batch {batch} per GPU ({amp})', f'{(fixed + per_image * batch) / 1024:.1f} GB',
                         f'measured {statistics.median(m for _, m, _ in runs) / 1024:.1f} GB at batch 128'))
    loader = loader_rates()
    if loader:
        per_core = [r for r, _ in loader]
        for epochs in (800, 1600):
            hours = [IMAGENET_TRAIN * epochs / (args.gpus * args.cores_per_gpu * r) / 3600 for r in per_core]
            rows.append((f'{epochs} epochs on {args.gpus} GPUs, loader bound ({args.cores_per_gpu} cores per GPU)',
                         f'{min(hours):.1f}-{max(hours):.1f} h' if len(hours) > 1 else f'{hours[0]:.1f} h',
                         f'{len(loader)} run(s) of the loader per core: ' + ', '.join(str(p) for _, p in loader)))
    ckpt_gb = params * 12 / 2 ** 30
    for epochs, keep in ((1600, 0), (1600, 2)):
        kept = epochs // 20 if not keep else keep
        rows.append((f'disk, {epochs} epochs at --save_freq 20' + (f' --keep_last {keep}' if keep else ''),
                     f'{(kept + 1) * ckpt_gb:.0f} GB', f'{kept + 1} checkpoints of {ckpt_gb:.2f} GB '
                                                       f'({params / 1e6:.1f}M parameters, counted)'))
    command = ' '.join(['python bench/estimate.py', *sys.argv[1:]])
    table = [f'Estimates for {args.model} (ImageNet-1k train, {IMAGENET_TRAIN} images), from `{command}`.', '',
             '| estimate | value | rests on |', '|---|---|---|'] + [f'| {a} | {b} | {c} |' for a, b, c in rows]
    text = '\n'.join(table) + '\n'
    print(text)
    if args.output:
        Path(args.output).write_text(text)


if __name__ == '__main__':
    main(get_args_parser().parse_args())
