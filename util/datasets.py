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
import torch
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


def eval_transform(input_size):
    """Resize to input_size / 0.875 (224 -> 256), bicubic, then centre crop (MAE / DeiT evaluation)."""
    return T.Compose([
        T.Resize(int(input_size / 0.875), interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(input_size),
        T.ToTensor(),
        T.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)])


def finetune_transform(args):
    """timm's training pipeline: RandAugment, colour jitter, random erasing as set by the flags."""
    from timm.data import create_transform
    return create_transform(args.input_size, is_training=True, color_jitter=args.color_jitter,
                            auto_augment=args.aa, interpolation='bicubic', re_prob=args.reprob,
                            re_mode=args.remode, re_count=args.recount, mean=IMAGENET_DEFAULT_MEAN,
                            std=IMAGENET_DEFAULT_STD)


def linprobe_transform(input_size):
    """MAE linear probing: random resized crop and flip only."""
    return T.Compose([
        T.RandomResizedCrop(input_size, interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)])


class ShardSampler(torch.utils.data.Sampler):
    """Every `world`-th sample from `rank` on, without the padding of DistributedSampler, so that
    summed counts over ranks give exactly the single-process accuracy."""

    def __init__(self, n, rank, world):
        self.indices = list(range(rank, n, world))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def build_classification_loaders(args, train_tf, val_tf):
    """Train/val loaders of <data_path>/{train,val} (or the embedded set); sets args.nb_classes."""
    from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, SequentialSampler
    train, val = image_folder(args.data_path, 'train', train_tf), image_folder(args.data_path, 'val', val_tf)
    if train.classes != val.classes:
        raise SystemExit(f"error: train/ and val/ under {args.data_path} have different class folders")
    found = len(train.classes)
    if args.nb_classes is None:
        args.nb_classes = found
    elif args.nb_classes < found:
        raise SystemExit(f"error: --nb_classes {args.nb_classes} is smaller than the {found} classes found in "
                         f"{train.root}; pass --nb_classes {found} or more")
    print(f'train: {train.root} {len(train)} images; val: {val.root} {len(val)} images; {found} classes')
    if args.distributed:
        train_sampler = DistributedSampler(train, args.world_size, args.rank, shuffle=True, seed=args.seed)
    else:
        train_sampler = RandomSampler(train)
    val_sampler = ShardSampler(len(val), args.rank, args.world_size) if args.dist_eval else SequentialSampler(val)
    common = dict(num_workers=args.num_workers, pin_memory=args.pin_mem and args.device.startswith('cuda'),
                  persistent_workers=args.num_workers > 0)
    train_loader = DataLoader(train, sampler=train_sampler, batch_size=args.batch_size, drop_last=True, **common)
    val_loader = DataLoader(val, sampler=val_sampler, batch_size=args.batch_size, **common)
    if len(train_loader) // args.accum_iter == 0:
        raise SystemExit(f"error: {len(train)} training images give no full step at --batch_size {args.batch_size}")
    return train_loader, val_loader, train_sampler
