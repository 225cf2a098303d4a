"""Kills, resumes, bad data and bad flags: nothing lost, clear errors."""
import random
import shutil

import numpy as np
import pytest
import torch

from conftest import REPO, TINY_PRETRAIN, run_script, script_env, worker_pid
from util import metrics
from util.datasets import EpochSampler
from util.pipeline import SeededSamples


def test_epoch_sampler_resumes_part_way_and_shards_like_one_process():
    full = list(EpochSampler(100, seed=3))
    s = EpochSampler(100, seed=3)
    s.set_epoch(0, start=40)
    assert list(s) == full[40:] and len(s) == 60
    ranks = [list(EpochSampler(100, rank=r, world=2, seed=3, batch=8)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 48  # 6 whole micro-batches of 8 each
    # micro-batches of 8 dealt out in turn: on 2 processes the same micro-batches as on one
    for m in range(12):
        assert ranks[m % 2][m // 2 * 8:(m // 2 + 1) * 8] == full[m * 8:(m + 1) * 8]
    s.set_epoch(1)
    assert list(s) != full


def test_seeded_samples_do_not_depend_on_or_disturb_the_global_rng():
    class Noisy(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.rand(2), random.random() + np.random.rand()

    data = SeededSamples(Noisy(), seed=0)
    torch.manual_seed(1)
    a = data[(2, 3)]
    state = torch.get_rng_state()
    torch.manual_seed(2)
    b = data[(2, 3)]
    assert torch.equal(a[0], b[0]) and a[1] == b[1]  # torch, python and numpy draws
    assert not torch.equal(data[(3, 3)][0], a[0])  # another epoch, other draws
    torch.manual_seed(1)
    data[(2, 3)]
    assert torch.equal(torch.get_rng_state(), state)


def pretrain(out, data, *extra, check=True):
    return run_script('run_pretrain.py', *TINY_PRETRAIN, '--data_path', data, '--output_dir', out, *extra, check=check)


def last_error(proc):
    return proc.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_fault_drill_quick(tmp_path, small_data):
    # the torchrun arm is left to tests/test_preemption.py's restart test (the suite's time)
    proc = run_script('bench/fault_drill.py', '--quick', '--arms', 'kill', 'term', '--batch_size', '16',
                      '--data_path', small_data, '--output_dir', tmp_path, timeout=600)
    lines = proc.stdout.strip().splitlines()
    assert [line.split(': ')[0] for line in lines] == [f'LocalMIM + FreezeOut, original rules [{arm}]'
                                                       for arm in ('kill', 'term')]
    for line in lines:
        assert 'interruptions 2, ' in line and 'corrupt checkpoints 0, lost steps 0' in line, line
        assert 'differing step losses 0, final weights identical: yes' in line, line
    assert 'stops with status 75 2' in lines[1] and 'recomputed steps 0' in lines[1]


@pytest.mark.slow
def test_keep_last_rotates_numbered_checkpoints(tmp_path, small_data):
    pretrain(tmp_path, small_data, '--epochs', '3', '--save_freq', '1', '--keep_last', '2')
    assert sorted(p.name for p in tmp_path.glob('checkpoint-*.pth')) == \
        ['checkpoint-1.pth', 'checkpoint-2.pth', 'checkpoint-last.pth']


@pytest.mark.slow
def test_unreadable_last_checkpoint_falls_back_to_the_previous_one(tmp_path, small_data):
    pretrain(tmp_path, small_data, '--epochs', '1', '--save_freq', '1')
    data = (tmp_path / 'checkpoint-last.pth').read_bytes()
    (tmp_path / 'checkpoint-last.pth').write_bytes(data[:len(data) // 2])  # truncated
    proc = pretrain(tmp_path, small_data, '--epochs', '2', '--save_freq', '1', '--new_recipe')
    assert 'checkpoint-last.pth cannot be read' in proc.stdout + proc.stderr
    assert 'Resumed from' in proc.stdout and 'checkpoint-0.pth' in proc.stdout
    assert [r['epoch'] for r in metrics.read_json_lines(tmp_path / 'log.txt')] == [0, 1]


@pytest.fixture()
def data_with_bad_image(tmp_path, small_data):
    data = tmp_path / 'data'
    shutil.copytree(small_data, data)
    bad = data / 'train' / sorted(p.name for p in (data / 'train').iterdir())[0] / 'broken.png'
    bad.write_bytes(b'this is not a png')
    (data / 'train' / sorted(p.name for p in (data / 'train').iterdir())[1] / 'notes.txt').write_text('ignored')
    return data, bad


def test_bad_image_names_the_file(tmp_path, data_with_bad_image):
    data, bad = data_with_bad_image
    proc = pretrain(tmp_path / 'o', data, '--epochs', '1', check=False)
    assert proc.returncode != 0
    assert last_error(proc).startswith(f'error: cannot read image {bad}') and '--skip_bad_images' in last_error(proc)


@pytest.mark.slow
def test_a_run_that_fails_with_loader_workers_exits():
    """The loader workers ignore the stop signals; multiprocessing's exit handler stops them with SIGTERM and waits,
    so a run failing with an unexpected error while its loader was alive would hang instead of exiting."""
    import subprocess
    import sys
    script = """if True:
        import torch
        from types import SimpleNamespace
        from util.preemption import loader_worker_init
        loader = torch.utils.data.DataLoader(range(64), batch_size=2, num_workers=2, persistent_workers=True,
                                             worker_init_fn=loader_worker_init(SimpleNamespace(stop_signals='TERM')))
        for batch in loader:
            raise RuntimeError('a step failed')
    """
    proc = subprocess.run([sys.executable, '-c', script], cwd=REPO, env=script_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1 and proc.stderr.rstrip().endswith('RuntimeError: a step failed')


@pytest.mark.slow
def test_skip_bad_images_counts_them(tmp_path, data_with_bad_image):
    data, _ = data_with_bad_image
    proc = pretrain(tmp_path / 'o', data, '--epochs', '1', '--skip_bad_images')
    assert 'skipped 1 unreadable image(s) this epoch' in proc.stdout
    assert metrics.read_json_lines(tmp_path / 'o' / 'log.txt')[0]['train_skipped_images'] == 1


def test_empty_class_folder_names_it(tmp_path, small_data):
    data = tmp_path / 'data'
    shutil.copytree(small_data, data)
    (data / 'train' / 'zz_empty').mkdir()
    proc = pretrain(tmp_path / 'o', data, check=False)
    assert last_error(proc) .startswith(f"error: class folder {data / 'train' / 'zz_empty'} has no images")


@pytest.mark.parametrize('args,message', [
    (['--input_size', '36'], 'even token grid'),
    (['--input_size', '30'], 'not a multiple of the patch size 4'),
    (['--freezeout', '--t_0', '0'], '--t_0 must be in (0, 1]'),
    (['--output_dir', '/proc/version/out'], 'cannot write to /proc/version/out'),
    (['--freeze_decoders'], '--freeze_decoders needs --freezeout'),
    (['--compile', 'reduce-overhead', '--accum_iter', '2'], 'with --accum_iter above 1 (here 2) use --compile default'),
    (['--compile_scope', 'blocks'], '--compile_scope blocks needs --compile'),
    (['--compile', 'reduce-overhead', '--compile_scope', 'blocks'], 'captures the whole step as CUDA graphs'),
    (['--model', 'MIM_swin_tiny_patch2_win4', '--compile', '--compile_scope', 'blocks'],
     'LocalMIMSwin compiles as one model; use --compile_scope model'),
])
def test_more_flag_errors(tmp_path, small_data, args, message):
    proc = run_script('run_pretrain.py', *TINY_PRETRAIN, '--data_path', small_data, '--output_dir', tmp_path / 'o',
                      *args, check=False)
    assert proc.returncode != 0 and message in last_error(proc), proc.stderr[-1500:]


@pytest.mark.slow
def test_non_finite_loss_stops_without_overwriting(tmp_path, small_data):
    pretrain(tmp_path, small_data, '--epochs', '1')
    before = (tmp_path / 'checkpoint-last.pth').read_bytes()
    proc = pretrain(tmp_path, small_data, '--epochs', '4', '--lr', '1e12', '--new_recipe', check=False)
    assert proc.returncode != 0
    msg = last_error(proc)
    assert msg.startswith('error: loss is') and 'stopped without writing a checkpoint' in msg
    assert str(tmp_path / 'checkpoint-last.pth') in msg
    assert (tmp_path / 'checkpoint-last.pth').read_bytes() == before


@pytest.mark.slow
def test_two_processes_follow_the_one_process_trajectory(tmp_path, small_data):
    """Same effective batch (1 x 16 and 2 x 8): the same images and masks in every step."""
    common = [*TINY_PRETRAIN, '--data_path', small_data, '--epochs', '2']
    run_script('run_pretrain.py', *common, '--output_dir', tmp_path / 'one')
    run_script('-m', 'torch.distributed.run', '--nproc_per_node=2', 'run_pretrain.py',
               *common, '--batch_size', '8', '--output_dir', tmp_path / 'two')
    logs = [metrics.read_json_lines(tmp_path / d / 'log.txt') for d in ('one', 'two')]
    for a, b in zip(*logs):
        assert a['train_loss'] == pytest.approx(b['train_loss'], abs=1e-5)
    wa = torch.load(tmp_path / 'one' / 'checkpoint-last.pth')['model']
    wb = torch.load(tmp_path / 'two' / 'checkpoint-last.pth')['model']
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-4


@pytest.mark.slow
def test_two_processes_bf16_accumulation_and_a_freeze_match_one_process(tmp_path, small_data):
    """torch.distributed.launch, --amp bf16, --accum_iter 2 and FreezeOut units freezing mid-run (the DDP
    wrapper rebuilt): 2 x 8 x 2 against 1 x 16 x 2 images per step. bf16 rounds each process's half batch
    differently from the whole one, hence a tolerance of a few bf16 steps on the weights."""
    common = [*TINY_PRETRAIN, '--data_path', small_data, '--epochs', '3', '--warmup_epochs', '0.5', '--amp', 'bf16',
              '--accum_iter', '2', '--freezeout', '--how_scale', 'linear', '--t_0', '0.5']
    run_script('run_pretrain.py', *common, '--output_dir', tmp_path / 'one')
    proc = run_script('-m', 'torch.distributed.launch', '--nproc_per_node=2', 'run_pretrain.py', *common,
                      '--batch_size', '8', '--output_dir', tmp_path / 'two')
    assert 'unit(s) frozen from step' in proc.stdout + proc.stderr
    logs = [metrics.read_json_lines(tmp_path / d / 'log.txt') for d in ('one', 'two')]
    assert logs[0][-1]['frozen_units'] == logs[1][-1]['frozen_units'] > 0
    for a, b in zip(*logs):
        assert a['train_loss'] == pytest.approx(b['train_loss'], rel=2e-3)
    wa = torch.load(tmp_path / 'one' / 'checkpoint-last.pth')['model']
    wb = torch.load(tmp_path / 'two' / 'checkpoint-last.pth')['model']
    diff = max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)
    assert diff < 2e-3, diff


@pytest.mark.slow
def test_a_dead_process_stops_the_others(tmp_path, small_data):
    """SIGKILL rank 1 mid-run: the launcher ends in bounded time with an error instead of hanging."""
    import os
    import signal
    import subprocess
    import sys
    import time
    out = tmp_path / 'ddp'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', 'run_pretrain.py', *TINY_PRETRAIN,
           '--batch_size', '8', '--data_path', str(small_data), '--epochs', '50', '--log_every_step',
           '--dist_timeout', '30', '--output_dir', str(out)]
    launcher = subprocess.Popen(cmd, cwd=REPO, env=script_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / 'steps.txt').exists() and time.time() < deadline:
        time.sleep(0.2)
    rank1 = worker_pid(1, str(out))
    assert rank1, 'rank 1 not found'
    os.kill(rank1, signal.SIGKILL)
    start = time.time()
    returncode = launcher.wait(timeout=90)
    assert returncode != 0 and time.time() - start < 90

