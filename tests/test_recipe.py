"""A resumed run is the run it was: a changed recipe is refused in one line or, with --new_recipe, applied and
recorded; every bad value is one line at start."""
import shutil

import pytest
import torch

import run_finetune
import run_knn
import run_linprobe
import run_pretrain
from conftest import TINY_PRETRAIN, run_script
from util import metrics, recipe

BASE = ['--epochs', '2', '--save_freq', '1', '--freezeout', '--how_scale', 'linear', '--t_0', '0.5']


def test_every_flag_is_on_one_side_of_the_recipe():
    """A new flag must be placed: either it defines the run (compared on resume) or it does not."""
    assert not recipe.RECIPE & recipe.NOT_RECIPE
    flags = set()
    for entry in (run_pretrain, run_finetune, run_linprobe, run_knn):
        flags |= {a.dest for a in entry.get_args_parser()._actions if a.dest != 'help'}
    assert flags - recipe.RECIPE - recipe.NOT_RECIPE == set()
    assert (recipe.RECIPE | recipe.NOT_RECIPE) - flags == {'train_images'}  # set from the data, not a flag


def test_the_lr_is_compared_as_the_base_lr_it_makes():
    saved = {'lr': 1e-3, 'blr': 2e-4, 'batch_size': 16, 'accum_iter': 1, 'world_size': 2, 'seed': 0}
    rescaled = {**saved, 'lr': 5e-4, 'world_size': 1}  # the same base lr on half the global batch
    assert recipe.changes(saved, rescaled) == []
    assert [c[0] for c in recipe.changes(saved, {**saved, 'lr': 2e-3})] == ['blr']
    assert recipe.changes(saved, {**saved, 'seed': 1}) == [('seed', 0, 1)]
    assert recipe.changes({'seed': 0}, {'seed': 0, 'mask_ratio': 0.6}) == []  # older checkpoints: not compared


def pretrain(out, data, *extra, check=True):
    return run_script('run_pretrain.py', *TINY_PRETRAIN, '--data_path', data, '--output_dir', out, *BASE, *extra,
                      check=check)


@pytest.fixture(scope='module')
def base_run(tmp_path_factory, small_data):
    """A 2-epoch FreezeOut run; its checkpoint-0.pth is the state a stop after epoch 0 leaves."""
    out = tmp_path_factory.mktemp('recipe') / 'full'
    pretrain(out, small_data)
    return out


def stopped_after_epoch_0(base_run, folder):
    folder.mkdir()
    shutil.copy(base_run / 'checkpoint-0.pth', folder / 'checkpoint-last.pth')
    return folder


def last_line(proc):
    assert proc.returncode != 0 and 'Traceback' not in proc.stderr, proc.stderr[-2000:]
    return proc.stderr.strip().splitlines()[-1]


@pytest.fixture
def fewer_images(small_data, tmp_path):
    """The small set less two classes."""
    for cls in sorted((small_data / 'train').iterdir())[:8]:
        shutil.copytree(cls, tmp_path / 'fewer' / 'train' / cls.name)
    return tmp_path / 'fewer'


# each group changed in one resume: the refusal lists every change of the group
CHANGES = [
    ([('--blr', '4e-4'), ('--mask_ratio', '0.6'), ('--epochs', '3'), ('--warmup_epochs', '0.2'), ('--t_0', '0.3'),
      ('--seed', '1'), ('--loss_weights', 'inverse_depth'), ('--hog_bias', None), ('--hog_nbins', '12'),
      ('--weight_decay', '0.3'), ('--min_lr', '1e-6'), ('--how_scale', 'cubic'), ('--repeated_aug', '2')],
     ['blr: 0.0002 -> 0.0004', 'mask_ratio: 0.75 -> 0.6', 'epochs: 2 -> 3', 'warmup_epochs: 0.5 -> 0.2',
      't_0: 0.5 -> 0.3', 'seed: 0 -> 1', 'loss_weights: uniform -> inverse_depth', 'hog_bias: False -> True',
      'hog_nbins: 9 -> 12', 'weight_decay: 0.05 -> 0.3', 'min_lr: 0 -> 1e-06', 'how_scale: linear -> cubic',
      'repeated_aug: 1 -> 2']),
    ([('--lr', '1e-3'), ('--input_size', '16'), ('--masks_per_image', '2')],
     ['blr: 0.0002 -> 0.016', 'input_size: 32 -> 16', 'masks_per_image: 1 -> 2']),
    ([('--input_size', None), ('--input_size_schedule', '16:0.5,32')], ['input_size_schedule: None -> 16:0.5,32']),
]


def with_flags(extra):
    """TINY_PRETRAIN + BASE with the flags of `extra` ((flag, value) pairs; value None: a switch, or with a flag
    that takes a value, dropped) in place of theirs."""
    args = [*TINY_PRETRAIN, *BASE]
    for flag, value in extra:
        if flag in args:
            k = args.index(flag)
            del args[k:k + 1 + (k + 1 < len(args) and not args[k + 1].startswith('--'))]
            if value is not None:
                args += [flag, value]
        else:
            args += [flag] + ([value] if value is not None else [])
    return args


@pytest.mark.slow
@pytest.mark.parametrize('extra,changes', CHANGES, ids=['schedule-objective-seed', 'lr-size-masks', 'schedule'])
def test_a_changed_recipe_is_refused_in_one_line(base_run, small_data, tmp_path, extra, changes):
    out = stopped_after_epoch_0(base_run, tmp_path / 'resumed')
    proc = run_script('run_pretrain.py', *with_flags(extra), '--data_path', small_data, '--output_dir', out,
                      check=False)
    line = last_line(proc)
    assert line.startswith('error: ') and 'was trained with another recipe' in line and '--new_recipe' in line, line
    assert all(change in line for change in changes), line


@pytest.mark.slow
def test_other_data_is_refused_and_mapped_to_the_same_epoch_under_new_recipe(base_run, fewer_images, tmp_path):
    out = stopped_after_epoch_0(base_run, tmp_path / 'resumed')
    line = last_line(pretrain(out, fewer_images, check=False))
    assert 'train_images: 80 -> 64' in line
    proc = pretrain(out, fewer_images, '--new_recipe')
    assert 'New recipe from' in proc.stdout and 'train_images: 80 -> 64' in proc.stdout
    assert "Resuming at step 4 of 8 (4 per epoch): the place in the run of the checkpoint's step 5" in proc.stdout
    assert 'from epoch 1, iteration 0 (step 4)' in proc.stdout


@pytest.mark.slow
def test_new_recipe_applies_and_records_each_change(base_run, small_data, tmp_path):
    """--weight_decay and --blr under --new_recipe: the optimizer's groups take the new weight decay, the
    checkpoint records the change with its step, log.txt holds both parts' arguments and the change."""
    out = stopped_after_epoch_0(base_run, tmp_path / 'resumed')
    proc = pretrain(out, small_data, '--weight_decay', '0.3', '--blr', '4e-4', '--new_recipe')
    assert proc.stdout.count('New recipe from') == 1
    ckpt = torch.load(out / 'checkpoint-last.pth')
    decays = {g['weight_decay'] for g in ckpt['optimizer']['param_groups']}
    assert decays == {0., 0.3}
    assert ckpt['args']['weight_decay'] == 0.3
    assert ckpt['args']['recipe_changes'] == [{'step': 5, 'epoch': 1, 'changes': {
        'blr': [pytest.approx(2e-4), pytest.approx(4e-4)], 'weight_decay': [0.05, 0.3]}}]
    starts = metrics.read_json_lines(out / 'log.txt', key='run_args')
    assert len(starts) == 1 and starts[0]['step'] == 5 and starts[0]['run_args']['weight_decay'] == 0.3
    assert starts[0]['new_recipe']['changes']['weight_decay'] == [0.05, 0.3]
    unchanged = torch.load(base_run / 'checkpoint-last.pth')['model']
    assert any(not torch.equal(unchanged[k], v) for k, v in ckpt['model'].items())


@pytest.mark.slow
def test_a_resume_with_nothing_changed_is_bitwise_the_uninterrupted_run(base_run, small_data, tmp_path):
    out = stopped_after_epoch_0(base_run, tmp_path / 'resumed')
    proc = pretrain(out, small_data)
    assert 'New recipe' not in proc.stdout and 'Resumed from' in proc.stdout
    full, resumed = (torch.load(d / 'checkpoint-last.pth') for d in (base_run, out))
    assert all(torch.equal(full['model'][k], resumed['model'][k]) for k in full['model'])
    assert [r['train_loss'] for r in metrics.read_json_lines(base_run / 'log.txt')][1:] == \
        [r['train_loss'] for r in metrics.read_json_lines(out / 'log.txt')]
    # a finished run has nothing left to do
    line = last_line(pretrain(base_run, small_data, check=False))
    assert line == f"error: nothing to do: {base_run / 'checkpoint-last.pth'} is at epoch 2 of 2; to train " \
                   f"longer, pass a larger --epochs with --new_recipe"


@pytest.mark.slow
def test_a_shape_that_cannot_load_names_the_flag(base_run, small_data, tmp_path):
    out = stopped_after_epoch_0(base_run, tmp_path / 'resumed')
    line = last_line(pretrain(out, small_data, '--hog_nbins', '12', '--new_recipe', check=False))
    assert line.startswith('error: the weights in') and '(changed: --hog_nbins)' in line, line


BAD_VALUES = [
    ([('--epochs', '0')], '--epochs must be >= 1, got 0'),
    ([('--epochs', '-1')], '--epochs must be >= 1, got -1'),
    ([('--epochs', '1'), ('--warmup_epochs', '5')], '--warmup_epochs 5.0 leaves no epoch of the cosine in --epochs 1'),
    ([('--min_lr', '1')], '--min_lr 1.0 is above the lr'),
    ([('--batch_size', '0')], '--batch_size must be >= 1, got 0'),
    ([('--batch_size', '-4')], '--batch_size must be >= 1, got -4'),
    ([('--blr=-1e-3', None)], '--blr must be >= 0, got -0.001'),
    ([('--lr', '-1')], '--lr must be >= 0, got -1.0'),
    ([('--weight_decay', '-0.1')], '--weight_decay must be >= 0, got -0.1'),
    ([('--input_size', '0')], '--input_size must be >= 1, got 0'),
    ([('--input_size', None), ('--input_size_schedule', '')], "--input_size_schedule '' names no size"),
    ([('--input_size', None), ('--input_size_schedule', '0:0.5,32')], "'0:0.5' is not SIZE:FRACTION"),
    ([('--input_size', None), ('--input_size_schedule=-16:0.5,32', None)], "'-16:0.5' is not SIZE:FRACTION"),
    ([('--input_size', None), ('--input_size_schedule', '16:0.05,32')],
     '16 px (to 0.05 of the run) gets no optimizer'),
]


@pytest.mark.parametrize('extra,message', BAD_VALUES, ids=[' '.join(f'{f} {v}' for f, v in b[0]) for b in BAD_VALUES])
def test_a_bad_value_is_one_line_at_start(small_data, tmp_path, extra, message):
    proc = run_script('run_pretrain.py', *with_flags(extra), '--data_path', small_data,
                      '--output_dir', tmp_path / 'o', check=False)
    line = last_line(proc)
    assert line.startswith('error: ') and message in line, line
    assert 'Start training' not in proc.stdout


def test_files_that_are_not_what_the_flag_needs(small_data, tmp_path):
    (tmp_path / 'x.jpg').write_bytes((next((small_data / 'train').rglob('*.*'))).read_bytes())
    torch.save({'epoch': 1, 'args': {}}, tmp_path / 'no_model.pth')
    for extra, message in ((['--data_path', tmp_path / 'x.jpg'], f"--data_path {tmp_path / 'x.jpg'} is a file"),
                           (['--resume', tmp_path], f'--resume {tmp_path} is a folder'),
                           (['--resume', tmp_path / 'x.jpg'], f"{tmp_path / 'x.jpg'} is not a checkpoint"),
                           (['--resume', tmp_path / 'no_model.pth'], 'holds no model weights (its entries: args, '
                                                                    'epoch)')):
        data = [] if extra[0] == '--data_path' else ['--data_path', small_data]
        proc = run_script('run_pretrain.py', *TINY_PRETRAIN, *data, *extra, '--output_dir', tmp_path / 'o',
                          check=False)
        assert message in last_line(proc)


@pytest.mark.slow
def test_fine_tuning_refuses_a_changed_recipe_and_records_a_new_one(pretrain_ckpt, small_data, tmp_path):
    common = ['--model', 'vit_tiny_patch4', '--input_size', '32', '--batch_size', '16', '--num_workers', '0',
              '--finetune', pretrain_ckpt, '--data_path', small_data, '--warmup_epochs', '0.5', '--epochs', '2',
              '--output_dir', tmp_path / 'ft']
    run_script('run_finetune.py', *common, '--epochs', '1')
    proc = run_script('run_finetune.py', *common, check=False)
    assert 'epochs: 1 -> 2' in last_line(proc)
    proc = run_script('run_finetune.py', *common, '--new_recipe', '--layer_decay', '0.5')
    assert 'layer_decay: 0.75 -> 0.5' in proc.stdout
    starts = metrics.read_json_lines(tmp_path / 'ft' / 'log.txt', key='run_args')
    assert [s['resumed_from'] is None for s in starts] == [True, False]
    assert set(starts[1]['new_recipe']['changes']) == {'epochs', 'layer_decay'}
