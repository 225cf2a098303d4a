"""Fault drill: interrupt a tiny pre-training run at random moments, resume it each time, and compare the
per-iteration losses and final weights with an uninterrupted run. Arms:
  kill      SIGKILL (inside steps and inside checkpoint writes); the rerun resumes from the last checkpoint
  term      SIGTERM to the whole process group, sometimes twice (the second inside the stop's own checkpoint
            write): the run checkpoints at the next optimizer step and exits 75; nothing may be computed twice
  torchrun  2 processes under torchrun --max_restarts N; a random worker SIGKILLed N times in one launch

  python bench/fault_drill.py              # 10 interruptions per arm and configuration, embedded data
  python bench/fault_drill.py --quick      # 2 per arm on a short run of the default method (the test suite)
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from util.preemption import EXIT_PREEMPTED  # noqa: E402

# both FreezeOut rule sets: the original's (the default: taps dropped as their units freeze) and this
# project's (a no-grad frozen prefix), the latter under bf16 autocast (fp16 matmuls are about 90x slower than
# bf16 on CPUs without fp16 units)
CONFIGS = {'LocalMIM': [],
           'LocalMIM + FreezeOut, original rules': ['--freezeout', '--freezeout_rules', 'original',
                                                    '--how_scale', 'linear', '--t_0', '0.5'],
           'LocalMIM + FreezeOut, project rules, bf16': ['--freezeout', '--freezeout_rules', 'project',
                                                         '--how_scale', 'linear', '--t_0', '0.5', '--amp', 'bf16']}
ARMS = ('kill', 'term', 'torchrun')
DEFAULT_CONFIG = 'LocalMIM + FreezeOut, original rules'  # the default method: the torchrun arm and --quick drill it
# what each arm checkpoints on its own: every step for SIGKILL (so that little is recomputed), every 4 steps
# for SIGTERM (the stop must save what the periodic checkpoint has not), every 3 under torchrun
SAVE_EVERY = {'kill': 1, 'term': 4, 'torchrun': 3}


def get_args_parser():
    p = argparse.ArgumentParser('fault drill')
    p.add_argument('--kills', type=int, default=10, help='interruptions per arm and configuration')
    p.add_argument('--arms', nargs='+', choices=ARMS, default=list(ARMS))
    p.add_argument('--epochs', type=int, default=3)
    p.add_argument('--batch_size', type=int, default=32, help='per optimizer step (the torchrun arm: 2 x half)')
    p.add_argument('--data_path', default=None, help='default: the embedded dataset')
    p.add_argument('--seed', type=int, default=0, help='of the kill times')
    p.add_argument('--quick', action='store_true', help='2 interruptions, 2 epochs, the default configuration only')
    p.add_argument('--output_dir', default='results/fault_drill')
    return p


def command(args, out, extra, save_every=1, processes=1):
    launch = [sys.executable] if processes == 1 else [
        sys.executable, '-m', 'torch.distributed.run', f'--nproc_per_node={processes}',
        f'--max_restarts={args.kills}']
    cmd = [*launch, 'run_pretrain.py', '--model', 'MIM_vit_tiny_patch4', '--input_size', '32',
           '--batch_size', str(args.batch_size // processes), '--epochs', str(args.epochs), '--warmup_epochs', '0.5',
           '--num_workers', '2', '--save_every_iters', str(save_every), '--save_freq', '1', '--keep_last', '2',
           '--log_every_step', '--print_freq', '1000', '--device', 'cpu', '--output_dir', str(out), *extra]
    return cmd + (['--data_path', args.data_path] if args.data_path else [])


def logged_iters(out):
    """[(iteration, loss)] in the order logged; a resumed run that recomputes an iteration logs it again."""
    path = Path(out) / 'steps.txt'
    found = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut by the kill
            continue
        found.append((record['iter'], record['loss']))
    return found


def step_losses(out):
    """{iteration: loss}; of a recomputed iteration the last value counts."""
    return dict(logged_iters(out))


def progress(out):
    """The furthest iteration logged so far (-1 before the first)."""
    return max(step_losses(out), default=-1)


def wait_for_progress(proc, out, rng, max_gap):
    """Wait for a random number of new iterations (at most max_gap), then a random moment inside a step or a
    checkpoint write; False when the run ended first."""
    target = progress(out) + int(rng.integers(1, max_gap + 1))
    while proc.poll() is None and progress(out) < target:
        time.sleep(0.02)
    time.sleep(rng.uniform(0, 0.3))
    return proc.poll() is None


def checkpoint_readable(out):
    last = Path(out) / 'checkpoint-last.pth'
    try:
        torch.load(last, map_location='cpu') if last.exists() else None
        return True
    except Exception:
        return False


def run_with_interruptions(args, out, extra, rng, log, total_iters, arm):
    """Interrupt `args.kills` times, at most total/(kills+1) iterations apart so that every interruption lands
    before the run ends; then run to the end. Returns the counts and the stop delays (SIGTERM)."""
    counts = {'interruptions': 0, **({'stops with status 75': 0} if arm == 'term' else {}), 'corrupt checkpoints': 0}
    delays = []
    max_gap = max(1, total_iters // (args.kills + 1))
    cmd = command(args, out, extra, SAVE_EVERY[arm])
    while counts['interruptions'] < args.kills:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=log, start_new_session=True)
        if not wait_for_progress(proc, out, rng, max_gap):
            break  # finished before the interruption
        if arm == 'kill':
            proc.send_signal(signal.SIGKILL)
        else:  # the scheduler's way: the whole group, loader workers included
            sent = time.time()
            os.killpg(proc.pid, signal.SIGTERM)
            if rng.random() < 0.5:
                time.sleep(rng.uniform(0, 0.2))
                os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()
        if arm == 'term':
            delays.append(time.time() - sent)
            counts['stops with status 75'] += proc.returncode == EXIT_PREEMPTED
        counts['interruptions'] += 1
        counts['corrupt checkpoints'] += not checkpoint_readable(out)
    if subprocess.run(cmd, cwd=REPO, stdout=log, stderr=log).returncode:
        raise SystemExit(f'error: the resumed run failed; see {log.name}')
    return counts, delays


def worker_pids(out):
    """The training processes of the torchrun launch writing to `out` (not torchrun, not loader workers)."""
    found = []
    for pid in (int(p) for p in os.listdir('/proc') if p.isdigit()):
        try:
            cmdline = open(f'/proc/{pid}/cmdline', 'rb').read().decode()
            environ = open(f'/proc/{pid}/environ', 'rb').read().decode()
            parent = open(f'/proc/{pid}/stat').read().rsplit(')', 1)[1].split()[1]
            parent_cmdline = open(f'/proc/{parent}/cmdline', 'rb').read().decode()
        except OSError:
            continue
        if str(out) in cmdline and 'TORCHELASTIC_RESTART_COUNT=' in environ and 'torch.distributed.run' in parent_cmdline:
            found.append(pid)
    return found


def run_torchrun_with_kills(args, out, extra, rng, log, total_iters):
    """One torchrun launch of 2 processes; SIGKILL a random worker `args.kills` times; torchrun restarts both."""
    max_gap = max(1, total_iters // (args.kills + 1))
    proc = subprocess.Popen(command(args, out, extra, SAVE_EVERY['torchrun'], processes=2), cwd=REPO,
                            stdout=log, stderr=log)
    kills = 0
    while kills < args.kills and wait_for_progress(proc, out, rng, max_gap):
        pids = worker_pids(out)
        if len(pids) == 2:
            os.kill(pids[rng.integers(2)], signal.SIGKILL)
            kills += 1
    if proc.wait():
        raise SystemExit(f'error: the torchrun launch failed; see {log.name}')
    return {'interruptions': kills, 'corrupt checkpoints': 0}


def compare(ref, drilled):
    a, b = step_losses(ref), step_losses(drilled)
    iters = [i for i, _ in logged_iters(drilled)]
    result = {'lost steps': len(set(a) - set(b)), 'recomputed steps': len(iters) - len(set(iters)),
              'differing step losses': sum(1 for k in a if k in b and a[k] != b[k])}
    wa = torch.load(Path(ref) / 'checkpoint-last.pth', weights_only=True)['model']
    wb = torch.load(Path(drilled) / 'checkpoint-last.pth', weights_only=True)['model']
    result['max weight difference'] = max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)
    return result


def uninterrupted(args, out, extra, log, processes=1):
    subprocess.run(['rm', '-rf', str(out)])
    if subprocess.run(command(args, out, extra, processes=processes), cwd=REPO, stdout=log, stderr=log).returncode:
        raise SystemExit(f'error: the uninterrupted run failed; see {log.name}')
    return len(step_losses(out))


def describe(name, arm, counts, result, delays, step_time):
    line = f'{name} [{arm}]: ' + ', '.join(f'{k} {v}' for k, v in {**counts, **result}.items()
                                           if k != 'max weight difference')
    line += f', final weights identical: {"yes" if result["max weight difference"] == 0 else "no"}'
    if delays:
        line += f' (stopped {np.median(delays):.1f} s median, {max(delays):.1f} s at most after the signal; ' \
                f'a step takes {step_time:.2f} s)'
    return line


def main(args):
    if args.quick:
        args.kills, args.epochs = 2, 2
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    lines = []
    for name, extra in CONFIGS.items():
        arms = [a for a in args.arms if a != 'torchrun' or name == DEFAULT_CONFIG]
        if not arms or args.quick and name != DEFAULT_CONFIG:
            continue
        tag = name.replace(' + ', '_').replace(', ', '_').replace(' ', '_')
        with open(out / f'{tag}.log', 'w') as log:
            ref = out / f'{tag}_uninterrupted'
            total = uninterrupted(args, ref, extra, log)
            epochs = [json.loads(line) for line in (ref / 'log.txt').read_text().splitlines()]
            step_time = sum(e['epoch_time'] for e in epochs) / total
            for arm in arms:
                drilled = out / f'{tag}_{arm}'
                subprocess.run(['rm', '-rf', str(drilled)])
                delays = []
                if arm == 'torchrun':
                    reference = out / f'{tag}_uninterrupted_2proc'
                    uninterrupted(args, reference, extra, log, processes=2)
                    counts = run_torchrun_with_kills(args, drilled, extra, rng, log, total)
                else:
                    reference = ref
                    counts, delays = run_with_interruptions(args, drilled, extra, rng, log, total, arm)
                line = describe(name, arm, counts, compare(reference, drilled), delays, step_time)
                print(line, flush=True)
                lines.append(line)
    (out / 'fault_drill.txt').write_text('\n'.join(lines) + '\n')


if __name__ == '__main__':
    main(get_args_parser().parse_args())
