"""How fast tools.index_shards indexes existing shards: a set in timm/imagenet-1k-wds's layout (<key>.jpg of
ImageNet-like JPEGs, <key>.cls, <key>.json; about 1 GB per shard) is written once, then indexed from the page
cache (a warm local disk), a few rounds. Two rates of the shards' bytes: over the scan (the tool's own progress
line) and over the wall time of the whole command (its Python start-up and imports included).

  python bench/bench_index_shards.py --set data/wds_bench --json results/index_shards_cpu/index_shards.json
"""
import argparse
import io
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.bench_data import make_jpegs  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def get_args_parser():
    p = argparse.ArgumentParser('tools.index_shards throughput')
    p.add_argument('--set', required=True, help='folder of the shard set (written when absent)')
    p.add_argument('--shards', type=int, default=4)
    p.add_argument('--per_shard', type=int, default=10000, help='samples per shard (about 1 GB at ImageNet sizes)')
    p.add_argument('--rounds', type=int, default=3)
    p.add_argument('--json', help='write the result here')
    return p


def write_set(folder, shards, per_shard):
    """The shards, their JPEGs cycled from 200 ImageNet-like ones (the index reads headers, not pixels)."""
    jpegs = folder / 'jpegs'
    make_jpegs(jpegs, 20)
    files = sorted(jpegs.rglob('*.JPEG'))
    for k in range(shards):
        with tarfile.open(folder / f'imagenet1k-train-{k:04d}.tar', 'w', format=tarfile.USTAR_FORMAT) as tar:
            for i in range(per_shard):
                key, src = f'{k:04d}_{i:06d}', files[(k * per_shard + i) % len(files)]
                label = int(src.parent.name.split('_')[0])
                for ext, data in (('cls', str(label).encode()), ('jpg', src.read_bytes()),
                                  ('json', json.dumps({'label': label}).encode())):
                    info = tarfile.TarInfo(f'{key}.{ext}')
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def main(args):
    folder = Path(args.set)
    folder.mkdir(parents=True, exist_ok=True)
    tars = sorted(folder.glob('*.tar'))
    if len(tars) != args.shards:
        write_set(folder, args.shards, args.per_shard)
        tars = sorted(folder.glob('*.tar'))
    total = sum(t.stat().st_size for t in tars)
    for t in tars:  # into the page cache
        with open(t, 'rb') as f:
            while f.read(1 << 24):
                pass
    seconds, scan_rates = [], []
    for _ in range(args.rounds):
        start = time.perf_counter()
        out = subprocess.run([sys.executable, '-m', 'tools.index_shards', str(folder), '--split', 'train'], cwd=REPO,
                             check=True, capture_output=True, text=True).stdout
        seconds.append(time.perf_counter() - start)
        scan_rates.append(float(re.findall(r'scanned at (\d+) MB/s', out)[-1]))
    samples = len(np.load(folder / 'train-index.npy'))
    result = {'shards': len(tars), 'bytes': total, 'samples': samples, 'seconds': seconds,
              'scan_mb_per_s': scan_rates, 'scan_mb_per_s_median': statistics.median(scan_rates),
              'wall_mb_per_s_median': total / statistics.median(seconds) / 1e6,
              'machine': f'{platform.processor() or platform.machine()}, {os.cpu_count()} cores',
              'date': time.strftime('%Y-%m-%d'),
              'command': 'python bench/bench_index_shards.py ' + ' '.join(sys.argv[1:])}
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + '\n')


if __name__ == '__main__':
    main(get_args_parser().parse_args())
