"""The GPU check: CUDA tests, an NCCL launch, and the GPU figures in one command. Each part runs as its own
process with a time limit, writes its results to OUTDIR as it finishes, and a failed part is reported without
stopping the others. All parts take about 30 minutes on one H200; --only picks the ones a change needs.

  bash scripts/gpu_check.sh OUTDIR           # on a CUDA machine
  bash scripts/gpu_check.sh OUTDIR --only cuda_tests,make_jpegs,e2e     # just these parts
  bash scripts/gpu_check.sh OUTDIR --dry     # the same parts on CPU with tiny models (CI)

Writes OUTDIR/gpu_check.json and OUTDIR/gpu_check.md (device, driver, package versions, date) and prints the table.
"""
import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def get_args_parser():
    p = argparse.ArgumentParser('GPU check')
    p.add_argument('output_dir')
    p.add_argument('--dry', action='store_true', help='CPU, tiny models, few steps: checks the script itself')
    p.add_argument('--full', action='store_true', help='also fp16 with --compile (a few more minutes)')
    p.add_argument('--skip', default='', help='comma-separated parts to leave out')
    p.add_argument('--only', default='', help='comma-separated parts to run, the others left out')
    p.add_argument('--workers', type=int, default=min(14, os.cpu_count() or 1), help='loader workers for the '
                   'whole-node loader figure')
    return p


def run(name, argv, out, timeout, env=None):
    """Run one part; its output goes to OUTDIR/<name>.log. Returns (ok, seconds, the output)."""
    start = time.time()
    try:
        proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, 'PYTHONUNBUFFERED': '1', **(env or {})})
        ok, text = proc.returncode == 0, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        ok, text = False, f'{e.stdout or ""}{e.stderr or ""}\ntimed out after {timeout} s'
    seconds = time.time() - start
    (out / f'{name}.log').write_text(text if isinstance(text, str) else text.decode())
    print(f"{name}: {'ok' if ok else 'FAILED'} in {seconds:.0f} s", flush=True)
    return ok, seconds, text if isinstance(text, str) else ''


NEEDS_NVIMGCODEC = ('loader_roi', 'loader_hw_decode')  # and the e2e part's --loader hw arm


def plan(args, out, has_nvimgcodec=True):
    """(name, argv, timeout) of every part: GPU sizes, or tiny CPU ones with --dry. Without nvImageCodec the
    parts that need it are left out (the report says so) and the e2e part runs without its hw arm."""
    py = sys.executable
    if args.dry:
        size, px, batch, dev, nproc, reps = 'tiny_patch4', '32', '8', 'cpu', 2, '1'
        tiny_run = ['--model', 'MIM_vit_tiny_patch4', '--input_size', '32', '--batch_size', '8', '--device', 'cpu']
        jpeg_px, jpeg_batch = '64', '4'
    else:
        size, px, batch, dev, nproc, reps = 'base_patch16', '224', '128', 'cuda', torch.cuda.device_count(), '3'
        tiny_run = ['--model', 'MIM_vit_tiny_patch8', '--input_size', '64', '--batch_size', '64']
        jpeg_px, jpeg_batch = '224', '64'
    steps = '1' if args.dry else '3'
    bench = ['--size', size, '--input_size', px, '--batch_size', batch, '--device', dev, '--reps', reps,
             '--steps', steps, '--output_dir', str(out), '--num_workers', str(args.workers)]
    jpegs = out / 'jpegs'
    data = ['bench/bench_data.py', '--data_path', str(jpegs), '--input_size', jpeg_px, '--batch_size', jpeg_batch,
            '--json', '--batches', '10' if not args.dry else '2', '--rounds', reps]
    parts = [
        ('cuda_tests', [py, '-m', 'pytest', '-q', '-m', 'cuda', '-k', 'not cuda_graph', 'tests/test_cuda.py'], 240),
        # two compiled runs through FreezeOut events, CUDA graphs against the default mode (mostly compile time)
        ('cuda_graph_run', [py, '-m', 'pytest', '-q', '-m', 'cuda', '-k', 'cuda_graph', 'tests/test_cuda.py'], 420),
        # the loader parts and the launch read these
        ('make_jpegs', [py, 'bench/bench_data.py', '--make_jpegs', str(jpegs),
                        '--per_class', '100' if not args.dry else '2'], 120),
        ('launch', [py, '-m', 'torch.distributed.launch', f'--nproc_per_node={nproc}', 'run_pretrain.py', *tiny_run,
                    '--data_path', str(jpegs),
                    '--epochs', '1', '--warmup_epochs', '0.5', '--num_workers', '2', '--print_freq', '5',
                    '--output_dir', str(out / 'launch_run'), '--no_auto_resume'], 240),
        ('throughput_bf16', [py, 'bench/bench_pretrain.py', *bench, '--amp', 'bf16', '--tag', '_bf16',
                             *(['--frozen_fractions', '0.5'] if args.dry else [])], 300),
        ('throughput_fp16', [py, 'bench/bench_pretrain.py', *bench, '--amp', 'fp16', '--tag', '_fp16',
                             '--frozen_fractions', ''], 300),
        ('throughput_bf16_compiled', [py, 'bench/bench_pretrain.py', *bench, '--amp', 'bf16', '--compile',
                                      '--frozen_fractions', '', '--tag', '_bf16_compiled'], 300),
    ]
    if args.full:
        parts.append(('throughput_fp16_compiled', [py, 'bench/bench_pretrain.py', *bench, '--amp', 'fp16',
                                                   '--compile', '--frozen_fractions', '', '--tag', '_fp16_compiled'],
                      420))
    # LocalMIM on Swin-B against ViT-B, and its sparse encoder against timm's dense windows (eager: compiled, its
    # five configurations would outlast a part; profile_step_swin compiles Swin-B beside ViT-B)
    swin = ['--swin', 'tiny_patch2_win4' if args.dry else 'base_patch4_win7', '--frozen_fractions', '', '--amp', 'bf16']
    parts.append(('throughput_swin_bf16', [py, 'bench/bench_pretrain.py', *bench, *swin, '--tag', '_swin_bf16'], 300))
    # low-resolution pre-training (FastMIM): MAE-B and LocalMIM-B at 224, 160 and 128 px, each against itself at 224
    sizes = ['32', '16'] if args.dry else ['224', '160', '128']
    parts.append(('throughput_lowres_bf16', [py, 'bench/bench_pretrain.py', *bench, '--amp', 'bf16',
                                             '--input_sizes', *sizes, '--tag', '_lowres_bf16'], 300))
    # Each compiled configuration of a ViT-B compiles for 1-2 minutes before it is timed (its log prints how
    # long), so a part holds at most four of them: one GPU call may run 10 minutes.
    # Where the eager step's time goes, part by part, LocalMIM against MAE at the recipes' batch and half of it
    # (compiled at 256 in profile_step_cudagraphs, at 128 in throughput_bf16_compiled)
    profile = [py, 'bench/profile_step.py', '--input_size', px, '--device', dev, '--amp', 'bf16', '--reps', reps,
               '--steps', steps, '--output_dir', str(out)]
    parts.append(('profile_step', [*profile, '--size', size, '--batch_sizes', *(['8'] if args.dry else ['128', '256']),
                                   '--modes', 'eager', '--host_floor'], 300))
    # the compiled step against the same replayed as CUDA graphs (torch.compile's reduce-overhead), batch 256
    parts.append(('profile_step_cudagraphs', [*profile, '--size', size, '--batch_sizes', '8' if args.dry else '256',
                                              '--modes', 'compiled', 'cudagraphs', '--tag', '_cudagraphs'], 540))
    # LocalMIM's compiled step against the same compiled block by block (--compile_scope blocks, FreezeOut's)
    parts.append(('profile_step_blocks', [*profile, '--models', f'MIM_vit_{size}', '--batch_sizes',
                                          '8' if args.dry else '256', '--modes', 'compiled', 'compiled_blocks',
                                          '--tag', '_blocks'], 360))
    # the same for LocalMIM on Swin-B beside ViT-B, at the recipes' batch
    models = ['MIM_swin_tiny_patch2_win4', 'MIM_vit_tiny_patch4'] if args.dry else \
        ['MIM_swin_base_patch4_win7', 'MIM_vit_base_patch16']
    parts.append(('profile_step_swin', [*profile, '--models', *models, '--batch_sizes', '8' if args.dry else '256',
                                        '--modes', *(['eager'] if args.dry else ['eager', 'compiled']),
                                        '--tag', '_swin'], 480))
    freezeout = [py, 'bench/bench_freezeout.py', '--model', f'MIM_vit_{size}', '--input_size', px, '--batch_size', batch,
                 '--device', dev, '--amp', 'bf16' if not args.dry else 'none']
    # whole runs on the check's JPEGs (linked 20 times: 156 steps per epoch), the cubic 0.8 schedule compressed
    # into 2 epochs, against the ordinary run
    freezeout_runs = [*freezeout, '--how_scale', 'cubic', '--t_0', '0.8', '--data_path', str(jpegs),
                      '--data_repeat', '20' if not args.dry else '1', '--run_epochs', '2',
                      '--run_workers', str(args.workers)]
    parts += [
        ('freezeout_steps', [*freezeout, '--reps', reps, '--run_epochs', '0', '--output_dir', str(out)], 300),
        # original rules and nothing frozen, eager, alternating
        ('freezeout_run', [*freezeout_runs, '--reps', reps, '--run_repeats', '2' if not args.dry else '1',
                           '--runs', 'freezeout, original rules', 'freezeout, nothing frozen',
                           '--output_dir', str(out / 'freezeout_run')], 600),
        # original rules compiled block by block (the default), each run from an empty compiler cache: what the
        # freeze events compile included. The whole model recompiled at each of ViT-B's 12 events would take longer
        # than a GPU call may run (measured on CPU: docs/freezeout.md)
        ('freezeout_run_compiled', [*freezeout_runs, '--reps', '1', '--run_repeats', '1', '--compile',
                                    '--run_compile_scopes', 'blocks', '--runs', 'freezeout, original rules',
                                    '--output_dir', str(out / 'freezeout_run_compiled')], 420),
        ('loader_per_core', [py, *data, '--num_workers', '0', '--baseline'], 240),
        # the crop-box decode beside the full one (needs nvImageCodec: requirements.txt)
        ('loader_roi', [py, *data, '--num_workers', '0', '--also_loaders', 'roi'], 240),
        # many batches per round: the workers' prefetched batches must not dominate the timing
        ('loader_workers', [py, *data, '--num_workers', str(args.workers), '--device', dev, '--batches',
                            '150' if not args.dry else '8'], 180),
        ('loader_profile', [py, 'bench/bench_data.py', '--data_path', str(jpegs), '--input_size', jpeg_px,
                            '--profile', '300' if not args.dry else '10'], 120),
        ('loader_device_decode', [py, *data, '--num_workers', '0', '--loader', 'device', '--device', dev], 120),
        # the crop boxes on the hardware JPEG decoder against nvJPEG on the SMs: host and device time per batch
        ('loader_hw_decode', [py, *data, '--num_workers', '0', '--loader', 'hw', '--also_loaders', 'device',
                              '--device', dev], 180),
    ]
    # the training loop fed from JPEG files by each loader, against a batch already on the device; then the same
    # with the compiled step replayed as CUDA graphs, fed by the loader that needs fewest cores
    def e2e(loaders, compile_mode):
        run = (['--model', 'MIM_vit_tiny_patch4', '--input_size', '32', '--batch_size', '8', '--device', 'cpu',
                '--num_workers', '2', '--warmup', '2', '--steps', '3', '--rounds', '1'] if args.dry else
               ['--model', 'MIM_vit_base_patch16', '--input_size', '224', '--batch_size', '256', '--amp', 'bf16',
                '--compile', compile_mode, '--device', 'cuda', '--num_workers', '8', '--warmup', '30', '--steps',
                '100', '--profile_steps', '10', '--rounds', '2'])
        loaders = [name for name in loaders if has_nvimgcodec or name != 'hw']
        return [py, 'bench/bench_e2e.py', '--data_path', str(jpegs / 'train'), *run, '--loaders', *loaders,
                '--output_dir', str(out)]
    # several masks per crop (--masks_per_image 1, 2, 4) through the real loader: LocalMIM-B and MAE-B
    masks = (['--model', 'MIM_vit_tiny_patch4', '--input_size', '32', '--batch_size', '8', '--device', 'cpu',
              '--num_workers', '2', '--warmup', '1', '--steps', '2', '--rounds', '1'] if args.dry else
             ['--input_size', '224', '--batch_size', '256', '--amp', 'bf16', '--device', 'cuda', '--num_workers', '8',
              '--warmup', '20', '--steps', '60', '--profile_steps', '0', '--rounds', '1'])
    for model in (['MIM_vit_tiny_patch4'] if args.dry else ['MIM_vit_base_patch16', 'mae_vit_base_patch16']):
        parts.append((f"e2e_masks_{model.split('_')[0].lower()}",
                      [py, 'bench/bench_e2e.py', '--data_path', str(jpegs / 'train'), *masks, '--model', model,
                       '--masks_per_image', '1', '2', '4', '--output_dir', str(out), '--tag',
                       f"_masks_{model.split('_')[0].lower()}"], 420))
    parts += [('e2e', e2e(['fast', 'hw'] if args.dry else ['fast', 'hw', 'device'], 'default'), 600),
              ('e2e_cudagraphs', [*e2e(['hw' if has_nvimgcodec else 'fast'], 'reduce-overhead'), '--tag',
                                  '_cudagraphs'], 420)]
    names = {name for name, _, _ in parts}
    skip, only = (set(v.split(',')) - {''} for v in (args.skip, args.only))
    for flag, chosen in (('--skip', skip), ('--only', only)):
        if chosen - names:
            raise ValueError(f"{flag} {','.join(sorted(chosen - names))}: no such part (parts: {', '.join(names)})")
    chosen = [part for part in parts if part[0] not in skip and (not only or part[0] in only)]
    return [part for part in chosen if has_nvimgcodec or part[0] not in NEEDS_NVIMGCODEC]


def json_line(text):
    lines = [line for line in text.splitlines() if line.startswith('{')]
    return json.loads(lines[-1]) if lines else None


PACKAGES = ('torch', 'torchvision', 'timm', 'numpy', 'nvidia-nvimgcodec-cu13')  # what the figures depend on


def pinned_versions():
    """{package: version} of requirements.txt's pins."""
    return dict(line.split('==') for line in (REPO / 'requirements.txt').read_text().splitlines()
                if '==' in line and not line.startswith('#'))


def package_versions():
    """{package: version or None} of PACKAGES, and the list of those that differ from requirements.txt's pins
    (a local build suffix such as +cu130 aside): a GPU image brings its own packages (see docs/measurements.md on
    carrying the pinned ones)."""
    pins = pinned_versions()
    found = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    unpinned = [f'{name} {found[name]} (pinned {pins[name]})' for name in PACKAGES
                if found[name] and found[name].split('+')[0] != pins[name]]
    return found, unpinned


def machine():
    if not torch.cuda.is_available():
        return {'device': f'CPU ({os.cpu_count()} cores)', 'driver': '-'}
    try:
        driver = subprocess.run(['nvidia-smi', '--query-gpu=driver_version', '--format=csv,noheader'],
                                capture_output=True, text=True).stdout.strip().splitlines()[0]
    except (OSError, IndexError):
        driver = 'unknown'
    return {'device': f'{torch.cuda.device_count()} x {torch.cuda.get_device_name()}', 'driver': driver}


def table(results, out):
    """Markdown: one row per figure."""
    rows = []
    for tag in ('bf16', 'fp16', 'bf16_compiled', 'fp16_compiled', 'swin_bf16', 'lowres_bf16'):
        path = out / f'bench_pretrain_{tag}.json'
        if not path.exists():
            continue
        for r in json.loads(path.read_text())['rows']:
            mfu = f", MFU {r['mfu']:.1%}" if 'mfu' in r else ''
            real = r['images_per_s_real_loader']
            rows.append((f"{r['config']}, {tag.replace('_', ' ')}",
                         f"{r['images_per_s']:.0f} images/s{f' (real loader {real:.0f})' if real else ''}, "
                         f"{r['memory_mb']:.0f} MB, {r['gflops_per_image']:.1f} GFLOPs/image{mfu}"))
    for path in (out / f'profile_step{tag}.json' for tag in ('', '_cudagraphs', '_blocks', '_swin')):
        if not path.exists():
            continue
        for r in json.loads(path.read_text())['rows']:
            busy = f", device busy {r['device_busy_ms']:.1f} ms, {r['kernels_per_step']:.0f} kernels" \
                if r['device_busy_ms'] is not None else ''
            mfu = f", MFU {r['mfu']:.1%}" if r['mfu'] is not None else ''
            floor = r.get('floor_ms') or {}
            floors = f", floors {floor['flops']:.1f} ms (FLOPs) / {floor['memory']:.1f} ms (memory)" \
                if floor.get('memory') is not None else ''
            twin = f", host floor {r['host_floor_ms']:.1f} ms (twin)" if r['host_floor_ms'] is not None else ''
            groups = '' if r['optimizer_groups'] == 'decay' else ', per-unit optimizer groups'
            rows.append((f"step profile, {r['model']}, batch {r['batch_size']}, {r['mode']}{groups}",
                         f"{r['images_per_s']:.0f} images/s, {r['wall_ms']:.1f} ms/step, host "
                         f"{r['host_ms']:.1f} ms{busy}{mfu}{floors}{twin}"))
    path = out / 'bench_freezeout.json'
    if path.exists():
        for r in json.loads(path.read_text())['steps']:
            rows.append((f"FreezeOut step, {r['config']}", f"{r['step_s']['median'] * 1e3:.1f} ms, "
                                                           f"{r['memory_mb']:.0f} MB"))
    for part, label in (('freezeout_run', ''), ('freezeout_run_compiled', ', compiled')):
        path = out / part / 'bench_freezeout.json'
        if not path.exists():
            continue
        for name, r in json.loads(path.read_text())['runs'].items():
            predicted = f", predicted {r['predicted_saving']:.1%}" if 'predicted_saving' in r else ''
            rows.append((f'FreezeOut whole run{label}, {name}',
                         f"{r['median']:.1f} s, saving {r['measured_saving_wall']:.1%} "
                         f"(CPU time {r['measured_saving_cpu']:.1%}){predicted}"))
    per_core = results.get('loader_per_core', {}).get('json')
    if per_core:
        rows.append(('loader images/s per core, --loader fast (0 workers)',
                     f"{per_core['img_per_s']:.0f} (facebookresearch/mae: {per_core['baseline_img_per_s']:.0f}, "
                     f"{per_core['speedup']:.2f}x)"))
    roi = (results.get('loader_roi', {}).get('json') or {}).get('pipelines')
    if roi:
        fast, crop = (roi[f'this project (--loader {n})']['img_per_s'] for n in ('fast', 'roi'))
        rows.append(('loader images/s per core, --loader roi against fast (0 workers)',
                     f"{crop:.0f} against {fast:.0f} ({crop / fast:.2f}x)"))
    for name, label in (('loader_workers', 'loader images/s, --loader fast, {w} workers'),
                        ('loader_device_decode', 'loader images/s, --loader device (host side, 0 workers)')):
        j = results.get(name, {}).get('json')
        if j:
            rows.append((label.format(w=j['num_workers']), f"{j['img_per_s']:.0f}; device work "
                                                            f"{j['device_ms_per_batch']:.1f} ms per batch of {j['batch_size']}"))
    hw = (results.get('loader_hw_decode', {}).get('json') or {}).get('pipelines')
    if hw:
        for name in ('hw', 'device'):
            j = hw[f'this project (--loader {name})']
            rows.append((f'--loader {name} (0 workers): host images/s, device ms per batch',
                         f"{j['img_per_s']:.0f}, {j['device_ms_per_batch']:.1f} ms"))
    for path, mode in ((out / 'bench_e2e.json', ''), (out / 'bench_e2e_cudagraphs.json', ', CUDA graphs')):
        if not path.exists():
            continue
        for name, r in json.loads(path.read_text())['rows'].items():
            idle = f", device idle {r['device_idle']:.0%}" if r['device_idle'] is not None else ''
            rows.append((f'end to end{mode}, {name}', f"{r['images_per_s']:.0f} images/s ({r['of_synthetic']:.0%} of "
                                                f"synthetic){idle}, loader workers {r['worker_cores']:.1f} cores, "
                                                f"main process {r['main_cores']:.1f}"))
    for name, r in results.items():
        rows.append((f'part {name}', f"{'ok' if r['ok'] else 'FAILED'} ({r['seconds']:.0f} s)"))
    return '\n'.join(['| figure | value |', '|---|---|'] + [f'| {a} | {b} |' for a, b in rows])


def main(args):
    if not args.dry and not torch.cuda.is_available():
        sys.exit('error: no CUDA device here; run on a GPU machine, or pass --dry for the CPU rehearsal')
    out = Path(args.output_dir).resolve()
    if (out / 'gpu_check.json').exists():  # its other files would mix with this run's (e.g. of a skipped part)
        sys.exit(f'error: {out} holds the results of an earlier check; pass a new OUTDIR')
    out.mkdir(parents=True, exist_ok=True)
    has_nvimgcodec = importlib.util.find_spec('nvidia.nvimgcodec') is not None
    versions, unpinned = package_versions()
    info = {**machine(), 'torch': torch.__version__, 'date': time.strftime('%Y-%m-%d'), 'dry': args.dry,
            'nvimgcodec': has_nvimgcodec, 'python': sys.version.split()[0], 'packages': versions,
            'unpinned': unpinned}
    header = (f"{info['device']}, driver {info['driver']}, Python {info['python']}, "
              + ', '.join(f'{name} {v}' for name, v in versions.items() if v) + f", {info['date']}"
              + (f"; not at requirements.txt's pins: {', '.join(unpinned)}" if unpinned else ''))
    print(f'GPU check on {header}', flush=True)
    try:
        parts = plan(args, out, has_nvimgcodec)
    except ValueError as e:
        sys.exit(f'error: {e}')
    if not has_nvimgcodec:
        print(f"nvImageCodec is not installed (pip install nvidia-nvimgcodec-cu13): left out "
              f"{', '.join(NEEDS_NVIMGCODEC)} and the e2e part's --loader hw", flush=True)
    results = {}
    for name, argv, timeout in parts:
        ok, seconds, text = run(name, argv, out, timeout)
        tail = text[-1500:]  # the JSON line may sit above a library's messages on stderr
        results[name] = {'ok': ok, 'seconds': round(seconds, 1), 'json': json_line(text) if ok else None,
                         'tail': None if ok else tail}
        (out / 'gpu_check.json').write_text(json.dumps({**info, 'parts': results}, indent=1))
    left_out = '' if has_nvimgcodec else \
        f"; nvImageCodec not installed: {', '.join(NEEDS_NVIMGCODEC)} and the e2e part's hw arm left out"
    md = f"GPU check: {header}{' (dry run on CPU)' if args.dry else ''}{left_out}\n\n{table(results, out)}\n"
    (out / 'gpu_check.md').write_text(md)
    print('\n' + md)
    failed = [n for n, r in results.items() if not r['ok']]
    if failed:
        sys.exit(f"error: {', '.join(failed)} failed; see {out}/<part>.log")


if __name__ == '__main__':
    main(get_args_parser().parse_args())
