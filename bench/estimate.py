"""Estimates to plan a run with, computed from measured figures in results/ (each one says what it rests on):
the hours of LocalMIM ViT-B pre-training on 8 GPUs, the GPU memory at a recipe's batch, and the checkpoints' disk.

  python bench/estimate.py                    # prints the table; --output results/estimates.md writes it

- Hours: the images of the run over 8 x the GPU's measured images/s (bench_pretrain.py's synthetic batches: the
  GPU bound, every H200 run in results/ for the spread), and over 8 x the loader's measured images/s per core x the
  cores per GPU (the input bound). A run takes at least the larger of the two.
- Memory: from the measured peak at batch 128, two ways that bound it: (a) plus the growth of the peak counted
  under fake tensors (every tensor's bytes while it lives, two eager bf16 steps with AdamW, the CPU's kernels, no
  allocator or library workspaces), (b) a fixed part (weights, gradients, AdamW's two moments: 16 bytes per fp32
  parameter, counted) + the rest scaled with the batch.
- Disk: a checkpoint holds the weights and AdamW's two moments (12 bytes per parameter, counted) and is kept
  per --save_freq epochs, unless --keep_last bounds them.
"""
import argparse
import json
import statistics
import sys
import weakref
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

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


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of every tensor storage from its creation until it is freed, and their peak."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.seen = WeakIdKeyDictionary()

    def _freed(self, nbytes):
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage() not in self.seen:
                storage, nbytes = t.untyped_storage(), t.untyped_storage().nbytes()
                self.seen[storage] = nbytes
                self.live += nbytes
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._freed, nbytes)
        return out


def counted_peak_mb(model_name, batch, input_size=224, mask_ratio=0.75):
    """The peak of building `model_name` with AdamW and taking two training steps (the second holds the moments),
    counted under fake tensors: no memory is used and no arithmetic done."""
    with FakeTensorMode(), LiveBytes() as counter:
        model = models_mim.build(argparse.Namespace(**{**models_mim.BUILD_DEFAULTS, 'model': model_name,
                                                       'input_size': input_size}))
        optimizer = torch.optim.AdamW(model.parameters())
        imgs = torch.randn(batch, 3, input_size, input_size)
        noise = torch.rand(batch, model.num_mask_units)
        for _ in range(2):
            with torch.autocast('cpu', dtype=torch.bfloat16):
                loss = model(imgs, mask_ratio, noise)[0]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return counter.peak / 2 ** 20


def main(args):
    with torch.device('meta'):
        model = models_mim.build(argparse.Namespace(**{**models_mim.BUILD_DEFAULTS, 'model': args.model}))
    params = sum(p.numel() for p in model.parameters())
    rows = []
    counted = {batch: counted_peak_mb(args.model, batch) for batch in {128, *args.batch_sizes}}
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
        measured, fixed = statistics.median(m for _, m, _ in runs), params * 16 / 2 ** 20
        per_image = (measured - fixed) / 128
        for batch in args.batch_sizes:
            # the part of the measured peak that the count misses (allocator, workspaces, kernels) either stays
            # fixed or grows with the batch: the two bound the estimate
            bounds = (measured + counted[batch] - counted[128], fixed + per_image * batch)
            rows.append((f'GPU memory at batch {batch} per GPU ({amp})',
                         '-'.join(f'{b / 1024:.1f}' for b in sorted(set(round(b / 1024, 1) * 1024 for b in bounds)))
                         + ' GB', f'measured {measured / 1024:.1f} GB at batch 128; counted under fake tensors '
                                  f'{counted[128] / 1024:.1f} GB at 128'
                                  + (f', {counted[batch] / 1024:.1f} GB at {batch}' if batch != 128 else '')))
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
