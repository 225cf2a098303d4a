"""Benchmarks and plots in their quick modes, the GPU check's CPU rehearsal, and the documented flag table."""
import collections
import json
import math
import shutil

import pytest
import torch

import models_mim
import run_pretrain
from bench import gpu_check
from bench.profile_step import TensorTraffic, split_rows, structural_twin, summarise
from util import metrics
from conftest import REPO, run_script, script_env, small_mae


def assert_drawn(png):
    """A figure with content: not one flat colour, and ink (dark pixels) on a good share of its rows."""
    import numpy as np
    from PIL import Image
    grey = np.asarray(Image.open(png).convert('L'), dtype=np.float32)
    assert grey.std() > 10 and ((grey < 128).any(axis=1)).mean() > 0.3, png


def test_plot_freezeout_writes_png(tmp_path):
    png = tmp_path / 'schedule.png'
    run_script('bench/plot_freezeout.py', '--epochs', '10', '--iters_per_epoch', '20', '--warmup_epochs', '1',
               '--depth', '6', '--how_scale', 'linear', 'cubic', '--t_0', '0.5', '0.8', '--output', png)
    assert_drawn(png)
    # a run's own settings, as run_pretrain.py stores them in its checkpoints
    saved = {'epochs': 4, 'steps_per_epoch': 10, 'warmup_epochs': 0.5, 'lr': 1e-3, 'min_lr': 0.,
             'how_scale': 'linear', 't_0': 0.5, 'scale_lr': True, 'model': 'MIM_vit_tiny_patch4'}
    torch.save({'args': saved}, tmp_path / 'ckpt.pth')
    proc = run_script('bench/plot_freezeout.py', '--checkpoint', tmp_path / 'ckpt.pth', '--output', tmp_path / 'run.png')
    assert 'wrote' in proc.stdout and (tmp_path / 'run.png').stat().st_size > 1000


@pytest.mark.slow
def test_bench_freezeout_quick(tmp_path, small_data):
    run_script('bench/bench_freezeout.py', '--quick', '--data_path', small_data, '--output_dir', tmp_path,
               timeout=600)
    result = json.loads((tmp_path / 'bench_freezeout.json').read_text())
    project = [r for r in result['steps'] if not r['freeze_decoders'] and r['rules'] == 'project']
    assert [r['frozen_units'] for r in project] == [0, 2, 4, 5]
    unfrozen, most = project[0], project[3]
    assert most['memory_mb'] < unfrozen['memory_mb']  # frozen prefix keeps no activations for backward
    assert set(result['runs']) == {'ordinary', 'freezeout', 'freezeout + freeze_decoders', 'freezeout, original rules',
                                   'freezeout, nothing frozen'}
    assert all(r['cpu_median'] > 0 and -1 < r['measured_saving_cpu'] < 1 for r in result['runs'].values())
    assert {r['rules'] for r in result['steps']} == {'project', 'original', 'none'}
    ordinary = [r for r in result['steps'] if r['rules'] == 'none']  # the step without FreezeOut's optimizer groups
    assert [r['config'] for r in ordinary] == ['no FreezeOut (ordinary optimizer groups)']
    assert set(result['projection']) == {'cubic 0.8', 'linear 0.5'}
    # a saving below 100%; one step per configuration on a loaded machine can make it any negative number
    assert all(math.isfinite(v) and v < 1 for p in result['projection'].values() for v in p.values())
    assert 'predicted_saving' in result['runs']['freezeout']
    assert '| configuration |' in (tmp_path / 'bench_freezeout.md').read_text()
    assert '| FreezeOut step, ' in gpu_check.table({}, tmp_path)  # the GPU check's report reads it


def test_compiled_freezeout_runs_are_measured_against_the_ordinary_run_of_their_compile_scope():
    from bench import bench_freezeout
    args = bench_freezeout.get_args_parser().parse_args(['--compile', '--run_compile_scopes', 'model', 'blocks',
                                                         '--runs', 'freezeout, original rules'])
    configs = bench_freezeout.run_configs(args)
    assert list(configs) == ['ordinary, compiled model', 'freezeout, original rules, compiled model',
                             'ordinary, compiled blocks', 'freezeout, original rules, compiled blocks']
    assert configs['ordinary, compiled model'] == ('ordinary', 'ordinary, compiled model',
                                                   ['--compile', 'default', '--compile_scope', 'model'])
    run, baseline, extra = configs['freezeout, original rules, compiled blocks']
    assert run == 'freezeout, original rules' and baseline == 'ordinary, compiled blocks'  # its prediction, its base
    assert extra == [*bench_freezeout.RUNS[run], '--compile', 'default', '--compile_scope', 'blocks']
    eager = bench_freezeout.get_args_parser().parse_args(['--runs', 'freezeout'])
    freezeout = bench_freezeout.RUNS['freezeout']
    assert bench_freezeout.run_configs(eager) == {'ordinary': ('ordinary', 'ordinary', []),
                                                  'freezeout': ('freezeout', 'ordinary', freezeout)}


def test_docs_document_every_pretrain_flag():
    readme = (REPO / 'docs' / 'pretraining.md').read_text()
    parser = run_pretrain.get_args_parser()
    for action in parser._actions:
        for flag in action.option_strings:
            if flag.startswith('--') and flag not in ('--help', '--no-auto_resume', '--no-pin_mem',
                                                      '--no-scale_lr'):
                assert f'`{flag}`' in readme, flag


@pytest.mark.slow
def test_bench_pretrain_quick(tmp_path, small_data):
    run_script('bench/bench_pretrain.py', '--quick', '--data_path', small_data, '--num_workers', '0',
               '--swin', 'tiny_patch2_win4', '--output_dir', tmp_path, timeout=600)
    result = json.loads((tmp_path / 'bench_pretrain.json').read_text())
    names = [r['config'] for r in result['rows']]
    swin = 'MIM_swin_tiny_patch2_win4'
    assert names[:5] == ['mae_vit_tiny_patch4', 'MIM_vit_tiny_patch4', swin, f'{swin} encoder alone, visible tokens',
                         f"{swin} encoder alone, timm's dense windows, all tokens"] and len(names) == 8
    flops = {r['config']: r['gflops_per_image'] for r in result['rows']}
    assert flops['MIM_vit_tiny_patch4, 75% frozen (5 units)'] < flops['MIM_vit_tiny_patch4']  # no backward there
    assert flops[names[3]] < 0.5 * flops[names[4]]  # masked units cost nothing
    # the real loader's one stream of mask noise fits the ViT models' units only
    assert all(r['images_per_s'] > 0 and (r['images_per_s_real_loader'] is None) == ('swin' in r['config'])
               for r in result['rows'])
    assert '| configuration |' in (tmp_path / 'bench_pretrain.md').read_text()
    shutil.copy(tmp_path / 'bench_pretrain.json', tmp_path / 'bench_pretrain_bf16.json')  # as the GPU check names it
    assert '| MIM_vit_tiny_patch4, bf16 | ' in gpu_check.table({}, tmp_path)
    # by CPU time (a shared machine), with the options that change the step, and each one's peak memory
    run_script('bench/bench_pretrain.py', '--quick', '--clock', 'cpu', '--grad_ckpt', '--rope', '--frozen_fractions', '',
               '--peak_rss', '--output_dir', tmp_path, '--tag', '_cpu', timeout=600)
    result = json.loads((tmp_path / 'bench_pretrain_cpu.json').read_text())
    assert [r['config'] for r in result['rows']][2:] == ['MIM_vit_tiny_patch4, --grad_ckpt',
                                                        'mae_vit_tiny_patch4, --pos_embed rope',
                                                        'MIM_vit_tiny_patch4, --pos_embed rope']
    assert all(r['images_per_s'] > 0 and r['images_per_s_real_loader'] is None for r in result['rows'])
    rss = [r['peak_rss_mb'] for r in result['rows']]
    assert all(100 < m < 4000 for m in rss) and len(set(rss)) > 1  # each process's own peak, not an inherited one
    assert 'images per CPU-second' in (tmp_path / 'bench_pretrain_cpu.md').read_text()


@pytest.mark.slow
def test_study_quick(tmp_path, small_data):
    run_script('bench/study.py', '--quick', '--data_path', small_data, '--batch_size', '16', '--input_size', '32',
               '--size', 'tiny_patch4', '--no_mae', '--output_dir', tmp_path, timeout=900)
    result = json.loads((tmp_path / 'study.json').read_text())
    assert set(result['per_seed']) == {'LocalMIM', 'LocalMIM + FreezeOut linear 0.5',
                                       'LocalMIM + FreezeOut cubic 0.8', 'LocalMIM, equal time to FreezeOut linear 0.5',
                                       'LocalMIM, equal time to FreezeOut cubic 0.8', 'from scratch (supervised)'}
    equal_time = result['per_seed']['LocalMIM, equal time to FreezeOut cubic 0.8']['0']
    assert 1 <= equal_time['pretrain_epochs'] <= 2
    pretrained = [*result['per_seed']['LocalMIM'].values(), *result['per_seed']['LocalMIM + FreezeOut cubic 0.8'].values()]
    assert all(r['pretrain_cpu_s'] > 0 for r in pretrained)  # the run's and its workers' CPU time
    assert equal_time['time_ratio'] > 0 and equal_time['time_ratio_cpu'] > 0
    arms = (tmp_path / 'arms.jsonl').read_text().splitlines()
    assert len(arms) == 6
    pretrained_at = (tmp_path / 'seed0' / 'LocalMIM' / 'pretrain' / 'checkpoint-last.pth').stat().st_mtime_ns
    assert_drawn(tmp_path / 'study.png')
    report = (tmp_path / 'study.md').read_text()
    assert '| method |' in report
    assert '| FreezeOut cubic 0.8 | ' in report.split('minus its equal-time ordinary run')[1]  # the paired differences
    # a second run finds every arm done and trains nothing; --test_path evaluates each recorded run on another
    # set's val/ (here the same images) and records each arm again with its test accuracies
    run_script('bench/study.py', '--quick', '--data_path', small_data, '--batch_size', '16', '--input_size', '32',
               '--size', 'tiny_patch4', '--no_mae', '--output_dir', tmp_path, '--test_path', small_data, timeout=600)
    tested = json.loads((tmp_path / 'study.json').read_text())['per_seed']
    assert (tmp_path / 'arms.jsonl').read_text().splitlines()[:6] == arms
    assert len((tmp_path / 'arms.jsonl').read_text().splitlines()) == 12
    assert (tmp_path / 'seed0' / 'LocalMIM' / 'pretrain' / 'checkpoint-last.pth').stat().st_mtime_ns == pretrained_at
    plain = tested['LocalMIM']['0']
    assert {k: v for k, v in plain.items() if 'test' not in k} == result['per_seed']['LocalMIM']['0']
    last_epoch = metrics.read_json_lines(tmp_path / 'seed0' / 'LocalMIM' / 'finetune' / 'log.txt')[-1]
    assert plain['finetune_test_acc1'] == pytest.approx(last_epoch['test_acc1'])  # the last checkpoint, not the best
    assert plain['knn_test_acc1'] == plain['knn_acc1']
    assert all(0 <= r['0']['linprobe_test_acc1'] <= 100 for name, r in tested.items() if 'scratch' not in name)
    assert 'linprobe_test_acc1' not in tested['from scratch (supervised)']['0']
    assert '| finetune_test_acc1 |' in (tmp_path / 'study.md').read_text()


def test_study_report_pairs_each_reuse_arm_with_the_plain_run_of_its_seed(tmp_path):
    """--report writes the report of a study not finished, running no arm; a reuse arm that only seed 1 has
    is compared with seed 1's plain run, not with the first plain run listed."""
    def result(acc):
        return {'pretrain_s': 1., 'pretrain_cpu_s': 1., 'pretrain_epochs': 10, 'finetune_acc1': acc,
                'linprobe_acc1': acc, 'knn_acc1': acc}
    arms = [{'seed': 0, 'arm': 'LocalMIM', 'result': result(60.)}, {'seed': 1, 'arm': 'LocalMIM', 'result': result(70.)},
            {'seed': 1, 'arm': 'LocalMIM, 2 random masks, equal CPU time to LocalMIM', 'result': result(71.)}]
    (tmp_path / 'arms.jsonl').write_text(''.join(json.dumps(a) + '\n' for a in arms))
    run_script('bench/study.py', '--report', '--reuse_arms', '--freezeout_arms', 'none', '--no_mae', '--no_scratch',
               '--seeds', '0', '1', '--output_dir', tmp_path, timeout=120)
    report = (tmp_path / 'study.md').read_text()
    assert '| LocalMIM | 0, 1 | 65.0 ± 7.1 |' in report
    assert '| LocalMIM, 2 random masks | 1.0 | 1.0 | 1.0 | none |' in report  # one seed: no spread to exceed
    assert len((tmp_path / 'arms.jsonl').read_text().splitlines()) == 3


@pytest.mark.slow
def test_study_resolution_arms(tmp_path, small_data):
    """Low and progressive resolution arms, each with the full-resolution run shortened to its CPU time, all
    evaluated at the full size."""
    run_script('bench/study.py', '--quick', '--data_path', small_data, '--batch_size', '16', '--input_size', '32',
               '--size', 'tiny_patch4', '--no_mae', '--no_scratch', '--freezeout_arms', 'none', '--low_input_size',
               '16', '--input_size_schedule', '16:0.5,32', '--output_dir', tmp_path, timeout=900)
    arms = json.loads((tmp_path / 'study.json').read_text())['per_seed']
    assert set(arms) == {'LocalMIM', 'LocalMIM at 16px', 'LocalMIM at 32px, equal CPU time to 16px',
                         'LocalMIM, progressive 16:0.5,32', 'LocalMIM at 32px, equal CPU time to progressive 16:0.5,32'}
    low, full = arms['LocalMIM at 16px']['0'], arms['LocalMIM']['0']
    assert low['pretrain_cpu_s'] < full['pretrain_cpu_s'] and 0 <= low['finetune_acc1'] <= 100
    checkpoint = torch.load(tmp_path / 'seed0' / 'LocalMIM_at_16px' / 'pretrain' / 'checkpoint-last.pth')
    assert checkpoint['args']['input_size'] == 16


def test_gpu_check_stops_at_once_without_cuda(tmp_path):
    proc = run_script('bench/gpu_check.py', tmp_path, check=False)
    assert proc.returncode != 0 and proc.stderr.strip().splitlines() == [
        'error: no CUDA device here; run on a GPU machine, or pass --dry for the CPU rehearsal']


def test_every_gpu_check_part_passes_its_scripts_parser(tmp_path):
    """The parts' command lines, at the GPU sizes (--full: every part) and the dry ones, name only flags and values
    their scripts accept, so that the check cannot fail on a GPU machine for a renamed flag."""
    import importlib
    for flags in (['--full'], ['--dry']):
        args = gpu_check.get_args_parser().parse_args([str(tmp_path), *flags])
        for name, argv, _ in gpu_check.plan(args, tmp_path):
            if argv[1:3] == ['-m', 'pytest']:
                assert (REPO / argv[-1]).exists(), name
                continue
            if argv[1:3] == ['-m', 'torch.distributed.launch']:
                argv = argv[argv.index('run_pretrain.py') - 1:]
            module = importlib.import_module(argv[1].removesuffix('.py').replace('/', '.'))
            try:
                module.get_args_parser().parse_args(argv[2:])
            except SystemExit:
                pytest.fail(f'{name}: {argv[1]} refuses {argv[2:]}')


@pytest.mark.slow
def test_gpu_check_dry_run_on_cpu(tmp_path):
    """The GPU check's CPU rehearsal with tiny models, for the parts whose scripts no other test runs with these
    flags: the loaders (hw on nvImageCodec's CPU stand-in), the end-to-end benchmark and the Swin profile. The
    others' command lines are checked above, their scripts by their own tests (which also read their results through
    the check's table), the CUDA tests need a GPU."""
    import subprocess
    parts = 'make_jpegs,loader_per_core,loader_roi,loader_hw_decode,profile_step_swin,e2e,e2e_masks_mim'
    proc = subprocess.run(['bash', 'scripts/gpu_check.sh', str(tmp_path), '--dry', '--only', parts], cwd=REPO,
                          env=script_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / 'gpu_check.json').read_text())
    assert result['dry'] and all(part['ok'] for part in result['parts'].values())
    assert set(result['parts']) == set(parts.split(','))
    assert result['parts']['loader_per_core']['json']['speedup'] > 0
    table = (tmp_path / 'gpu_check.md').read_text()
    assert 'loader images/s per core' in table and '--loader roi against fast' in table
    assert '| step profile, MIM_swin_tiny_patch2_win4, batch 8, eager |' in table
    swin = json.loads((tmp_path / 'profile_step_swin.json').read_text())['rows'][0]  # Swin split by stage
    assert swin['model'] == 'MIM_swin_tiny_patch2_win4'
    assert {'encoder stage 0: blocks', 'encoder stage 2: patch merging', 'decoder 0 (4 px)', 'HOG targets'} <= set(
        swin['parts'])
    e2e = json.loads((tmp_path / 'bench_e2e.json').read_text())['rows']
    hw = e2e['--loader hw, 2 workers']  # the dry check's JPEGs: every one on the (CPU stand-in of the) decoder
    assert hw['decoded_hardware'] > 0 and hw['decoded_refused'] == hw['decoded_in_workers'] == 0
    assert all(r['images_per_s'] > 0 and r['worker_cores'] >= 0 for r in e2e.values())
    assert '| end to end, --loader fast, 2 workers |' in table and '| --loader hw (0 workers)' in table
    again = subprocess.run(['bash', 'scripts/gpu_check.sh', str(tmp_path), '--dry'], cwd=REPO, capture_output=True,
                           text=True, timeout=60)  # an earlier check's folder: refused before anything runs
    assert again.returncode != 0 and again.stderr.strip().splitlines() == [
        f'error: {tmp_path.resolve()} holds the results of an earlier check; pass a new OUTDIR']


def test_gpu_check_names_the_packages_that_differ_from_the_pins(monkeypatch):
    """A GPU image brings its own torch and timm: the check's report says which differ from requirements.txt."""
    pins = gpu_check.pinned_versions()
    found = {**pins, 'timm': '1.0.0', 'torch': pins['torch'] + '+cu130'}  # a local build suffix is no difference
    monkeypatch.setattr(gpu_check.metadata, 'version', found.get)
    versions, unpinned = gpu_check.package_versions()
    assert versions['timm'] == '1.0.0' and unpinned == [f"timm 1.0.0 (pinned {pins['timm']})"]


def test_gpu_check_without_nvimagecodec_leaves_out_only_what_needs_it(tmp_path):
    args = gpu_check.get_args_parser().parse_args([str(tmp_path), '--dry'])
    full, without = ({name: argv for name, argv, _ in gpu_check.plan(args, tmp_path, has)} for has in (True, False))
    assert set(full) - set(without) == set(gpu_check.NEEDS_NVIMGCODEC)
    assert 'hw' in full['e2e'] and 'hw' not in without['e2e'] and 'fast' in without['e2e']


def test_gpu_check_table_reports_the_whole_freezeout_runs(tmp_path):
    """The freezeout_run part (left out of the dry run above for time: bench_freezeout's runs are tested on their
    own) reaches the table with measured and predicted savings."""
    runs = {'ordinary': {'median': 10.0, 'measured_saving_wall': 0.0, 'measured_saving_cpu': 0.0},
            'freezeout, original rules': {'median': 9.0, 'measured_saving_wall': 0.1, 'measured_saving_cpu': 0.08,
                                          'predicted_saving': 0.11}}
    (tmp_path / 'freezeout_run').mkdir()
    (tmp_path / 'freezeout_run' / 'bench_freezeout.json').write_text(json.dumps({'runs': runs}))
    (tmp_path / 'freezeout_run_compiled').mkdir()
    (tmp_path / 'freezeout_run_compiled' / 'bench_freezeout.json').write_text(json.dumps({'runs': runs}))
    text = gpu_check.table({}, tmp_path)
    assert '| FreezeOut whole run, freezeout, original rules | 9.0 s, saving 10.0% (CPU time 8.0%), predicted 11.0% |' \
        in text
    assert '| FreezeOut whole run, compiled, freezeout, original rules | 9.0 s, saving 10.0%' in text


def test_gpu_check_table_reports_the_step_profiles_of_every_part(tmp_path):
    row = {'model': 'MIM_vit_base_patch16', 'batch_size': 256, 'images_per_s': 4000., 'wall_ms': 64., 'host_ms': 20.,
           'device_busy_ms': 60., 'kernels_per_step': 900, 'mfu': 0.15, 'optimizer_groups': 'decay'}
    eager = {**row, 'mode': 'eager', 'floor_ms': {'flops': 10., 'memory': 25.}, 'host_floor_ms': 30.}
    compiled = {**row, 'mode': 'compiled', 'floor_ms': {'flops': 10., 'memory': None}, 'host_floor_ms': None}
    for tag in ('', '_cudagraphs', '_blocks', '_swin'):
        (tmp_path / f'profile_step{tag}.json').write_text(json.dumps({'rows': [eager, compiled]}))
    lines = gpu_check.table({}, tmp_path).splitlines()
    assert lines.count('| step profile, MIM_vit_base_patch16, batch 256, eager | 4000 images/s, 64.0 ms/step, host '
                       '20.0 ms, device busy 60.0 ms, 900 kernels, MFU 15.0%, floors 10.0 ms (FLOPs) / 25.0 ms '
                       '(memory), host floor 30.0 ms (twin) |') == 4
    assert sum(line.endswith('batch 256, compiled | 4000 images/s, 64.0 ms/step, host 20.0 ms, device busy 60.0 ms, '
                             '900 kernels, MFU 15.0% |') for line in lines) == 4


@pytest.mark.slow
def test_profile_step_splits_an_eager_step_into_its_parts(tmp_path):
    proc = run_script('bench/profile_step.py', '--quick', '--host_floor', '--optimizer_groups', 'decay', 'per_unit',
                      '--output_dir', tmp_path)
    assert 'MIM_vit_tiny_patch4, 8, eager: first 2 steps in ' in proc.stdout  # printed before any timing
    assert 'MIM_vit_tiny_patch4, 8, eager, per_unit: first 2 steps in ' in proc.stdout
    rows = {(r['model'], r['mode'], r['optimizer_groups']): r
            for r in json.loads((tmp_path / 'profile_step.json').read_text())['rows']}
    assert all(r['warmup_s'] > 0 for r in rows.values())
    assert set(rows) == {(m, 'eager', g) for m in ('MIM_vit_tiny_patch4', 'mae_vit_tiny_patch4')
                         for g in ('decay', 'per_unit')}
    mim, mae = rows[('MIM_vit_tiny_patch4', 'eager', 'decay')], rows[('mae_vit_tiny_patch4', 'eager', 'decay')]
    assert rows[('MIM_vit_tiny_patch4', 'eager', 'per_unit')]['parts']['optimizer step']['host_ms'] > 0
    assert {'patch embedding', 'encoder blocks', 'HOG targets', 'decoder 3 (x0.5)', '  decoder 3: block', 'forward',
            'optimizer step', 'step'} <= set(mim['parts'])
    assert {'encoder blocks', 'decoder: blocks', 'forward'} <= set(mae['parts']) and 'HOG targets' not in mae['parts']
    # the tiny LocalMIM (4 decoders, HOG) issues more operators per step than the tiny MAE (one deeper decoder)
    assert mim['aten_calls_per_step'] > mae['aten_calls_per_step'] > 100
    assert mim['device_busy_ms'] is None  # the device columns are absent on CPU
    assert all(0 < r['host_floor_ms'] < r['wall_ms'] for r in rows.values())  # each model's twin, timed beside it
    # the tensor traffic of the eager operators, by part: the parts and the derived rows add up to the step
    split = dict(split_rows(mim['parts']))
    assert mim['mb_per_image'] == mim['parts']['step']['mb_per_image'] > 0
    assert sum(v['mb_per_image'] for k, v in split.items() if not k.startswith('  ')) == pytest.approx(
        mim['mb_per_image'])
    assert split['HOG targets']['mb_per_image'] > 0 and split['backward']['mb_per_image'] > split['encoder blocks'][
        'mb_per_image']
    table = (tmp_path / 'profile_step.md').read_text()
    assert '| rest of forward (masking, unshuffle, losses) |' in table and '| backward |' in table
    assert (tmp_path / 'profile_step_traces' / 'MIM_vit_tiny_patch4_b8_eager.json').stat().st_size > 0
    assert (tmp_path / 'profile_step_traces' / 'MIM_vit_tiny_patch4_b8_eager_per_unit.json').stat().st_size > 0
    assert '| MIM_vit_tiny_patch4 | 8 | eager, per-unit optimizer groups |' in table


@pytest.mark.parametrize('name, extra', [
    ('MIM_vit_base_patch16', {}), ('mae_vit_base_patch16', {'norm_pix_loss': True}),
    ('MIM_vit_small_patch16', {'pos_embed': 'rope'}), ('MIM_swin_base_patch4_win7', {})])
def test_structural_twin_issues_the_same_operators_as_its_model(name, extra):
    """The twin is a valid host floor only if a step of it makes the same operator calls as the model's step:
    counted below autograd (forward and backward), operator by operator, on batch 2."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import FlopCounterMode
    import models_mim

    class Calls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.calls[str(func.overloadpacket)] += 1
            return func(*args, **(kwargs or {}))

    def step(model, img_size=224):
        torch.manual_seed(0)
        images = torch.randn(2, 3, img_size, img_size)
        with Calls() as calls, FlopCounterMode(display=False) as flops:
            loss, _ = model(images, 0.75)
            loss.backward()
        return calls.calls, flops.get_total_flops()

    model = models_mim.all_models()[name](**extra)
    (model_calls, model_flops), (twin_calls, twin_flops) = step(model), step(*structural_twin(model, name, extra))
    assert twin_calls == model_calls and sum(model_calls.values()) > 500
    assert twin_flops < model_flops / 40


def test_tensor_traffic_counts_each_operators_tensors_once_in_every_open_range():
    from types import SimpleNamespace
    ranges = SimpleNamespace(open=['step', 'forward'])
    a = torch.ones(2 ** 18)  # 1 MB of fp32
    with TensorTraffic(ranges) as traffic:
        b = a + a  # reads a, writes b
        b.view(-1, 2)  # a view moves nothing
        ranges.open.pop()
        b.mul_(2)
    assert traffic.mb == {'step': 3.0, 'forward': 2.0}


def test_profile_summary_on_cuda_leaves_the_ranges_device_annotations_out():
    """On CUDA the profiler also puts every range on the device's timeline: the summary counts only kernels and
    copies as device work, reads the parts from their host-side ranges, and gives backward (which runs in autograd's
    own thread there, outside the step's range) the kernel time beyond the forward's and the optimizer's."""
    from types import SimpleNamespace
    cpu, cuda = SimpleNamespace(name='CPU'), SimpleNamespace(name='CUDA')

    def event(name, device, start, end, annotation=False):
        return SimpleNamespace(name=name, device_type=device, is_user_annotation=annotation, cpu_parent=None,
                               time_range=SimpleNamespace(start=start, end=end, elapsed_us=lambda: end - start))

    def average(key, device, host_us, device_us):
        return SimpleNamespace(key=key, device_type=device, cpu_time_total=host_us, device_time_total=device_us)
    events = [event('step', cuda, 0, 1000, annotation=True), event('forward', cuda, 0, 400, annotation=True),
              event('forward kernel', cuda, 0, 300), event('forward kernel', cuda, 250, 400),  # overlapping
              event('backward kernel', cuda, 600, 900), event('optimizer kernel', cuda, 950, 1000),
              event('aten::mm', cpu, 0, 10), event('aten::view', cpu, 10, 11)]
    averages = [average('step', cpu, 2000, 450), average('step', cuda, 0, 1000), average('forward', cpu, 800, 450),
                average('forward', cuda, 0, 400), average('optimizer step', cpu, 100, 50)]
    out = summarise(events, averages, ['step', 'optimizer step', 'forward'], steps=1, cuda=True)
    assert out['kernels_per_step'] == 4 and out['aten_calls_per_step'] == 1
    assert out['device_busy_ms'] == pytest.approx(0.75)  # the union of the kernels: 0-400, 600-900, 950-1000 µs
    assert out['parts']['forward'] == {'host_ms': 0.8, 'device_ms': 0.45}
    rows = dict(split_rows(out['parts']))
    assert rows['backward']['host_ms'] == pytest.approx(1.1)
    assert rows['backward']['device_ms'] == pytest.approx(0.8 - 0.45 - 0.05)  # all kernels: 800 µs


@pytest.mark.parametrize('scope', ['model', 'blocks'])
def test_benchmarks_compile_each_batch_size_with_static_shapes(monkeypatch, scope):
    """profile_step.py times batch 128 and then 256 of the same model class in one process: the second must get a
    graph of fixed sizes, as a run of its own would, not one with symbolic sizes (torch's automatic dynamic)."""
    from functools import partial
    from bench.step_timer import StepRunner
    symbolic = []

    def backend(gm, example_inputs):
        symbolic.append(sum(isinstance(x, torch.SymInt) for x in example_inputs))
        return gm.forward

    monkeypatch.setattr(torch, 'compile', partial(torch.compile, backend=backend))
    torch._dynamo.reset()
    for batch_size in (2, 4):
        torch.manual_seed(0)
        StepRunner(small_mae(depth=1), torch.randn(batch_size, 3, 16, 16), compile='default',
                   compile_scope=scope).step()
    # the whole model: one graph per batch size; blocks: the encoder's block and MAE's decoder blocks, whose
    # graphs one function shares, per batch size
    assert symbolic == [0] * (2 if scope == 'model' else 4)
    torch._dynamo.reset()


# The peak of tensor bytes live in torch's CPU allocator, from the profiler's allocation events: unlike the peak
# resident memory, it does not depend on malloc's arenas or on which kernels the CPU's instruction set selects.
MEASURE_CPU_PEAK = '''
import argparse, sys, torch
from torch.profiler import profile, ProfilerActivity
import models_mim
name, batch = sys.argv[1], int(sys.argv[2])
model = models_mim.build(argparse.Namespace(**{**models_mim.BUILD_DEFAULTS, 'model': name, 'input_size': 32}))
optimizer = torch.optim.AdamW(model.parameters())
imgs, noise = torch.randn(batch, 3, 32, 32), torch.rand(batch, model.num_mask_units)
with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
    for _ in range(2):
        with torch.autocast('cpu', dtype=torch.bfloat16):
            loss = model(imgs, 0.75, noise)[0]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
live = peak = 0
for _, nbytes in sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                        if e.name() == '[memory]'):
    live += nbytes
    peak = max(peak, live)
print(peak / 2 ** 20)
'''


@pytest.mark.slow
def test_counted_memory_grows_with_the_batch_as_a_measured_cpu_peak():
    """bench/estimate.py's count under fake tensors: its growth from batch 256 to 512 is the growth of the peak of
    tensor bytes live during the same two steps run for real on CPU (the estimate adds that growth to a measured
    peak)."""
    from bench.estimate import counted_peak_mb
    name = 'MIM_vit_tiny_patch4'
    measured = [float(run_script('-c', MEASURE_CPU_PEAK, name, batch, env={}).stdout) for batch in (256, 512)]
    counted = [counted_peak_mb(name, batch, input_size=32) for batch in (256, 512)]
    assert counted[1] - counted[0] == pytest.approx(measured[1] - measured[0], rel=0.03), (counted, measured)
    params = sum(p.numel() for p in models_mim.MIM_vit_tiny_patch4().parameters())
    assert counted[0] > 16 * params / 2 ** 20  # weights, gradients and AdamW's two moments at once
