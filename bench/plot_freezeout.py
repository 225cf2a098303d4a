"""Draw every FreezeOut unit's lr over a run, before spending GPU hours on it.

  python bench/plot_freezeout.py --epochs 100 --iters_per_epoch 625 --how_scale linear cubic --t_0 0.5 0.8
  python bench/plot_freezeout.py --checkpoint output_dir/checkpoint-last.pth   # a run's own settings
Several --how_scale/--t_0 pairs give one panel each.
"""
import argparse
import sys
from pathlib import Path

import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import models_mim  # noqa: E402
from util.freezeout import RULES, FreezeOut  # noqa: E402
from util.lr_sched import cosine_schedule  # noqa: E402


def get_args_parser():
    p = argparse.ArgumentParser('FreezeOut schedule plot')
    p.add_argument('--epochs', type=int, default=100)
    p.add_argument('--iters_per_epoch', type=int, default=625, help='optimizer steps per epoch (ImageNet at 2048: 625)')
    p.add_argument('--warmup_epochs', type=float, default=10)
    p.add_argument('--depth', type=int, default=12, help='encoder blocks (units = depth + 1)')
    p.add_argument('--how_scale', nargs='+', default=['linear', 'cubic'])
    p.add_argument('--t_0', nargs='+', type=float, default=[0.5, 0.8])
    p.add_argument('--lr', type=float, default=1.6e-3, help='peak lr of the ordinary schedule')
    p.add_argument('--min_lr', type=float, default=0.)
    p.add_argument('--no_scale_lr', dest='scale_lr', action='store_false')
    p.add_argument('--freezeout_rules', choices=RULES, default=models_mim.BUILD_DEFAULTS['freezeout_rules'])
    p.add_argument('--checkpoint', help="take every setting from a pre-training checkpoint's args")
    p.add_argument('--output', default='freezeout_schedule.png')
    return p


def settings_from_checkpoint(args):
    from util.checkpoint import load_checkpoint_file
    saved = load_checkpoint_file(args.checkpoint)['args']
    args.epochs, args.iters_per_epoch = saved['epochs'], saved['steps_per_epoch']
    args.warmup_epochs, args.lr, args.min_lr = saved['warmup_epochs'], saved['lr'], saved['min_lr']
    args.how_scale, args.t_0, args.scale_lr = [saved['how_scale']], [saved['t_0']], saved['scale_lr']
    args.freezeout_rules = saved.get('freezeout_rules', 'project')  # checkpoints older than the flag: project rules
    args.depth = len(models_mim.MODELS[saved['model']]().blocks)


def main(args):
    if args.checkpoint:
        settings_from_checkpoint(args)
    if len(args.how_scale) != len(args.t_0):
        raise SystemExit('error: give one --t_0 per --how_scale')
    total, warmup = args.epochs * args.iters_per_epoch, int(args.warmup_epochs * args.iters_per_epoch)
    steps = range(0, total + 1, max(1, total // 1000))
    fig, axes = plt.subplots(1, len(args.t_0), figsize=(6 * len(args.t_0), 4), squeeze=False)
    for ax, how, t_0 in zip(axes[0], args.how_scale, args.t_0):
        fo = FreezeOut(num_units=args.depth + 1, total_steps=total, warmup_steps=warmup, lr=args.lr, min_lr=args.min_lr,
                       t_0=t_0, how_scale=how, scale_lr=args.scale_lr, rules=args.freezeout_rules)
        cmap = plt.get_cmap('viridis')
        for unit in range(args.depth + 1):
            label = ('patch embed + cls' if args.freezeout_rules == 'project' else 'patch embed') if unit == 0 \
                else f'block {unit - 1}'
            ax.plot([s / args.iters_per_epoch for s in steps], [fo.unit_lr(unit, s) for s in steps],
                    color=cmap(unit / args.depth), lw=1.2, label=label if unit in (0, 1, args.depth) else None)
        ax.plot([s / args.iters_per_epoch for s in steps],
                [cosine_schedule(s, total, warmup, args.lr, args.min_lr) for s in steps], 'k--', lw=1,
                label='ordinary schedule')
        block_steps = sum(min(s, total) for s in fo.freeze_steps[1:]) / (args.depth * total)
        ax.set_title(f'{how}, t_0={t_0}{"" if args.scale_lr else ", unscaled lr"}, {args.freezeout_rules} rules: '
                     f'{block_steps:.0%} of block-steps trained')
        ax.set_xlabel('epoch')
        ax.set_ylabel('lr')
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.output, dpi=110)
    print(f'wrote {args.output}')


if __name__ == '__main__':
    main(get_args_parser().parse_args())
