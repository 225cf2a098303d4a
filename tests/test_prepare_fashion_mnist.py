import gzip
import struct

import numpy as np
from PIL import Image

from conftest import run_script


def write_idx(source, prefix, images, labels):
    """The idx format of the Debian package: big-endian magic and sizes, then raw uint8."""
    with gzip.open(source / f'{prefix}-images-idx3-ubyte.gz', 'wb') as f:
        f.write(struct.pack('>IIII', 2051, len(images), 28, 28) + images.tobytes())
    with gzip.open(source / f'{prefix}-labels-idx1-ubyte.gz', 'wb') as f:
        f.write(struct.pack('>II', 2049, len(labels)) + labels.tobytes())


def fake_source(tmp_path, per_class=3):
    rng = np.random.default_rng(0)
    source = tmp_path / 'idx'
    source.mkdir()
    splits = {}
    for prefix in ('train', 't10k'):
        labels = np.tile(np.arange(10, dtype=np.uint8), per_class)
        images = rng.integers(1, 256, size=(len(labels), 28, 28), dtype=np.uint8)
        write_idx(source, prefix, images, labels)
        splits[prefix] = images
    return source, splits


def test_writes_padded_rgb_image_folder_with_per_class_subset(tmp_path):
    source, splits = fake_source(tmp_path)
    out = tmp_path / 'fm'
    run_script('-m', 'tools.prepare_fashion_mnist', '--source', source, '--output_dir', out, '--train_per_class', 2)
    train = sorted((out / 'train').rglob('*.png'))
    assert len(train) == 20 and len(list((out / 'val').rglob('*.png'))) == 30
    assert len(list((out / 'train' / 'Ankle_boot').iterdir())) == 2
    # image 9 of the train file has label 9 (Ankle_boot): padded by 2 zero pixels, grey repeated to RGB
    pixels = np.asarray(Image.open(out / 'train' / 'Ankle_boot' / '00009.png'))
    assert pixels.shape == (32, 32, 3) and (pixels[0] == 0).all() and (pixels[:, -2:] == 0).all()
    assert (pixels[2:30, 2:30, 1] == splits['train'][9]).all() and (pixels[..., 0] == pixels[..., 2]).all()


def test_missing_and_truncated_files_are_clear_errors(tmp_path):
    proc = run_script('-m', 'tools.prepare_fashion_mnist', '--source', tmp_path / 'nowhere', '--output_dir',
                      tmp_path / 'fm', check=False)
    assert proc.returncode == 1 and 'apt-get install dataset-fashion-mnist' in proc.stderr
    source, _ = fake_source(tmp_path)
    with gzip.open(source / 't10k-images-idx3-ubyte.gz', 'rb') as f:
        data = f.read()
    with gzip.open(source / 't10k-images-idx3-ubyte.gz', 'wb') as f:
        f.write(data[:-100])
    proc = run_script('-m', 'tools.prepare_fashion_mnist', '--source', source, '--output_dir', tmp_path / 'fm',
                      check=False)
    assert proc.returncode == 1 and 'truncated' in proc.stderr
