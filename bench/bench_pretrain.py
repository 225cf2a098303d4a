"""Pre-training throughput: MAE against LocalMIM of the same size, and LocalMIM with 0/25/50/75% of the
encoder frozen; a full step (forward, backward, AdamW, AMP as set), on a synthetic in-memory batch (the
model alone) and on the real data loader (what data loading costs). Configurations alternate in one
process; median and range over --reps. On CPU, --clock cpu times by CPU time and --peak_rss adds the peak
resident memory of each configuration in a fresh process.

  python bench/bench_pretrain.py                                   # CPU: tiny models, 64 px
  python bench/bench_pretrain.py --device cuda --size base_patch16 --input_size 224 --batch_size 256 --amp bf16
  python bench/bench_pretrain.py --size base_patch16 --swin base_patch4_win7 --input_size 224 --batch_size 8 \
      --frozen_fractions '' --clock cpu      # CPU: LocalMIM on Swin-B against ViT-B, sparse against dense windows
  python bench/bench_pretrain.py --size base_patch16 --input_sizes 224 160 128 --batch_size 8 --clock cpu
                                         # low-resolution pre-training (FastMIM): both models at each size
On a GPU it also reports model FLOPs per image (torch.utils.flop_counter) and MFU against the measured
bf16 matmul peak.
"""
import argparse
import itertools
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import models_mim  # noqa: E402
import util.misc as misc  # noqa: E402
from bench.step_timer import StepRunner, alternate  # noqa: E402
from util.datasets import EpochSampler, image_folder  # noqa: E402
from util.distributed import add_compile_arg, compile_scope  # noqa: E402
from util.errors import UsageError  # noqa: E402
from util.pipeline import CropSamples, collate  # noqa: E402

def get_args_parser():
    p = argparse.ArgumentParser('pre-training throughput')
    p.add_argument('--size', default='tiny_patch8', help='model size suffix shared by mae_vit_* and MIM_vit_*')
    p.add_argument('--input_size', type=int, default=64)
    p.add_argument('--input_sizes', type=int, nargs='+', metavar='PX',
                   help='MAE and LocalMIM at each of these sizes side by side, each against itself at the first size '
                        '(low-resolution pre-training); replaces --input_size and the other configurations')
    p.add_argument('--batch_size', type=int, default=64)
    p.add_argument('--device', default='cpu')
    p.add_argument('--amp', default='none', choices=['none', 'fp16', 'bf16'])
    p.add_argument('--reps', type=int, default=5)
    p.add_argument('--steps', type=int, default=3, help='timed steps per repetition')
    p.add_argument('--num_workers', type=int, default=2, help='real-loader workers')
    p.add_argument('--data_path', default=None, help='real loader: ImageFolder root (default: embedded data)')
    add_compile_arg(p, 'every model (compile time not counted)')
    p.add_argument('--grad_ckpt', action='store_true', help='also LocalMIM with activation checkpointing (--grad_ckpt)')
    p.add_argument('--rope', action='store_true', help='also MAE and LocalMIM with rotary position embeddings '
                   '(--pos_embed rope)')
    p.add_argument('--swin', default=None, metavar='SIZE',
                   help='also LocalMIM on Swin, MIM_swin_SIZE (e.g. base_patch4_win7), and its encoder\'s forward and '
                        'backward alone, on the visible tokens against timm\'s dense windows over all tokens')
    p.add_argument('--masks_per_image', type=int, nargs='+', default=[1], metavar='K',
                   help='also MAE and LocalMIM with K masks of each crop (run_pretrain.py --masks_per_image): the '
                        'batch holds batch_size / K crops; figures per masked sample')
    p.add_argument('--frozen_fractions', default='0.25,0.5,0.75',
                   help='LocalMIM configurations with this fraction of the encoder frozen ("" for none)')
    p.add_argument('--clock', choices=['wall', 'cpu'], default='wall',
                   help='cpu: time steps by the CPU time of the process\'s threads (time.process_time) instead of '
                        'the wall clock, for a CPU machine shared with other work; no real-loader column')
    p.add_argument('--peak_rss', action='store_true',
                   help='CPU: also the peak resident memory of each configuration, each in a fresh process')
    p.add_argument('--rss_of', default=None, help=argparse.SUPPRESS)  # the child process of --peak_rss
    p.add_argument('--quick', action='store_true', help='smoke test: tiny patch4 at 32 px, one repetition')
    p.add_argument('--output_dir', default='results')
    p.add_argument('--tag', default='', help='suffix of the output file names')
    return p


def configurations(args):
    """{config name: function building its model}: MAE (norm-pix), LocalMIM, LocalMIM with part of the encoder
    frozen, and the options asked for; with --input_sizes, MAE and LocalMIM at each size."""
    mae, mim = f'mae_vit_{args.size}', f'MIM_vit_{args.size}'

    def build(name, frozen=0, size=None, **kw):
        def make():
            model = models_mim.all_models()[name](img_size=size or args.input_size, **kw)
            if frozen:
                model.set_frozen(range(frozen))
            return model
        return make
    if args.input_sizes:
        return {f'{name} at {px}px': build(name, size=px, **kw) for px in args.input_sizes
                for name, kw in ((mae, {'norm_pix_loss': True}), (mim, {}))}
    configs = {mae: build(mae, norm_pix_loss=True), mim: build(mim)}
    if args.grad_ckpt:
        configs[f'{mim}, --grad_ckpt'] = build(mim, grad_ckpt=True)
    if args.rope:
        for name in (mae, mim):
            configs[f'{name}, --pos_embed rope'] = build(name, pos_embed='rope')
    for k in [k for k in args.masks_per_image if k > 1]:
        for name, kw in ((mae, {'norm_pix_loss': True}), (mim, {})):
            configs[f'{name}, {k} masks per image'] = \
                lambda name=name, kw=kw, k=k: MasksPerImage(build(name, **kw)(), k)
    if args.swin:
        swin = f'MIM_swin_{args.swin}'
        configs[swin] = build(swin)
        for dense in (False, True):
            label = "timm's dense windows, all tokens" if dense else 'visible tokens'
            configs[f'{swin} encoder alone, {label}'] = lambda dense=dense: SwinEncoderStep(build(swin)(), dense)
    with torch.device('meta'):  # the unit count only
        num_units = models_mim.MODELS[mim](img_size=args.input_size).num_units
    for frac in [float(f) for f in args.frozen_fractions.split(',') if f]:
        units = round(frac * num_units)
        configs[f'{mim}, {frac:.0%} frozen ({units} units)'] = build(mim, frozen=units)
    return configs


class SwinEncoderStep(torch.nn.Module):
    """The encoder of a LocalMIM Swin model alone (a mean of its outputs as the loss): on the visible tokens, as
    pre-training runs it, or dense, timm's stages on every token, as an encoder that keeps the masked tokens
    would (the same weights)."""

    def __init__(self, model, dense):
        super().__init__()
        self.model, self.dense = model, dense

    def forward(self, imgs, mask_ratio, noise=None):
        if self.dense:
            feats = [self.model.layers(self.model.patch_embed(imgs))]
        else:
            feats = self.model.forward_encoder(imgs, mask_ratio, noise)[0]
        return sum(f.float().mean() for f in feats), {}

    @property
    def num_mask_units(self):
        return self.model.num_mask_units


class MasksPerImage(torch.nn.Module):
    """A pre-training model stepping on crops masked `masks` times each (--masks_per_image): the batch's first
    batch_size / masks crops, with independent mask noise (B, masks, L); one patch embedding and one target per
    crop."""

    def __init__(self, model, masks):
        super().__init__()
        self.model, self.masks = model, masks

    def forward(self, imgs, mask_ratio, noise=None):
        crops = imgs[:len(imgs) // self.masks]
        if noise is None:
            noise = torch.rand(len(crops), self.masks, self.model.num_mask_units, device=imgs.device)
        return self.model(crops, mask_ratio, noise)

    @property
    def num_mask_units(self):
        return self.model.num_mask_units


def peak_rss_mb(args, name):
    """Peak resident memory of a fresh process that builds configuration `name` and runs two training steps on CPU:
    everything a step holds (weights, optimizer state, activations), as the operating system counts it."""
    argv = [a for a in sys.argv[1:] if a != '--peak_rss']
    proc = subprocess.run([sys.executable, __file__, *argv, '--rss_of', name], capture_output=True, text=True,
                          check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])['peak_rss_mb']


def flops_per_image(model, batch):
    """Forward + backward FLOPs of one training step, per image (matmuls, convolutions and attention). Attention
    runs as plain matmuls here: the counter has no formula for the CPU's fused attention kernel."""
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH):
        loss, _ = model(batch, 0.75)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / len(batch)


def seconds_per_call(fn, reps, warmup=3):
    """Seconds per call of `fn` on the GPU, synchronised, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps


def matmul_peak(device, dtype=torch.bfloat16, n=8192, reps=20):
    """Measured FLOP/s of a large bf16 matmul: the MFU denominator."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n ** 3 / seconds_per_call(lambda: a @ b, reps)


def copy_bandwidth(device, mb=1024, reps=10):
    """Measured bytes/s of a large device-to-device copy (read and write counted): a memory floor's denominator."""
    a = torch.empty(mb * 2 ** 18, device=device)
    b = torch.empty_like(a)
    return 2 * a.nbytes / seconds_per_call(lambda: b.copy_(a), reps)


def real_loader_batches(args, noise_len):
    images = image_folder(args.data_path, 'train', None)
    loader = DataLoader(CropSamples(images, 0, args.input_size, noise_len=noise_len), sampler=EpochSampler(len(images)),
                        batch_size=args.batch_size, drop_last=True, num_workers=args.num_workers,
                        collate_fn=collate, persistent_workers=args.num_workers > 0,
                        pin_memory=args.device.startswith('cuda'))
    return itertools.chain.from_iterable(itertools.repeat(loader))  # endless, epoch after epoch


def main(args):
    if args.quick:
        args.size, args.input_size, args.batch_size, args.reps, args.steps = 'tiny_patch4', 32, 8, 1, 1
    device = torch.device(args.device)
    torch.manual_seed(0)
    sizes = args.input_sizes or [args.input_size]
    batches = {px: torch.randn(args.batch_size, 3, px, px, device=device) for px in sizes}
    batch = batches[sizes[0]]

    def input_of(model):  # its own size's batch with --input_sizes
        return batches[model.patch_embed.img_size[0]] if args.input_sizes else batch
    if args.peak_rss and device.type != 'cpu':
        raise UsageError('--peak_rss measures CPU runs; on a GPU the table has the peak GPU memory')
    if args.clock == 'cpu' and device.type != 'cpu':
        raise UsageError('--clock cpu times CPU steps; use the wall clock with --device cuda')
    if args.rss_of:
        model = configurations(args)[args.rss_of]()
        runner = StepRunner(model, input_of(model), args.amp)
        runner.step()
        runner.step()
        # VmHWM, the high-water mark of this process's own memory: getrusage's maxrss would include the parent's,
        # which a child inherits through fork
        hwm_kb = next(int(line.split()[1]) for line in Path('/proc/self/status').read_text().splitlines()
                      if line.startswith('VmHWM:'))
        print(json.dumps({'peak_rss_mb': hwm_kb / 1024}))
        return
    models = {name: make() for name, make in configurations(args).items()}
    inputs = {name: input_of(m) for name, m in models.items()}
    # two samples per configuration (with K masks per image: two crops, 2K masked samples)
    flops = {name: flops_per_image(m, inputs[name][:2 * getattr(m, 'masks', 1)].cpu()) for name, m in models.items()}
    runners = {name: StepRunner(m.to(device), inputs[name], args.amp, compile=args.compile,
                                compile_scope=compile_scope(args))
               for name, m in models.items()}
    clock = time.process_time if args.clock == 'cpu' else time.perf_counter
    synthetic = alternate(runners, args.reps, args.steps, clock=clock)
    memory = {name: r.peak_memory_mb() for name, r in runners.items()}
    real = None
    if args.clock == 'wall' and not args.input_sizes:  # loader workers' time is not the process's CPU time
        # one stream of batches with one mask-noise length: the configurations with MAE's mask units
        units = models[f'mae_vit_{args.size}'].num_mask_units
        batches = real_loader_batches(args, units)
        real = alternate({name: r for name, r in runners.items() if models[name].num_mask_units == units
                          and not isinstance(models[name], MasksPerImage)},
                         args.reps, args.steps, warmup=0, batches=batches)  # warmed up above
    peak = matmul_peak(device) if device.type == 'cuda' else None
    machine = torch.cuda.get_device_name() if device.type == 'cuda' else f'CPU, {torch.get_num_threads()} threads'

    mae = f'mae_vit_{args.size}' + (f' at {sizes[0]}px' if args.input_sizes else '')
    rss = {name: peak_rss_mb(args, name) for name in runners} if args.peak_rss else None
    mem_label = 'peak GPU memory' if device.type == 'cuda' else 'activations saved for backward'
    per = 'images per CPU-second' if args.clock == 'cpu' else 'images/s'
    rows, lines = [], [
        f'| configuration | {per}, synthetic batch: median [min-max] | '
        f'{f"vs. itself at {sizes[0]}px" if args.input_sizes else "vs. MAE"} | images/s, real loader | '
        f'GFLOPs / image (fwd+bwd) | {mem_label} (MB) |' + (' MFU |' if peak else '')
        + (' peak RSS (MB) |' if rss else ''),
        '|---|---|---|---|---|---|' + ('---|' if peak else '') + ('---|' if rss else '')]
    digits = 1 if args.batch_size / synthetic[mae]['median'] >= 10 else 2  # ViT-B on CPU: about 1 image/s
    for name in runners:
        rate, slowest, fastest = (args.batch_size / synthetic[name][k] for k in ('median', 'max', 'min'))
        real_rate = args.batch_size / real[name]['median'] if real and name in real else None
        row = {'config': name, 'images_per_s': rate, 'images_per_s_range': [slowest, fastest],
               'images_per_s_real_loader': real_rate, 'gflops_per_image': flops[name] / 1e9,
               'memory_mb': memory[name]}
        if peak:
            row['mfu'] = rate * flops[name] / peak
        if rss:
            row['peak_rss_mb'] = rss[name]
        rows.append(row)
        # against MAE, or with --input_sizes against the same model at the first size
        base = name.replace(f' at {inputs[name].shape[-1]}px', f' at {sizes[0]}px') if args.input_sizes else mae
        ratio = synthetic[base]['median'] / synthetic[name]['median']
        row['vs'] = ratio
        lines.append(f"| {name} | {rate:.{digits}f} [{slowest:.{digits}f}-{fastest:.{digits}f}] | {ratio:.2f}x | "
                     f"{f'{real_rate:.1f}' if real_rate else '-'} | {flops[name] / 1e9:.3f} | {memory[name]:.0f} |"
                     + (f" {row['mfu']:.1%} |" if peak else '') + (f" {rss[name]:.0f} |" if rss else ''))
    table = '\n'.join(lines)
    header = (f"{args.size}, {'/'.join(map(str, sizes))}px, batch {args.batch_size}, amp {args.amp}"
              f"{f', compiled ({args.compile})' if args.compile else ''}, {machine}, "
              f"{time.strftime('%Y-%m-%d')}" + (f", MFU against the measured bf16 matmul peak "
                                                f"(8192^3) of {peak / 1e12:.0f} TFLOP/s" if peak else ''))
    print(header + '\n\n' + table)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = f'bench_pretrain{args.tag}'
    (out / f'{name}.json').write_text(json.dumps({'setup': header, 'rows': rows, 'amp': args.amp, 'compile': args.compile,
                                                  'matmul_peak_flops': peak}, indent=1))
    (out / f'{name}.md').write_text(header + '\n\n' + table + '\n')
    print(f'wrote {out}/{name}.json and .md')


if __name__ == '__main__':
    misc.run_main(main, get_args_parser())
