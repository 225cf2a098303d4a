"""Fault drill: interrupt a tiny pre-training run at random moments, resume it each time, and compare the
per-iteration losses and final weights with an uninterrupted run. Arms:
  kill      SIGKILL (inside steps and inside checkpoint writes); the rerun resumes from the last checkpoint
  term      SIGTERM to the whole process group, sometimes twice (the second inside the stop's own checkpoint
            write): the run checkpoints at the next optimizer step and exits 75; nothing may be computed twice
  torchrun  2 processes under torchrun --max_restarts N; a random worker SIGKILLed N times in one launch
  resize    SIGTERM to a torchrun launch; each attempt runs on the other number of processes (2, 1, 2, ...) with the
            same per-process batch, so the accumulation adapts (1 <-> 2) and the global batch is kept
  lost_node two torchrun agents (two nodes on this machine) under --nnodes 1:2 --max_restarts 1 with --global_batch;
            one node, agent and worker, SIGKILLed; the head node re-forms the job alone; N separate runs

  python bench/fault_drill.py              # 10 interruptions per arm and configuration, embedded data
  python bench/fault_drill.py --quick      # 2 per arm on a short run of the default method (the test suite)
"""
import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from util import metrics  # noqa: E402
from util.preemption import EXIT_PREEMPTED  # noqa: E402

# both FreezeOut rule sets: the original's (the default: taps dropped as their units freeze) and this
# project's (a no-grad frozen prefix), the latter under bf16 autocast (fp16 matmuls are about 90x slower than
# bf16 on CPUs without fp16 units)
CONFIGS = {'LocalMIM': [],
           'LocalMIM + FreezeOut, original rules': ['--freezeout', '--freezeout_rules', 'original',
                                                    '--how_scale', 'linear', '--t_0', '0.5'],
           'LocalMIM + FreezeOut, project rules, bf16': ['--freezeout', '--freezeout_rules', 'project',
                                                         '--how_scale', 'linear', '--t_0', '0.5', '--amp', 'bf16']}
ARMS = ('kill', 'term', 'torchrun', 'resize', 'lost_node')
SEVERAL_PROCESSES = ('torchrun', 'resize', 'lost_node')  # drilled on the default method, against a 2-process run
DEFAULT_CONFIG = 'LocalMIM + FreezeOut, original rules'  # the default method: the torchrun arm and --quick drill it
# what each arm checkpoints on its own: every step for SIGKILL (so that little is recomputed), every 4 steps
# for SIGTERM (the stop must save what the periodic checkpoint has not), every 3 under torchrun
SAVE_EVERY = {'kill': 1, 'term': 4, 'torchrun': 3, 'resize': 4, 'lost_node': 3}


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


def torchrun(processes=1, restarts=0, nodes=None, port=None, host=True):
    """A torchrun launch; with `nodes` one agent of a job of several, meeting the others through the c10d
    rendezvous on this machine's `port` (the host's agent holds the rendezvous store)."""
    launch = [sys.executable, '-m', 'torch.distributed.run', f'--nproc_per_node={processes}', f'--max_restarts={restarts}']
    if nodes:
        launch += [f'--nnodes={nodes}', '--rdzv_backend=c10d', f'--rdzv_endpoint=localhost:{port}', '--rdzv_id=drill',
                   f'--rdzv_conf=is_host={int(host)},last_call_timeout=3']
    return launch


def command(args, out, extra, save_every=1, processes=1, launch=None, per_process=None):
    """The drilled run; `per_process` images per process and micro-batch (default: the global batch shared out)."""
    if launch is None:
        launch = [sys.executable] if processes == 1 else torchrun(processes, restarts=args.kills)
    cmd = [*launch, 'run_pretrain.py', '--model', 'MIM_vit_tiny_patch4', '--input_size', '32',
           '--batch_size', str(per_process or args.batch_size // processes), '--epochs', str(args.epochs),
           '--warmup_epochs', '0.5',
           '--num_workers', '2', '--save_every_iters', str(save_every), '--save_freq', '1', '--keep_last', '2',
           '--log_every_step', '--print_freq', '1000', '--device', 'cpu', '--output_dir', str(out), *extra]
    return cmd + (['--data_path', args.data_path] if args.data_path else [])


def logged_iters(out):
    """[(optimizer step, loss)] in the order logged; a resumed run that recomputes a step logs it again."""
    path = Path(out) / 'steps.txt'
    found = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut by the kill
            continue
        found.append((record['step'], record['loss']))
    return found


def step_losses(out):
    """{optimizer step: loss}; of a recomputed step the last value counts."""
    return dict(logged_iters(out))


def progress(out):
    """The furthest optimizer step logged so far (-1 before the first)."""
    return max(step_losses(out), default=-1)


def wait_for_progress(proc, out, rng, max_gap):
    """Wait for a random number of new optimizer steps (at most max_gap), then a random moment inside a step or a
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


def run_resized(args, out, extra, rng, log, total_iters):
    """SIGTERM to the launch `args.kills` times; the attempts alternate between 2 processes and 1 with the same
    per-process batch, so the resumed run keeps the global batch by adapting its accumulation."""
    counts = {'interruptions': 0, 'stops checkpointed at their step': 0, 'corrupt checkpoints': 0}
    max_gap = max(1, total_iters // (args.kills + 1))
    attempt = 0
    while True:
        processes = 2 if attempt % 2 == 0 else 1
        cmd = command(args, out, extra, SAVE_EVERY['resize'], processes, launch=torchrun(processes),
                      per_process=args.batch_size // 2)
        attempt += 1
        if counts['interruptions'] == args.kills:
            break
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=log, start_new_session=True)
        if not wait_for_progress(proc, out, rng, max_gap):
            break
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()
        counts['interruptions'] += 1
        counts['corrupt checkpoints'] += not checkpoint_readable(out)
        saved = torch.load(out / 'checkpoint-last.pth', map_location='cpu', weights_only=True)['step']
        counts['stops checkpointed at their step'] += saved == progress(out) + 1
    if subprocess.run(cmd, cwd=REPO, stdout=log, stderr=log).returncode:
        raise SystemExit(f'error: the resumed run failed; see {log.name}')
    return counts


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def children(pid):
    """The processes whose parent is `pid` (a torchrun agent's workers run in sessions of their own)."""
    found = []
    for p in (p for p in os.listdir('/proc') if p.isdigit()):
        try:
            if open(f'/proc/{p}/stat').read().rsplit(')', 1)[1].split()[1] == str(pid):
                found.append(int(p))
        except OSError:
            continue
    return found


def run_losing_a_node(args, out, extra, rng, log, total_iters):
    """Two agents under --nnodes 1:2 --max_restarts 1; the second node (agent and worker) SIGKILLed at a random
    step of the first half; the head node must re-form the job alone and finish. Returns the seconds from the kill
    to the re-formed job's first step, and whether the checkpoint was readable right after the kill."""
    port = free_port()
    extra = [*extra, '--global_batch', str(args.batch_size)]  # the recipe's, also when lost before a checkpoint
    head, other = (subprocess.Popen(command(args, out, extra, SAVE_EVERY['lost_node'],
                                            launch=torchrun(1, 1, '1:2', port, host), per_process=args.batch_size // 2),
                                    cwd=REPO, stdout=log, stderr=log, start_new_session=True) for host in (True, False))
    if not wait_for_progress(head, out, rng, max(1, total_iters // 2)):
        raise SystemExit(f'error: the run ended before the node was lost; see {log.name}')
    at = progress(out)
    killed = time.time()
    for pid in [other.pid, *children(other.pid)]:
        os.kill(pid, signal.SIGKILL)
    readable = checkpoint_readable(out)
    while head.poll() is None and len(logged_iters(out)) <= at + 1:
        time.sleep(0.02)
    reformed = time.time() - killed
    if head.wait():
        raise SystemExit(f'error: the head node did not finish alone; see {log.name}')
    return reformed, readable


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
    difference = result['max weight difference']
    line += f', final weights identical: {"yes" if difference == 0 else f"no (at most {difference:.1e} apart)"}'
    if arm == 'lost_node':
        line += f' (the job re-formed on the head node {np.median(delays):.0f} s median, {max(delays):.0f} s at ' \
                f'most after the kill)'
    elif delays:
        line += f' (stopped {np.median(delays):.1f} s median, {max(delays):.1f} s at most after the signal; ' \
                f'a step takes {step_time:.2f} s)'
    return line


def drill(args, arm, drilled, reference, extra, rng, log, total):
    """(counts, comparison with the reference run, delays) of one arm."""
    subprocess.run(['rm', '-rf', str(drilled)])
    if arm == 'lost_node':  # one loss per run: args.kills runs
        results, delays, corrupt = [], [], 0
        for _ in range(args.kills):
            subprocess.run(['rm', '-rf', str(drilled)])
            reformed, readable = run_losing_a_node(args, drilled, extra, rng, log, total)
            results.append(compare(reference, drilled))
            delays.append(reformed)
            corrupt += not readable
        worst = {k: max(r[k] for r in results) for k in results[0] if k != 'differing step losses'}  # as resize
        worst['recomputed steps'] = sum(r['recomputed steps'] for r in results)
        return {'interruptions': args.kills, 'corrupt checkpoints': corrupt}, worst, delays
    if arm == 'torchrun':
        counts, delays = run_torchrun_with_kills(args, drilled, extra, rng, log, total), []
    elif arm == 'resize':
        counts, delays = run_resized(args, drilled, extra, rng, log, total), []
        result = compare(reference, drilled)
        del result['differing step losses']  # a logged loss is rank 0's micro-batch: other images on 1 process
        return counts, result, delays
    else:
        counts, delays = run_with_interruptions(args, drilled, extra, rng, log, total, arm)
    return counts, compare(reference, drilled), delays


def main(args):
    if args.quick:
        args.kills, args.epochs = 2, 2
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    lines = []
    for name, extra in CONFIGS.items():
        arms = [a for a in args.arms if a not in SEVERAL_PROCESSES or name == DEFAULT_CONFIG]
        if not arms or args.quick and name != DEFAULT_CONFIG:
            continue
        tag = name.replace(' + ', '_').replace(', ', '_').replace(' ', '_')
        with open(out / f'{tag}.log', 'w') as log:
            ref = out / f'{tag}_uninterrupted'
            total = uninterrupted(args, ref, extra, log)
            epochs = metrics.read_json_lines(ref / 'log.txt')
            step_time = sum(e['epoch_time'] for e in epochs) / total
            for arm in arms:
                reference = ref
                if arm in SEVERAL_PROCESSES:
                    reference = out / f'{tag}_uninterrupted_2proc'
                    if not (reference / 'checkpoint-last.pth').exists():
                        uninterrupted(args, reference, extra, log, processes=2)
                counts, result, delays = drill(args, arm, out / f'{tag}_{arm}', reference, extra, rng, log, total)
                line = describe(name, arm, counts, result, delays, step_time)
                print(line, flush=True)
                lines.append(line)
    (out / 'fault_drill.txt').write_text('\n'.join(lines) + '\n')


if __name__ == '__main__':
    main(get_args_parser().parse_args())
