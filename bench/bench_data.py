"""Input-pipeline throughput: the pre-training loader exactly as run_pretrain.py builds it, against
facebookresearch/mae's pre-training pipeline (PIL loader, RandomResizedCrop, flip, ToTensor, Normalize,
float32 collate), on the same files, alternating in one process.

  python bench/bench_data.py --make_jpegs data/jpegs                 # ImageNet-like JPEGs, offline
  python bench/bench_data.py --data_path data/jpegs --num_workers 0 --baseline   # images/s per core
  python bench/bench_data.py --data_path data/jpegs --loader device --device cuda --json
  python bench/bench_data.py --data_path data/jpegs --also_loaders roi      # crop-box decode beside the full one
  python -m tools.make_shards data/jpegs data/jpeg-shards
  python bench/bench_data.py --data_path data/jpegs --shards data/jpeg-shards --count_opens 1000

The host time runs from asking the loader for a batch to holding it (after warm-up batches, which
include worker start-up). What a batch then costs on the device (the copy and normalisation, and for
--loader device the decode, crop and resize) is timed apart. Images/s per core divides by the worker
processes (or 1 with --num_workers 0, where the main process loads and torch uses one thread).
"""
import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import util.misc as misc  # noqa: E402
from util import pipeline  # noqa: E402
from util.datasets import EMBEDDED_PHOTOS, _load_photo, build_pretrain_loader, image_folder  # noqa: E402

JPEG_SIZE, JPEG_QUALITY = (500, 375), 90  # ImageNet's typical photo: about 500x375, quality 90
NOISE_SIGMA = 16  # grain that brings the smooth, upscaled crops to ImageNet's typical file size (about 95 KB)


def get_args_parser():
    p = argparse.ArgumentParser('input-pipeline throughput')
    p.add_argument('--data_path', default=None, help='ImageFolder root (default: the embedded dataset)')
    p.add_argument('--input_size', type=int, default=224)
    p.add_argument('--patch_size', type=int, default=16, help='sets the mask-noise length')
    p.add_argument('--batch_size', type=int, default=64)
    p.add_argument('--num_workers', type=int, default=0)
    p.add_argument('--batches', type=int, default=20, help='timed batches per round')
    p.add_argument('--warmup', type=int, default=2, help='untimed batches per round (worker start-up included)')
    p.add_argument('--rounds', type=int, default=3, help='rounds, alternating the pipelines')
    p.add_argument('--loader', choices=pipeline.LOADERS, default='fast')
    p.add_argument('--also_loaders', nargs='+', choices=pipeline.LOADERS, default=[],
                   help='more loader paths, alternated with --loader in the same rounds')
    p.add_argument('--repeated_aug', type=int, nargs='+', default=[1],
                   help='views per decoded image (run_pretrain.py --repeated_aug); several values alternate')
    p.add_argument('--masks_per_image', type=int, nargs='+', default=[1],
                   help='masks per crop (run_pretrain.py --masks_per_image); several values alternate')
    p.add_argument('--baseline', action='store_true', help="also time facebookresearch/mae's pipeline")
    p.add_argument('--device', default='cpu', help='where batches go after loading')
    p.add_argument('--json', action='store_true', help='print one JSON line')
    p.add_argument('--profile', type=int, default=0, metavar='N',
                   help="ms per image of each stage of --loader fast and of facebookresearch/mae's, over N images")
    p.add_argument('--make_jpegs', default=None, metavar='DIR',
                   help='write ImageNet-like JPEGs (500x375, quality 90, about 95 KB) cut from the embedded photos, then exit')
    p.add_argument('--per_class', type=int, default=100, help='--make_jpegs: images per class')
    p.add_argument('--shards', default=None, metavar='DIR',
                   help='also time the loader on these shards of --data_path (tools.make_shards), in the same rounds')
    p.add_argument('--count_opens', type=int, default=0, metavar='N',
                   help='count the files opened to make the image set and read N images, folder and --shards')
    return p


OPENS = {'counting': False, 'count': 0}


def count_open(event, args):
    if event == 'open' and OPENS['counting']:  # open() and os.open
        OPENS['count'] += 1


def count_opens(data_path, n, size, patch_size):
    """Files opened, in this process, to make the image set (folder or shards) and read n images through the
    pre-training dataset: what a shared filesystem pays for."""
    OPENS.update(counting=True, count=0)
    images = image_folder(data_path, 'train', None)
    dataset = pipeline.CropSamples(images, 0, size, noise_len=(size // patch_size) ** 2)
    for i in range(n):
        dataset[(0, i % len(images))]
    OPENS['counting'] = False
    return OPENS['count']


def make_jpegs(out, per_class, seed=0):
    """Random crops of the embedded photographs at 500x375 (or 375x500) with Gaussian grain, JPEG quality 90,
    one class per photo."""
    rng = np.random.default_rng(seed)
    for label, name in enumerate(EMBEDDED_PHOTOS):
        photo = _load_photo(name)
        folder = Path(out) / 'train' / f'{label}_{name}'
        folder.mkdir(parents=True, exist_ok=True)
        h, w = photo.shape[:2]
        for i in range(per_class):
            size = JPEG_SIZE if rng.random() < 0.75 else JPEG_SIZE[::-1]
            cw = int(min(w, h * size[0] / size[1]) * rng.uniform(0.6, 1.0))
            ch = int(cw * size[1] / size[0])
            x, y = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
            img = np.asarray(Image.fromarray(photo[y:y + ch, x:x + cw]).resize(size, Image.BICUBIC), np.float32)
            img = np.clip(img + rng.normal(0, NOISE_SIGMA, img.shape), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(folder / f'{i:04d}.JPEG', quality=JPEG_QUALITY)
    files = list(Path(out).rglob('*.JPEG'))
    kb = np.mean([f.stat().st_size for f in files]) / 1024
    print(f'wrote {len(files)} JPEGs ({kb:.0f} KB on average) to {out}/train')


def repeat_folder(root, times, out):
    """An ImageFolder of `root`'s images, each linked `times` times (the same files, more samples per epoch)."""
    if times <= 1:
        return root
    linked = Path(out) / f'{Path(root).name}_x{times}'
    if not linked.is_dir():
        tmp = linked.with_name(linked.name + '.tmp')
        shutil.rmtree(tmp, ignore_errors=True)  # left by a killed run
        for cls in sorted(d for d in Path(root).iterdir() if d.is_dir()):
            (tmp / cls.name).mkdir(parents=True, exist_ok=True)
            for f in cls.iterdir():
                for k in range(times):
                    (tmp / cls.name / f'{k}_{f.name}').symlink_to(f.resolve())
        tmp.rename(linked)
    return linked


def mae_loader(args, root):
    """facebookresearch/mae's main_pretrain.py pipeline, written from its definition."""
    transform = T.Compose([
        T.RandomResizedCrop(args.input_size, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)])
    return DataLoader(ImageFolder(str(root), transform=transform), batch_size=args.batch_size, shuffle=True,
                      num_workers=args.num_workers, pin_memory=args.device.startswith('cuda'), drop_last=True,
                      persistent_workers=False)


def our_loader(args, repeated_aug=1, loader=None, data_path=None, masks=1):
    run_args = argparse.Namespace(data_path=data_path or args.data_path, shard_cache=None, rank=0, world_size=1, seed=0, input_size=args.input_size,
                                  skip_bad_images=False, loader=loader or args.loader, batch_size=args.batch_size,
                                  repeated_aug=repeated_aug, masks_per_image=masks, mask_sets='random',
                                  num_workers=args.num_workers, pin_mem=True, device=args.device,
                                  stop_signals='none')
    images, loader, sampler = build_pretrain_loader(run_args, (args.input_size // args.patch_size) ** 2)
    return images.root, loader, sampler


def endless(loader, epoch_sampler, epoch):
    """The loader's batches, epoch after epoch (a small folder can serve a long round)."""
    while True:
        if epoch_sampler is not None:
            epoch_sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def time_round(loader, args, device, epoch_sampler=None, epoch=0):
    """(host seconds per batch, device seconds per batch, last batch on the device, its host form) over a round."""
    batches = endless(loader, epoch_sampler, epoch * 1000)
    for _ in range(args.warmup):
        next(batches)
    host, moved = 0., []
    for _ in range(args.batches):
        start = time.perf_counter()
        images = next(batches)[0]
        host += time.perf_counter() - start
        moved.append(images)
    if device.type == 'cuda':
        torch.cuda.synchronize()
    start = time.perf_counter()
    for images in moved:
        out = pipeline.to_device(images, device, args.input_size)
    if device.type == 'cuda':
        torch.cuda.synchronize()
    dev = time.perf_counter() - start
    batches.close()  # stops this round's workers before the other pipeline is timed
    return host / args.batches, dev / args.batches, out, moved[-1]


def profile_stages(root, n, size):
    """Milliseconds per image of each stage, one thread, the same n files for both pipelines."""
    paths = [p for _, p in zip(range(n), sorted(Path(root).rglob('*.JPEG')))]
    rng = np.random.default_rng(0)
    ms = {}

    def timed(name, fn, *inputs):
        start = time.perf_counter()
        out = [fn(*x) for x in zip(*inputs)]
        ms[name] = 1e3 * (time.perf_counter() - start) / len(paths)
        return out

    data = timed('read file', pipeline.read_bytes, paths)
    imgs = timed('decode (torchvision.io)', pipeline.decode_rgb, data, paths)
    boxes = timed('crop box and flip draw', lambda i: (pipeline.random_resized_crop_box(
        pipeline.sample_rng(0, 0, 1), i.shape[2], i.shape[1]), rng.random() < 0.5), imgs)
    crops = timed('crop + uint8 bicubic resize', lambda i, b: pipeline.resize_crop(i, b[0], size, False), imgs, boxes)
    timed('flip', lambda c: c.flip(-1), crops)
    start = time.perf_counter()
    torch.stack(crops)
    ms['collate (uint8 stack)'] = 1e3 * (time.perf_counter() - start) / len(paths)
    pil = timed('mae: PIL open + decode + RGB', lambda p: Image.open(p).convert('RGB'), paths)
    crop = T.RandomResizedCrop(size, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC)
    pil = timed('mae: PIL crop + bicubic resize', crop, pil)
    tensors = timed('mae: ToTensor', T.ToTensor(), pil)
    timed('mae: Normalize', T.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD), tensors)
    start = time.perf_counter()
    torch.stack(tensors)
    ms['mae: collate (float32 stack)'] = 1e3 * (time.perf_counter() - start) / len(paths)
    return ms


def main(args):
    if args.profile:
        torch.set_num_threads(1)
        for name, v in profile_stages(args.data_path, args.profile, args.input_size).items():
            print(f'{name}: {v:.3f} ms/image')
        return
    if args.make_jpegs:
        make_jpegs(args.make_jpegs, args.per_class)
        return
    if args.num_workers == 0:
        torch.set_num_threads(1)  # one core: the main process loads
    device = torch.device(args.device)
    pipelines = {}
    decodes = {}  # images decoded per masked sample of each pipeline
    for n in args.repeated_aug:
        for k in args.masks_per_image:
            root, loader, sampler = our_loader(args, n, masks=k)
            name = f'this project (--loader {args.loader}' + (f', --repeated_aug {n}' if n > 1 else '') + \
                (f', --masks_per_image {k}' if k > 1 else '') + ')'
            pipelines[name], decodes[name] = (loader, sampler), 1 / (n * k)
    ours = next(iter(pipelines.values()))[0]
    for name in args.also_loaders:
        pipelines[f'this project (--loader {name})'] = our_loader(args, loader=name)[1:]
    if args.shards:
        pipelines[f'this project (--loader {args.loader}, shards)'] = our_loader(args, data_path=args.shards)[1:]
    if args.baseline:
        pipelines['facebookresearch/mae'] = (mae_loader(args, root), None)
    times = {name: ([], []) for name in pipelines}
    for r in range(args.rounds):
        for name, (loader, s) in pipelines.items():
            host, dev, out, on_host = time_round(loader, args, device, s, epoch=r)
            if loader is ours:
                host_dtype = 'encoded' if isinstance(on_host, pipeline.EncodedBatch) else str(on_host.dtype)[6:]
            times[name][0].append(host)
            times[name][1].append(dev)
    cores = max(1, args.num_workers)
    rows = {}
    for name, (host, dev) in times.items():
        rate = args.batch_size / statistics.median(host)
        rows[name] = {'img_per_s': rate, 'img_per_s_per_core': rate / cores,  # samples (views, masks) per second
                      'img_per_s_range': [args.batch_size / max(host), args.batch_size / min(host)],
                      'device_ms_per_batch': 1e3 * statistics.median(dev),
                      'decodes_per_sample': decodes.get(name, 1.)}
    first = next(iter(rows))
    result = {**rows[first], 'loader': args.loader, 'repeated_aug': args.repeated_aug[0],
              'num_workers': args.num_workers, 'batch_size': args.batch_size,
              'batch_shape': list(out.shape), 'dtype': host_dtype, 'device': str(device), 'data_path': str(root),
              'rounds': args.rounds, 'batches': args.batches}
    if args.baseline:
        base = rows['facebookresearch/mae']
        result.update(baseline_img_per_s=base['img_per_s'], baseline_device_ms_per_batch=base['device_ms_per_batch'],
                      speedup=rows[first]['img_per_s'] / base['img_per_s'])
    if len(rows) > 1:
        result['pipelines'] = rows
    if args.count_opens:
        sys.addaudithook(count_open)
        result['opens_per_1000_images'] = {
            name: 1000 * count_opens(path, args.count_opens, args.input_size, args.patch_size) / args.count_opens
            for name, path in (('folder', args.data_path), ('shards', args.shards)) if path}
    if args.json:
        print(json.dumps(result))
        return
    print(f'{root}, batch {args.batch_size}, {args.num_workers} workers, {args.rounds} rounds of {args.batches} '
          f'batches, device {device}')
    for name, row in rows.items():
        lo, hi = row['img_per_s_range']
        print(f"{name}: {row['img_per_s']:.0f} samples/s [{lo:.0f}-{hi:.0f}], "
              f"{row['img_per_s_per_core']:.0f} per core, "
              f"{row['decodes_per_sample']:.2f} decodes per sample; device {row['device_ms_per_batch']:.1f} ms/batch")
    if args.baseline:
        print(f"speed-up over facebookresearch/mae: {result['speedup']:.2f}x")
    if args.count_opens:
        print('files opened per 1000 images (making the image set included): ' + ', '.join(
            f'{name} {v:.1f}' for name, v in result['opens_per_1000_images'].items()))


if __name__ == '__main__':
    misc.run_main(main, get_args_parser())
