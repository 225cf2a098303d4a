"""Fault drill: SIGKILL a tiny pre-training run at random moments, resume it each time, and compare the
per-iteration losses and final weights with an uninterrupted run.

  python bench/fault_drill.py              # 10 kills, with and without FreezeOut, embedded data
  python bench/fault_drill.py --quick      # 2 kills on a short run (the test suite)
"""
import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
# both FreezeOut rule sets: the original's (the default: taps dropped as their units freeze) and this
# project's (a no-grad frozen prefix), the latter under bf16 autocast (fp16 matmuls are about 90x slower than
# bf16 on CPUs without fp16 units)
CONFIGS = {'LocalMIM': [],
           'LocalMIM + FreezeOut, original rules': ['--freezeout', '--freezeout_rules', 'original',
                                                    '--how_scale', 'linear', '--t_0', '0.5'],
           'LocalMIM + FreezeOut, project rules, bf16': ['--freezeout', '--freezeout_rules', 'project',
                                                         '--how_scale', 'linear', '--t_0', '0.5', '--amp', 'bf16']}


def get_args_parser():
    p = argparse.ArgumentParser('fault drill')
    p.add_argument('--kills', type=int, default=10)
    p.add_argument('--epochs', type=int, default=3)
    p.add_argument('--batch_size', type=int, default=32)
    p.add_argument('--data_path', default=None, help='default: the embedded dataset')
    p.add_argument('--seed', type=int, default=0, help='of the kill times')
    p.add_argument('--quick', action='store_true', help='2 kills, 2 epochs')
    p.add_argument('--output_dir', default='results/fault_drill')
    return p


def command(args, out, extra):
    cmd = [sys.executable, 'run_pretrain.py', '--model', 'MIM_vit_tiny_patch4', '--input_size', '32',
           '--batch_size', str(args.batch_size), '--epochs', str(args.epochs), '--warmup_epochs', '0.5',
           '--num_workers', '2', '--save_every_iters', '1', '--save_freq', '1', '--keep_last', '2',
           '--log_every_step', '--print_freq', '1000', '--output_dir', str(out), *extra]
    return cmd + (['--data_path', args.data_path] if args.data_path else [])


def step_losses(out):
    """{iteration: loss}; a resumed run logs the replayed iterations again, and the last value counts."""
    path = Path(out) / 'steps.txt'
    losses = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut by the kill
            continue
        losses[record['iter']] = record['loss']
    return losses


def progress(out):
    """The furthest iteration logged so far (-1 before the first)."""
    return max(step_losses(out), default=-1)


def run_with_kills(args, out, extra, rng, log, total_iters):
    """Kill after a random number of new iterations, at most total/(kills+1) each, so that every kill
    lands before the run ends."""
    kills = corrupt = 0
    max_gap = max(1, total_iters // (args.kills + 1))
    while kills < args.kills:
        target = progress(out) + int(rng.integers(1, max_gap + 1))
        proc = subprocess.Popen(command(args, out, extra), cwd=REPO, stdout=log, stderr=log)
        while proc.poll() is None and progress(out) < target:
            time.sleep(0.02)
        time.sleep(rng.uniform(0, 0.3))  # somewhere inside a step, or inside a checkpoint write
        if proc.poll() is not None:
            break  # finished before the kill
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        last = Path(out) / 'checkpoint-last.pth'
        if last.exists():
            try:
                torch.load(last, map_location='cpu')
            except Exception:
                corrupt += 1
    final = subprocess.run(command(args, out, extra), cwd=REPO, stdout=log, stderr=log)
    if final.returncode:
        raise SystemExit(f'error: the resumed run failed; see {log.name}')
    return kills, kills, corrupt


def compare(ref, drilled):
    a, b = step_losses(ref), step_losses(drilled)
    lost = len(set(a) - set(b))
    differing = sum(1 for k in a if k in b and a[k] != b[k])
    wa = torch.load(Path(ref) / 'checkpoint-last.pth', weights_only=True)['model']
    wb = torch.load(Path(drilled) / 'checkpoint-last.pth', weights_only=True)['model']
    identical = all(torch.equal(wa[k], wb[k]) for k in wa)
    return lost, differing, identical


def main(args):
    if args.quick:
        args.kills, args.epochs = 2, 2
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    lines = []
    for name, extra in CONFIGS.items():
        tag = name.replace(' + ', '_').replace(', ', '_').replace(' ', '_')
        ref, drilled = out / f'{tag}_uninterrupted', out / f'{tag}_killed'
        for d in (ref, drilled):
            subprocess.run(['rm', '-rf', str(d)])
        with open(out / f'{tag}.log', 'w') as log:
            if subprocess.run(command(args, ref, extra), cwd=REPO, stdout=log, stderr=log).returncode:
                raise SystemExit(f'error: the uninterrupted run failed; see {log.name}')
            kills, resumes, corrupt = run_with_kills(args, drilled, extra, rng, log, len(step_losses(ref)))
        lost, differing, identical = compare(ref, drilled)
        line = (f'{name}: kills {kills}, resumes {resumes}, lost steps {lost}, corrupt checkpoints {corrupt}, '
                f'differing step losses {differing}, final weights identical: {"yes" if identical else "no"}')
        print(line)
        lines.append(line)
    (out / 'fault_drill.txt').write_text('\n'.join(lines) + '\n')


if __name__ == '__main__':
    main(get_args_parser().parse_args())
