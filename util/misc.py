"""Distributed set-up, rank-0 logging, progress with ETA, AMP loss scaling and atomic checkpoints."""
import argparse
import builtins
import datetime
import json
import math
import os
import random
import sys
import time
from collections import defaultdict, deque
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist


class UsageError(ValueError):
    """A flag, file or folder the run cannot use; the message says what to pass instead. Entry points print it
    as one line and exit (run_main)."""


def run_main(main, parser):
    """An entry point's `if __name__ == '__main__'`: parse, run, and turn a UsageError into a one-line exit."""
    try:
        main(parser.parse_args())
    except UsageError as e:
        sys.exit(f'error: {e}')


def add_bool_flag(parser, name, default, help):
    """--name / --no_name (also --no-name) pair, the MAE spelling of on/off switches."""
    parser.add_argument(f'--{name}', dest=name, action='store_true', help=f'{help} (default: {default})')
    parser.add_argument(f'--no_{name}', f'--no-{name}', dest=name, action='store_false', help=argparse.SUPPRESS)
    parser.set_defaults(**{name: default})


def add_run_args(p, output_dir):
    """Flags every entry point shares: data, output, precision, resume, loader and distributed launch."""
    p.add_argument('--data_path', default=None, type=str,
                   help='ImageFolder root (<data_path>/train/<class>/*, val/ likewise); default: the embedded real dataset')
    p.add_argument('--output_dir', default=output_dir, help='checkpoints and log.txt')
    p.add_argument('--log_dir', default=None, help='TensorBoard folder (default: output_dir)')
    p.add_argument('--amp', choices=['fp16', 'bf16', 'none'], default=None,
                   help='autocast precision (default: fp16 with loss scaling on CUDA, none on CPU)')
    p.add_argument('--print_freq', default=20, type=int)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--seed', default=0, type=int)
    p.add_argument('--resume', default='', help='checkpoint to resume from')
    add_bool_flag(p, 'auto_resume', True, 'resume from output_dir/checkpoint-last.pth when it exists')
    p.add_argument('--start_epoch', default=0, type=int)
    p.add_argument('--num_workers', default=8, type=int)
    add_bool_flag(p, 'pin_mem', True, 'pin CPU memory of the loader for faster GPU transfers')
    p.add_argument('--skip_bad_images', action='store_true',
                   help='skip unreadable training images (counted per epoch) instead of stopping')
    p.add_argument('--world_size', default=1, type=int, help='set by the launcher')
    p.add_argument('--local_rank', '--local-rank', default=-1, type=int, help='set by torch.distributed.launch')
    p.add_argument('--dist_url', default='env://')
    p.add_argument('--dist_timeout', default=1800, type=int, help='seconds before a stuck collective fails')


def check_run_args(args):
    """Checks shared by the entry points, before anything is built; also fills the defaults that
    depend on the device."""
    if args.accum_iter < 1:
        raise UsageError(f"--accum_iter must be >= 1, got {args.accum_iter}")
    if args.resume and not Path(args.resume).is_file():
        raise UsageError(f"--resume {args.resume} does not exist")
    args.log_dir = args.log_dir or args.output_dir
    for folder in {args.output_dir, args.log_dir} - {None, ''}:
        try:
            Path(folder).mkdir(parents=True, exist_ok=True)
            probe = Path(folder) / f'.write-test-{os.getpid()}'
            probe.touch()
            probe.unlink()
            for stale in Path(folder).glob('.checkpoint-*.pth.tmp*'):  # left by a run killed while saving
                if is_main_process():
                    stale.unlink(missing_ok=True)
        except OSError as e:
            raise UsageError(f"cannot write to {folder} ({e.strerror}); pass a writable --output_dir/--log_dir")
    if args.amp is None:
        args.amp = 'fp16' if args.device.startswith('cuda') else 'none'


def setup_run(args):
    """Distributed init, argument checks, the printed configuration and per-rank seeds; returns the device."""
    init_distributed_mode(args)
    check_run_args(args)
    print(f'command: {" ".join(sys.argv)}')
    print(json.dumps(vars(args), indent=1, default=str))
    seed_everything(args.seed + get_rank())
    return torch.device(args.device)


def scale_lr(args):
    """lr = blr * effective batch / 256 (MAE), printed with its parts."""
    eff_batch = args.batch_size * args.accum_iter * get_world_size()
    if args.lr is None:
        args.lr = args.blr * eff_batch / 256
    print(f'base lr: {args.lr * 256 / eff_batch:.2e}  actual lr: {args.lr:.2e}  effective batch: {eff_batch}  '
          f'accumulate: {args.accum_iter}  steps: {args.steps_per_epoch}/epoch, {args.total_steps} in all')


def optimizer_step(args, epoch, iteration):
    """The optimizer step of an epoch's iteration (micro-batch): the clock of every schedule."""
    return epoch * args.steps_per_epoch + iteration // args.accum_iter


def set_schedule_steps(args, loader_len):
    args.steps_per_epoch = loader_len // args.accum_iter
    args.total_steps = args.epochs * args.steps_per_epoch
    args.warmup_steps = int(args.warmup_epochs * args.steps_per_epoch)


# ---------------------------------------------------------------- distributed
def is_dist():
    return dist.is_available() and dist.is_initialized()


def get_rank():
    return dist.get_rank() if is_dist() else 0


def get_world_size():
    return dist.get_world_size() if is_dist() else 1


def is_main_process():
    return get_rank() == 0


def silence_non_main(is_main):
    """Only rank 0 prints, unless print(..., force=True)."""
    builtin_print = builtins.print

    def print(*args, force=False, **kwargs):
        if is_main or force:
            now = datetime.datetime.now().strftime('%H:%M:%S')
            builtin_print(f'[{now}]', *args, flush=True, **kwargs)

    builtins.print = print


def init_distributed_mode(args):
    """torchrun / torch.distributed.launch (env RANK, WORLD_SIZE, LOCAL_RANK) or SLURM; NCCL on GPU, gloo on CPU."""
    if 'RANK' in os.environ and 'WORLD_SIZE' in os.environ:
        args.rank, args.world_size = int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])
        args.gpu = int(os.environ.get('LOCAL_RANK', max(args.local_rank, 0)))
    elif 'SLURM_PROCID' in os.environ and int(os.environ.get('SLURM_NTASKS', 1)) > 1:
        args.rank, args.world_size = int(os.environ['SLURM_PROCID']), int(os.environ['SLURM_NTASKS'])
        args.gpu = args.rank % max(1, torch.cuda.device_count())
    else:
        args.distributed, args.rank, args.world_size, args.gpu = False, 0, 1, 0
        silence_non_main(True)
        return
    args.distributed = True
    use_cuda = args.device.startswith('cuda')
    if use_cuda:
        torch.cuda.set_device(args.gpu)
        args.device = f'cuda:{args.gpu}'
    backend = 'nccl' if use_cuda else 'gloo'
    dist.init_process_group(backend, init_method=args.dist_url, world_size=args.world_size, rank=args.rank,
                            timeout=datetime.timedelta(seconds=args.dist_timeout))
    silence_non_main(args.rank == 0)
    print(f'distributed init: rank {args.rank}/{args.world_size}, local {args.gpu}, {backend}, {args.dist_url}')
    dist.barrier()


def finish():
    """Leave the process group together: a rank that exits while others still use it can abort."""
    if is_dist():
        dist.barrier()
        dist.destroy_process_group()


def wrap_ddp(model, args):
    """DDP over the parameters that are trainable now; rebuilt by the caller when that set changes."""
    if not args.distributed:
        return model
    ids = [args.gpu] if args.device.startswith('cuda') else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False,
                                                     gradient_as_bucket_view=True)


def wrap_for_training(model, args):
    """DDP when distributed, then torch.compile with --compile (compiling the DDP wrapper, as torch advises)."""
    model = wrap_ddp(model, args)
    if not args.compile:
        return model
    print('torch.compile: the first steps compile the model')
    return torch.compile(model)


def broadcast_buffers(model):
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank."""
    if is_dist():
        for b in model.buffers():
            dist.broadcast(b, 0)


def all_reduce_mean(x):
    if not is_dist():
        return x
    t = torch.tensor(x, dtype=torch.float64, device='cuda' if dist.get_backend() == 'nccl' else 'cpu')
    dist.all_reduce(t)
    return (t / get_world_size()).item()


def seed_everything(seed):
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


# ---------------------------------------------------------------- logging
def to_float(v):
    return v.item() if isinstance(v, torch.Tensor) else float(v)


class SmoothedValue:
    """Recent window and global average of a metric; tensors are read (one sync) only when printed."""

    def __init__(self, window=20, fmt='{median:.4f} ({global_avg:.4f})'):
        self.window, self.fmt = deque(maxlen=window), fmt
        self.total, self.count = 0., 0

    def update(self, value, n=1):
        self.window.append(value)
        self.total = self.total + value * n
        self.count += n

    def _recent(self):
        vals = list(self.window)
        if vals and isinstance(vals[0], torch.Tensor):
            return torch.stack([v.float() for v in vals]).tolist()
        return vals

    @property
    def median(self):
        return float(np.median(self._recent()))

    @property
    def value(self):
        return to_float(self.window[-1])

    @property
    def global_avg(self):
        return to_float(self.total) / max(1, self.count)

    def synchronize_between_processes(self):
        self.total = all_reduce_mean(to_float(self.total))

    def __str__(self):
        return self.fmt.format(median=self.median, global_avg=self.global_avg, value=self.value)


class MetricLogger:
    def __init__(self, delimiter='  '):
        self.meters = defaultdict(SmoothedValue)
        self.delimiter = delimiter

    def add_meter(self, name, meter):
        self.meters[name] = meter

    def update(self, **kwargs):
        for k, v in kwargs.items():
            self.meters[k].update(v.detach() if isinstance(v, torch.Tensor) else v)

    def synchronize_between_processes(self):
        for meter in self.meters.values():
            meter.synchronize_between_processes()

    def averages(self):
        return {k: m.global_avg for k, m in self.meters.items()}

    def __str__(self):
        return self.delimiter.join(f'{k}: {m}' for k, m in self.meters.items())

    def log_every(self, iterable, print_freq, header='', total=None):
        """Yield from `iterable`, printing progress, ETA, step time and data time every `print_freq` items."""
        total = len(iterable) if total is None else total
        step_time, data_time = SmoothedValue(fmt='{avg:.4f}'), SmoothedValue()
        start = end = time.time()
        width = len(str(total))
        for i, obj in enumerate(iterable):
            if i >= total:
                break
            data_time.update(time.time() - end)
            yield obj
            step_time.update(time.time() - end)
            if i % print_freq == 0 or i == total - 1:
                eta = datetime.timedelta(seconds=int(np.mean(step_time._recent()) * (total - i - 1)))
                mem = f'  max mem: {torch.cuda.max_memory_allocated() / 2 ** 20:.0f}MB' if torch.cuda.is_available() else ''
                print(f'{header} [{i:>{width}}/{total}]  eta: {eta}  {self}  time: {step_time.median:.4f}'
                      f'  data: {data_time.median:.4f}{mem}')
            end = time.time()
        elapsed = datetime.timedelta(seconds=int(time.time() - start))
        print(f'{header} Total time: {elapsed} ({(time.time() - start) / max(1, total):.4f} s / it)')


def read_json_lines(path):
    """The records of a log.txt written by append_json_line."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def append_json_line(path, record):
    """One JSON line per epoch, written by rank 0 with a flush+fsync so a killed run keeps its log."""
    with open(path, 'a') as f:
        f.write(json.dumps(record) + '\n')
        f.flush()
        os.fsync(f.fileno())


class NonFiniteLoss(RuntimeError):
    pass


def check_finite(loss, epoch, step):
    value = loss.item()
    if not math.isfinite(value):
        raise NonFiniteLoss(f"loss is {value} at epoch {epoch}, step {step}")
    return value


# ---------------------------------------------------------------- AMP
AMP_DTYPES = {'fp16': torch.float16, 'bf16': torch.bfloat16, 'none': None}


class LossScaler:
    """Backward with fp16 loss scaling when enabled; an update step only when asked, skipped when no
    parameter got a gradient (GradScaler would raise 'No inf checks were recorded')."""
    def __init__(self, device_type, enabled):
        self.scaler = torch.amp.GradScaler(device_type, enabled=enabled)

    def __call__(self, loss, optimizer, parameters, clip_grad=None, update_grad=True):
        self.scaler.scale(loss).backward()
        if not update_grad:
            return None
        params = [p for p in parameters if p.grad is not None]
        if not params:
            return None
        norm = None
        if clip_grad is not None:
            self.scaler.unscale_(optimizer)
            norm = torch.nn.utils.clip_grad_norm_(params, clip_grad)
        self.scaler.step(optimizer)
        self.scaler.update()
        return norm

    def state_dict(self):
        return self.scaler.state_dict()

    def load_state_dict(self, state):
        self.scaler.load_state_dict(state)


# ---------------------------------------------------------------- checkpoints
def atomic_save(obj, path):
    """Write to a temporary file in the same folder, fsync, then rename: a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f'.{path.name}.tmp{os.getpid()}')
    with open(tmp, 'wb') as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def rng_state():
    state = {'torch': torch.get_rng_state(), 'numpy': np.random.get_state(), 'python': random.getstate()}
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state['torch'])
    np.random.set_state(state['numpy'])
    random.setstate(state['python'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def save_checkpoint(args, epoch, step, model, optimizer, loss_scaler, name, extra=None):
    """Called on every rank (the RNG states of all ranks are gathered); rank 0 writes
    `<output_dir>/checkpoint-<name>.pth` with everything a resume needs."""
    rngs = [None] * get_world_size()
    if is_dist():
        dist.all_gather_object(rngs, rng_state())
    else:
        rngs = [rng_state()]
    if not is_main_process() or not args.output_dir:
        return None
    state = {'model': model.state_dict(), 'optimizer': optimizer.state_dict(), 'scaler': loss_scaler.state_dict(),
             'epoch': epoch, 'step': step, 'args': vars(args), 'rng': rngs, **(extra or {})}
    path = Path(args.output_dir) / f'checkpoint-{name}.pth'
    atomic_save(state, path)
    return path


def load_checkpoint_file(path):
    """Our own checkpoints hold numpy RNG state and args, hence weights_only=False (trusted files only)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"checkpoint {path} does not exist; check --resume / --finetune")
    try:
        return torch.load(path, map_location='cpu', weights_only=False)
    except Exception as e:
        raise UsageError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e}); "
                         f"it may be truncated: pass an earlier checkpoint with --resume")


def numbered_checkpoints(output_dir):
    """checkpoint-<epoch>.pth files, newest first."""
    found = [(int(p.stem.split('-')[1]), p) for p in Path(output_dir).glob('checkpoint-*.pth')
             if p.stem.split('-')[1].isdigit()]
    return [p for _, p in sorted(found, reverse=True)]


def remove_old_checkpoints(output_dir, keep):
    if keep > 0 and is_main_process():
        for old in numbered_checkpoints(output_dir)[keep:]:
            old.unlink()


def find_resume_checkpoint(args):
    """--resume if given, else with --auto_resume the output folder's checkpoint-last.pth."""
    if args.resume:
        return args.resume
    last = Path(args.output_dir or '.') / 'checkpoint-last.pth'
    return str(last) if args.auto_resume and args.output_dir and last.is_file() else ''


def load_resume_checkpoint(args):
    """(path, checkpoint) to resume from. Auto-resume falls back from an unreadable checkpoint-last.pth
    to the newest readable checkpoint-<epoch>.pth, saying so; an explicit --resume must load."""
    path = find_resume_checkpoint(args)
    if not path:
        return '', {}
    if args.resume:
        return path, load_checkpoint_file(path)
    for candidate in [Path(path)] + numbered_checkpoints(args.output_dir):
        try:
            return str(candidate), load_checkpoint_file(candidate)
        except UsageError as e:
            print(f'warning: {e}; trying an older checkpoint', force=True)
    raise UsageError(f"no readable checkpoint in {args.output_dir}; pass --no_auto_resume to start over")


def resume_from_checkpoint(args, model, optimizer, loss_scaler):
    """Restore model, optimizer, scaler and RNG; sets args.start_epoch and returns the checkpoint ({} if none)."""
    path, ckpt = load_resume_checkpoint(args)
    if not path:
        return {}
    saved_model = ckpt.get('args', {}).get('model')
    if saved_model and saved_model != args.model:
        raise UsageError(f"{path} was written by --model {saved_model}, not {args.model}; "
                         f"pass --model {saved_model} or another --output_dir")
    model.load_state_dict(ckpt['model'])
    if 'optimizer' in ckpt and optimizer is not None:
        try:
            optimizer.load_state_dict(ckpt['optimizer'])
        except ValueError:
            raise UsageError(f"the optimizer state in {path} has other parameter groups than this run's "
                             f"(another version's weight-decay grouping, or other FreezeOut flags); resume with "
                             f"the code and flags that wrote it, or start from its weights in another --output_dir")
        loss_scaler.load_state_dict(ckpt['scaler'])
        args.start_epoch = ckpt['epoch'] + 1
        if len(ckpt.get('rng', [])) == get_world_size():
            set_rng_state(ckpt['rng'][get_rank()])
        else:  # another world size: fresh per-rank streams
            seed_everything(args.seed + get_rank() + args.start_epoch)
    print(f"Resumed from {path} (epoch {ckpt['epoch']}, step {ckpt.get('step', 0)})")
    return ckpt
