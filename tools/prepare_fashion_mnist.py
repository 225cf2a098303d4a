"""Write Fashion-MNIST as an ImageFolder (train/ and val/, 32x32 RGB PNGs) for the study and quick ablations.

  apt-get install dataset-fashion-mnist        # Debian's package: the idx files, offline, MIT licence
  python -m tools.prepare_fashion_mnist --output_dir data/fashion_mnist --train_per_class 1000
The 28x28 grey images are padded to 32x32 (so 4 and 8 px patches tile them) and repeated to three
channels; val/ is the official test set. --*_per_class keeps the first N images of each class, in file
order, so a subset is the same on every machine.
"""
import argparse
import gzip
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ['T-shirt_top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag',
           'Ankle_boot']
SPLITS = {'train': 'train', 'val': 't10k'}  # our split name -> idx file prefix


def get_args_parser():
    p = argparse.ArgumentParser('Fashion-MNIST idx files -> ImageFolder')
    p.add_argument('--source', default='/usr/share/datasets/fashion-mnist',
                   help='folder with the four *-idx?-ubyte.gz files')
    p.add_argument('--output_dir', required=True)
    p.add_argument('--train_per_class', type=int, default=0, help='0: all 6,000')
    p.add_argument('--val_per_class', type=int, default=0, help='0: all 1,000')
    return p


def read_idx(path, header_bytes):
    if not path.is_file():
        raise SystemExit(f'error: {path} not found; install the data with `apt-get install '
                         f'dataset-fashion-mnist` or point --source at the folder holding the idx .gz files')
    with gzip.open(path, 'rb') as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=header_bytes)


def load_split(source, prefix):
    labels = read_idx(source / f'{prefix}-labels-idx1-ubyte.gz', 8)
    images = read_idx(source / f'{prefix}-images-idx3-ubyte.gz', 16)
    if images.size != len(labels) * 28 * 28:
        raise SystemExit(f'error: {source}/{prefix}-images-idx3-ubyte.gz holds {images.size} bytes of pixels, '
                         f'expected {len(labels)} 28x28 images; the file is truncated or not Fashion-MNIST')
    return images.reshape(-1, 28, 28), labels


def write_split(images, labels, out, per_class):
    counts = [0] * len(CLASSES)
    for index, (image, label) in enumerate(zip(images, labels)):
        if per_class and counts[label] >= per_class:
            continue
        counts[label] += 1
        folder = out / CLASSES[label]
        folder.mkdir(parents=True, exist_ok=True)
        rgb = np.repeat(np.pad(image, 2)[..., None], 3, axis=2)
        Image.fromarray(rgb).save(folder / f'{index:05d}.png')
    return sum(counts)


def main(args):
    source, out = Path(args.source), Path(args.output_dir)
    for split, prefix in SPLITS.items():
        images, labels = load_split(source, prefix)
        per_class = args.train_per_class if split == 'train' else args.val_per_class
        n = write_split(images, labels, out / split, per_class)
        print(f'{split}: {n} images in {out / split}')


if __name__ == '__main__':
    main(get_args_parser().parse_args())
