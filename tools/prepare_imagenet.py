"""Arrange the ImageNet-1K validation images into class folders, and check the result.

  python -m tools.prepare_imagenet --val_dir /data/imagenet/val --devkit /data/ILSVRC2012_devkit_t12
  python -m tools.prepare_imagenet --val_dir /data/imagenet/val --labels val_labels.txt   # "<file> <class>" lines
The official development kit gives the label of each validation image in order
(data/ILSVRC2012_validation_ground_truth.txt, ids 1..1000) and the WordNet id of each label
(data/meta.mat); images move to <val_dir>/<wnid>/. Running it again is harmless. Exits 1, naming what is
wrong, unless every class has the expected number of images.
"""
import argparse
import sys
from collections import Counter
from pathlib import Path


def get_args_parser():
    p = argparse.ArgumentParser('prepare the ImageNet validation folder')
    p.add_argument('--val_dir', required=True, help='folder holding ILSVRC2012_val_*.JPEG')
    p.add_argument('--devkit', help='ILSVRC2012_devkit_t12 folder')
    p.add_argument('--labels', help='instead of --devkit: a file of "<image file> <class name>" lines')
    p.add_argument('--expected_classes', type=int, default=1000)
    p.add_argument('--expected_per_class', type=int, default=50)
    p.add_argument('--dry_run', action='store_true', help='only report what would move')
    return p


def devkit_labels(devkit):
    """{image file: wnid} from the devkit's ground truth and meta.mat."""
    from scipy.io import loadmat
    devkit = Path(devkit)
    gt, meta = devkit / 'data' / 'ILSVRC2012_validation_ground_truth.txt', devkit / 'data' / 'meta.mat'
    for f in (gt, meta):
        if not f.is_file():
            raise SystemExit(f"error: {f} not found; --devkit must be the extracted ILSVRC2012_devkit_t12 folder")
    synsets = loadmat(meta, squeeze_me=True)['synsets']
    wnid = {int(s['ILSVRC2012_ID']): str(s['WNID']) for s in synsets}
    ids = [int(line) for line in gt.read_text().split()]
    return {f'ILSVRC2012_val_{i:08d}.JPEG': wnid[label] for i, label in enumerate(ids, start=1)}


def file_labels(path):
    labels = {}
    for n, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if line.strip():
            parts = line.split()
            if len(parts) != 2:
                raise SystemExit(f"error: {path} line {n}: expected '<image file> <class>', got {line!r}")
            labels[Path(parts[0]).name] = parts[1]
    return labels


def arrange(val_dir, labels, dry_run=False):
    """Move each labelled image into its class folder; returns (moved, already in place, missing files)."""
    moved, in_place, missing = 0, 0, []
    for name, cls in labels.items():
        src, dst = val_dir / name, val_dir / cls / name
        if dst.exists():
            in_place += 1
        elif src.exists():
            moved += 1
            if not dry_run:
                dst.parent.mkdir(exist_ok=True)
                src.rename(dst)
        else:
            missing.append(name)
    return moved, in_place, missing


def check(val_dir, expected_classes, expected_per_class):
    """Problems with the class-folder layout, as readable lines."""
    counts = Counter({d.name: sum(1 for f in d.iterdir() if f.is_file()) for d in val_dir.iterdir() if d.is_dir()})
    problems = []
    if len(counts) != expected_classes:
        problems.append(f'{len(counts)} class folders, expected {expected_classes}')
    wrong = {c: n for c, n in sorted(counts.items()) if n != expected_per_class}
    if wrong:
        listed = ', '.join(f'{c} ({n})' for c, n in list(wrong.items())[:10])
        problems.append(f'{len(wrong)} classes without {expected_per_class} images: {listed}')
    stray = sorted(f.name for f in val_dir.iterdir() if f.is_file())
    if stray:
        problems.append(f'{len(stray)} images left unsorted in {val_dir}: {", ".join(stray[:5])}')
    return counts, problems


def main(args):
    val_dir = Path(args.val_dir)
    if not val_dir.is_dir():
        raise SystemExit(f"error: --val_dir {val_dir} does not exist")
    if bool(args.devkit) == bool(args.labels):
        raise SystemExit("error: pass exactly one of --devkit and --labels")
    labels = devkit_labels(args.devkit) if args.devkit else file_labels(args.labels)
    moved, in_place, missing = arrange(val_dir, labels, args.dry_run)
    print(f'{len(labels)} labelled images: {moved} {"to move" if args.dry_run else "moved"}, {in_place} already in '
          f'place, {len(missing)} missing')
    if missing:
        print(f'missing: {", ".join(missing[:10])}{" ..." if len(missing) > 10 else ""}')
    if args.dry_run:
        return 0
    counts, problems = check(val_dir, args.expected_classes, args.expected_per_class)
    if missing or problems:
        print('problems: ' + '; '.join(problems or ['see the missing images above']))
        return 1
    print(f'{val_dir}: {sum(counts.values())} images in {len(counts)} classes, {args.expected_per_class} each: ok')
    return 0


if __name__ == '__main__':
    sys.exit(main(get_args_parser().parse_args()))
