"""A small reproduction on real images: MAE (norm-pix), LocalMIM, LocalMIM + FreezeOut (the two published
recipes, or one recipe under both rule sets) and, for each FreezeOut run, the equal-time baseline (ordinary
LocalMIM with its schedule shortened to that run's measured pre-training time, see time_ratios), each
fine-tuned, linear-probed and kNN-evaluated, against a from-scratch supervised run with the same fine-tuning
budget; several seeds, mean and standard deviation.

  python bench/study.py                 # embedded data, tiny ViT, 3 seeds (CPU, under an hour on 2 cores)
  python bench/study.py --quick         # smoke test
  python bench/study.py --data_path data/fm500 --size tiny_patch4 --input_size 32 --seeds 0   # Fashion-MNIST
  python bench/study.py --data_path data/fm500 --size tiny_patch4 --input_size 32 --swin tiny_patch2_win4 \
      --freezeout_arms none --no_mae --no_scratch --output_dir results/study_fm_swin   # LocalMIM, ViT and Swin
  python bench/study.py --low_input_size 32 --input_size_schedule 32:0.5,64 --freezeout_arms none --no_scratch \
      --output_dir results/study_resolution      # low and progressive resolution, evaluated at 64 px
  python bench/study.py --data_path data/fm500 --size tiny_patch4 --input_size 32 --reuse_arms --freezeout_arms none \
      --no_scratch --output_dir results/study_reuse   # crops and masks per decoded image, at equal CPU time
A finished arm is recorded in arms.jsonl and skipped when the study is run again; --report writes the report of
the arms finished so far and trains none. --test_path adds each run's accuracies on a larger held-out set, e.g.
the 10,000 test images of Fashion-MNIST (python -m tools.prepare_fashion_mnist --output_dir data/fm500_test
--train_per_class 500), to the runs it makes and to those recorded without them. Writes study.json, study.md
(with each FreezeOut run's and each reuse run's difference from its reference, paired by seed) and study.png
(accuracy against pre-training CPU time) to --output_dir.
"""
import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from util import metrics  # noqa: E402

# --freezeout_arms: the two published recipes, one recipe under both rule sets, or none
FREEZEOUT = {
    'none': {},
    'recipes': {'LocalMIM + FreezeOut linear 0.5': ['--freezeout', '--how_scale', 'linear', '--t_0', '0.5'],
                'LocalMIM + FreezeOut cubic 0.8': ['--freezeout', '--how_scale', 'cubic', '--t_0', '0.8']},
    'rules': {'LocalMIM + FreezeOut cubic 0.8, project rules': ['--freezeout', '--how_scale', 'cubic', '--t_0', '0.8',
                                                                 '--freezeout_rules', 'project'],
              'LocalMIM + FreezeOut cubic 0.8, original rules': ['--freezeout', '--how_scale', 'cubic', '--t_0', '0.8',
                                                                  '--freezeout_rules', 'original']}}


# --reuse_arms: each decoded image used for several masked samples (--repeated_aug crops, --masks_per_image masks)
REUSE = {'LocalMIM': {'2 crops': ['--repeated_aug', '2'], '2 random masks': ['--masks_per_image', '2'],
                      '4 complementary masks': ['--masks_per_image', '4', '--mask_sets', 'complementary'],
                      '2 crops x 2 masks': ['--repeated_aug', '2', '--masks_per_image', '2']},
         'MAE (norm-pix)': {'4 complementary masks': ['--masks_per_image', '4', '--mask_sets', 'complementary']}}


def get_args_parser():
    p = argparse.ArgumentParser('small real-data study')
    p.add_argument('--data_path', default=None, help='ImageFolder root with train/ and val/ (default: embedded)')
    p.add_argument('--size', default='tiny_patch8')
    p.add_argument('--input_size', type=int, default=64)
    p.add_argument('--pretrain_epochs', type=int, default=10)
    p.add_argument('--finetune_epochs', type=int, default=5)
    p.add_argument('--probe_epochs', type=int, default=5)
    p.add_argument('--batch_size', type=int, default=64)
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    p.add_argument('--freezeout_arms', choices=list(FREEZEOUT), default='recipes',
                   help='recipes: linear 0.5 and cubic 0.8; rules: cubic 0.8 under the project and the original rules')
    p.add_argument('--swin', default=None, metavar='SIZE',
                   help='also LocalMIM on Swin (MIM_swin_SIZE, e.g. tiny_patch2_win4): for as many epochs as the ViT, '
                        'and for as much pre-training CPU time as the ViT\'s LocalMIM run of the same seed')
    p.add_argument('--low_input_size', type=int, default=None, metavar='PX',
                   help='also LocalMIM (and MAE) pre-trained at this lower size for as many epochs, and at --input_size '
                        'for as much pre-training CPU time; all evaluated at --input_size')
    p.add_argument('--input_size_schedule', default=None, metavar='SCHEDULE',
                   help='also LocalMIM (and MAE) pre-trained with this progressive resolution, likewise')
    p.add_argument('--reuse_arms', action='store_true',
                   help='also the reuse of each decoded image at equal pre-training CPU time: LocalMIM with 2 crops '
                        '(--repeated_aug 2), 2 random masks, 4 complementary masks, 2 crops x 2 masks; MAE with 4 '
                        'complementary masks; each run as many epochs as the plain run, then for its CPU time')
    p.add_argument('--no_mae', action='store_true', help='leave out the MAE arm')
    p.add_argument('--no_scratch', action='store_true', help='leave out the from-scratch supervised arm')
    p.add_argument('--quick', action='store_true', help='1 seed, 1-2 epochs each')
    p.add_argument('--test_path', default=None, metavar='DIR',
                   help='also evaluate every run on DIR/val/, a held-out set larger than --data_path\'s val/ '
                        '(DIR/train/: the same training images, for kNN): the last fine-tuned and probe checkpoints, '
                        'chosen by no evaluation, and kNN; with --report, the recorded runs only')
    p.add_argument('--report', action='store_true',
                   help='only write the report, from the arms of --seeds that arms.jsonl holds (a study not finished); '
                        'trains nothing')
    p.add_argument('--output_dir', default='results/study')
    return p


def run(script, *args):
    proc = subprocess.run([sys.executable, script, *map(str, args)], cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f'error: {script} {" ".join(map(str, args))} failed:\n{proc.stderr[-2000:]}')


def log(folder):
    return metrics.read_json_lines(Path(folder) / 'log.txt')


def classifier_args(args, classifier, seed, data_path):
    """The arguments every evaluation of `classifier` shares; Swin pools its tokens."""
    return (['--model', classifier, '--input_size', args.input_size, '--num_workers', 2, '--seed', seed,
             '--print_freq', 1000] + (['--data_path', data_path] if data_path else [])
            + (['--global_pool'] if classifier.startswith('swin_') else []))


def evaluate(args, out, ckpt, seed, classifier=None):
    """Fine-tuning, linear probe and kNN of `ckpt` (from scratch without one)."""
    common = classifier_args(args, classifier or f'vit_{args.size}', seed, args.data_path)
    pre = ['--finetune', ckpt] if ckpt else []
    run('run_finetune.py', *common, *pre, '--batch_size', args.batch_size, '--epochs', args.finetune_epochs,
        '--warmup_epochs', min(1, args.finetune_epochs / 2), '--blr', 2e-3, '--reprob', 0,
        '--output_dir', out / 'finetune')  # a warm-up shorter than the run (--quick: 1 epoch)
    result = {'finetune_acc1': max(r['test_acc1'] for r in log(out / 'finetune'))}
    if ckpt:
        run('run_linprobe.py', *common, *pre, '--batch_size', 2 * args.batch_size, '--epochs', args.probe_epochs,
            '--warmup_epochs', min(1, args.probe_epochs / 2), '--blr', 20, '--output_dir', out / 'linprobe')
        run('run_knn.py', *common, *pre, '--batch_size', 2 * args.batch_size, '--output_dir', out / 'knn')
        result['linprobe_acc1'] = max(r['test_acc1'] for r in log(out / 'linprobe'))
        result['knn_acc1'] = log(out / 'knn')[-1]['knn_top1']
    return result


TESTED = ['finetune_test_acc1', 'linprobe_test_acc1', 'knn_test_acc1']


def test(args, folder):
    """A finished run's accuracies on --test_path's val/: its last fine-tuned and probe checkpoints (the study's
    own columns take the best epoch on --data_path's val/, a choice made on the images measured) and kNN. Each
    evaluation is kept in the run's folder, so that arms sharing a run evaluate it once."""
    trained = metrics.read_json_lines(folder / 'finetune' / 'log.txt', 'run_args')[-1]['run_args']
    common = classifier_args(args, trained['model'], trained['seed'], args.test_path)

    def kept(kind, script, *how):
        """The last record of the evaluation in <folder>/<kind>_test, made there unless it was before."""
        if not (folder / f'{kind}_test' / 'log.txt').exists():
            run(script, *common, *how, '--batch_size', 256, '--output_dir', folder / f'{kind}_test')
        return log(folder / f'{kind}_test')[-1]

    def last_checkpoint(kind):
        return ['--eval', '--resume', folder / kind / 'checkpoint-last.pth']

    result = {'finetune_test_acc1': kept('finetune', 'run_finetune.py', *last_checkpoint('finetune'))['test_acc1']}
    if trained['finetune']:  # pre-trained: probed and kNN-evaluated too
        result['linprobe_test_acc1'] = kept('linprobe', 'run_linprobe.py', *last_checkpoint('linprobe'))['test_acc1']
        result['knn_test_acc1'] = kept('knn', 'run_knn.py', '--finetune', trained['finetune'])['knn_top1']
    return result


def pretrain(args, out, model, seed, epochs, extra=()):
    size = [] if any(str(e).startswith('--input_size') for e in extra) else ['--input_size', args.input_size]
    common = ['--model', model, *size, '--batch_size', args.batch_size,
              '--epochs', epochs, '--warmup_epochs', epochs / 10, '--blr', 1.5e-3, '--num_workers', 2,
              '--seed', seed, '--save_freq', 0, '--print_freq', 1000, '--output_dir', out / 'pretrain', *extra]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    run('run_pretrain.py', *common, *(['--data_path', args.data_path] if args.data_path else []))
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the run and its loader workers, once they have ended
    cpu_s = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return sum(r['epoch_time'] for r in log(out / 'pretrain')), cpu_s, out / 'pretrain' / 'checkpoint-last.pth'


def main(args):
    if args.quick:
        args.seeds, args.pretrain_epochs, args.finetune_epochs, args.probe_epochs = [0], 2, 1, 1
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    done = {(r['seed'], r['arm']): r['result'] for r in (metrics.read_json_lines(out / 'arms.jsonl')
                                                          if (out / 'arms.jsonl').exists() else [])}
    results = {}  # arm -> {seed: its result}

    def arm(seed, name, fn):
        """One arm's result, from arms.jsonl when an earlier run finished it (a study resumes arm by arm), with its
        accuracies on --test_path; a result that gains them is recorded again (the last record of an arm counts)."""
        new = (seed, name) not in done
        if new:
            done[seed, name] = fn()
        result = results.setdefault(name, {})[seed] = done[seed, name]
        if args.test_path and 'folder' in result and 'finetune_test_acc1' not in result:
            result.update(test(args, out / result['folder']))
            new = True
        if new:
            metrics.append_json_line(out / 'arms.jsonl', {'seed': seed, 'arm': name, 'result': result})
        return result

    if args.report:  # the recorded arms only, each evaluated on --test_path where it has not been
        for seed, name in list(done):
            if seed in args.seeds:
                arm(seed, name, None)
        write_report(args, out, results, list(FREEZEOUT[args.freezeout_arms]))
        return

    def folder_of(seed, name):
        return out / f'seed{seed}' / name.replace(' ', '_').replace('(', '').replace(')', '').replace(',', '')

    def pretrained(seed, name, model, epochs, extra=()):
        folder = folder_of(seed, name)
        shutil.rmtree(folder, ignore_errors=True)  # an arm not in arms.jsonl starts over: times of a whole run only
        t, cpu_s, ckpt = pretrain(args, folder, model, seed, epochs, extra)
        return {'pretrain_s': t, 'pretrain_cpu_s': cpu_s, 'pretrain_epochs': epochs,
                'folder': str(folder.relative_to(out)),
                **evaluate(args, folder, ckpt, seed, model.removeprefix('MIM_').removeprefix('mae_'))}

    freezeout = FREEZEOUT[args.freezeout_arms]
    mim = f'MIM_vit_{args.size}'
    for seed in args.seeds:
        if not args.no_mae:
            arm(seed, 'MAE (norm-pix)', lambda: pretrained(seed, 'MAE', f'mae_vit_{args.size}', args.pretrain_epochs,
                                                             ['--norm_pix_loss']))
        ordinary = arm(seed, 'LocalMIM', lambda: pretrained(seed, 'LocalMIM', mim, args.pretrain_epochs))
        shortened = {args.pretrain_epochs: ordinary}  # runs are deterministic: one run per schedule length

        def shortened_run(epochs):
            if epochs not in shortened:
                shortened[epochs] = pretrained(seed, f'LocalMIM_{epochs}ep', mim, epochs)
            return shortened[epochs]

        for name, extra in freezeout.items():
            fo = arm(seed, name, lambda: pretrained(seed, name, mim, args.pretrain_epochs, extra))

            def equal_time_run():
                fo_log = folder_of(seed, name) / 'pretrain' / 'log.txt'
                ratios = time_ratios(fo, ordinary, log(fo_log.parent) if fo_log.exists() else [])
                return {**shortened_run(max(1, round(args.pretrain_epochs * ratios['time_ratio']))), **ratios}
            equal = arm(seed, equal_time_name(name), equal_time_run)
            shortened.setdefault(equal['pretrain_epochs'], equal)
        if args.swin:
            swin = f'MIM_swin_{args.swin}'
            same = arm(seed, 'LocalMIM on Swin', lambda: pretrained(seed, 'Swin', swin, args.pretrain_epochs))
            # CPU time: the two runs are made one after the other, and the wall clock drifts with machine load
            epochs = max(1, round(args.pretrain_epochs * ordinary['pretrain_cpu_s'] / same['pretrain_cpu_s']))
            arm(seed, 'LocalMIM on Swin, equal CPU time to LocalMIM',
                lambda: same if epochs == args.pretrain_epochs else pretrained(seed, f'Swin_{epochs}ep', swin, epochs))
        for label, model, full, extra in [('LocalMIM', mim, ordinary, [])] + ([] if args.no_mae else [
                ('MAE (norm-pix)', f'mae_vit_{args.size}', results['MAE (norm-pix)'][seed], ['--norm_pix_loss'])]):
            lower = ([(f'{label} at {args.low_input_size}px', f'{args.low_input_size}px',
                       ['--input_size', args.low_input_size])] if args.low_input_size else [])
            lower += ([(f'{label}, progressive {args.input_size_schedule}', f'progressive {args.input_size_schedule}',
                        ['--input_size_schedule', args.input_size_schedule])] if args.input_size_schedule else [])
            for name, how, size in lower:
                low = arm(seed, name, lambda: pretrained(seed, name, model, args.pretrain_epochs, [*extra, *size]))
                # the full-resolution run shortened to the same pre-training CPU time
                epochs = max(1, round(args.pretrain_epochs * low['pretrain_cpu_s'] / full['pretrain_cpu_s']))
                arm(seed, f'{label} at {args.input_size}px, equal CPU time to {how}',
                    lambda: pretrained(seed, f'{name} equal {epochs}ep', model, epochs, extra))
            for how, reuse in (REUSE[label] if args.reuse_arms else {}).items():
                name = f'{label}, {how}'
                same = arm(seed, name, lambda: pretrained(seed, name, model, args.pretrain_epochs, [*extra, *reuse]))
                # the reuse run lengthened to the plain run's pre-training CPU time (it decodes fewer images)
                epochs = max(1, round(args.pretrain_epochs * full['pretrain_cpu_s'] / same['pretrain_cpu_s']))
                arm(seed, f'{name}, equal CPU time to {label}',
                    lambda: same if epochs == args.pretrain_epochs else
                    pretrained(seed, f'{name} {epochs}ep', model, epochs, [*extra, *reuse]))
        if not args.no_scratch:
            arm(seed, 'from scratch (supervised)',
                lambda: {'pretrain_s': 0., 'pretrain_cpu_s': 0., 'folder': f'seed{seed}/scratch',
                         **evaluate(args, out / f'seed{seed}' / 'scratch', None, seed)})
    write_report(args, out, results, list(freezeout))


def time_ratios(fo, ordinary, fo_log):
    """The FreezeOut run's time as a fraction of the ordinary run's, which sets the equal-time schedule. Its own
    epochs before the first freeze compute what ordinary epochs compute, so they time an ordinary epoch under the
    same conditions (time_ratio): a shared machine drifts by 10% and more over half an hour, as much as FreezeOut
    saves here, which biases a ratio of two runs made at different times (time_ratio_cpu, the runs' CPU times,
    reported beside it and used when no epoch ran unfrozen)."""
    ratios = {'time_ratio_cpu': fo['pretrain_cpu_s'] / ordinary['pretrain_cpu_s']}
    unfrozen = [r['epoch_time'] for r in fo_log if r['frozen_units'] == 0]
    ratios['time_ratio'] = (sum(r['epoch_time'] for r in fo_log) / (len(fo_log) * statistics.mean(unfrozen))
                            if unfrozen else ratios['time_ratio_cpu'])
    return ratios


def equal_time_name(freezeout_arm):
    return f'LocalMIM, equal time to {freezeout_arm.removeprefix("LocalMIM + ")}'


def mean_std(values):
    return (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.)


def cell(mean, std, n_seeds):
    return f'{mean:.1f} ± {std:.1f}' if n_seeds > 1 else f'{mean:.1f}'


def write_report(args, out, results, freezeout_arms):
    metrics = [m for m in ['finetune_acc1', 'linprobe_acc1', 'knn_acc1', *TESTED, 'pretrain_epochs', 'pretrain_s',
                           'pretrain_cpu_s'] if any(m in r for per_seed in results.values() for r in per_seed.values())]
    lines = [f'| method | seeds | {" | ".join(metrics)} |', '|---|---|' + '---|' * len(metrics)]
    summary = {}
    for name, per_seed in results.items():
        runs = list(per_seed.values())
        summary[name] = {m: mean_std([r[m] for r in runs]) for m in metrics if all(m in r for r in runs)}
        cells = [cell(*summary[name][m], len(runs)) if m in summary[name] else '-' for m in metrics]
        lines.append(f'| {name} | {", ".join(map(str, sorted(per_seed)))} | {" | ".join(cells)} |')
    setup = (f'{args.size}, {args.input_size}px, pre-train {args.pretrain_epochs} epochs, fine-tune '
             f'{args.finetune_epochs}, probe {args.probe_epochs}, seeds {args.seeds}'
             + ('; mean ± std over seeds' if len(args.seeds) > 1 else ''))
    def paired(a, b):
        return [(results[a][seed], results[b][seed]) for seed in sorted(results[a]) if seed in results[b]]

    def differences(pairs, m):
        return [a[m] - b[m] for a, b in pairs if m in a and m in b]

    def difference_cell(d):
        return cell(*mean_std(d), len(d)) if d else '-'

    # paired by seed, which removes the spread between seeds that the columns above carry: each FreezeOut run minus
    # the ordinary run of its seed shortened to the same time; each reuse run at equal CPU time minus the plain run
    accuracies, ratios = [m for m in metrics if m.endswith('acc1')], ['time_ratio', 'time_ratio_cpu']
    freezeout_pairs = [f'| FreezeOut run minus its equal-time ordinary run | {" | ".join(accuracies + ratios)} |',
              '|---|' + '---|' * (len(accuracies) + len(ratios))]
    for name in freezeout_arms:
        if name in results and equal_time_name(name) in results:
            pairs = paired(name, equal_time_name(name))
            cells = [difference_cell(differences(pairs, m)) for m in accuracies]
            for m in ratios:
                values = [eq[m] for _, eq in pairs if m in eq]
                cells.append('{:.3f} ± {:.3f}'.format(*mean_std(values)) if len(values) == len(pairs) else '-')
            freezeout_pairs.append(f'| {name.removeprefix("LocalMIM + ")} | {" | ".join(cells)} |')
    reuse = [f'| reuse at equal CPU time minus the plain run | {" | ".join(accuracies)} | beyond the seeds\' spread |',
             '|---|' + '---|' * (len(accuracies) + 1)]
    for label, arms in (REUSE.items() if args.reuse_arms else ()):
        for how in arms:
            name = f'{label}, {how}, equal CPU time to {label}'
            if name in results and label in results:
                diffs = {m: differences(paired(name, label), m) for m in accuracies}
                beyond = [m for m, d in diffs.items() if len(d) > 1 and abs(mean_std(d)[0]) > mean_std(d)[1]]
                reuse.append(f'| {label}, {how} | '
                             + ' | '.join(difference_cell(d) for d in diffs.values())
                             + f' | {", ".join(beyond) or "none"} |')
    table = (setup + '\n\n' + '\n'.join(lines) + '\n' + ('\n' + '\n'.join(freezeout_pairs) + '\n' if freezeout_arms else '')
             + ('\n' + '\n'.join(reuse) + '\n' if args.reuse_arms else ''))
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    (out / 'study.md').write_text(table)
    (out / 'study.json').write_text(json.dumps({'setup': setup, 'per_seed': results}, indent=1))  # seeds as keys
    fig, ax = plt.subplots(figsize=(6, 4))
    clock = 'pretrain_cpu_s' if all('pretrain_cpu_s' in s for s in summary.values()) else 'pretrain_s'
    for name, s in summary.items():
        ax.errorbar(s[clock][0], s['finetune_acc1'][0], xerr=s[clock][1], yerr=s['finetune_acc1'][1],
                    fmt='o', capsize=3, label=name)
    ax.set_xlabel('pre-training CPU time (s)' if clock == 'pretrain_cpu_s' else 'pre-training wall time (s)')
    ax.set_ylabel('fine-tuned top-1 (%)')
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / 'study.png', dpi=110)
    print(f'wrote {out}/study.md, study.json, study.png')


if __name__ == '__main__':
    main(get_args_parser().parse_args())
