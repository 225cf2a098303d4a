"""Progressive resolution (--input_size_schedule, FastMIM-P): the schedule, the model carried across sizes, and
a run that changes size inside an epoch, stops and resumes exactly."""
import json
import os
import re
import signal

import pytest
import torch

import models_mim
from conftest import TINY_PRETRAIN, run_script, same_weights, start, until_training
from util import resolution
from util.errors import UsageError


def test_the_schedule_gives_each_size_its_steps():
    schedule = resolution.parse_schedule('128:0.5,160:0.75,224')
    assert schedule == [(128, 0.5, None), (160, 0.75, None), (224, 1.0, None)]
    assert resolution.segments(schedule, 100) == [(0, 50, 128, None), (50, 75, 160, None), (75, 100, 224, None)]
    assert resolution.segments(schedule, 3) == [(0, 1, 128, None), (1, 2, 160, None), (2, 3, 224, None)]
    with pytest.raises(UsageError, match=r'16 px \(to 0.1 of the run\) gets no optimizer step of the run\'s 5'):
        resolution.segments(resolution.parse_schedule('16:0.1,32'), 5)
    found = resolution.segments(schedule, 100)
    assert [resolution.segment_at(found, s)[2] for s in (0, 49, 50, 99, 100)] == [128, 128, 160, 224, 224]
    for bad, message in (('128:0.5,x', 'is not SIZE:FRACTION'), ('128:0.5,224:1', 'the last size runs to the end'),
                         ('128:0.7,160:0.5,224', 'must rise'), ('128:1.5,224', 'must rise'),
                         ('', 'names no size'), (',', 'names no size'), ('0:0.5,32', 'is not SIZE:FRACTION'),
                         ('-16:0.5,32', 'is not SIZE:FRACTION')):
        with pytest.raises(UsageError, match=message):
            resolution.parse_schedule(bad)


def test_each_size_can_have_its_own_batch_and_keeps_the_global_batch():
    schedule = resolution.parse_schedule('128:0.5,224', '256,64')
    assert resolution.segments(schedule, 10) == [(0, 5, 128, 256), (5, 10, 224, 64)]
    assert [resolution.accumulation(4096, batch, 8, size) for size, _, batch in schedule] == [2, 8]
    with pytest.raises(UsageError, match=r'a batch of 96 per process at 224 px on 8 process\(es\) cannot make the '
                                         r'global batch of 4096 .* divides 512$'):
        resolution.accumulation(4096, 96, 8, 224)
    for bad in ('256', '256,64,32', '256,x', '256,0'):
        with pytest.raises(UsageError, match='give one per-process batch for each of the 2 sizes'):
            resolution.parse_schedule('128:0.5,224', bad)


@pytest.mark.parametrize('name', ['MIM_vit_tiny_patch4', 'mae_vit_tiny_patch4', 'MIM_swin_tiny_patch2_win4'])
def test_a_model_carried_to_another_size_is_that_size_s_model_with_the_same_weights(name):
    small, large = (64, 32) if name.startswith('MIM_swin') else (16, 32)
    torch.manual_seed(0)
    trained = models_mim.all_models()[name](img_size=large)
    resized = models_mim.all_models()[name](img_size=small)
    models_mim.load_at_size(resized, trained.state_dict())
    fresh = models_mim.all_models()[name](img_size=small).state_dict()
    params = dict(trained.named_parameters())
    for k, v in resized.state_dict().items():  # the weights carried, the position tables the small model's own
        assert torch.equal(v, params[k] if k in params else fresh[k]), k
    back = models_mim.all_models()[name](img_size=large)
    models_mim.load_at_size(back, resized.state_dict())
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in back.state_dict().items())
    imgs = torch.randn(2, 3, small, small)
    loss, _ = resized(imgs, 0.75, torch.rand(2, resized.num_mask_units))
    assert torch.isfinite(loss)


def test_a_size_the_model_cannot_take_is_one_line():
    from run_pretrain import check_args, get_args_parser
    parse = get_args_parser().parse_args
    with pytest.raises(UsageError, match='do not tile'):
        check_args(parse(['--model', 'MIM_swin_tiny_patch2_win4', '--input_size_schedule', '24:0.5,32']))
    with pytest.raises(UsageError, match='leave --input_size out'):
        check_args(parse(['--model', 'MIM_vit_tiny_patch4', '--input_size', '32', '--input_size_schedule', '32']))
    check_args(parse(['--model', 'MIM_swin_tiny_patch2_win4', '--input_size_schedule', '64:0.5,32']))
    with pytest.raises(UsageError, match='pass that too'):
        check_args(parse(['--model', 'MIM_vit_tiny_patch4', '--batch_size_schedule', '8']))
    with pytest.raises(UsageError, match='the batch 6 .* must be a multiple of --repeated_aug x --masks_per_image = 4'):
        check_args(parse(['--model', 'MIM_vit_tiny_patch4', '--input_size_schedule', '16:0.5,32',
                          '--batch_size_schedule', '8,6', '--repeated_aug', '4']))


RUN = [a for a in TINY_PRETRAIN if a not in ('--input_size', '32')] + [
    '--batch_size', '8', '--epochs', '2', '--num_workers', '1', '--log_every_step', '--print_freq', '100',
    '--freezeout', '--how_scale', 'linear', '--t_0', '0.1', '--warmup_epochs', '0.2']  # freezing on both sides of the change


@pytest.mark.slow
def test_a_run_changes_size_inside_an_epoch_and_resumes_exactly_across_the_change(tmp_path, small_data):
    """16 px for the first 30% of 20 steps (the change at step 6, inside epoch 0), then 32 px; a run stopped at 16
    px resumes, crosses the change and ends with the uninterrupted weights bitwise; the checkpoint records the
    schedule. FreezeOut's units freeze before and after the change. One size for the whole run is the run without
    a schedule, bitwise."""
    run = ['run_pretrain.py', *RUN, '--data_path', small_data, '--input_size_schedule', '16:0.3,32']
    ref = tmp_path / 'ref'
    proc = run_script(*run, '--output_dir', ref)
    assert 'input size: 16 px from step 0, 32 px from step 6' in proc.stdout
    assert 'input size 32 px from step 6' in proc.stdout
    frozen = [json.loads(line)['frozen_units'] for line in (ref / 'steps.txt').read_text().splitlines()]
    assert frozen[5] > 0 and frozen[-1] > frozen[6]
    ckpt = torch.load(ref / 'checkpoint-last.pth')
    assert ckpt['args']['input_size'] == 32 and ckpt['args']['input_size_schedule'] == '16:0.3,32'
    out = tmp_path / 'stopped'
    stopped = start([*run, '--output_dir', out])
    until_training(stopped)
    os.killpg(stopped.pid, signal.SIGTERM)
    stopped.communicate(timeout=120)
    assert torch.load(out / 'checkpoint-last.pth')['step'] < 6
    run_script(*run, '--output_dir', out)
    assert same_weights(ref, out) == 0
    plain, single = tmp_path / 'plain', tmp_path / 'single'
    run_script('run_pretrain.py', *RUN, '--data_path', small_data, '--input_size', '32', '--output_dir', plain)
    run_script('run_pretrain.py', *RUN, '--data_path', small_data, '--input_size_schedule', '32',
               '--output_dir', single)
    assert same_weights(plain, single) == 0


TWO = ['-m', 'torch.distributed.run', '--nproc_per_node=2', 'run_pretrain.py']
# 80 images, 2 views each: 5 optimizer steps of 16 views (8 images) per epoch, 10 in the run; 16 px up to step 7
PER_SIZE = [*RUN, '--input_size_schedule', '16:0.7,32', '--batch_size_schedule', '8,4', '--global_batch', '16',
            '--repeated_aug', '2']
REDUCTION_ORDER = 1e-5  # what summing a step's gradients in another order may change (tests/test_elastic.py)


@pytest.mark.slow
def test_per_size_batches_train_alike_on_two_processes_or_one_and_resume_across_the_change(tmp_path, small_data):
    """--batch_size_schedule 8,4 at a global batch of 16, with FreezeOut and repeated augmentation: on two
    processes the accumulation goes from 1 to 2 at the size change, on one from 2 to 4, over the same
    micro-batches: the same weights up to the order of the gradient sums. A run stopped on two processes at 16 px
    and finished on one crosses the change and ends there too. With one batch for both sizes the steps take the
    same images, and the weights differ by the order of the sums only."""
    run = [*PER_SIZE, '--data_path', small_data]
    two, one = tmp_path / 'two', tmp_path / 'one'
    proc = run_script(*TWO, *run, '--output_dir', two)
    assert 'input size: 16 px (batch 8 x --accum_iter 1) from step 0, 32 px (batch 4 x --accum_iter 2) from step 7' \
        in proc.stdout
    run_script('run_pretrain.py', *run, '--output_dir', one)
    assert same_weights(two, one) < REDUCTION_ORDER
    assert torch.load(one / 'checkpoint-last.pth')['args']['batch_size_schedule'] == '8,4'
    out = tmp_path / 'stopped'
    stopped = start([*TWO, *run, '--output_dir', out])
    until_training(stopped)
    os.killpg(stopped.pid, signal.SIGTERM)
    stopped.communicate(timeout=120)
    ckpt = torch.load(out / 'checkpoint-last.pth')
    assert ckpt['step'] < 7 and ckpt['args']['world_size'] == 2, ckpt['step']
    proc = run_script('run_pretrain.py', *run, '--output_dir', out)
    assert 'input size 32 px from step 7 (batch 4 x --accum_iter 4)' in proc.stdout
    assert same_weights(one, out) < REDUCTION_ORDER
    one_batch = tmp_path / 'one_batch'
    run_script(*TWO, *[{'8,4': '8,8'}.get(a, a) for a in run], '--output_dir', one_batch)
    assert same_weights(two, one_batch) < REDUCTION_ORDER


@pytest.mark.parametrize('batches,extra,message', [
    ('8,3', [], 'a batch of 3 per process at 32 px on 1 process\\(es\\) cannot make the global batch of 8'),
    ('8,4', ['--compile', 'reduce-overhead'], '--compile reduce-overhead replays CUDA graphs')])
def test_a_size_whose_batch_cannot_keep_the_global_batch_stops_at_start(tmp_path, small_data, batches, extra, message):
    proc = run_script('run_pretrain.py', *RUN, '--input_size_schedule', '16:0.5,32', '--batch_size_schedule',
                      batches, '--global_batch', '8', *extra, '--data_path', small_data, '--output_dir', tmp_path,
                      check=False)
    assert proc.returncode == 1 and re.search(message, proc.stderr.strip().splitlines()[-1]), proc.stderr[-2000:]


def test_fine_tuning_starts_from_a_low_resolution_checkpoint(tmp_path):
    import models_vit
    model = models_mim.MIM_vit_tiny_patch4(img_size=16)
    torch.save({'model': model.state_dict(), 'args': {'model': 'MIM_vit_tiny_patch4', 'input_size': 16}},
               tmp_path / 'low.pth')
    classifier = models_vit.vit_tiny_patch4(num_classes=10, img_size=32)
    models_vit.load_pretrained(classifier, tmp_path / 'low.pth')  # the position table resized 4x4 -> 8x8
    assert torch.equal(classifier.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)
    assert classifier(torch.randn(1, 3, 32, 32)).shape == (1, 10)
