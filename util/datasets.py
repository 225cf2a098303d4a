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
from torchvision.datasets.folder import IMG_EXTENSIONS

from util.errors import UsageError
from util.preemption import loader_worker_init
from util.pipeline import PROBE_SCALE, CropSamples, Readable, SeededSamples, collate, load_rgb, read_bytes
from util.shards import ShardImages, is_shards

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


def resolve_split(data_path, split):
    """`<data_path>/<split>` if it exists; for train, a folder of class folders is accepted directly."""
    if data_path is None:
        return embedded_dataset_root() / split
    root = Path(data_path)
    if root.is_file():
        raise UsageError(f"--data_path {root} is a file: pass the folder that holds {split}/<class>/<images>, or "
                         f"tar shards (their folder, a <split>.json or a brace pattern of shards)")
    if not root.is_dir():
        raise UsageError(f"--data_path {root} does not exist; pass an ImageFolder root holding "
                         f"{split}/<class>/<images>, or leave --data_path out to use the embedded dataset")
    if (root / split).is_dir():
        return root / split
    if split == 'train':
        return root
    raise UsageError(f"--data_path {root} has no {split}/ folder of class folders")


def image_folder(data_path, split, transform, shard_cache=None):
    """The images of `split`: tar shards made by tools.make_shards (util/shards.py) when --data_path names them,
    else an ImageFolder with clear errors: missing folder, no class folders, a class folder without images.
    Files without an image extension are ignored (torchvision's rule); unreadable images fail when loaded."""
    if is_shards(data_path):
        return ShardImages(data_path, split, transform, shard_cache)
    path = resolve_split(data_path, split)
    classes = sorted(d for d in path.iterdir() if d.is_dir())
    if not classes:
        raise UsageError(f"no class folders under {path}; it must hold one folder per class with images inside")
    for d in classes:
        if not any(f.suffix.lower() in IMG_EXTENSIONS for f in d.rglob('*') if f.is_file()):
            raise UsageError(f"class folder {d} has no images ({', '.join(IMG_EXTENSIONS)}); "
                             f"remove it or add its images")
    return ImageFiles(str(path), transform=transform, loader=load_rgb)


class ImageFiles(ImageFolder):
    """torchvision's ImageFolder, whose images the uint8 pipeline also reads as bytes by index (as it reads
    util.shards.ShardImages)."""

    def read_bytes(self, index):
        return read_bytes(self.samples[index][0])

    def name(self, index):
        return self.samples[index][0]


class EpochSampler(torch.utils.data.Sampler):
    """(epoch, index) keys of this process's share of a permutation that depends on seed and epoch only;
    an epoch can start part-way, so a resumed run sees the same batches. The permutation is cut into
    micro-batches of `batch` samples, and micro-batch m goes to process m % world: with the same per-process
    batch, a micro-batch holds the same samples on any number of processes, and an optimizer step of
    accum_iter x world micro-batches the same images (what a run resumed on other GPUs relies on:
    util/checkpoint.py). Each process gets the same number of whole micro-batches (the tail of the permutation
    is dropped). With `repeats` N (repeated augmentation, N views per image), an epoch takes the first
    len // N images of its permutation, so that it still holds about len samples."""

    def __init__(self, n, rank=0, world=1, seed=0, shuffle=True, repeats=1, batch=1):
        self.n, self.rank, self.world, self.seed, self.shuffle = n // repeats, rank, world, seed, shuffle
        self.population, self.batch = n, batch
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch, start=0):
        """`start`: images of this process already consumed in this epoch."""
        self.epoch, self.start = epoch, start

    def __iter__(self):
        if self.shuffle:
            order = torch.randperm(self.population, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(self.population)
        micro_batches = order[:self.per_process() * self.world].view(-1, self.batch)
        mine = micro_batches[self.rank::self.world].flatten()
        return ((self.epoch, int(i)) for i in mine[self.start:])

    def per_process(self):
        return self.n // (self.world * self.batch) * self.batch

    def __len__(self):
        return self.per_process() - self.start


def eval_crop_pct(input_size):
    """facebookresearch/mae's evaluation crop: 224/256 up to 224 px, 1.0 above (resize to the input size)."""
    return 224 / 256 if input_size <= 224 else 1.0


def eval_transform(input_size):
    """facebookresearch/mae's evaluation: resize the short side to input_size / crop_pct (bicubic), centre crop."""
    crop_pct = eval_crop_pct(input_size)
    return T.Compose([
        T.Resize(int(input_size / crop_pct), interpolation=T.InterpolationMode.BICUBIC),
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


class ShardSampler(torch.utils.data.Sampler):
    """Every `world`-th sample from `rank` on, without the padding of DistributedSampler, so that
    summed counts over ranks give exactly the single-process accuracy."""

    def __init__(self, n, rank, world):
        self.indices = list(range(rank, n, world))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def loader_rng_and_signals(args):
    """DataLoader arguments of every training loader. Its own generator: a loader draws its workers' base seed
    (unused: samples are seeded by (seed, epoch, index)) whenever an iterator starts, and a draw from the global
    RNG would shift drop path and mixup after a resume. Workers ignore the stop signals (util/preemption.py)."""
    return dict(generator=torch.Generator().manual_seed(args.seed), worker_init_fn=loader_worker_init(args))


def build_pretrain_loader(args, noise_len, keep=None):
    """(images, loader, sampler) of pre-training: the ImageFolder, seeded crops (util/pipeline.py) through
    --loader (and --repeated_aug views of each image, --masks_per_image masks of each view), and the epoch sampler
    that makes a resume exact. `keep`: the units a mask keeps, for --mask_sets complementary."""
    from torch.utils.data import DataLoader
    images = image_folder(args.data_path, 'train', None, args.shard_cache)
    views, masks = args.repeated_aug, args.masks_per_image
    per_image = views * masks  # masked samples of one image in a batch
    sampler = EpochSampler(len(images), args.rank, args.world_size, args.seed, repeats=per_image,
                           batch=args.batch_size // per_image)
    dataset = CropSamples(images, args.seed, args.input_size, noise_len=noise_len, skip_bad=args.skip_bad_images,
                          loader=args.loader, views=views, masks=masks,
                          complementary_keep=keep if args.mask_sets == 'complementary' else None)
    # a batch of batch_size masked samples: batch_size / (views x masks) images, each in `views` crops masked
    # `masks` times
    loader = DataLoader(dataset, sampler=sampler, batch_size=args.batch_size // per_image, num_workers=args.num_workers,
                        pin_memory=args.pin_mem and args.device.startswith('cuda'), drop_last=True,
                        collate_fn=collate, persistent_workers=args.num_workers > 0, **loader_rng_and_signals(args))
    return images, loader, sampler


def build_classification_loaders(args, train_tf, val_tf):
    """Train/val loaders of <data_path>/{train,val} (or the embedded set); sets args.nb_classes.
    train_tf None: facebookresearch/mae's linear-probe augmentation (its clamped random-resized crop and a
    flip) through the uint8 pipeline of --loader."""
    from torch.utils.data import DataLoader, SequentialSampler
    train = image_folder(args.data_path, 'train', train_tf, args.shard_cache)
    val = image_folder(args.data_path, 'val', val_tf, args.shard_cache)
    n_train = len(train)
    if train.classes != val.classes:
        raise UsageError(f"train/ and val/ under {args.data_path} have different class folders")
    found = len(train.classes)
    if args.nb_classes is None:
        args.nb_classes = found
    elif args.nb_classes < found:
        raise UsageError(f"--nb_classes {args.nb_classes} is smaller than the {found} classes found in "
                         f"{train.root}; pass --nb_classes {found} or more")
    print(f'train: {train.root} {len(train)} images; val: {val.root} {len(val)} images; {found} classes')
    train_sampler = EpochSampler(n_train, args.rank, args.world_size, args.seed, batch=args.batch_size)
    if train_tf is None:
        train = CropSamples(train, args.seed, args.input_size, PROBE_SCALE, clamp=True, skip_bad=args.skip_bad_images,
                            loader=args.loader)
    else:
        train = SeededSamples(train, args.seed, skip_bad=args.skip_bad_images)
    val_sampler = ShardSampler(len(val), args.rank, args.world_size) if args.dist_eval else SequentialSampler(val)
    common = dict(num_workers=args.num_workers, pin_memory=args.pin_mem and args.device.startswith('cuda'),
                  persistent_workers=args.num_workers > 0, **loader_rng_and_signals(args))
    train_loader = DataLoader(train, sampler=train_sampler, batch_size=args.batch_size, drop_last=True,
                              collate_fn=collate, **common)
    val_loader = DataLoader(Readable(val, args.skip_bad_images), sampler=val_sampler, batch_size=args.batch_size,
                            collate_fn=collate, **common)
    if not args.eval and len(train_loader) // args.accum_iter == 0:  # --eval trains nothing
        raise UsageError(f"{n_train} training images give no full step at --batch_size {args.batch_size}")
    return train_loader, val_loader, train_sampler
