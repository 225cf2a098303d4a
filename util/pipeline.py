"""Input pipeline for training: per-sample seeded random-resized crops, uint8 batches normalised on the
device, and an optional batched decode on the training device.

`--loader fast` (default): a worker reads and decodes the image (torchvision.io, libjpeg-turbo), resizes
the crop box with torch's antialiased uint8 bicubic and flips it; batches travel as uint8 (a quarter of
float32's bytes) and are converted and normalised on the device after the copy.
`--loader roi`: as fast, but an RGB JPEG is decoded only inside its crop box, by nvImageCodec's CPU backend
(libjpeg-turbo): the same pixels as cropping the full decode, for less work per image. Other files are decoded
whole, as fast does.
`--loader pil`: the same boxes and flips, resized by PIL's bicubic (facebookresearch/mae's resampling).
`--loader device`: a worker only reads the file and draws the box; JPEGs are decoded in batches on the
training device (nvJPEG on CUDA) and cropped, resized and flipped there. Files that are not RGB or grey
JPEGs (PNG, CMYK, ...) are decoded in the worker instead.
`--loader hw`: as device, but each JPEG's crop box alone is decoded by the GPU's hardware JPEG decoder
(nvImageCodec), which leaves the SMs to training; JPEGs it refuses (progressive, 4:1:1, ...) are decoded by
nvJPEG on the SMs, and both kinds of fallback are counted (HardwareDecoder). On a CPU device the same code
runs on nvImageCodec's CPU backend.
The box, the flip and the mask noise of a sample come from a NumPy Generator seeded by
(seed, epoch, index): they depend neither on workers nor processes nor on where a run was resumed.
"""
import functools
import importlib
import io
import math
import os
import random
import sys
import tempfile
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import default_collate
from torchvision.io import ImageReadMode, decode_image, decode_jpeg

from util import distributed
from util.errors import UsageError

LOADERS = ('fast', 'roi', 'pil', 'device', 'hw')
DEVICE_DECODE = ('device', 'hw')  # the loaders whose workers pass encoded JPEGs on
PRETRAIN_SCALE = (0.2, 1.0)  # facebookresearch/mae's pre-training crop
PROBE_SCALE = (0.08, 1.0)  # torchvision's default, as facebookresearch/mae's linear probe
RATIO = (3 / 4, 4 / 3)


def sample_rng(*key):
    """The generator of one sample's randomness, from (seed, epoch, index[, view]): cheap (no global state is
    saved, set or restored)."""
    return np.random.default_rng(list(key))


def random_resized_crop_box(rng, width, height, scale=PRETRAIN_SCALE, ratio=RATIO, clamp=False):
    """(left, top, w, h) of a random-resized crop. Default: torchvision's RandomResizedCrop (up to 10 draws
    of area and aspect ratio, then a centre crop). clamp=True: facebookresearch/mae's probe crop (one
    draw, the sides clamped to the image)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(1 if clamp else 10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if clamp:
            w, h = min(w, width), min(h, height)
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    if width / height < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif width / height > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


class BadImageError(RuntimeError):
    pass


PIL_ERRORS = (OSError, ValueError, Image.DecompressionBombError)


def bad_image(path, error):
    return BadImageError(f"cannot read image {path} ({type(error).__name__}: {error})")


def bad_image_message(error):
    """The 'cannot read image ...' line of a BadImageError, also when re-raised from a loader worker."""
    lines = [line for line in str(error).splitlines() if 'cannot read image' in line]
    return lines[-1].split('BadImageError: ')[-1].strip() if lines else str(error)


def load_rgb(path):
    """PIL loader that names the file when it is not a readable image."""
    try:
        data = read_bytes(path)
    except OSError as e:
        raise bad_image(path, e) from None
    return load_rgb_bytes(data, path)


def load_rgb_bytes(data, name):
    """A PIL RGB image from a file's bytes; `name` says which file when they are not a readable image."""
    try:
        return Image.open(io.BytesIO(data)).convert('RGB')
    except PIL_ERRORS as e:
        raise bad_image(name, e) from None


def read_bytes(path):
    with open(path, 'rb') as f:
        return f.read()


def decode_rgb(data, path):
    """(3, H, W) uint8 from encoded bytes: torchvision for JPEG/PNG/GIF/WebP, PIL for anything else."""
    try:
        return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError:
        pass
    try:
        img = Image.open(io.BytesIO(data)).convert('RGB')
    except PIL_ERRORS as e:
        raise bad_image(path, e) from None
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous()


# what nvImageCodec's library prints when it imports without the optional JPEG 2000 and TIFF libraries, which
# this project never decodes with
CODEC_NOISE = ('nvjpeg2k', 'nvJPEG2000', 'nvtiff', 'nvTIFF')


def import_without_codec_noise(name):
    """Import `name`, passing on what its C library writes to stderr meanwhile except the lines of CODEC_NOISE
    (six lines that read as errors at the start of every run)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            return importlib.import_module(name)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode(errors='replace').splitlines(keepends=True):
                if not any(word in line for word in CODEC_NOISE):
                    sys.stderr.write(line)


def nvimgcodec():
    """nvImageCodec's Python module, which `--loader roi` and `--loader hw` need. Its GPU decoders load
    libnvjpeg.so.13 by name: torchvision.io, imported above, has loaded its own copy, so no nvJPEG wheel is needed."""
    try:
        return import_without_codec_noise('nvidia.nvimgcodec')
    except ImportError:
        raise UsageError('--loader roi and hw decode with nvImageCodec: pip install nvidia-nvimgcodec-cu13 (CUDA 13 '
                         'builds of torch; -cu12 for CUDA 12), or pick --loader fast or device') from None


_ROI_DECODER = {}


def roi_decoder():
    """This process's CPU decoder, one thread (one per loader worker: a decoder does not survive a fork)."""
    pid = os.getpid()
    if pid not in _ROI_DECODER:
        codec = nvimgcodec()
        _ROI_DECODER.clear()
        _ROI_DECODER[pid] = codec.Decoder(device_id=codec.NVIMGCODEC_DEVICE_CPU_ONLY, max_num_cpu_threads=1,
                                          backends=[codec.Backend(codec.BackendKind.CPU_ONLY)])
    return _ROI_DECODER[pid]


def jpeg_stream(data):
    """nvImageCodec's code stream of an RGB (three-channel) JPEG, whose regions decode alone; None for any
    other file, which is decoded whole."""
    try:
        stream = nvimgcodec().CodeStream(data)
        return stream if stream.codec_name == 'jpeg' and stream.num_channels == 3 else None
    except RuntimeError:  # not an image it can parse (the full decode names the file)
        return None


def decode_params():
    """nvImageCodec's decoding as torchvision's: EXIF orientation not applied (the crop box is drawn on the stored
    pixel grid, as every loader here draws it; nvImageCodec's default would rotate the image)."""
    return nvimgcodec().DecodeParams(apply_exif_orientation=False)


def box_region(stream, box):
    """The crop box (left, top, w, h) of a code stream, as a code stream that decodes alone."""
    left, top, w, h = box
    return stream.get_sub_code_stream(region=nvimgcodec().Region(top, left, top + h, left + w))


def decode_box(stream, box, path):
    """(3, h, w) uint8: the crop box of a JPEG code stream, decoded alone."""
    img = roi_decoder().decode(box_region(stream, box), params=decode_params())
    if img is None:
        raise bad_image(path, RuntimeError('nvImageCodec could not decode it'))
    return as_chw(img, torch.device('cpu'))


def as_chw(img, device):
    """(3, h, w) uint8 view of an nvImageCodec (h, w, 3) image; on CUDA without a copy (DLPack also orders the
    decoder's stream before torch's current one)."""
    if device.type == 'cuda':
        return torch.from_dlpack(img).permute(2, 0, 1)
    return torch.from_numpy(np.asarray(img.cpu())).permute(2, 0, 1)


def crop(img, box):
    """The box (left, top, w, h) of a (C, H, W) image, as a view."""
    left, top, w, h = box
    return img[:, top:top + h, left:left + w]


def resize_crop(img, box, size, flip, pil=False):
    """Crop `box` of a (3, H, W) uint8 image, resize to size x size (bicubic, antialiased), flip."""
    if pil:
        left, top, w, h = box
        cut = Image.fromarray(img.permute(1, 2, 0).numpy()).crop((left, top, left + w, top + h))
        cut = cut.resize((size, size), Image.BICUBIC)  # crop first, as torchvision's resized_crop
        out = torch.from_numpy(np.array(cut)).permute(2, 0, 1)
    else:
        out = F.interpolate(crop(img, box)[None], size=(size, size), mode='bicubic', antialias=True)[0]
    return out.flip(-1) if flip else out


class Encoded(NamedTuple):
    """One sample of the device and hw loaders: the file's bytes (or, for files the device cannot decode, the
    decoded (3, H, W) image), its crop box and flip, and whether the hardware decoder is to decode it."""
    data: torch.Tensor
    is_jpeg: bool
    box: tuple
    flip: bool
    path: str
    hw: bool


class EncodedBatch(NamedTuple):
    data: list
    is_jpeg: list
    boxes: list
    flips: list
    paths: list
    hw: list


class CropSamples(torch.utils.data.Dataset):
    """Random-resized crop + horizontal flip of an image set's images (util.datasets.ImageFiles or
    util.shards.ShardImages: read_bytes, name, targets), keyed by (epoch, index) from
    EpochSampler. Returns (uint8 (3, S, S) image, target), or with `noise_len` (image, mask noise (L,)).
    With `views` N > 1 (repeated augmentation), the image is read and decoded once and a list of N such
    samples is returned, view v drawn from (seed, epoch, index, v). With `skip_bad`, an unreadable image gives
    None (dropped by `collate`) instead of an error."""

    def __init__(self, folder, seed, input_size, scale=PRETRAIN_SCALE, clamp=False, noise_len=0, skip_bad=False,
                 loader='fast', views=1, masks=1, complementary_keep=None):
        if loader not in LOADERS:
            raise ValueError(f"unknown loader {loader!r}; choose one of {', '.join(LOADERS)}")
        if loader in ('roi', 'hw'):
            nvimgcodec()  # installed? (here, not in every worker)
        self.images, self.seed, self.size, self.views = folder, seed, input_size, views
        self.masks, self.complementary_keep = masks, complementary_keep
        self.scale, self.clamp, self.noise_len, self.skip_bad, self.loader = scale, clamp, noise_len, skip_bad, loader

    def __len__(self):
        return len(self.images)

    def __getitem__(self, key):
        epoch, index = key
        path, target = self.images.name(index), self.images.targets[index]
        rngs = [sample_rng(self.seed, epoch, index)] if self.views == 1 else \
            [sample_rng(self.seed, epoch, index, v) for v in range(self.views)]
        try:
            source = self._read(index, path)
            views = [self._view(source, path, rng) for rng in rngs]
        except BadImageError:
            if self.skip_bad:
                return None
            raise
        if self.noise_len:  # mask noise, drawn after the box and the flip
            views = [(img, self._noise(rng)) for img, rng in zip(views, rngs)]
        else:
            views = [(img, target) for img in views]
        return views[0] if self.views == 1 else views

    def _noise(self, rng):
        """The view's mask noise (L,); with `masks` K > 1, (K, L): K masks of the one crop, mask k the k-th draw
        of the view's generator (mask 0 is the noise of K = 1). With `complementary_keep` V the K masks keep
        disjoint sets of V units: the first draw orders the units, and mask k keeps its k-th V of them."""
        if self.masks == 1:
            return torch.from_numpy(rng.random(self.noise_len, dtype=np.float32))
        if self.complementary_keep is None:
            return torch.from_numpy(rng.random((self.masks, self.noise_len), dtype=np.float32))
        order = np.argsort(rng.random(self.noise_len, dtype=np.float32), kind='stable')
        rank = np.empty(self.noise_len, dtype=np.int64)
        rank[order] = np.arange(self.noise_len)
        shifts = np.arange(self.masks)[:, None] * self.complementary_keep
        # mask k: the units of rank kV .. kV + V - 1 get the lowest noise, so the model keeps exactly them
        return torch.from_numpy(((rank[None] - shifts) % self.noise_len).astype(np.float32) / self.noise_len)

    def _read(self, index, path):
        """The decoded (3, H, W) uint8 image; for the roi loader an RGB JPEG's code stream; for the device
        and hw loaders (bytes, header)."""
        try:
            data = self.images.read_bytes(index)
        except OSError as e:
            raise bad_image(path, e) from None
        if self.loader == 'roi':
            return jpeg_stream(data) or decode_rgb(data, path)
        if self.loader not in DEVICE_DECODE:
            return decode_rgb(data, path)
        try:  # only the header is parsed here (for the size, and to catch what the device cannot decode)
            header = Image.open(io.BytesIO(data))
        except PIL_ERRORS as e:
            raise bad_image(path, e) from None
        if header.format == 'JPEG' and header.mode in ('RGB', 'L'):
            return torch.frombuffer(bytearray(data), dtype=torch.uint8), True, header.size
        img = decode_rgb(data, path)
        return img, False, (img.shape[2], img.shape[1])

    def _view(self, source, path, rng):
        if self.loader == 'roi' and not isinstance(source, torch.Tensor):
            box = random_resized_crop_box(rng, source.width, source.height, self.scale, clamp=self.clamp)
            crop = decode_box(source, box, path)
            return resize_crop(crop, (0, 0, box[2], box[3]), self.size, rng.random() < 0.5)
        if self.loader not in DEVICE_DECODE:
            box = random_resized_crop_box(rng, source.shape[2], source.shape[1], self.scale, clamp=self.clamp)
            return resize_crop(source, box, self.size, rng.random() < 0.5, pil=self.loader == 'pil')
        data, is_jpeg, (width, height) = source
        box = random_resized_crop_box(rng, width, height, self.scale, clamp=self.clamp)
        return Encoded(data, is_jpeg, box, bool(rng.random() < 0.5), str(path), self.loader == 'hw')


class Readable(torch.utils.data.Dataset):
    """dataset[i] for evaluation and kNN features, or None for an unreadable image under --skip_bad_images (collate
    leaves it out and counts it)."""

    def __init__(self, dataset, skip_bad):
        self.dataset, self.skip_bad = dataset, skip_bad

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        try:
            return self.dataset[index]
        except BadImageError:
            if self.skip_bad:
                return None
            raise


class SeededSamples(torch.utils.data.Dataset):
    """A dataset with PIL transforms that draw from the global RNGs (timm's RandAugment, random erasing)
    keyed by (epoch, index): those RNGs are seeded by (seed, epoch, index) for the sample and restored
    after it, so augmentations depend neither on workers nor processes nor on a resume."""

    def __init__(self, dataset, seed, skip_bad=False):
        self.dataset, self.seed, self.skip_bad = dataset, seed, skip_bad

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key
        s = int(sample_rng(self.seed, epoch, index).integers(2 ** 63))
        states = random.getstate(), np.random.get_state(), torch.get_rng_state()
        try:
            torch.default_generator.manual_seed(s)  # CPU only: torch.manual_seed would also seed CUDA
            random.seed(s)
            np.random.seed(s % 2 ** 32)
            return self.dataset[index]
        except BadImageError:
            if self.skip_bad:
                return None
            raise
        finally:
            random.setstate(states[0])
            np.random.set_state(states[1])
            torch.set_rng_state(states[2])


def collate(batch):
    """Stack the readable samples, plus how many were skipped: (images, targets, n_bad); device-loader
    samples stay a list of encoded images (EncodedBatch)."""
    kept = [b for b in batch if b is not None]
    n_bad = len(batch) - len(kept)
    if kept and isinstance(kept[0], list):  # repeated augmentation: every view of every image
        n_bad *= len(kept[0])
        kept = [view for views in kept for view in views]
    if not kept:
        raise BadImageError('cannot read image: every image of a batch failed to load (see --skip_bad_images)')
    images, targets = zip(*kept)
    if isinstance(images[0], Encoded):
        return EncodedBatch(*map(list, zip(*images))), default_collate(targets), n_bad
    images, targets = default_collate(kept)  # in a worker, stacked straight into shared memory
    return images, targets, n_bad


def nvjpeg_crops(batch, device):
    """The crop boxes of an EncodedBatch's JPEGs, decoded whole in one batched call on `device` (nvJPEG on
    CUDA) and cropped; None for the samples decoded in the workers."""
    jpegs = [d for d, j in zip(batch.data, batch.is_jpeg) if j]
    try:
        decoded = iter(decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device) if jpegs else [])
    except RuntimeError:  # name the file that broke the batch
        for d, path in zip(batch.data, batch.paths):
            try:
                decode_jpeg(d, mode=ImageReadMode.RGB, device=device)
            except RuntimeError as e:
                raise BadImageError(f"cannot read image {path} (device decode: {e})") from None
        raise
    return [crop(next(decoded), box) if is_jpeg else None for is_jpeg, box in zip(batch.is_jpeg, batch.boxes)]


class HardwareDecoder:
    """Decodes the crop boxes of an EncodedBatch's JPEGs with nvImageCodec: on CUDA the GPU's hardware JPEG
    decoder alone (A100, H100, H200 carry one; it uses no SMs), on a CPU device the CPU backend (the same code,
    for tests). Those it refuses are decoded by nvJPEG (nvjpeg_crops) and counted, as are the files decoded
    in the workers (not RGB or grey JPEGs): `counts` since the last `take_counts()`."""

    def __init__(self, device):
        codec = nvimgcodec()
        self.codec, self.device = codec, device
        if device.type == 'cuda':
            index = device.index if device.index is not None else torch.cuda.current_device()
            self.decoder = codec.Decoder(device_id=index, backends=[codec.Backend(codec.BackendKind.HW_GPU_ONLY)])
        else:
            self.decoder = codec.Decoder(device_id=codec.NVIMGCODEC_DEVICE_CPU_ONLY, max_num_cpu_threads=1,
                                         backends=[codec.Backend(codec.BackendKind.CPU_ONLY)])
        self.counts = dict.fromkeys(('hardware', 'refused', 'in_workers'), 0)
        self.warned = False

    def take_counts(self):
        counts, self.counts = self.counts, dict.fromkeys(self.counts, 0)
        return counts

    def crops(self, batch):
        """(3, h, w) uint8 crops on the device, one per JPEG sample; None for the samples decoded in the workers."""
        jpegs = [i for i, j in enumerate(batch.is_jpeg) if j]
        regions = []
        for i in jpegs:
            try:
                regions.append(box_region(self.codec.CodeStream(batch.data[i].numpy()), batch.boxes[i]))
            except RuntimeError as e:  # a header PIL read but nvImageCodec cannot parse
                raise BadImageError(f"cannot read image {batch.paths[i]} (nvImageCodec: {e})") from None
        stream = torch.cuda.current_stream(self.device).cuda_stream if self.device.type == 'cuda' else 0
        decoded = self.decoder.decode(regions, params=decode_params(), cuda_stream=stream) if regions else []
        out = [None] * len(batch.data)
        refused = []
        for i, img in zip(jpegs, decoded):
            if img is None:
                refused.append(i)
            else:
                out[i] = as_chw(img, self.device)
        if refused:  # nvJPEG on the SMs, whole files then cropped, as --loader device
            sub = EncodedBatch(*([field[i] for i in refused] for field in batch))
            for i, c in zip(refused, nvjpeg_crops(sub, self.device)):
                out[i] = c
        self.count(len(jpegs) - len(refused), len(refused), len(batch.data) - len(jpegs))
        return out

    def count(self, hardware, refused, in_workers):
        for key, n in zip(self.counts, (hardware, refused, in_workers)):
            self.counts[key] += n
        if refused and not hardware and not self.warned:
            self.warned = True
            print('warning: the hardware JPEG decoder decoded none of a batch (this GPU may have none): nvJPEG decodes '
                  'them on the SMs instead, which --loader device does for less host work')


@functools.lru_cache
def hardware_decoder(device):
    """This process's HardwareDecoder of `device` (created once: a decoder holds buffers and threads)."""
    return HardwareDecoder(device)


def report_hw_decoding(device):
    """The epoch's HardwareDecoder counts, summed over processes and printed: what the hardware decoder did
    not decode is never silent."""
    counts = {f'decoded_{k}': int(round(distributed.all_reduce_mean(v) * distributed.get_world_size()))
              for k, v in hardware_decoder(device).take_counts().items()}
    print(f"hardware JPEG decoder: {counts['decoded_hardware']} images; refused {counts['decoded_refused']} "
          f"(decoded by nvJPEG on the SMs); {counts['decoded_in_workers']} not RGB or grey JPEGs (decoded in the "
          f"loader workers)")
    return counts


def decode_on_device(batch, device, size):
    """(B, 3, size, size) float images in [0, 255] from an EncodedBatch: the crop boxes of its JPEGs decoded on
    `device` (hardware decoder or nvJPEG), the others copied there, then each crop resized (bicubic,
    antialiased) and flipped there."""
    crops = hardware_decoder(device).crops(batch) if batch.hw[0] else nvjpeg_crops(batch, device)
    out = []
    for c, data, box, flip in zip(crops, batch.data, batch.boxes, batch.flips):
        c = crop(data.to(device, non_blocking=True), box) if c is None else c
        c = F.interpolate(c[None].float(), size=(size, size), mode='bicubic', antialias=True)
        out.append(c.flip(-1) if flip else c)
    return torch.cat(out).clamp_(0, 255).round_()  # the value grid of the uint8 paths


@functools.lru_cache
def _mean_std(device):
    """ImageNet mean and std on the 0-255 scale, (1, 3, 1, 1), copied to `device` once."""
    def scaled(v):
        return (torch.tensor(v).view(1, 3, 1, 1) * 255).to(device)
    return scaled(IMAGENET_DEFAULT_MEAN), scaled(IMAGENET_DEFAULT_STD)


def to_device(images, device, size=None):
    """A loader's images as normalised float32 on `device`: uint8 batches and EncodedBatch are converted
    and normalised there; float batches (PIL transforms) arrive already normalised."""
    if isinstance(images, EncodedBatch):
        images = decode_on_device(images, device, size)
    else:
        images = images.to(device, non_blocking=True)
        if images.dtype != torch.uint8:
            return images
    mean, std = _mean_std(images.device)
    return (images.float() - mean) / std
