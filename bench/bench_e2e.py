"""End to end: run_pretrain.py's training loop (engine_pretrain.train_one_epoch) fed by its real loaders from JPEG
files, against the same model fed a batch already on the device, alternating in one process.

  python bench/bench_data.py --make_jpegs data/jpegs                       # ImageNet-like JPEGs, offline
  python bench/bench_e2e.py --data_path data/jpegs --device cuda --model MIM_vit_base_patch16 --input_size 224 \\
      --batch_size 256 --amp bf16 --compile --loaders fast hw --num_workers 8 14

Each arm (the synthetic batch, then every loader x worker count) runs one epoch per round of `--warmup` untimed
steps, `--steps` timed ones (synchronised at both ends) and, on CUDA, `--profile_steps` under torch.profiler for
the device's idle share. Reported per arm: images/s (median over rounds) and its share of the synthetic rate,
the CPU cores its loader workers and the main process used in the timed steps (CPU seconds / wall seconds), and
for --loader hw what the hardware decoder did not decode. A folder with fewer images than an epoch needs is
repeated through symbolic links in --output_dir (the same files, new crops). Writes bench_e2e{tag}.json and .md.
"""
import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import models_mim  # noqa: E402
import run_pretrain  # noqa: E402
import util.misc as misc  # noqa: E402
from bench.bench_data import repeat_folder  # noqa: E402
from bench.profile_step import busy_us, device_work  # noqa: E402
from engine_pretrain import train_one_epoch  # noqa: E402
from util import distributed, pipeline  # noqa: E402
from util.datasets import image_folder, resolve_split  # noqa: E402
from util.freezeout import param_groups  # noqa: E402


def get_args_parser():
    p = argparse.ArgumentParser('end-to-end pre-training throughput')
    p.add_argument('--data_path', default=None, help='ImageFolder root of the JPEGs (default: the embedded dataset)')
    p.add_argument('--model', default='MIM_vit_tiny_patch8')
    p.add_argument('--input_size', type=int, default=64)
    p.add_argument('--batch_size', type=int, default=16)
    p.add_argument('--amp', default='none', choices=list(misc.AMP_DTYPES))
    distributed.add_compile_arg(p)
    p.add_argument('--device', default='cpu')
    p.add_argument('--loaders', nargs='+', choices=pipeline.LOADERS, default=['fast'])
    p.add_argument('--num_workers', type=int, nargs='+', default=[2])
    p.add_argument('--masks_per_image', type=int, nargs='+', default=[1], metavar='K',
                   help='each loader arm with K masks of each crop (run_pretrain.py --masks_per_image): images/s then '
                        'counts masked samples, and a row says the images decoded per masked sample')
    p.add_argument('--warmup', type=int, default=5, help='untimed steps per arm and round (worker start-up inside)')
    p.add_argument('--steps', type=int, default=10, help='timed steps per arm and round')
    p.add_argument('--profile_steps', type=int, default=5, help='CUDA: steps under torch.profiler per arm and round')
    p.add_argument('--rounds', type=int, default=2, help='rounds, alternating the arms')
    p.add_argument('--output_dir', default='results')
    p.add_argument('--tag', default='')
    return p


def children_cpu_seconds():
    """User + system CPU seconds of this process's live children (the loader workers), from /proc."""
    tick, total = os.sysconf('SC_CLK_TCK'), 0
    for pid in filter(str.isdigit, os.listdir('/proc')):
        try:
            fields = Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[1]) == os.getpid():  # ppid
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


class Phases:
    """The batches of one arm's epoch, clocked: `warmup` untimed, `steps` timed, then (CUDA) profiled ones."""

    def __init__(self, batches, warmup, steps, device):
        self.batches, self.warmup, self.steps, self.device = batches, warmup, steps, device
        self.profiler = None

    def sync(self):
        if self.device.type == 'cuda':
            torch.cuda.synchronize()

    def clock(self):
        self.sync()
        return time.perf_counter(), time.process_time(), children_cpu_seconds()

    def __iter__(self):
        self.end = None
        try:
            for i, batch in enumerate(self.batches):
                if i == self.warmup:
                    self.start = self.clock()
                if i == self.warmup + self.steps:
                    self.end = self.clock()
                    if self.device.type == 'cuda':
                        self.profiler = profile(activities=[ProfilerActivity.CUDA])
                        self.profiler.__enter__()
                        self.profile_start = time.perf_counter()
                yield batch
        finally:  # the epoch's loop is done with its batches (the timed steps end the epoch when none are profiled)
            self.end = self.end or self.clock()

    def idle_share(self):
        """The device's idle share over the profiled steps (None on CPU)."""
        if self.profiler is None:
            return None
        self.sync()
        wall_us = (time.perf_counter() - self.profile_start) * 1e6
        self.profiler.__exit__(None, None, None)
        return 1 - busy_us(device_work(self.profiler.events())) / wall_us

    def rates(self, batch_size):
        """Images/s and cores over the timed steps."""
        wall = self.end[0] - self.start[0]
        return {'images_per_s': self.steps * batch_size / wall, 'main_cores': (self.end[1] - self.start[1]) / wall,
                'worker_cores': (self.end[2] - self.start[2]) / wall}


def stop_workers(loader):
    """End a loader's (persistent) workers, so that they neither work nor count in the next arm's timing: they
    finish the batches already asked of them otherwise. The next epoch starts new ones, inside its warm-up."""
    iterator = getattr(loader, '_iterator', None)  # DataLoader keeps its persistent workers' iterator here
    if iterator is not None:
        iterator._shutdown_workers()
        loader._iterator = None


def run_args(args, loader, workers, epoch_steps, masks=1):
    """run_pretrain.py's arguments for this bench (its defaults, a schedule far from its ends)."""
    argv = ['--model', args.model, '--input_size', str(args.input_size), '--batch_size', str(args.batch_size),
            '--amp', args.amp, '--device', args.device, '--loader', loader, '--num_workers', str(workers),
            '--warmup_epochs', '0', '--epochs', '100', '--print_freq', str(10 ** 6), '--masks_per_image', str(masks)]
    if args.compile:
        argv += ['--compile', args.compile] + (['--compile_scope', args.compile_scope] if args.compile_scope else [])
    a = run_pretrain.get_args_parser().parse_args(argv)
    a.rank, a.world_size, a.distributed, a.output_dir, a.log_every_step = 0, 1, False, '', False
    a.stop_signals = 'none'
    misc.set_schedule_steps(a, epoch_steps)
    misc.scale_lr(a)
    return a


def main(args):
    device = torch.device(args.device)
    misc.time_conv_algorithms()  # as run_pretrain.py
    epoch_steps = args.warmup + args.steps + (args.profile_steps if device.type == 'cuda' else 0)
    train = resolve_split(args.data_path, 'train')
    n_images = len(image_folder(train, 'train', None))
    data_path = repeat_folder(train, -(-epoch_steps * args.batch_size // n_images), args.output_dir)

    base = run_args(args, 'fast', 0, epoch_steps)
    torch.manual_seed(0)
    model = models_mim.build(base).to(device)
    optimizer = torch.optim.AdamW(param_groups(model, base.weight_decay, per_unit=False), lr=base.lr, betas=(0.9, 0.95),
                                  fused=device.type == 'cuda')
    scaler = misc.LossScaler(device.type, enabled=args.amp == 'fp16')
    model_run = distributed.wrap_for_training(model, base)

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.batch_size, 3, args.input_size, args.input_size), dtype=torch.uint8,
                           generator=g).to(device)
    noise = torch.rand(args.batch_size, model.num_mask_units, generator=g).to(device)
    arms = {'synthetic batch on the device': (base, [(images, noise, 0)] * epoch_steps, None)}
    decodes = {}  # images decoded per masked sample of each arm
    for loader in args.loaders:
        for workers in args.num_workers:
            for k in args.masks_per_image:
                a = run_args(args, loader, workers, epoch_steps, k)
                a.data_path = str(data_path)
                name = f'--loader {loader}, {workers} workers' + (f', {k} masks per image' if k > 1 else '')
                arms[name], decodes[name] = (a, *run_pretrain.pretrain_loader(a, model)[1:]), 1 / k

    measured = {name: [] for name in arms}
    for r in range(args.rounds):
        for i, (name, (a, batches, sampler)) in enumerate(arms.items()):
            epoch = r * len(arms) + i
            if sampler is not None:
                sampler.set_epoch(epoch)
            phases = Phases(batches, args.warmup, args.steps, device)
            stats, _ = train_one_epoch(model_run, model, phases, optimizer, scaler, device, epoch, a)
            if sampler is not None:
                stop_workers(batches)
            row = {**phases.rates(args.batch_size), 'device_idle': phases.idle_share()}
            row.update({k: v for k, v in stats.items() if k.startswith('decoded_')})
            measured[name].append(row)
            print(f"round {r} {name}: {row['images_per_s']:.1f} images/s", flush=True)

    rows = {}
    for name, reps in measured.items():
        rate = [m['images_per_s'] for m in reps]
        idle = [m['device_idle'] for m in reps if m['device_idle'] is not None]
        rows[name] = {'images_per_s': statistics.median(rate), 'range': [min(rate), max(rate)],
                      'main_cores': statistics.median(m['main_cores'] for m in reps),
                      'worker_cores': statistics.median(m['worker_cores'] for m in reps),
                      'device_idle': statistics.median(idle) if idle else None,
                      'decodes_per_sample': decodes.get(name, 1.),
                      **{k: sum(m[k] for m in reps) for k in reps[0] if k.startswith('decoded_')}}
    synthetic = rows['synthetic batch on the device']['images_per_s']
    for row in rows.values():
        row['of_synthetic'] = row['images_per_s'] / synthetic
    machine = torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'
    header = (f"{args.model}, {args.input_size}px, batch {args.batch_size}, amp {args.amp}"
              f"{f', compiled ({args.compile})' if args.compile else ''}, {machine}, {os.cpu_count()} CPUs, "
              f"{n_images} images in {train}, {args.rounds} rounds of {args.steps} timed steps, {time.strftime('%Y-%m-%d')}")
    fmt = lambda v, spec: '-' if v is None else format(v, spec)  # noqa: E731
    table = ['| input | images/s [range] | of synthetic | device idle | loader worker cores | main process cores | '
             'not on the hardware decoder |', '|---|---|---|---|---|---|---|']
    for name, row in rows.items():
        hw = (f"{row['decoded_refused']} refused, {row['decoded_in_workers']} in workers of "
              f"{sum(v for k, v in row.items() if k.startswith('decoded_'))}" if 'decoded_refused' in row else '-')
        table.append(f"| {name} | {row['images_per_s']:.1f} [{row['range'][0]:.1f}-{row['range'][1]:.1f}] | "
                     f"{row['of_synthetic']:.0%} | {fmt(row['device_idle'], '.0%')} | {row['worker_cores']:.1f} | "
                     f"{row['main_cores']:.1f} | {hw} |")
    text = header + '\n\n' + '\n'.join(table)
    print(text)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f'bench_e2e{args.tag}.json').write_text(json.dumps({'setup': header, 'rows': rows}, indent=1))
    (out / f'bench_e2e{args.tag}.md').write_text(text + '\n')
    print(json.dumps({'setup': header, 'rows': rows}))


if __name__ == '__main__':
    misc.run_main(main, get_args_parser())
