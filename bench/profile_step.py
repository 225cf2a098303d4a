"""Where a pre-training step's time goes: LocalMIM against MAE of the same size, per batch size, eager and compiled,
side by side in one process (configurations alternate; median over --reps).

Per configuration: wall time per step (synchronised), host time per step (until the step's last call returns,
without waiting for the device), and from torch.profiler the device's busy time (the union of its kernels)
and idle share, kernel launches per step, and the aten operators the host issues per step (on CPU the proxy
for launches). Eager steps are split into parts by ranges on the model's modules: patch embedding, encoder
blocks, HOG targets, each decoder (embedding, block, norm, head), the rest of the forward (masking, unshuffle,
losses), backward and the optimizer step; compiled steps are fused across those borders and get totals only.
Eager steps also get the MB per image their operators read and write, per part (TensorTraffic), and on CUDA the
step's floors: its FLOPs at the measured matmul peak, its traffic at the measured copy bandwidth. --host_floor
times each model's structural twin beside it: the host's work per step, whatever the arithmetic.

  python bench/profile_step.py                 # CPU: tiny models, eager
  python bench/profile_step.py --device cuda --size base_patch16 --input_size 224 --batch_sizes 128 256 \\
      --amp bf16 --modes eager compiled
  python bench/profile_step.py --models MIM_swin_base_patch4_win7 MIM_vit_base_patch16 --input_size 224 ...
Writes profile_step{tag}.md and .json, and a Chrome trace per configuration, into --output_dir.
"""
import argparse
import collections
import functools
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.autograd.profiler import record_function
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import util.misc as misc  # noqa: E402
from util.errors import UsageError  # noqa: E402
from bench.bench_pretrain import copy_bandwidth, flops_per_image, matmul_peak  # noqa: E402
from bench.step_timer import StepRunner  # noqa: E402
import models_mim  # noqa: E402

# operators that only make a view: no kernel on any device
VIEW_OPS = {'aten::view', 'aten::_unsafe_view', 'aten::reshape', 'aten::transpose', 'aten::t', 'aten::permute',
            'aten::expand', 'aten::unsqueeze', 'aten::squeeze', 'aten::select', 'aten::slice', 'aten::as_strided',
            'aten::alias', 'aten::detach', 'aten::flatten', 'aten::split', 'aten::chunk', 'aten::unbind',
            'aten::narrow', 'aten::view_as', 'aten::expand_as', 'aten::lift_fresh', 'aten::unflatten'}
STEP, FORWARD, OPTIMIZER = 'step', 'forward', 'optimizer step'
OPTIMIZER_GROUPS = {'decay': False, 'per_unit': True}  # StepRunner's freezeout (per-unit groups)
# torch.compile's mode and run_pretrain.py's --compile_scope
MODES = {'eager': (None, None), 'compiled': ('default', 'model'), 'compiled_blocks': ('default', 'blocks'),
         'cudagraphs': ('reduce-overhead', 'model')}


def get_args_parser():
    p = argparse.ArgumentParser('pre-training step profile')
    p.add_argument('--size', default='tiny_patch8', help='model size suffix shared by mae_vit_* and MIM_vit_*')
    p.add_argument('--models', nargs='+', metavar='NAME',
                   help='the models to profile side by side (default: MIM_vit_SIZE and mae_vit_SIZE; any '
                        'pre-training model, LocalMIM on Swin included)')
    p.add_argument('--input_size', type=int, default=64)
    p.add_argument('--batch_sizes', type=int, nargs='+', default=[16])
    p.add_argument('--modes', nargs='+', choices=list(MODES), default=['eager'],
                   help='eager; compiled (torch.compile of the whole model); compiled_blocks (each block, decoder and '
                        'the HOG target compiled on its own, as --compile_scope blocks); cudagraphs (torch.compile '
                        'mode reduce-overhead: the compiled forward and backward replayed as CUDA graphs)')
    p.add_argument('--device', default='cpu')
    p.add_argument('--amp', default='none', choices=['none', 'fp16', 'bf16'])
    p.add_argument('--reps', type=int, default=3, help='timed repetitions per configuration (alternating)')
    p.add_argument('--steps', type=int, default=3, help='steps per repetition, and profiled steps')
    p.add_argument('--quick', action='store_true', help='smoke test: tiny patch4 at 32 px, batch 8, one repetition')
    p.add_argument('--output_dir', default='results')
    p.add_argument('--tag', default='', help='suffix of the output file names')
    p.add_argument('--optimizer_groups', nargs='+', choices=list(OPTIMIZER_GROUPS), default=['decay'],
                   help="run_pretrain.py's AdamW groups: decay (two, decay and no decay) or per_unit (one per "
                        'FreezeOut unit, each with its own lr, as with --freezeout; nothing frozen); name both to step '
                        'them side by side')
    p.add_argument('--host_floor', action='store_true',
                   help="also time each model's structural twin (structural_twin) in each mode: the host's time per "
                        'step whatever the arithmetic, which a device cannot step faster than unless CUDA graphs '
                        'replay the step')
    return p


def structural_twin(model, name, extra):
    """`name` with its widths cut to 4 channels per attention head (8 in Swin's decoders, whose finest is half as
    wide) and, for a ViT, its image to a 4x4 token grid: the same modules and operators as `model` with 1/45-1/150
    of its arithmetic per image at the same size (ViT-B 1/146, MAE-B 1/86, Swin-B 1/46; Swin's windows need its
    image size), run at batch 2 with fused AdamW as on CUDA. Its step time is the host's work per step (Python,
    dispatch, autograd, launches): the floor under the model's step wherever the host launches it."""
    if hasattr(model, 'layers'):  # Swin: stage widths double with their heads; the finest decoder is half as wide
        encoder, decoder, decoder_width = model.layers[0].blocks[0], model.decoders[1].block, 8
        img_size = model.patch_embed.img_size[0]
    else:
        encoder, decoder_width, img_size = model.blocks[0], 4, 4 * model.patch_embed.patch_size[0]
        decoder = model.decoders[0].block if hasattr(model, 'decoders') else model.decoder_blocks[0]
    widths = {'embed_dim': 4 * encoder.attn.num_heads, 'decoder_dim': decoder_width * decoder.attn.num_heads}
    return models_mim.all_models()[name](img_size=img_size, **extra, **widths), img_size


def spans(model):
    """(first module, last module, part) of every profiled stretch of the forward, in module order: one module for
    most parts; a Swin block is not called as a module (models_swin.sparse_swin_block calls its parts), so its
    stretch runs from its first part (norm1) to its last (drop_path2)."""
    out = []
    for name, module in model.named_modules():
        path = name.split('.')
        if path[0] == 'layers' and len(path) == 4 and path[2] == 'blocks':
            out.append((module.norm1, module.drop_path2, f'encoder stage {path[1]}: blocks'))
        elif name and part_of(name, model):
            out.append((module, module, part_of(name, model)))
    return out


def part_of(name, model):
    """The profile part of a module (by its qualified name), or None for modules inside a part."""
    path = name.split('.')
    if name == 'patch_embed':
        return 'patch embedding'
    if path[0] == 'blocks' and len(path) == 2:
        return 'encoder blocks'
    if path[0] == 'layers' and path[2:] == ['downsample']:  # Swin: a stage's patch merging, then its blocks
        return f'encoder stage {path[1]}: patch merging'
    if name == 'hog':
        return 'HOG targets'
    if path[0] == 'tap_norms' and len(path) == 2:
        return 'tap norms'
    if path[0] == 'decoders' and len(path) == 2:
        scale = f'x{model.scales[int(path[1])]:g}' if hasattr(model, 'scales') else \
            f'{model.cell_sizes[int(path[1])]} px'  # Swin: its target cells
        return f'decoder {path[1]} ({scale})'
    if path[0] == 'decoders' and len(path) == 3:
        return f'  decoder {path[1]}: {"head" if path[2] == "pred" else path[2]}'
    if path[0] in ('decoder_embed', 'decoder_norm', 'decoder_pred') or (path[0] == 'decoder_blocks' and len(path) == 2):
        return f'decoder: {path[0].split("_")[1]}'  # MAE's
    if name == 'norm':
        return 'encoder norm'
    return None


class Ranges:
    """Profiler ranges on modules (forward pre-hook opens, forward hook closes) and on the optimizer step."""

    def __init__(self, model, optimizer, parts=True):
        self.ranges, self.handles, self.labels = [], [], [STEP, OPTIMIZER]  # then the parts in module order
        # a compiled step gets no module ranges: hooks would be traced into its graph
        for first, last, label in [(model, model, FORWARD)] + spans(model) if parts else []:
            self.handles += [first.register_forward_pre_hook(functools.partial(self.enter, label)),
                             last.register_forward_hook(self.exit)]
            self.labels += [label] if label not in self.labels else []
        self.handles += [optimizer.register_step_pre_hook(functools.partial(self.enter, OPTIMIZER)),
                         optimizer.register_step_post_hook(self.exit)]

    def enter(self, label, *hook_args):
        self.ranges.append(record_function(label))
        self.ranges[-1].__enter__()

    def exit(self, *hook_args):
        self.ranges.pop().__exit__(None, None, None)

    @property
    def open(self):
        """The labels of the ranges open now."""
        return [r.name for r in self.ranges]

    def remove(self):
        for h in self.handles:
            h.remove()


def busy_us(device_ops):
    """Length of the union of the intervals of device_work's events (µs): the time the device was doing anything."""
    total, end = 0., float('-inf')
    for start, stop in sorted((e.time_range.start, e.time_range.end) for e in device_ops):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def device_work(events):
    """The kernels and copies among profiler events: on CUDA the profiler also puts every range (record_function,
    the optimizer's step) on the device's timeline, as an annotation spanning its kernels, which is no device work."""
    return [e for e in events if e.device_type.name != 'CPU' and not e.is_user_annotation]


def profile_steps(runner, steps, trace_path, parts):
    """torch.profiler over `steps` steps, with the Chrome trace written; see summarise."""
    cuda = runner.device.type == 'cuda'
    ranges = Ranges(runner.model, runner.optimizer, parts)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            with record_function(STEP):
                runner.step()
        if cuda:
            torch.cuda.synchronize()
    ranges.remove()
    prof.export_chrome_trace(str(trace_path))
    return summarise(prof.events(), prof.key_averages(), ranges.labels, steps, cuda)


class TensorTraffic(TorchDispatchMode):
    """MB of the tensors each non-view operator reads and writes (inputs and outputs, each counted once), summed
    into every range open when it runs: what eager kernels move through device memory at the least, caches aside.
    Operators that torch.compile fuses share their intermediate tensors in registers and move less."""

    def __init__(self, ranges):
        super().__init__()
        self.ranges, self.mb = ranges, collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if f'aten::{func._overloadpacket.__name__}' not in VIEW_OPS:
            tensors = {id(t): t for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)}
            mb = sum(t.numel() * t.element_size() for t in tensors.values()) / 2 ** 20
            for label in set(self.ranges.open):
                self.mb[label] += mb
        return out


def tensor_traffic(runner):
    """{part: MB per image} of one eager step's operators (TensorTraffic), by the parts of profile_steps."""
    ranges = Ranges(runner.model, runner.optimizer)
    with TensorTraffic(ranges) as traffic:
        ranges.enter(STEP)
        runner.step()
        ranges.exit()
    ranges.remove()
    return {label: mb / len(runner.batch) for label, mb in traffic.mb.items()}


def summarise(events, averages, labels, steps, cuda):
    """Per-part host and device ms per step, device busy ms, device operations (kernels and copies) and non-view
    aten calls per step. The parts are read from their host-side ranges, whose device time is that of the kernels
    their operators launched. Backward runs in autograd's own thread on CUDA, outside the step's range there, so
    its device time is what the step's kernels took beyond the forward's and the optimizer's."""
    device_ops = device_work(events)
    aten = [e for e in events if e.name.startswith('aten::') and e.name not in VIEW_OPS
            and not (e.cpu_parent is not None and e.cpu_parent.name.startswith('aten::'))]
    host_side = {e.key: e for e in averages if e.device_type.name == 'CPU'}
    parts = {label: {'host_ms': host_side[label].cpu_time_total / 1e3 / steps,
                     'device_ms': host_side[label].device_time_total / 1e3 / steps if cuda else None}
             for label in labels if label in host_side}  # a module the forward never calls has no range
    if cuda:
        parts[STEP]['device_ms'] = sum(e.time_range.elapsed_us() for e in device_ops) / 1e3 / steps
    return {'parts': parts,
            'device_busy_ms': busy_us(device_ops) / 1e3 / steps if cuda else None,
            'kernels_per_step': len(device_ops) / steps if cuda else None, 'aten_calls_per_step': len(aten) / steps}


def split_rows(parts):
    """Table rows of the step's parts in order, with the derived ones: the rest of the forward and backward."""
    step, forward = parts[STEP], parts[FORWARD]
    named = {k: v for k, v in parts.items() if k not in (STEP, FORWARD, OPTIMIZER)}
    top = [k for k in named if not k.startswith('  ')]

    def minus(a, b_keys, src=named):
        return {key: (a[key] - sum(src[k][key] for k in b_keys) if a[key] is not None else None) for key in a}
    rows = list(named.items())
    rows.append(('rest of forward (masking, unshuffle, losses)', minus(forward, top)))
    rows.append(('backward', minus(step, [FORWARD, OPTIMIZER], parts)))
    rows.append((OPTIMIZER, parts[OPTIMIZER]))
    return rows


def main(args):
    if args.quick:
        args.size, args.input_size, args.batch_sizes, args.reps, args.steps = 'tiny_patch4', 32, [8], 1, 1
    device = torch.device(args.device)
    cuda = device.type == 'cuda'
    out = Path(args.output_dir)
    (out / f'profile_step{args.tag}_traces').mkdir(parents=True, exist_ok=True)
    runners, flops, twins = {}, {}, {}
    names = args.models or [f'MIM_vit_{args.size}', f'mae_vit_{args.size}']
    unknown = set(names) - set(models_mim.all_models())
    if unknown:
        raise UsageError(f"--models {', '.join(sorted(unknown))}: no such model; pick from "
                         f"{', '.join(models_mim.all_models())}")
    for mode, batch_size, groups, name in itertools.product(args.modes, args.batch_sizes, args.optimizer_groups,
                                                            names):
        torch.manual_seed(0)
        extra = {'norm_pix_loss': True} if name.startswith('mae') else {}
        model = models_mim.all_models()[name](img_size=args.input_size, **extra)
        batch = torch.randn(batch_size, 3, args.input_size, args.input_size, device=device)
        flops[name] = flops.get(name) or flops_per_image(model, batch[:2].cpu())
        compile_mode, scope = MODES[mode]
        per_unit = OPTIMIZER_GROUPS[groups]
        runners[(name, batch_size, mode, groups)] = StepRunner(
            model.to(device), batch, args.amp, compile=compile_mode, compile_scope=scope, freezeout=per_unit)
        if args.host_floor and (name, mode, groups) not in twins:
            twin, twin_size = structural_twin(model, name, extra)
            twins[(name, mode, groups)] = StepRunner(
                twin.to(device), torch.randn(2, 3, twin_size, twin_size, device=device), args.amp,
                compile=compile_mode, compile_scope=scope, freezeout=per_unit,
                fused=True)  # CUDA's optimizer, on any device
    # warm-up: compilation and CUDA-graph capture, timed (the figure that sizes a GPU check's part)
    config = lambda key: ', '.join(map(str, key[:-1] if key[-1] == 'decay' else key))  # noqa: E731
    warmup_s = {key: r.warm_up(config(key)) for key, r in runners.items()}
    for key, r in twins.items():
        r.warm_up(f'{config(key)}, structural twin')

    timed = {**runners, **{('twin', *key): r for key, r in twins.items()}}
    wall = {key: [] for key in timed}
    host = {key: [] for key in timed}
    for _ in range(args.reps):  # alternating, so that drift hits every configuration alike
        for key, r in timed.items():
            for _ in range(args.steps):
                if cuda:
                    torch.cuda.synchronize()
                start = time.perf_counter()
                r.step()
                host[key].append(time.perf_counter() - start)
                if cuda:
                    torch.cuda.synchronize()
                wall[key].append(time.perf_counter() - start)
    peak, bandwidth = (matmul_peak(device), copy_bandwidth(device)) if cuda else (None, None)
    machine = torch.cuda.get_device_name() if cuda else f'CPU, {torch.get_num_threads()} threads'
    header = (f"{', '.join(names)}, {args.input_size}px, amp {args.amp}, {machine}, {time.strftime('%Y-%m-%d')}"
              + (f', MFU against the measured bf16 matmul peak of {peak / 1e12:.0f} TFLOP/s; floors: the step\'s '
                 f'FLOPs at that peak, its eager operators\' tensor traffic at the measured copy bandwidth of '
                 f'{bandwidth / 1e12:.2f} TB/s' if peak else ''))

    rows = []
    for key, r in runners.items():  # the report is rewritten as each configuration's profile is done
        name, batch_size, mode, groups = key
        tag = f'{name}_b{batch_size}_{mode}' + ('' if groups == 'decay' else f'_{groups}')
        prof = profile_steps(r, args.steps, out / f'profile_step{args.tag}_traces' / f'{tag}.json', mode == 'eager')
        traffic = tensor_traffic(r) if mode == 'eager' else None
        for label, part in prof['parts'].items():
            part['mb_per_image'] = traffic.get(label, 0.) if traffic else None
        step_s = statistics.median(wall[key])
        row = {'model': name, 'batch_size': batch_size, 'mode': mode, 'optimizer_groups': groups,
               'images_per_s': batch_size / step_s,
               'wall_ms': step_s * 1e3, 'host_ms': statistics.median(host[key]) * 1e3,
               'gflops_per_image': flops[name] / 1e9, 'mfu': batch_size / step_s * flops[name] / peak if peak else None,
               'mb_per_image': traffic[STEP] if traffic else None, 'warmup_s': warmup_s[key], **prof,
               'host_floor_ms': statistics.median(wall[('twin', name, mode, groups)]) * 1e3 if twins else None}
        if cuda:
            row['device_idle'] = 1 - row['device_busy_ms'] / row['wall_ms']  # the profiled steps' own busy time
            row['floor_ms'] = {'flops': flops[name] * batch_size / peak * 1e3,
                               'memory': traffic[STEP] * 2 ** 20 * batch_size / bandwidth * 1e3 if traffic else None}
        rows.append(row)
        text = write_report(out, args.tag, header, rows)
    print(text)
    print(f'wrote {out}/profile_step{args.tag}.json, .md and _traces/')


def write_report(out, tag, header, rows):
    """profile_step{tag}.md and .json of the rows so far; returns the markdown."""
    fmt = lambda v, spec: '-' if v is None else format(v, spec)  # noqa: E731
    lines = ['| model | batch | mode | images/s | wall ms / step | host ms / step | device busy ms / step | '
             'device idle | kernels / step | aten calls / step | GFLOPs / image | MFU | MB / image, eager operators | '
             'floor ms / step, FLOPs / memory | host floor ms / step (twin) | first 2 steps (s) |',
             '|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|']
    split = []
    for row in rows:
        floor = row.get('floor_ms', {})
        mode = row['mode'] + ('' if row['optimizer_groups'] == 'decay' else ', per-unit optimizer groups')
        lines.append(f"| {row['model']} | {row['batch_size']} | {mode} | {row['images_per_s']:.1f} | "
                     f"{row['wall_ms']:.1f} | {row['host_ms']:.1f} | {fmt(row['device_busy_ms'], '.1f')} | "
                     f"{fmt(row.get('device_idle'), '.0%')} | {fmt(row['kernels_per_step'], '.0f')} | "
                     f"{row['aten_calls_per_step']:.0f} | {row['gflops_per_image']:.2f} | {fmt(row['mfu'], '.1%')} | "
                     f"{fmt(row['mb_per_image'], '.1f')} | {fmt(floor.get('flops'), '.1f')} / "
                     f"{fmt(floor.get('memory'), '.1f')} | {fmt(row['host_floor_ms'], '.1f')} | "
                     f"{row['warmup_s']:.1f} |")
        if row['mode'] == 'eager':
            split.append(f"\n**{row['model']}, batch {row['batch_size']}, {mode}** (step {row['wall_ms']:.1f} ms wall)"
                         '\n\n| part | host ms / step | device ms / step | MB / image |\n|---|---|---|---|')
            split += [f"| {label} | {v['host_ms']:.2f} | {fmt(v['device_ms'], '.2f')} | {v['mb_per_image']:.1f} |"
                      for label, v in split_rows(row['parts'])]
    text = header + '\n\n' + '\n'.join(lines + split)
    (out / f'profile_step{tag}.json').write_text(json.dumps({'setup': header, 'rows': rows}, indent=1))
    (out / f'profile_step{tag}.md').write_text(text + '\n')
    return text


if __name__ == '__main__':
    misc.run_main(main, get_args_parser())
