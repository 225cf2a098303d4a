"""Write an ImageFolder (train/ and val/ of class folders, or class folders alone as train) as webdataset tar
shards, with the shard list and an index that find any image without scanning a shard (util/shards.py):

  python -m tools.make_shards /data/imagenet /data/imagenet-shards          # about 1 GB per shard
  python run_pretrain.py --data_path /data/imagenet-shards ...

Each image is stored with its original bytes (never re-encoded) as <key>.<ext>, its class index as <key>.cls,
in the ImageFolder's order: sample i of the shards is image i of the folder, so a run sees the same images, crops
and masks from either. The descriptor holds each shard's sha256, so that a copy fetched by URL is checked. A
killed run resumes at its last finished shard; a destination that holds the shards of another set is refused.
"""
import argparse
import hashlib
import io
import json
import os
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

import util.misc as misc
from util.datasets import image_folder
from util.errors import UsageError
from util.shards import file_sha256, write_atomically, write_split


def get_args_parser():
    p = argparse.ArgumentParser('ImageFolder -> webdataset tar shards')
    p.add_argument('source', help='ImageFolder root: <source>/train/<class>/*, val/ likewise (or class folders)')
    p.add_argument('output_dir')
    p.add_argument('--shard_size', type=float, default=1e9, help='bytes per shard, about (default: 1 GB)')
    p.add_argument('--splits', nargs='+', default=['train', 'val'], help='splits to write (those present)')
    return p


def fingerprint(images, source):
    """The set's identity: class names, and every file's path under the split and size, in order."""
    digest = hashlib.sha256(json.dumps(images.classes).encode())
    for path, target in images.samples:
        digest.update(f'{Path(path).relative_to(source)}\t{target}\t{os.path.getsize(path)}\n'.encode())
    return digest.hexdigest()


def write_shard(path, images, first, shard_size, shard_no):
    """Images first.. into one shard until it holds shard_size bytes (written under a temporary name, then renamed);
    returns (next image, index rows: shard, offset of the image's bytes, their size, class)."""
    rows, i = [], first
    tmp = path.with_name(f'.{path.name}.tmp')
    with open(tmp, 'wb') as f, tarfile.open(fileobj=f, mode='w', format=tarfile.USTAR_FORMAT) as tar:
        while i < len(images) and (i == first or f.tell() < shard_size):
            file, target = images.samples[i]
            data = Path(file).read_bytes()
            ext = Path(file).suffix.lower().lstrip('.') or 'img'
            info = tarfile.TarInfo(f'{i:08d}.{ext}')
            info.size, info.mode = len(data), 0o444
            rows.append((shard_no, tar.offset + tarfile.BLOCKSIZE, len(data), target))  # after its one header block
            tar.addfile(info, io.BytesIO(data))
            label = str(target).encode()
            info = tarfile.TarInfo(f'{i:08d}.cls')
            info.size, info.mode = len(label), 0o444
            tar.addfile(info, io.BytesIO(label))
            i += 1
    os.replace(tmp, path)
    return i, rows


def rows_file(out, shard):
    return out / f'.{shard}.rows.npy'


def progress(split, done, total, nbytes, rate):
    eta = (total - done) / rate if rate else 0
    end = '' if sys.stdout.isatty() else '\n'  # one line rewritten on a terminal, a line per shard in a log
    print(f'\r{split}: {done}/{total} images, {nbytes / 2**30:.2f} GiB, {rate:.0f} images/s, '
          f'eta {int(eta // 3600)}:{int(eta % 3600 // 60):02d}:{int(eta % 60):02d}', end=end, flush=True)


def make_split(source, out, split, shard_size):
    images = image_folder(source, split, None)
    print(f'{split}: {len(images)} images, {len(images.classes)} classes in {images.root}')
    ident = fingerprint(images, images.root)
    final, partial = out / f'{split}.json', out / f'.{split}.progress.json'
    for done_file in (final, partial):
        if done_file.exists() and json.loads(done_file.read_text())['fingerprint'] != ident:
            raise UsageError(f"{out} holds the shards of another set than {images.root} ({done_file.name}); pass "
                             f"another output folder or delete it")
    if final.exists():
        print(f'{split}: already made in {out}')
        return
    state = (json.loads(partial.read_text()) if partial.exists() else
             {'fingerprint': ident, 'next': 0, 'shardlist': []})
    if state['next']:
        print(f"{split}: resuming at image {state['next']} (shard {len(state['shardlist'])})")
    start, first = time.time(), state['next']
    while state['next'] < len(images):
        k = len(state['shardlist'])
        name = f'{split}-{k:06d}.tar'
        state['next'], rows = write_shard(out / name, images, state['next'], shard_size, k)
        np.save(rows_file(out, name), np.asarray(rows, dtype=np.int64))  # the shard's part of the index
        state['shardlist'].append({'url': name, 'nsamples': len(rows), 'filesize': (out / name).stat().st_size,
                                   'sha256': file_sha256(out / name)})
        write_atomically(partial, json.dumps(state).encode())
        rate = (state['next'] - first) / max(time.time() - start, 1e-6)
        progress(split, state['next'], len(images), sum(s['filesize'] for s in state['shardlist']), rate)
    if sys.stdout.isatty():
        print()
    index = np.concatenate([np.load(rows_file(out, s['url'])) for s in state['shardlist']])  # (N, 4)
    write_split(out, {'wids_version': 1, 'name': split, 'shardlist': state['shardlist'], 'classes': images.classes,
                      'index': f'{split}-index.npy', 'fingerprint': ident,
                      'source': str(Path(images.root).resolve())}, index)
    partial.unlink()
    for s in state['shardlist']:
        rows_file(out, s['url']).unlink()
    print(f"{split}: {len(images)} images in {len(state['shardlist'])} shards, {final}")


def main(args):
    source, out = Path(args.source), Path(args.output_dir)
    if not source.is_dir():
        raise UsageError(f"{source} is not a folder; pass an ImageFolder root (train/ and val/ of class folders)")
    out.mkdir(parents=True, exist_ok=True)
    splits = [s for s in args.splits if (source / s).is_dir()] or ['train']  # class folders alone: train
    for split in splits:
        make_split(source, out, split, args.shard_size)


if __name__ == '__main__':
    misc.run_main(main, get_args_parser())
