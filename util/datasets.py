"""Datasets: ImageFolder roots, MAE's pre-training augmentation, and the embedded default set.

The embedded set is made offline and deterministically from photographs that
ship inside scikit-image's wheel: square crops labelled by source photograph,
train crops from one half of each photo and validation crops from the other
half, so the two splits share no pixels.
"""
import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import default_collate
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

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


class BadImageError(RuntimeError):
    pass


def load_rgb(path):
    """PIL loader that names the file when it is not a readable image."""
    try:
        with open(path, 'rb') as f:
            return Image.open(f).convert('RGB')
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise BadImageError(f"cannot read image {path} ({type(e).__name__}: {e})") from None


def bad_image_message(error):
    """The 'cannot read image ...' line of a BadImageError, also when re-raised from a loader worker."""
    lines = [line for line in str(error).splitlines() if 'cannot read image' in line]
    return lines[-1].split('BadImageError: ')[-1].strip() if lines else str(error)


def image_folder(data_path, split, transform):
    """ImageFolder with clear errors: missing folder, no class folders, a class folder without images.
    Files without an image extension are ignored (torchvision's rule); unreadable images fail when loaded."""
    path = resolve_split(data_path, split)
    classes = sorted(d for d in path.iterdir() if d.is_dir())
    if not classes:
        raise SystemExit(f"error: no class folders under {path}; it must hold one folder per class with images inside")
    for d in classes:
        if not any(f.suffix.lower() in IMG_EXTENSIONS for f in d.rglob('*') if f.is_file()):
            raise SystemExit(f"error: class folder {d} has no images ({', '.join(IMG_EXTENSIONS)}); "
                             f"remove it or add its images")
    return ImageFolder(str(path), transform=transform, loader=load_rgb)


def sample_seed(seed, epoch, index):
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


class SeededSamples(torch.utils.data.Dataset):
    """Each sample is loaded and augmented under an RNG seeded by (seed, epoch, index), and with
    `noise_len` it also draws its mask noise there. Augmentations and masks then depend on neither
    the number of workers nor of processes nor on where a run was resumed. Keys come from EpochSampler.
    With `skip_bad`, an unreadable image gives None (dropped by `collate`) instead of an error."""

    def __init__(self, dataset, seed, noise_len=0, skip_bad=False):
        self.dataset, self.seed, self.noise_len, self.skip_bad = dataset, seed, noise_len, skip_bad

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                s = sample_seed(self.seed, epoch, index)
                torch.manual_seed(s)
                random.seed(s)
                np.random.seed(s % 2 ** 32)
                try:
                    img, target = self.dataset[index]
                except BadImageError:
                    if self.skip_bad:
                        return None
                    raise
                return img, (torch.rand(self.noise_len) if self.noise_len else target)
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def collate(batch):
    """default_collate of the readable samples, plus how many were skipped: (images, targets, n_bad)."""
    kept = [b for b in batch if b is not None]
    if not kept:
        raise BadImageError('cannot read image: every image of a batch failed to load (see --skip_bad_images)')
    images, targets = default_collate(kept)
    return images, targets, len(batch) - len(kept)


class EpochSampler(torch.utils.data.Sampler):
    """(epoch, index) keys of this process's share of a permutation that depends on seed and epoch only;
    an epoch can start part-way, so a resumed run sees the same batches. Each process gets
    len // world samples (the tail of the permutation is dropped), so all take the same number of steps."""

    def __init__(self, n, rank=0, world=1, seed=0, shuffle=True):
        self.n, self.rank, self.world, self.seed, self.shuffle = n, rank, world, seed, shuffle
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch, start=0):
        """`start`: samples of this process already consumed in this epoch."""
        self.epoch, self.start = epoch, start

    def __iter__(self):
        if self.shuffle:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(self.n)
        mine = order[:self.n // self.world * self.world][self.rank::self.world]
        return ((self.epoch, int(i)) for i in mine[self.start:])

    def __len__(self):
        return self.n // self.world - self.start


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
    from torch.utils.data import DataLoader, SequentialSampler
    train, val = image_folder(args.data_path, 'train', train_tf), image_folder(args.data_path, 'val', val_tf)
    n_train = len(train)
    if train.classes != val.classes:
        raise SystemExit(f"error: train/ and val/ under {args.data_path} have different class folders")
    found = len(train.classes)
    if args.nb_classes is None:
        args.nb_classes = found
    elif args.nb_classes < found:
        raise SystemExit(f"error: --nb_classes {args.nb_classes} is smaller than the {found} classes found in "
                         f"{train.root}; pass --nb_classes {found} or more")
    print(f'train: {train.root} {len(train)} images; val: {val.root} {len(val)} images; {found} classes')
    train_sampler = EpochSampler(n_train, args.rank, args.world_size, args.seed)
    train = SeededSamples(train, args.seed, skip_bad=args.skip_bad_images)
    val_sampler = ShardSampler(len(val), args.rank, args.world_size) if args.dist_eval else SequentialSampler(val)
    common = dict(num_workers=args.num_workers, pin_memory=args.pin_mem and args.device.startswith('cuda'),
                  persistent_workers=args.num_workers > 0)
    train_loader = DataLoader(train, sampler=train_sampler, batch_size=args.batch_size, drop_last=True,
                              collate_fn=collate, **common)
    val_loader = DataLoader(val, sampler=val_sampler, batch_size=args.batch_size, **common)
    if len(train_loader) // args.accum_iter == 0:
        raise SystemExit(f"error: {n_train} training images give no full step at --batch_size {args.batch_size}")
    return train_loader, val_loader, train_sampler
