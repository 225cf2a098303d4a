"""run_pretrain.py from the command line: runs, resumes, distributed launchers, errors, record.sh."""
import json
import shutil
import subprocess

import pytest
import torch

from conftest import REPO, TINY_PRETRAIN, run_script, script_env
from util import metrics


def read_log(out):
    return metrics.read_json_lines(out / 'log.txt')


def pretrain(out, data, *extra, **kw):
    return run_script('run_pretrain.py', *TINY_PRETRAIN, '--data_path', data, '--output_dir', out, *extra, **kw)


@pytest.mark.slow
def test_one_epoch_run_writes_log_and_checkpoint_and_a_no_auto_resume_rerun_starts_over(tmp_path, small_data):
    out = tmp_path / 'run'
    proc = pretrain(out, small_data, '--epochs', '1')
    assert 'effective batch: 16' in proc.stdout
    log = read_log(out)
    assert len(log) == 1 and log[0]['epoch'] == 0 and 'train_loss_blk1_x4' in log[0]
    ckpt = torch.load(out / 'checkpoint-last.pth')
    assert {'model', 'optimizer', 'scaler', 'epoch', 'step', 'args', 'rng'} <= set(ckpt)
    assert any(k.startswith('decoders.') for k in ckpt['model'])  # decoders kept for visualisation/resume
    assert ckpt['args']['model'] == 'MIM_vit_tiny_patch4' and ckpt['step'] == 5
    assert (out / 'checkpoint-0.pth').is_file()  # the final epoch is always kept
    assert any(f.name.startswith('events.out.tfevents') for f in out.iterdir())
    proc = pretrain(out, small_data, '--epochs', '1', '--no_auto_resume')  # starts over beside the finished run
    assert 'Resumed' not in proc.stdout and [r['epoch'] for r in read_log(out)] == [0, 0]


@pytest.mark.slow
@pytest.mark.parametrize('rules', ['original', 'project'])
def test_auto_resume_is_exact(tmp_path, small_data, rules):
    """A run killed after epoch 0 of 3 and auto-resumed gives the same losses, lr, frozen units and final
    weights as the uninterrupted run (CPU, fixed seed; FreezeOut events happen after the resume)."""
    args = ['--epochs', '3', '--save_freq', '1', '--freezeout', '--freezeout_rules', rules, '--how_scale', 'linear',
            '--t_0', '0.5', '--warmup_epochs', '0.4']
    full, resumed = tmp_path / 'full', tmp_path / 'resumed'
    pretrain(full, small_data, *args)
    resumed.mkdir()  # the state a kill after epoch 0 leaves behind
    shutil.copy(full / 'checkpoint-0.pth', resumed / 'checkpoint-last.pth')
    (resumed / 'log.txt').write_text(''.join((full / 'log.txt').read_text().splitlines(True)[:2]))
    proc = pretrain(resumed, small_data, *args)
    assert 'Resumed from' in proc.stdout and 'from epoch 1, iteration 0 (step 5)' in proc.stdout
    a, b = read_log(full), read_log(resumed)
    assert [r['epoch'] for r in b] == [0, 1, 2] and a[-1]['frozen_units'] > 0
    for ra, rb in zip(a, b):
        assert (ra['frozen_units'], ra['lr_unit0']) == (rb['frozen_units'], rb['lr_unit0'])
        assert ra['train_loss'] == pytest.approx(rb['train_loss'], abs=1e-6)
    wa = torch.load(full / 'checkpoint-last.pth')['model']
    wb = torch.load(resumed / 'checkpoint-last.pth')['model']
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


@pytest.mark.slow
def test_embedded_default_dataset_at_the_models_own_input_size(tmp_path):
    no_size = [a for a in TINY_PRETRAIN if a not in ('--input_size', '32')]
    proc = run_script('run_pretrain.py', *no_size, '--batch_size', '128', '--epochs', '1', '--output_dir', tmp_path)
    assert '1000 images, 10 classes' in proc.stdout
    assert torch.load(tmp_path / 'checkpoint-last.pth')['args']['input_size'] == 32  # MIM_vit_tiny_patch4's own


@pytest.mark.slow
@pytest.mark.parametrize('launcher,rules,compile', [(['-m', 'torch.distributed.launch'], 'original', []),
                                                    (['-m', 'torch.distributed.run'], 'project', []),
                                                    (['-m', 'torch.distributed.run'], 'original', ['--compile'])])
def test_two_process_gloo_run(tmp_path, small_data, launcher, rules, compile):
    """torch.distributed.launch passes --local-rank (hyphen); torchrun sets LOCAL_RANK. FreezeOut events
    inside the run rebuild the DDP wrapper (under each rule set), also around blocks compiled one by one."""
    out = tmp_path / 'ddp'
    proc = run_script(*launcher, '--nproc_per_node=2', 'run_pretrain.py', *TINY_PRETRAIN, '--batch_size', '8',
                      '--data_path', small_data, '--output_dir', out, '--epochs', '2', '--freezeout',
                      '--freezeout_rules', rules, '--how_scale', 'linear', '--t_0', '0.5', '--warmup_epochs', '0.4',
                      *compile, timeout=600)
    assert 'rank 0/2' in proc.stdout and 'effective batch: 16' in proc.stdout
    assert ('torch.compile (default, blocks)' in proc.stdout) == bool(compile)
    assert 'unit(s) frozen from step' in proc.stdout
    log = read_log(out)
    assert len(log) == 2 and log[-1]['frozen_units'] > 0


@pytest.mark.parametrize('args,message', [
    (['--data_path', '/nonexistent/imagenet'], '--data_path /nonexistent/imagenet does not exist'),
    (['--model', 'MIM_vit_gigantic'], 'unknown --model'),
    (['--mask_ratio', '1.0'], '--mask_ratio must be in (0, 1)'),
    (['--accum_iter', '0'], '--accum_iter must be >= 1'),
    (['--resume', '/nonexistent.pth'], '--resume /nonexistent.pth does not exist'),
    (['--freezeout', '--freezeout_rules', 'project', '--how_scale', 'cubic', '--t_0', '0.3', '--warmup_epochs', '1'],
     '--t_0'),
])
def test_clear_errors(tmp_path, small_data, args, message):
    base = [*TINY_PRETRAIN, '--epochs', '2', '--output_dir', tmp_path / 'o']
    if '--data_path' not in args:
        base += ['--data_path', small_data]
    proc = run_script('run_pretrain.py', *base, *args, check=False)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith('error:') and message in last, proc.stderr[-2000:]


def test_empty_data_folder_is_a_clear_error(tmp_path):
    (tmp_path / 'empty' / 'train').mkdir(parents=True)
    proc = run_script('run_pretrain.py', *TINY_PRETRAIN, '--data_path', tmp_path / 'empty',
                      '--output_dir', tmp_path / 'o', check=False)
    assert proc.returncode != 0 and 'no class folders under' in proc.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_record_sh_with_leading_variables(tmp_path, small_data):
    logs = tmp_path / 'logs'
    cmd = ['bash', 'record.sh', f'RECORD_DIR={logs}', 'OMP_NUM_THREADS=1', 'CUDA_VISIBLE_DEVICES=',
           str(REPO / '.venv/bin/python') if (REPO / '.venv/bin/python').exists() else 'python3',
           '-m', 'torch.distributed.launch', '--nproc_per_node=1', 'run_pretrain.py', *TINY_PRETRAIN,
           '--data_path', str(small_data), '--output_dir', str(tmp_path / 'rec'), '--epochs', '1']
    proc = subprocess.run(cmd, cwd=REPO, env=script_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    [log] = list(logs.iterdir())
    assert log.name.endswith('_rec.log')
    text = log.read_text()
    for field in ('command:', 'variables: RECORD_DIR=', 'OMP_NUM_THREADS=1', 'git:', 'host:', 'gpus:',
                  'versions:  python', 'start:', 'end:', 'duration:', 'exit:      0', 'Training time'):
        assert field in text, field
    failing = subprocess.run(['bash', 'record.sh', f'RECORD_DIR={logs}', 'bash', '-c', 'exit 7'], cwd=REPO,
                             capture_output=True, text=True)
    assert failing.returncode == 7


@pytest.mark.slow
def test_compile_with_grad_ckpt_follows_the_eager_run_through_freeze_events(tmp_path, small_data):
    """--compile and --grad_ckpt change how the step runs, not what it computes: same losses as the plain eager
    run, to fp32 rounding, also across FreezeOut events (project rules: two units at step 3, two at step 4), with
    the blocks compiled one by one (--freezeout's default scope; tests/test_compile.py counts its graphs). The
    original rules freeze through the same model.set_frozen, on other steps."""
    eager, compiled = tmp_path / 'eager', tmp_path / 'compiled'
    common = ['--epochs', '1', '--warmup_epochs', '0.2', '--log_every_step', '--freezeout', '--freezeout_rules',
              'project', '--how_scale', 'cubic', '--t_0', '0.8']
    pretrain(eager, small_data, *common)
    proc = run_script('run_pretrain.py', *TINY_PRETRAIN, '--data_path', small_data, '--output_dir', compiled, *common,
                      '--compile', '--grad_ckpt', timeout=600)
    assert 'torch.compile (default, blocks)' in proc.stdout and proc.stdout.count('unit(s) frozen from step') == 2
    losses = [[json.loads(line)['loss'] for line in (out / 'steps.txt').read_text().splitlines()]
              for out in (eager, compiled)]
    assert len(losses[0]) == len(losses[1]) == 5
    # AdamW's normalised update turns fp32 rounding differences of near-zero gradients into whole lr-sized steps:
    # on one 2-core CPU the project rules' last loss differed by 1.2e-3 relative (its inductor code, not the method)
    assert losses[1] == pytest.approx(losses[0], rel=3e-3)


@pytest.mark.slow
def test_repeated_augmentation_run_resumes_exactly(tmp_path, small_data):
    """--repeated_aug 2: 8 images x 2 views per batch of 16, the same steps per epoch; a resume after epoch 0
    gives the same losses and final weights."""
    args = ['--epochs', '2', '--save_freq', '1', '--repeated_aug', '2']
    full, resumed = tmp_path / 'full', tmp_path / 'resumed'
    pretrain(full, small_data, *args)
    resumed.mkdir()
    shutil.copy(full / 'checkpoint-0.pth', resumed / 'checkpoint-last.pth')
    (resumed / 'log.txt').write_text(''.join((full / 'log.txt').read_text().splitlines(True)[:2]))
    pretrain(resumed, small_data, *args)
    a, b = read_log(full), read_log(resumed)
    assert a[0]['step'] == 5 and [r['train_loss'] for r in a] == pytest.approx([r['train_loss'] for r in b], abs=1e-6)
    wa, wb = (torch.load(d / 'checkpoint-last.pth')['model'] for d in (full, resumed))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
    proc = pretrain(tmp_path / 'odd', small_data, '--repeated_aug', '3', check=False)
    assert 'must be a multiple of --repeated_aug x --masks_per_image = 3' in proc.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_hw_loader_run_logs_what_the_hardware_decoder_decoded(tmp_path):
    """--loader hw on a CPU device (nvImageCodec's CPU backend stands in for the hardware decoder; its batches equal
    --loader device's, tests/test_pipeline.py): the epoch's log counts the images each path decoded."""
    from bench.bench_data import make_jpegs
    make_jpegs(tmp_path / 'jpegs', per_class=2)
    proc = pretrain(tmp_path / 'run', tmp_path / 'jpegs', '--epochs', '1', '--loader', 'hw')
    log = read_log(tmp_path / 'run')[0]
    assert [log[f'train_decoded_{k}'] for k in ('hardware', 'refused', 'in_workers')] == [16, 0, 0]
    assert 'hardware JPEG decoder: 16 images; refused 0' in proc.stdout


def test_help_shows_how_to_turn_each_switch_off():
    import run_pretrain
    text = run_pretrain.get_args_parser().format_help()
    assert all(flag in text for flag in ('--no_auto_resume', '--no_pin_mem', '--no_scale_lr', '--new_recipe'))
