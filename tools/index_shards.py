"""Index tar shards that exist, so that the entry points read them by index as they read make_shards' own
(util/shards.py). Shards in webdataset's layout (each sample's files named <key>.<ext>, next to each other), such as
timm/imagenet-1k-wds's <key>.jpg, <key>.cls and <key>.json:

  python -m tools.index_shards '/data/imagenet-1k-wds/imagenet1k-train-{0000..1023}.tar' --split train
  python -m tools.index_shards '/data/imagenet-1k-wds/imagenet1k-validation-{00..63}.tar' --split val
  python run_pretrain.py --data_path /data/imagenet-1k-wds ...

One scan of each shard's tar headers (the images themselves are not read); the image of a sample is its
jpg/jpeg/png/webp/bmp file, its label the number in <key>.cls or a field of <key>.json (--label_field); class names
come from a file (--classes) or are the label numbers. Writes <split>.json and <split>-index.npy beside the shards
(or in --output_dir); a killed run resumes at its last finished shard.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

import util.misc as misc
from util.errors import UsageError
from util.shards import file_sha256, write_atomically, write_split

IMAGE_EXTENSIONS = ('jpg', 'jpeg', 'png', 'webp', 'bmp')


def get_args_parser():
    p = argparse.ArgumentParser('index existing webdataset tar shards')
    p.add_argument('shards', nargs='+', help='a brace pattern (quoted), .tar files, or a folder (its .tar files whose '
                                             'names hold the split name, else all of them)')
    p.add_argument('--split', required=True, help='the split they hold: train or val (names <split>.json)')
    p.add_argument('--output_dir', help="where <split>.json and <split>-index.npy go (default: the first shard's "
                                        "folder)")
    p.add_argument('--label_field', help="labels from this field of each sample's .json (default: its .cls)")
    p.add_argument('--classes', help='class names in label order, one per line (default: the label numbers)')
    p.add_argument('--sha256', action='store_true',
                   help="also write each shard's sha256 (reads every byte): a copy fetched by URL is then checked")
    return p


def shard_paths(items, split):
    from braceexpand import braceexpand
    paths = []
    for item in items:
        if Path(item).is_dir():
            tars = sorted(Path(item).glob('*.tar'))
            paths += [t for t in tars if split in t.name] or tars
        else:
            paths += [Path(p) for p in braceexpand(item)]
    if not paths:
        raise UsageError(f"no .tar shards in {' '.join(items)}")
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise UsageError(f"{missing[0]} does not exist ({len(missing)} of the {len(paths)} shards named are missing)")
    return paths


def sample_key(name):
    """webdataset's split of a member name into key and extension: at the first dot of its file name."""
    folder, _, base = name.rpartition('/')
    stem, _, ext = base.partition('.')
    return f'{folder}/{stem}' if folder else stem, ext.lower()


def members(path):
    """(name, offset of its data, size) of each regular file of a tar shard, from its headers alone: one positioned
    read of 512 bytes per file (tarfile's reader costs several times more per member). ustar names with their
    prefix, GNU long names and pax path records are read; other entries are skipped."""
    fd = os.open(path, os.O_RDONLY)
    try:
        end, offset, long_name = os.fstat(fd).st_size, 0, None
        while offset + 512 <= end:
            header = os.pread(fd, 512, offset)
            if header == bytes(512):  # the two zero blocks that end an archive
                return
            try:
                size = int(header[124:136].rstrip(b'\0 ').decode() or '0', 8)
            except ValueError:
                raise UsageError(f"{path} is not a readable tar file (a bad header at byte {offset}); restore it") \
                    from None
            kind, data = header[156:157], offset + 512
            if kind in (b'L', b'x'):  # the name of the next file: GNU long name, or a pax record path=...
                text = os.pread(fd, size, data).decode('utf-8', 'replace')
                long_name = text.rstrip('\0') if kind == b'L' else next(
                    (r.split('=', 1)[1] for r in text.split('\n') if r.partition(' ')[2].startswith('path=')),
                    long_name)
            elif kind in (b'0', b'\0', b'7'):
                name = long_name or (header[345:500].rstrip(b'\0') + b'/' * bool(header[345]) +
                                     header[:100].rstrip(b'\0')).decode('utf-8', 'replace')
                long_name = None
                if data + size > end:
                    raise UsageError(f"{path} is truncated: {name} ends past its {end} bytes; restore it")
                yield name, data, size
            offset = data + (size + 511) // 512 * 512
    finally:
        os.close(fd)


def read_label(fd, name, offset, size, label_field, path):
    data = os.pread(fd, size, offset)
    try:
        return int(json.loads(data)[label_field] if label_field else data.strip())
    except (ValueError, KeyError, TypeError):
        what = f"field {label_field!r}" if label_field else 'class number'
        raise UsageError(f"{path}: {name} holds no {what} ({data[:40]!r}); pass --label_field for labels in "
                         f"the samples' .json") from None


def scan(path, shard, label_field):
    """(index rows: shard, offset, size, label of each sample with an image; samples without an image)."""
    rows, no_image = [], 0
    key = image = label = None

    def finish():
        nonlocal no_image
        if key is None:
            return
        if image is None:
            no_image += 1
        elif label is None:
            raise UsageError(f"{path}: sample {key} has no {'.json' if label_field else '.cls'} label; pass "
                             f"--label_field for labels in the samples' .json")
        else:
            rows.append((shard, *image, label))
    label_ext = 'json' if label_field else 'cls'
    fd = os.open(path, os.O_RDONLY)
    try:
        for member, offset, size in members(path):
            name, ext = sample_key(member)
            if name != key:
                finish()
                key, image, label = name, None, None
            if ext.rsplit('.', 1)[-1] in IMAGE_EXTENSIONS and image is None:
                image = (offset, size)
            elif ext == label_ext:
                label = read_label(fd, member, offset, size, label_field, path)
        finish()
    finally:
        os.close(fd)
    return rows, no_image


def class_names(path, labels):
    top = int(labels.max()) + 1 if len(labels) else 0
    if path is None:
        return [str(k) for k in range(top)]
    names = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if len(names) < top:
        raise UsageError(f"--classes {path} names {len(names)} classes, the labels go up to {top - 1}")
    return names


def entry(path, out):
    """A shard as the descriptor names it: relative to the descriptor's folder when inside it, else absolute."""
    relative = os.path.relpath(path.resolve(), out.resolve())
    return str(path.resolve()) if relative.startswith('..') else relative


def main(args):
    paths = shard_paths(args.shards, args.split)
    out = Path(args.output_dir or paths[0].parent)
    out.mkdir(parents=True, exist_ok=True)
    ident = [[str(p.resolve()), p.stat().st_size] for p in paths]
    progress_file = out / f'.{args.split}.index-progress.json'
    done = json.loads(progress_file.read_text()) if progress_file.exists() else {}
    if done.get('shards') != ident:
        done = {'shards': ident, 'shardlist': []}
    elif done['shardlist']:
        print(f"{args.split}: resuming at shard {len(done['shardlist'])} of {len(paths)}")
    start, scanned = time.time(), 0
    for k in range(len(done['shardlist']), len(paths)):
        rows, no_image = scan(paths[k], k, args.label_field)
        np.save(out / f'.{args.split}-{k:06d}.rows.npy', np.asarray(rows, dtype=np.int64).reshape(-1, 4))
        shard = {'url': entry(paths[k], out), 'nsamples': len(rows), 'filesize': paths[k].stat().st_size}
        if args.sha256:
            shard['sha256'] = file_sha256(paths[k])
        if no_image:
            print(f'{paths[k]}: {no_image} sample(s) without an image left out')
        done['shardlist'].append(shard)
        write_atomically(progress_file, json.dumps(done).encode())
        scanned += shard['filesize']
        rate = scanned / max(time.time() - start, 1e-6)
        end = '' if sys.stdout.isatty() else '\n'
        print(f"\r{args.split}: {k + 1}/{len(paths)} shards, {sum(s['nsamples'] for s in done['shardlist'])} "
              f"samples, {scanned / 2**30:.2f} GiB scanned at {rate / 1e6:.0f} MB/s", end=end, flush=True)
    if sys.stdout.isatty():
        print()
    parts = [out / f'.{args.split}-{k:06d}.rows.npy' for k in range(len(paths))]
    index = np.concatenate([np.load(p) for p in parts])  # (N, 4): shard, offset, size, label
    spec = {'wids_version': 1, 'name': args.split, 'shardlist': done['shardlist'],
            'classes': class_names(args.classes, index[:, 3]), 'index': f'{args.split}-index.npy'}
    write_split(out, spec, index)
    for p in parts + [progress_file]:
        p.unlink()
    print(f"{args.split}: {len(index)} samples of {len(spec['classes'])} classes in {len(paths)} shards indexed: "
          f"{out / f'{args.split}.json'}")


if __name__ == '__main__':
    misc.run_main(main, get_args_parser())
