"""Training curves from one or several log.txt files: total and per-scale loss, lr, frozen units.

  python bench/plot_log.py output/mim/log.txt output/mim_fo/log.txt --output curves.png
"""
import argparse
import sys
from pathlib import Path

import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from util import metrics  # noqa: E402


def get_args_parser():
    p = argparse.ArgumentParser('plot training curves')
    p.add_argument('logs', nargs='+', help="log.txt files (or their run folders)")
    p.add_argument('--output', default='curves.png')
    return p


def read_log(path):
    path = Path(path)
    path = path / 'log.txt' if path.is_dir() else path
    if not path.is_file():
        raise SystemExit(f"error: {path} not found; pass a run's log.txt or its output folder")
    return path.parent.name, metrics.read_json_lines(path)


def main(args):
    runs = [read_log(p) for p in args.logs]
    panels = [('total loss', lambda k: k == 'train_loss'),
              ('per-scale loss', lambda k: k.startswith('train_loss_')),
              ('lr', lambda k: k in ('train_lr', 'lr_unit0')),
              ('frozen units', lambda k: k == 'frozen_units')]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6))
    for ax, (title, wanted) in zip(axes, panels):
        for name, records in runs:
            keys = sorted({k for r in records for k in r if wanted(k)})
            for key in keys:
                points = [(r['epoch'], r[key]) for r in records if key in r]
                label = name if len(keys) == 1 else f'{name}: {key.removeprefix("train_")}'
                ax.plot(*zip(*points), label=label, lw=1.2, marker='.')
        ax.set_title(title)
        ax.set_xlabel('epoch')
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.output, dpi=100)
    print(f'wrote {args.output}')


if __name__ == '__main__':
    main(get_args_parser().parse_args())
