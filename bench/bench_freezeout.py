"""What FreezeOut saves: step time and memory with part of the encoder frozen, the saving a whole run
should get from that, and the saving measured on real runs (data loader in the loop).

  python bench/bench_freezeout.py                         # CPU: MIM_vit_tiny_patch8 at 64 px
  python bench/bench_freezeout.py --device cuda --model MIM_vit_base_patch16 --input_size 224 --batch_size 128 --amp bf16
Part 1 alternates the configurations in one process (median and range over --reps). Part 2 runs
run_pretrain.py without FreezeOut and with each of --runs, alternating, and compares the summed epoch times
and the runs' CPU times with the saving predicted from part 1 for the same schedule; 'freezeout, nothing
frozen' measures what FreezeOut costs before any unit freezes.
  python bench/bench_freezeout.py --reps 1 --run_repeats 4 --runs "freezeout, nothing frozen"   # that alone
With --compile the real runs are compiled, each from an empty compiler cache, so that a run pays for every
compilation it causes; `--run_compile_scopes model blocks` runs the set under each --compile_scope.
"""
import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import models_mim  # noqa: E402
from util import metrics  # noqa: E402
from util.datasets import resolve_split  # noqa: E402
from bench.bench_data import repeat_folder  # noqa: E402
from bench.step_timer import StepRunner, alternate  # noqa: E402
from util.freezeout import FreezeOut  # noqa: E402
from util.distributed import COMPILE_SCOPES, add_compile_arg  # noqa: E402

FRACTIONS = (0, 0.25, 0.5, 0.75)
RECIPES = (('cubic', 0.8), ('linear', 0.5))  # utkutpcgl/freezeout_localmim_rho's ImageNet runs
PROJECTION = (100, 10, 625)  # epochs, warm-up epochs, steps per epoch of those runs (ViT-B, batch 2048)
WARMUP_FRACTION = 0.1  # of the real runs' epochs


def get_args_parser():
    p = argparse.ArgumentParser('FreezeOut benchmark')
    p.add_argument('--model', default='MIM_vit_tiny_patch8')
    p.add_argument('--input_size', type=int, default=64)
    p.add_argument('--batch_size', type=int, default=64)
    p.add_argument('--device', default='cpu')
    p.add_argument('--amp', default='none', choices=['none', 'fp16', 'bf16'])
    p.add_argument('--reps', type=int, default=5, help='alternating repetitions per configuration')
    p.add_argument('--steps', type=int, default=3, help='timed steps per repetition')
    p.add_argument('--how_scale', default='linear')
    p.add_argument('--t_0', type=float, default=0.5)
    p.add_argument('--run_epochs', type=int, default=6, help='epochs of each real run (0: skip part 2)')
    p.add_argument('--run_repeats', type=int, default=2)
    p.add_argument('--runs', nargs='+', choices=[n for n in RUNS if n != 'ordinary'],
                   default=[n for n in RUNS if n != 'ordinary'], help='real runs beside the ordinary one')
    p.add_argument('--data_path', default=None, help='real runs: ImageFolder root (default: embedded data)')
    p.add_argument('--data_repeat', type=int, default=1,
                   help='real runs: each image of --data_path linked N times (longer epochs from a small folder)')
    p.add_argument('--run_loader', default='fast', help='real runs: --loader')
    p.add_argument('--run_workers', type=int, default=2, help='real runs: --num_workers')
    add_compile_arg(p, 'the model of the real runs, each run with an empty compiler cache (its compile time counted)')
    p.add_argument('--run_compile_scopes', nargs='+', choices=COMPILE_SCOPES, default=['blocks'],
                   help='with --compile: the ordinary run and the --runs once per --compile_scope, each measured '
                        'against the ordinary run of its scope')
    p.add_argument('--quick', action='store_true', help='smoke test: tiny model, few steps, short runs')
    p.add_argument('--output_dir', default='results')
    return p


# (rules, decoders of frozen taps dropped): this project's rules with and without --freeze_decoders, and
# utkutpcgl/freezeout_localmim_rho's (decoders dropped, cls token trained, so backward runs through frozen blocks)
VARIANTS = (('project', False), ('project', True), ('original', True))
ORDINARY = 'no FreezeOut (ordinary optimizer groups)'


def measure_steps(args):
    """Step time and memory for 0/25/50/75% of the encoder's units frozen, under each rule set."""
    torch.manual_seed(0)
    device = torch.device(args.device)
    batch = torch.randn(args.batch_size, 3, args.input_size, args.input_size, device=device)
    runners, meta = {}, {}
    for rules, freeze_decoders in VARIANTS:
        for frac in FRACTIONS:
            model = models_mim.MODELS[args.model](img_size=args.input_size, freeze_decoders=freeze_decoders,
                                                  cls_token_in_unit0=rules == 'project')
            units = round(frac * model.num_units)
            if units == 0 and (rules, freeze_decoders) != VARIANTS[0]:
                continue  # identical to the ordinary model
            model.to(device).set_frozen(range(units))
            name = f'{frac:.0%} frozen ({units} units)' + {
                ('project', False): '', ('project', True): ', decoders dropped',
                ('original', True): ', original rules'}[(rules, freeze_decoders)]
            runners[name] = StepRunner(model, batch, args.amp, freezeout=True)
            meta[name] = (units, freeze_decoders, rules)
            if units == 0:  # FreezeOut's per-unit optimizer groups against the ordinary run's two, nothing frozen
                runners[ORDINARY] = StepRunner(copy.deepcopy(model), batch, args.amp)
                meta[ORDINARY] = (0, False, 'none')
    timing = alternate(runners, args.reps, args.steps)
    memory = {name: r.peak_memory_mb() for name, r in runners.items()}
    num_units = next(iter(runners.values())).model.num_units
    return [{'config': n, 'frozen_units': meta[n][0], 'freeze_decoders': meta[n][1], 'rules': meta[n][2],
             'step_s': timing[n], 'memory_mb': memory[n]} for n in runners], num_units


def predicted_saving(rows, num_units, total_steps, warmup_steps, how_scale, t_0, freeze_decoders, rules='project'):
    """Sum over the run's steps of the measured step time at that step's frozen count (interpolated
    between the measured fractions), against every step at the ordinary (no FreezeOut) step's time."""
    pts = sorted((r['frozen_units'], r['step_s']['median']) for r in rows if r['config'] != ORDINARY and (
        r['frozen_units'] == 0 or (r['freeze_decoders'] == freeze_decoders and r['rules'] == rules)))
    xs, ys = zip(*pts)
    ordinary = next((r['step_s']['median'] for r in rows if r['config'] == ORDINARY), ys[0])
    fo = FreezeOut(num_units=num_units, total_steps=total_steps, warmup_steps=warmup_steps, lr=1., t_0=t_0,
                   how_scale=how_scale, rules=rules)
    frozen = [fo.num_frozen(s) for s in range(total_steps)]
    run_time = sum(np.interp(frozen, xs, ys))
    block_steps = 1 - sum(min(s, total_steps) for s in fo.freeze_steps) / (num_units * total_steps)
    return 1 - run_time / (total_steps * ordinary), block_steps


PROJECT = ['--freezeout', '--freezeout_rules', 'project']
# the real runs; 'freezeout, nothing frozen': FreezeOut's machinery (per-unit groups and lr, the freeze checks)
# with every t_i = 1, so that no unit freezes inside the run: what FreezeOut costs before it saves anything
RUNS = {'ordinary': [], 'freezeout': PROJECT, 'freezeout + freeze_decoders': [*PROJECT, '--freeze_decoders'],
        'freezeout, original rules': ['--freezeout', '--freezeout_rules', 'original'],
        'freezeout, nothing frozen': ['--freezeout', '--freezeout_rules', 'original', '--how_scale', 'linear',
                                      '--t_0', '1']}


def run_configs(args):
    """name -> (run, the ordinary run it is measured against, extra run_pretrain.py arguments) of the real runs,
    each ordinary run before the others: one set, or with --compile one per --run_compile_scopes."""
    if not args.compile:
        return {name: (name, 'ordinary', RUNS[name]) for name in ['ordinary', *args.runs]}
    configs = {}
    for scope in args.run_compile_scopes:
        ordinary = f'ordinary, compiled {scope}'
        for name in ['ordinary', *args.runs]:
            configs[f'{name}, compiled {scope}'] = (name, ordinary, [*RUNS[name], '--compile', args.compile,
                                                                     '--compile_scope', scope])
    return configs


def real_runs(args, out):
    """Alternate the --runs of run_pretrain.py; each one's summed epoch (wall) time and the CPU time of its
    process and loader workers, which load from other work on the machine biases less."""
    configs = run_configs(args)
    common = ['--model', args.model, '--input_size', str(args.input_size), '--batch_size', str(args.batch_size),
              '--epochs', str(args.run_epochs), '--warmup_epochs', str(args.run_epochs * WARMUP_FRACTION),
              '--num_workers', str(args.run_workers), '--loader', args.run_loader, '--print_freq', '1000',
              '--how_scale', args.how_scale, '--t_0', str(args.t_0), '--device', args.device, '--amp', args.amp,
              '--save_freq', '0']
    if args.data_path:
        common += ['--data_path', str(repeat_folder(resolve_split(args.data_path, 'train'), args.data_repeat, out))]
    seconds = {name: [] for name in configs}
    cpu_seconds = {name: [] for name in configs}
    steps_per_epoch = None
    for rep in range(args.run_repeats):
        for name, (_, _, extra) in configs.items():
            with tempfile.TemporaryDirectory() as tmp:
                # an empty compiler cache: a run must not reuse the kernels of the run before it
                env = {**os.environ, 'TORCHINDUCTOR_CACHE_DIR': os.path.join(tmp, 'inductor')}
                before = resource.getrusage(resource.RUSAGE_CHILDREN)
                proc = subprocess.run([sys.executable, 'run_pretrain.py', *common, *extra,
                                       '--output_dir', os.path.join(tmp, 'run')],
                                      cwd=REPO, capture_output=True, text=True, env=env)
                after = resource.getrusage(resource.RUSAGE_CHILDREN)
                if proc.returncode:
                    raise SystemExit(f'error: the {name} run failed:\n{proc.stderr[-2000:]}')
                log = metrics.read_json_lines(Path(tmp) / 'run' / 'log.txt')
                seconds[name].append(sum(r['epoch_time'] for r in log))
                cpu_seconds[name].append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
                steps_per_epoch = log[0]['step']
    return {n: {'run': configs[n][0], 'baseline': configs[n][1], 'median': float(np.median(s)), 'runs': s,
                'cpu_median': float(np.median(cpu_seconds[n])), 'cpu_runs': cpu_seconds[n]}
            for n, s in seconds.items()}, steps_per_epoch


def main(args):
    if args.quick:
        args.model, args.input_size, args.batch_size = 'MIM_vit_tiny_patch4', 32, 8
        args.reps, args.steps, args.run_epochs, args.run_repeats = 1, 1, 2, 1
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(torch.get_num_threads())
    machine = torch.cuda.get_device_name() if args.device.startswith('cuda') else f'CPU, {torch.get_num_threads()} threads'
    print(f'{args.model} at {args.input_size}px, batch {args.batch_size}, {machine}, amp {args.amp}')
    rows, num_units = measure_steps(args)
    base = next(r['step_s']['median'] for r in rows if r['config'] == ORDINARY)
    mem_label = 'peak GPU memory' if args.device.startswith('cuda') else 'activations saved for backward'
    lines = [f'| configuration | step time (s), median [min-max] | vs. no FreezeOut | {mem_label} (MB) |',
             '|---|---|---|---|']
    for r in rows:
        s = r['step_s']
        lines.append(f"| {r['config']} | {s['median']:.4f} [{s['min']:.4f}-{s['max']:.4f}] | "
                     f"{s['median'] / base:.2f}x | {r['memory_mb']:.1f} |")
    result = {'model': args.model, 'input_size': args.input_size, 'batch_size': args.batch_size,
              'machine': machine, 'amp': args.amp, 'date': time.strftime('%Y-%m-%d'), 'steps': rows}

    if args.run_epochs > 0:
        runs, steps_per_epoch = real_runs(args, out)
        total = args.run_epochs * steps_per_epoch
        warmup = int(args.run_epochs * WARMUP_FRACTION * steps_per_epoch)
        lines += ['', f'Whole runs: {args.run_epochs} epochs x {steps_per_epoch} steps, FreezeOut '
                  f'{args.how_scale} t_0={args.t_0}, data loader in the loop ({args.run_repeats} alternating repeats'
                  f'{f"; compiled ({args.compile}), compile time included" if args.compile else ""})',
                  '', '| run | wall time (s), median | measured saving | CPU time (s), median | saving by CPU time | '
                  'predicted from step times | encoder unit-steps skipped |', '|---|---|---|---|---|---|---|']
        for name, r in runs.items():
            baseline = runs[r['baseline']]
            r['measured_saving_wall'] = saving = 1 - r['median'] / baseline['median']
            r['measured_saving_cpu'] = saving_cpu = 1 - r['cpu_median'] / baseline['cpu_median']
            measured = f"| {name} | {r['median']:.1f} | {saving:.1%} | {r['cpu_median']:.1f} | {saving_cpu:.1%} |"
            run = r['run']
            if run in ('ordinary', 'freezeout, nothing frozen'):  # nothing to predict
                lines.append(measured + ' - | - |')
                continue
            rules = 'original' if 'original' in run else 'project'
            predicted, skipped = predicted_saving(rows, num_units, total, warmup, args.how_scale, args.t_0,
                                                  'decoders' in run or rules == 'original', rules)
            r.update(predicted_saving=predicted, block_steps_skipped=skipped)
            lines.append(measured + f" {predicted:.1%} | {skipped:.1%} |")
        result['runs'] = runs
    lines += ['', f'Projected whole-run saving of the encoder step (data loading not counted) for a '
              f'{PROJECTION[0]}-epoch run with {PROJECTION[1]} warm-up epochs, from the step times above:', '',
              '| recipe | project rules | project rules + --freeze_decoders | original rules |', '|---|---|---|---|']
    total, warmup = PROJECTION[0] * PROJECTION[2], PROJECTION[1] * PROJECTION[2]
    result['projection'] = {}
    for how, t_0 in RECIPES:
        cells = [predicted_saving(rows, num_units, total, warmup, how, t_0, fd, rules)[0] for rules, fd in VARIANTS]
        result['projection'][f'{how} {t_0}'] = dict(zip(['project', 'project_freeze_decoders', 'original'], cells))
        lines.append(f'| {how} t_0={t_0} | ' + ' | '.join(f'{c:.1%}' for c in cells) + ' |')
    table = '\n'.join(lines)
    print(table)
    (out / 'bench_freezeout.json').write_text(json.dumps(result, indent=1))
    (out / 'bench_freezeout.md').write_text(f"{args.model}, {args.input_size}px, batch {args.batch_size}, "
                                            f"{machine}, {result['date']}\n\n{table}\n")
    print(f'wrote {out}/bench_freezeout.json and .md')


if __name__ == '__main__':
    main(get_args_parser().parse_args())
