"""Checkpoints open safely: own checkpoints with a plain torch.load, older ones through an allow-list, and a
checkpoint whose unpickling would run code is refused everywhere without running it."""
import argparse
import os
import random

import numpy as np
import pytest
import torch

from conftest import TINY_PRETRAIN, run_script
from util.checkpoint import load_checkpoint_file, rng_state, set_rng_state
from util.errors import UsageError


class WritesAFile:
    """Unpickling this would create the file: the attack a downloaded checkpoint can carry."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f'touch {self.path}',))


def test_own_checkpoint_opens_with_a_plain_torch_load(pretrain_ckpt):
    ckpt = torch.load(pretrain_ckpt)  # weights_only=True, torch's default
    assert isinstance(ckpt['args'], dict) and 'model' in ckpt and ckpt['rng'][0]['numpy']['keys'].dtype == torch.int64


def test_rng_state_round_trips_through_plain_values():
    np.random.seed(3)
    random.seed(3)
    state = rng_state()
    expected = np.random.rand(), random.random(), torch.rand(1)
    set_rng_state(state)
    assert (np.random.rand(), random.random(), torch.rand(1)) == expected


def test_older_and_original_checkpoints_load_through_the_allow_list(tmp_path):
    """facebookresearch/mae pickles argparse.Namespace; this project's older checkpoints NumPy's RNG tuple."""
    old = {'model': {'w': torch.ones(2)}, 'args': argparse.Namespace(model='vit_base_patch16', lr=1e-3),
           'rng': [{'torch': torch.get_rng_state(), 'numpy': np.random.get_state(), 'python': random.getstate()}]}
    torch.save(old, tmp_path / 'old.pth')
    loaded = load_checkpoint_file(tmp_path / 'old.pth')
    assert loaded['args'].model == 'vit_base_patch16' and torch.equal(loaded['model']['w'], torch.ones(2))
    set_rng_state(loaded['rng'][0])  # NumPy's own tuple is still accepted
    assert np.random.get_state()[1].tolist() == old['rng'][0]['numpy'][1].tolist()


def test_a_crafted_checkpoint_is_refused_without_running(tmp_path):
    marker = tmp_path / 'ran'
    torch.save({'model': {}, 'args': {}, 'payload': WritesAFile(marker)}, tmp_path / 'evil.pth')
    with pytest.raises(UsageError, match=r'holds a (posix|os)\.system object.*refused'):
        load_checkpoint_file(tmp_path / 'evil.pth')
    assert not marker.exists()


@pytest.mark.parametrize('command', [
    ['run_pretrain.py', *TINY_PRETRAIN, '--epochs', '1', '--resume', '{ckpt}'],
    ['run_finetune.py', '--model', 'vit_tiny_patch4', '--input_size', '32', '--num_workers', '0', '--finetune', '{ckpt}'],
    ['run_linprobe.py', '--model', 'vit_tiny_patch4', '--input_size', '32', '--num_workers', '0', '--batch_size', '16',
     '--finetune', '{ckpt}'],
    ['run_knn.py', '--model', 'vit_tiny_patch4', '--input_size', '32', '--num_workers', '0', '--finetune', '{ckpt}'],
    ['visualize.py', '--checkpoint', '{ckpt}'],
    ['-m', 'tools.export_timm', '{ckpt}', '{out}/x.safetensors'],
])
@pytest.mark.slow
def test_every_entry_point_refuses_it(tmp_path, small_data, command):
    marker = tmp_path / 'ran'
    torch.save({'model': {}, 'args': {}, 'payload': WritesAFile(marker)}, tmp_path / 'evil.pth')
    argv = [a.format(ckpt=tmp_path / 'evil.pth', out=tmp_path) for a in command]
    if '-m' not in argv:
        argv += ['--data_path', str(small_data), '--output_dir', str(tmp_path / 'o')]
    proc = run_script(*argv, check=False)
    assert proc.returncode != 0 and 'refused' in proc.stderr.strip().splitlines()[-1], proc.stderr[-800:]
    assert not marker.exists()
