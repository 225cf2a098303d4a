"""--masks_per_image K: one decode, crop, patch embedding and target per crop for K masked samples; --mask_sets
complementary: the K visible sets are disjoint. K = 1 is the run without the flag."""
import argparse
import shutil

import pytest
import torch

import models_mim
from conftest import TINY_PRETRAIN, run_script, same_weights
from util.datasets import image_folder
from util.pipeline import CropSamples

MODELS = ['MIM_vit_tiny_patch4', 'mae_vit_tiny_patch4', 'MIM_swin_tiny_patch2_win4']


def build(name):
    return models_mim.build(argparse.Namespace(**{**models_mim.BUILD_DEFAULTS, 'model': name}))


def test_the_loader_draws_k_masks_of_one_crop_and_mask_0_is_the_noise_of_k_1(small_data):
    images = image_folder(small_data, 'train', None)
    one = CropSamples(images, 0, 32, noise_len=64)
    three = CropSamples(images, 0, 32, noise_len=64, masks=3)
    for key in ((0, 5), (2, 17)):
        (img1, noise1), (img3, noise3) = one[key], three[key]
        assert torch.equal(img1, img3) and noise3.shape == (3, 64) and torch.equal(noise3[0], noise1)
        assert not torch.equal(noise3[1], noise3[2])


def test_complementary_masks_keep_disjoint_sets_that_cover_the_crop(small_data):
    images = image_folder(small_data, 'train', None)
    samples = CropSamples(images, 0, 32, noise_len=64, masks=4, complementary_keep=16)
    for key in ((0, 3), (1, 40)):
        _, noise = samples[key]
        kept = [set(n.argsort()[:16].tolist()) for n in noise]
        assert all(len(k) == 16 for k in kept) and set().union(*kept) == set(range(64))
        assert sum(len(a & b) for i, a in enumerate(kept) for b in kept[i + 1:]) == 0


@pytest.mark.parametrize('name', MODELS)
def test_k_masks_of_a_crop_are_the_mean_of_the_masks_alone(name):
    torch.manual_seed(0)
    model = build(name)
    x, noise = torch.randn(3, 3, 32, 32), torch.rand(3, 2, model.num_mask_units)
    together, _ = model(x, 0.75, noise)
    alone = [model(x, 0.75, noise[:, k])[0] for k in range(2)]
    torch.testing.assert_close(together, (alone[0] + alone[1]) / 2, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('name', MODELS)
def test_one_patch_embedding_and_one_target_per_crop_not_per_mask(name):
    model = build(name)
    calls = []
    hooks = [module.register_forward_hook(lambda m, args, out, kind=kind: calls.append((kind, len(args[0]))))
             for kind, module in (('embed', model.patch_embed), ('target', getattr(model, 'hog', None)))
             if module is not None]
    if 'mae' in name:  # MAE's pixel target: one patchify per crop
        real = model.patchify
        model.patchify = lambda imgs: calls.append(('target', len(imgs))) or real(imgs)
    loss, _ = model(torch.randn(3, 3, 32, 32), 0.75, torch.rand(3, 4, model.num_mask_units))
    loss.backward()
    assert sorted(calls) == [('embed', 3), ('target', 3)]
    for h in hooks:
        h.remove()


@pytest.mark.parametrize('extra,message', [
    (['--masks_per_image', '5', '--mask_sets', 'complementary', '--batch_size', '20'],
     '5 masks keeping 16 of 64 units each cannot be disjoint; at --mask_ratio 0.75 use --masks_per_image 4 or fewer'),
    (['--masks_per_image', '3'], 'the batch 16 (--batch_size, --batch_size_schedule) must be a multiple of '
                                 '--repeated_aug x --masks_per_image = 3'),
    (['--masks_per_image', '0'], '--masks_per_image 0 must be at least 1'),
])
def test_masks_that_do_not_fit_are_one_line_at_start(small_data, tmp_path, extra, message):
    proc = run_script('run_pretrain.py', *TINY_PRETRAIN, '--data_path', small_data, '--output_dir', tmp_path, *extra,
                      check=False)
    assert proc.returncode == 1 and message in proc.stderr.strip().splitlines()[-1], proc.stderr[-1000:]


@pytest.mark.slow
def test_a_run_with_four_complementary_masks_resumes_exactly(tmp_path, small_data):
    """K = 4 complementary with FreezeOut: a run stopped after epoch 0 and resumed ends with the uninterrupted
    run's weights bitwise; an epoch takes a quarter of the images for the same steps."""
    args = [*TINY_PRETRAIN, '--data_path', small_data, '--epochs', '2', '--save_freq', '1', '--masks_per_image', '4',
            '--mask_sets', 'complementary', '--freezeout', '--how_scale', 'linear', '--t_0', '0.5']
    proc = run_script('run_pretrain.py', *args, '--output_dir', tmp_path / 'full')
    assert 'steps: 5/epoch' in proc.stdout
    (tmp_path / 'resumed').mkdir()
    shutil.copy(tmp_path / 'full' / 'checkpoint-0.pth', tmp_path / 'resumed' / 'checkpoint-last.pth')
    run_script('run_pretrain.py', *args, '--output_dir', tmp_path / 'resumed')
    assert same_weights(tmp_path / 'full', tmp_path / 'resumed') == 0


@pytest.mark.slow
def test_two_processes_give_the_one_process_run_at_the_same_global_batch(tmp_path, small_data):
    common = [*TINY_PRETRAIN, '--data_path', small_data, '--epochs', '1', '--batch_size', '8', '--masks_per_image',
              '2']
    run_script('-m', 'torch.distributed.run', '--nproc_per_node=2', 'run_pretrain.py', *common,
               '--output_dir', tmp_path / 'two', timeout=600)
    run_script('run_pretrain.py', *common, '--accum_iter', '2', '--output_dir', tmp_path / 'one')
    assert same_weights(tmp_path / 'two', tmp_path / 'one') < 1e-5
