"""The input pipeline: crop boxes, the loaders against each other, fallbacks, bad files, determinism."""
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader

from conftest import REPO, run_script
from util.datasets import EpochSampler, image_folder
from util.pipeline import (BadImageError, CropSamples, EncodedBatch, collate, random_resized_crop_box, sample_rng,
                           to_device)


@pytest.fixture(scope='module')
def photo_folder(tmp_path_factory):
    """Two classes of 160x120 photographs (crops of scikit-image's astronaut), in the formats a folder may hold:
    RGB, grey and CMYK JPEG, PNG with alpha, BMP."""
    import skimage.data
    root = tmp_path_factory.mktemp('photos') / 'train'
    astronaut = skimage.data.astronaut()
    files = [('a', 'rgb.JPEG', 'RGB', 'JPEG'), ('a', 'grey.jpg', 'L', 'JPEG'), ('a', 'cmyk.jpg', 'CMYK', 'JPEG'),
             ('b', 'alpha.png', 'RGBA', 'PNG'), ('b', 'plain.bmp', 'RGB', 'BMP'), ('b', 'rgb2.JPEG', 'RGB', 'JPEG')]
    for i, (cls, name, mode, fmt) in enumerate(files):
        (root / cls).mkdir(parents=True, exist_ok=True)
        crop = astronaut[40 * i:40 * i + 240, 30 * i:30 * i + 320]
        Image.fromarray(crop).resize((160, 120), Image.BICUBIC).convert(mode).save(root / cls / name, fmt, quality=95)
    return root.parent


def samples(folder, loader, **kw):
    return CropSamples(image_folder(folder, 'train', None), seed=3, input_size=64, loader=loader, **kw)


def test_crop_box_follows_torchvision_and_maes_probe_crop():
    rng = np.random.default_rng(0)
    ours = np.array([random_resized_crop_box(rng, 512, 512, (0.08, 1.0)) for _ in range(20000)])
    torch.manual_seed(0)
    img = torch.zeros(1, 512, 512)
    boxes = [T.RandomResizedCrop.get_params(img, (0.08, 1.0), (3 / 4, 4 / 3)) for _ in range(20000)]
    theirs = np.array([(j, i, w, h) for i, j, h, w in boxes])
    area = lambda b: (b[:, 2] * b[:, 3] / 512 ** 2)  # noqa: E731
    assert abs(area(ours).mean() - area(theirs).mean()) < 0.01  # torchvision's draw: about 0.477
    assert (ours[:, 0] + ours[:, 2] <= 512).all() and (ours[:, 1] + ours[:, 3] <= 512).all()
    # facebookresearch/mae's probe crop: one draw, sides clamped to the image (mean area about 0.533)
    clamped = np.array([random_resized_crop_box(rng, 512, 512, (0.08, 1.0), clamp=True) for _ in range(20000)])
    assert abs(area(clamped).mean() - 0.533) < 0.01
    assert 0.12 < ((clamped[:, 2] == 512) | (clamped[:, 3] == 512)).mean() < 0.16
    assert (clamped[:, 0] + clamped[:, 2] <= 512).all() and (clamped[:, 1] + clamped[:, 3] <= 512).all()


def test_fast_and_pil_loaders_give_the_same_crops_within_a_few_levels(photo_folder):
    """Only the resampling differs (torch's and PIL's antialiased bicubic): at most a few of 255 levels on
    single pixels of these strong (about 3x) reductions, well under one level on average."""
    fast, pil = samples(photo_folder, 'fast', noise_len=16), samples(photo_folder, 'pil', noise_len=16)
    for key in [(0, i) for i in range(6)] + [(1, 0), (1, 3)]:
        (a, noise_a), (b, noise_b) = fast[key], pil[key]
        assert a.dtype == b.dtype == torch.uint8 and a.shape == (3, 64, 64)
        diff = (a.int() - b.int()).abs()
        assert diff.max() <= 8 and diff.float().mean() < 0.3, (key, diff.max(), diff.float().mean())
        assert torch.equal(noise_a, noise_b)


def test_device_loader_on_cpu_matches_the_fast_loader(photo_folder):
    fast, dev = samples(photo_folder, 'fast', noise_len=16), samples(photo_folder, 'device', noise_len=16)
    keys = [(0, i) for i in range(6)]
    a, noise_a, _ = collate([fast[k] for k in keys])
    b, noise_b, _ = collate([dev[k] for k in keys])
    assert isinstance(b, EncodedBatch)
    # the formats nvJPEG cannot take (CMYK, PNG, BMP) are decoded in the worker; RGB and grey JPEGs are not
    assert b.is_jpeg == [False, True, True, False, False, True]  # cmyk, grey, rgb | alpha.png, bmp, rgb2
    assert torch.equal(noise_a, noise_b)
    out_a, out_b = to_device(a, torch.device('cpu')), to_device(b, torch.device('cpu'), 64)
    assert out_a.shape == out_b.shape == (6, 3, 64, 64) and out_b.dtype == torch.float32
    levels = (out_a - out_b).abs() * torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1) * 255
    assert levels.max() < 4.01 and levels.mean() < 0.3  # float against uint8 fixed-point resampling


@pytest.fixture(scope='module')
def jpeg_kinds(tmp_path_factory, photo_folder):
    """photo_folder plus a progressive, a 4:4:4 and an EXIF-rotated JPEG (decoded as stored, as torchvision does)."""
    import shutil
    root = tmp_path_factory.mktemp('kinds') / 'd'
    shutil.copytree(photo_folder, root)
    photo = Image.open(root / 'train' / 'a' / 'rgb.JPEG')
    photo.save(root / 'train' / 'b' / 'progressive.jpg', quality=90, progressive=True)
    photo.save(root / 'train' / 'b' / 'full_chroma.jpg', quality=90, subsampling=0)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees for display
    photo.save(root / 'train' / 'b' / 'exif_rotated.jpg', quality=90, exif=exif.tobytes())
    return root


def test_roi_loader_decodes_the_crop_box_alone_with_the_fast_loaders_pixels(jpeg_kinds):
    """RGB JPEGs (baseline, progressive, 4:4:4, EXIF-rotated) decode only inside their box; the others whole; every sample,
    noise included, equals the fast loader's bit for bit."""
    from util import pipeline
    fast, roi = samples(jpeg_kinds, 'fast', noise_len=16), samples(jpeg_kinds, 'roi', noise_len=16)
    whole = {p.rsplit('/', 1)[-1] for p, _ in roi.images.samples
             if pipeline.jpeg_stream(pipeline.read_bytes(p)) is None}
    assert whole == {'cmyk.jpg', 'grey.jpg', 'alpha.png', 'plain.bmp'}
    for epoch in range(3):
        for i in range(len(fast)):
            (a, noise_a), (b, noise_b) = fast[(epoch, i)], roi[(epoch, i)]
            assert torch.equal(a, b) and torch.equal(noise_a, noise_b), (epoch, roi.images.samples[i][0])


def hw_and_device_batches(folder, epoch):
    hw, dev = samples(folder, 'hw', noise_len=16), samples(folder, 'device', noise_len=16)
    keys = [(epoch, i) for i in range(len(hw))]
    return collate([hw[k] for k in keys]), collate([dev[k] for k in keys]), hw


def test_hw_loader_on_cpu_decodes_crop_boxes_with_the_device_loaders_pixels(jpeg_kinds):
    """The hw loader's code on a CPU device (nvImageCodec's CPU backend): each JPEG's crop box decoded alone
    gives the device loader's batch bit for bit; files that are not RGB or grey JPEGs are decoded in the
    workers and counted."""
    from util import pipeline
    cpu = torch.device('cpu')
    pipeline.hardware_decoder(cpu).take_counts()
    for epoch in range(3):
        (hw, noise_a, _), (dev, noise_b, _), data = hw_and_device_batches(jpeg_kinds, epoch)
        assert isinstance(hw, EncodedBatch) and all(hw.hw) and not any(dev.hw)
        assert torch.equal(to_device(hw, cpu, 64), to_device(dev, cpu, 64)) and torch.equal(noise_a, noise_b)
    in_workers = sum(p.endswith(('cmyk.jpg', '.png', '.bmp')) for p, _ in data.images.samples)
    assert pipeline.hardware_decoder(cpu).take_counts() == {
        'hardware': 3 * (len(data) - in_workers), 'refused': 0, 'in_workers': 3 * in_workers}


def test_hw_loader_decodes_what_the_hardware_refuses_with_nvjpeg_and_counts_it(jpeg_kinds, monkeypatch, capsys):
    """Files the hardware decoder refuses (on a GPU: progressive, 4:1:1, ...; here made to refuse progressive
    ones) are decoded whole by nvJPEG's path and cropped: the same batch, and the epoch's report counts them."""
    from util import pipeline
    cpu = torch.device('cpu')
    decoder = pipeline.hardware_decoder(cpu)
    decoder.take_counts()
    (hw, _, _), (dev, _, _), _ = hw_and_device_batches(jpeg_kinds, 0)
    progressive = [p.endswith('progressive.jpg') for p in hw.paths]
    real_decode = decoder.decoder.decode
    jpeg_is_progressive = [p for p, j in zip(progressive, hw.is_jpeg) if j]

    def refuse_progressive(regions, **kw):
        return [None if refuse else img for img, refuse in zip(real_decode(regions, **kw), jpeg_is_progressive)]
    monkeypatch.setattr(decoder, 'decoder', SimpleNamespace(decode=refuse_progressive))
    assert torch.equal(to_device(hw, cpu, 64), to_device(dev, cpu, 64))
    counts = pipeline.report_hw_decoding(cpu)
    assert counts == {'decoded_hardware': sum(hw.is_jpeg) - 1, 'decoded_refused': 1,
                      'decoded_in_workers': len(hw.is_jpeg) - sum(hw.is_jpeg)}
    assert 'refused 1 (decoded by nvJPEG on the SMs)' in capsys.readouterr().out


@pytest.mark.parametrize('loader', ['roi', 'hw'])
def test_nvimagecodec_loaders_without_it_say_what_to_install(photo_folder, monkeypatch, loader):
    import sys
    from util.errors import UsageError
    monkeypatch.setitem(sys.modules, 'nvidia.nvimgcodec', None)  # as if not installed
    with pytest.raises(UsageError, match='pip install nvidia-nvimgcodec-cu13'):
        samples(photo_folder, loader)


def test_nvimagecodec_imports_without_its_optional_codec_messages(tmp_path, monkeypatch, capfd):
    """nvImageCodec's library writes six lines to stderr about the JPEG 2000 and TIFF libraries it lacks; they
    are left out, what else it writes (a missing nvJPEG, say) is passed on."""
    import subprocess
    import sys
    from util import pipeline
    (tmp_path / 'noisy_codec.py').write_text(
        "import os\nos.write(2, b'Failed to load nvtiff library!\\n[nvjpeg2k_ext] Failed to load nvJPEG2000\\n"
        "Failed to load nvjpeg library!\\n')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    pipeline.import_without_codec_noise('noisy_codec')
    assert capfd.readouterr().err == 'Failed to load nvjpeg library!\n'
    proc = subprocess.run([sys.executable, '-W', 'ignore', '-c', 'from util import pipeline; pipeline.nvimgcodec()'],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stderr == ''


def test_to_device_normalises_uint8_and_passes_float_through():
    x = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    expected = T.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)(x.float() / 255)
    assert torch.allclose(to_device(x, torch.device('cpu')), expected, atol=1e-5)
    f = torch.randn(2, 3, 4, 4)
    assert to_device(f, torch.device('cpu')) is f


def test_sample_depends_only_on_seed_epoch_and_index(photo_folder):
    data = samples(photo_folder, 'fast', noise_len=16)
    runs = []
    for workers in (0, 2):
        sampler = EpochSampler(len(data), seed=3)
        sampler.set_epoch(2)
        loader = DataLoader(data, sampler=sampler, batch_size=3, num_workers=workers, collate_fn=collate)
        runs.append([b[:2] for b in loader])
    for (img0, noise0), (img1, noise1) in zip(*runs):
        assert torch.equal(img0, img1) and torch.equal(noise0, noise1)
    assert not torch.equal(data[(0, 0)][0], data[(1, 0)][0])  # a new epoch, a new crop
    assert np.random.default_rng([3, 2, 5]).random() == sample_rng(3, 2, 5).random()


@pytest.mark.parametrize('loader', ['fast', 'roi', 'pil', 'device', 'hw'])
def test_bad_image_is_named_or_skipped(tmp_path, photo_folder, loader):
    import shutil
    root = tmp_path / 'd'
    shutil.copytree(photo_folder, root)
    bad = root / 'train' / 'a' / 'broken.JPEG'
    bad.write_bytes(b'not an image at all')
    data = samples(root, loader)
    index = [p for p, _ in data.images.samples].index(str(bad))
    with pytest.raises(BadImageError, match='broken.JPEG'):
        data[(0, index)]
    assert samples(root, loader, skip_bad=True)[(0, index)] is None
    images, _, n_bad = collate([samples(root, loader, skip_bad=True)[(0, i)] for i in range(len(data))])
    assert n_bad == 1


@pytest.mark.parametrize('loader', ['device', 'hw'])
def test_device_decode_names_a_jpeg_that_fails_there(photo_folder, loader):
    """A file whose header parses but whose data does not decode fails on the device with its name."""
    data = samples(photo_folder, loader)
    good = data[(0, 2)][0]  # rgb.JPEG
    cut = good._replace(data=good.data[:200].clone(), path='cut.JPEG')
    with pytest.raises(BadImageError, match='cut.JPEG'):
        to_device(EncodedBatch(*map(list, zip(good, cut))), torch.device('cpu'), 64)


def test_linear_probe_loader_uses_the_clamped_crop(photo_folder):
    from util.datasets import build_classification_loaders
    import shutil
    root = photo_folder.parent / 'probe'
    if not root.exists():
        shutil.copytree(photo_folder / 'train', root / 'train')
        shutil.copytree(photo_folder / 'train', root / 'val')
    args = SimpleNamespace(data_path=root, nb_classes=None, rank=0, world_size=1, seed=0, input_size=64,
                           skip_bad_images=False, loader='fast', dist_eval=False, num_workers=0, pin_mem=False,
                           device="cpu", batch_size=2, accum_iter=1, stop_signals="TERM,USR1", shard_cache=None,
                           eval=False)
    from util.datasets import eval_transform
    train_loader, _, _ = build_classification_loaders(args, None, eval_transform(64))
    assert train_loader.dataset.clamp and train_loader.dataset.scale == (0.08, 1.0)
    images, targets, _ = next(iter(train_loader))
    assert images.dtype == torch.uint8 and images.shape == (2, 3, 64, 64) and targets.dtype == torch.int64


@pytest.mark.slow
def test_bench_data_json(tmp_path, photo_folder):
    proc = run_script('bench/bench_data.py', '--data_path', photo_folder, '--input_size', '64', '--batch_size', '4',
                      '--batches', '2', '--warmup', '1', '--rounds', '1', '--baseline', '--json')
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result['batch_shape'] == [4, 3, 64, 64] and result['dtype'] == 'uint8' and result['num_workers'] == 0
    assert result['img_per_s'] > 0 and result['baseline_img_per_s'] > 0 and result['speedup'] > 0
    proc = run_script('bench/bench_data.py', '--make_jpegs', tmp_path / 'j', '--per_class', '2')
    files = sorted((tmp_path / 'j' / 'train').rglob('*.JPEG'))
    assert len(files) == 20 and Image.open(files[0]).size in ((500, 375), (375, 500))


def test_eval_transform_crop_pct_as_facebookresearch_mae():
    from util.datasets import eval_transform
    img = Image.fromarray((np.random.default_rng(0).random((300, 400, 3)) * 255).astype(np.uint8))
    resize = [t for t in eval_transform(224).transforms if isinstance(t, T.Resize)][0]
    assert resize.size == 256 and eval_transform(224)(img).shape == (3, 224, 224)
    resize = [t for t in eval_transform(384).transforms if isinstance(t, T.Resize)][0]
    assert resize.size == 384 and eval_transform(384)(img).shape == (3, 384, 384)  # crop_pct 1.0 above 224


def test_repeated_augmentation_decodes_once_for_n_distinct_views(photo_folder):
    data = samples(photo_folder, 'fast', noise_len=16, views=3)
    views = data[(0, 2)]
    assert len(views) == 3 and all(img.shape == (3, 64, 64) for img, _ in views)
    assert not torch.equal(views[0][0], views[1][0]) and not torch.equal(views[0][1], views[2][1])  # crops, masks
    assert all(torch.equal(a[0], b[0]) for a, b in zip(views, data[(0, 2)]))  # a function of (seed, epoch, index, v)
    images, noise, n_bad = collate([data[(0, 0)], data[(0, 1)]])
    assert images.shape == (6, 3, 64, 64) and noise.shape == (6, 16) and n_bad == 0
    device = collate([samples(photo_folder, 'device', views=2)[(0, i)] for i in range(2)])[0]
    assert len(device.data) == 4 and device.data[0] is device.data[1]  # one file read for both views


def test_repeated_augmentation_sampler_keeps_epochs_and_ranks_apart():
    full = list(EpochSampler(100, seed=1, repeats=4))
    assert len(full) == 25 and len(set(full)) == 25  # an epoch: len / N images, N views each
    ranks = [set(EpochSampler(100, rank=r, world=2, seed=1, repeats=4)) for r in range(2)]
    assert not ranks[0] & ranks[1]  # no image on two ranks
    resumed = EpochSampler(100, seed=1, repeats=4)
    resumed.set_epoch(0, start=10)  # mid-epoch resume counts images
    assert list(resumed) == full[10:]
