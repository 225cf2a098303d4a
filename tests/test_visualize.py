import struct

import pytest

from conftest import TINY_PRETRAIN, run_script
from test_bench import assert_drawn


def png_size(path):
    with open(path, 'rb') as f:
        header = f.read(24)
    assert header[:8] == b'\x89PNG\r\n\x1a\n'
    return struct.unpack('>II', header[16:24])


def about(size, expected):
    """Figure inches x dpi can round a pixel either way."""
    return all(abs(a - b) <= 1 for a, b in zip(size, expected))


@pytest.mark.slow
def test_visualize_localmim_and_mae(tmp_path, small_data, pretrain_ckpt):
    run_script('visualize.py', '--checkpoint', pretrain_ckpt, '--data_path', small_data, '--num_images', '2',
               '--output_dir', tmp_path / 'mim')
    pngs = sorted((tmp_path / 'mim').glob('*.png'))
    assert len(pngs) == 2 and about(png_size(pngs[0]), (1440, 500))  # input, masked, 4 scales x (target, prediction)
    assert_drawn(pngs[0])
    mae = tmp_path / 'mae'
    run_script('run_pretrain.py', *TINY_PRETRAIN, '--model', 'mae_vit_tiny_patch4', '--norm_pix_loss',
               '--data_path', small_data, '--epochs', '1', '--output_dir', mae)
    run_script('visualize.py', '--checkpoint', mae / 'checkpoint-last.pth', '--images',
               next((small_data / 'val').rglob('*.png')), '--output_dir', tmp_path / 'mae_vis')
    [png] = list((tmp_path / 'mae_vis').glob('*.png'))
    assert about(png_size(png), (720, 500))
    assert_drawn(png)
    assert any(f.name.startswith('events.out.tfevents') for f in mae.iterdir())  # with the predictions figure


def test_plot_log(tmp_path, pretrain_ckpt):
    run_script('bench/plot_log.py', pretrain_ckpt.parent, pretrain_ckpt.parent / 'log.txt', '--output',
               tmp_path / 'curves.png')
    assert about(png_size(tmp_path / 'curves.png'), (2000, 360))
    assert_drawn(tmp_path / 'curves.png')
