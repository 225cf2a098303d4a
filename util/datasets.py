"""Datasets: ImageFolder roots, MAE's pre-training augmentation, and the embedded default set.

The embedded set is made offline and deterministically from photographs that
ship inside scikit-image's wheel: square crops labelled by source photograph,
train crops from one half of each photo and validation crops from the other
half, so the two splits share no pixels.
"""
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torchvision.transforms as T
from PIL import Image
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision.datasets import ImageFolder

EMBEDDED_PHOTOS = ('astronaut', 'chelsea', 'coffee', 'hubble_deep_field', 'immunohistochemistry', 'retina',
                   'rocket', 'stereo_motorcycle', 'camera', 'grass')
EMBEDDED_VERSION = 'skimage-v1'
EMBEDDED_SIZE = 96  # stored crop side; the training transforms resize to --input_size
EMBEDDED_PER_CLASS = {'train': 100, 'val': 30}
DEFAULT_DATA_ROOT = Path(os.environ.get('LOCALMIM_DATA_DIR', Path(__file__).resolve().parents[1] / 'data'))


def _load_photo(name):
    import skimage.data
    img = getattr(skimage.data, name)()
    if isinstance(img, tuple):  # stereo_motorcycle: (left, right, disparity)
        img = img[0]
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return img[..., :3]


def _write_crops(photo, out_dir, count, rng):
    """Random square crops of `photo`, resized to EMBEDDED_SIZE, written as PNG files."""
    h, w = photo.shape[:2]
    out_dir.mkdir(parents=True)
    for i in range(count):
        side = int(rng.uniform(0.3, 0.9) * min(h, w))
        y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        crop = Image.fromarray(photo[y:y + side, x:x + side]).resize((EMBEDDED_SIZE,) * 2, Image.BICUBIC)
        crop.save(out_dir / f'{i:04d}.png')


def embedded_dataset_root(root=DEFAULT_DATA_ROOT):
    """Path of the embedded dataset (train/ and val/ class folders), built on first use."""
    final = Path(root) / f'embedded-{EMBEDDED_VERSION}'
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    print(f"Building the embedded dataset from scikit-image's photographs in {final} (once)")
    rng = np.random.default_rng(0)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix='.embedded-'))
    for label, name in enumerate(EMBEDDED_PHOTOS):
        photo = _load_photo(name)
        axis = 0 if photo.shape[0] > photo.shape[1] else 1  # split along the longer side
        halves = np.array_split(photo, 2, axis=axis)
        for split, half in zip(('train', 'val'), halves):
            _write_crops(half, tmp / split / f'{label}_{name}', EMBEDDED_PER_CLASS[split], rng)
    try:
        tmp.rename(final)  # atomic: a concurrent builder either wins or finds ours
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def pretrain_transform(input_size):
    """MAE: random resized crop (scale 0.2-1, bicubic), horizontal flip, ImageNet normalisation."""
    return T.Compose([
        T.RandomResizedCrop(input_size, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)])


def resolve_split(data_path, split):
    """`<data_path>/<split>` if it exists; for train, a folder of class folders is accepted directly."""
    if data_path is None:
        return embedded_dataset_root() / split
    root = Path(data_path)
    if not root.is_dir():
        raise SystemExit(f"error: --data_path {root} does not exist; pass an ImageFolder root holding "
                         f"{split}/<class>/<images>, or leave --data_path out to use the embedded dataset")
    if (root / split).is_dir():
        return root / split
    if split == 'train':
        return root
    raise SystemExit(f"error: --data_path {root} has no {split}/ folder of class folders")


def image_folder(data_path, split, transform):
    path = resolve_split(data_path, split)
    try:
        return ImageFolder(str(path), transform=transform)
    except FileNotFoundError as e:  # torchvision: no class folder, or no image in any of them
        raise SystemExit(f"error: no images found under {path} ({e}); it must hold one folder per class "
                         f"with image files inside")


def build_pretrain_dataset(args):
    return image_folder(args.data_path, 'train', pretrain_transform(args.input_size))
