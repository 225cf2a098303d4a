"""Run set-up: the flags every entry point shares and their checks, one-line usage errors, seeds, the
optimizer-step clock and lr scaling, AMP precision and loss scaling."""
import json
import os
import random
import sys
import traceback
from pathlib import Path

import numpy as np
import torch

from util import distributed, preemption
from util.distributed import get_rank, init_distributed_mode, is_main_process
from util.errors import UsageError
from util.redact import redact, redacted_args


def run_main(main, parser):
    """An entry point's `if __name__ == '__main__'`: parse, run, turn a UsageError into a one-line exit, and a
    stop on a signal (util/preemption.py) into its exit status once every rank has left together."""
    try:
        main(parser.parse_args())
    except UsageError as e:
        sys.exit(f'error: {e}')
    except preemption.Preempted as e:
        print(e)
        traceback.clear_frames(e.__traceback__)  # the stopped run's DDP wrapper goes before its process group
        distributed.finish()
        sys.exit(preemption.EXIT_PREEMPTED)


def add_bool_flag(parser, name, default, help):
    """--name / --no_name (also --no-name) pair, the MAE spelling of on/off switches."""
    parser.add_argument(f'--{name}', dest=name, action='store_true', help=f'{help} (default: {default})')
    parser.add_argument(f'--no_{name}', f'--no-{name}', dest=name, action='store_false', help=f'turn off --{name}')
    parser.set_defaults(**{name: default})


def add_run_args(p, output_dir):
    """Flags every entry point shares: data, output, precision, resume, loader and distributed launch."""
    p.add_argument('--data_path', default=None, type=str,
                   help='ImageFolder root (<data_path>/train/<class>/*, val/ likewise), or tar shards made by '
                        'tools.make_shards (their folder, a <split>.json, or a brace pattern of train shards); '
                        'default: the embedded real dataset')
    p.add_argument('--shard_cache', default=None,
                   help='folder that keeps a local copy of shards named by URL (default: ~/.cache/mim_shards)')
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
    p.add_argument('--global_batch', type=int,
                   help='images per optimizer step over all processes; --accum_iter follows from it on whatever number '
                        'of processes the run starts or resumes on (a resumed run keeps its checkpoint\'s anyway)')
    p.add_argument('--new_global_batch', action='store_true',
                   help="resume with another global batch than the checkpoint's (--global_batch, or batch_size x "
                        "accum_iter x processes); lr and schedule follow the new one")
    p.add_argument('--new_recipe', action='store_true',
                   help="resume although flags that define the run (lr and schedule, objective, FreezeOut, seed, "
                        "augmentation, the number of images: util/recipe.py) differ from the checkpoint's; each change "
                        "is printed, applied and recorded in log.txt and the checkpoints (default: refused)")
    p.add_argument('--num_workers', default=8, type=int)
    add_bool_flag(p, 'pin_mem', True, 'pin CPU memory of the loader for faster GPU transfers')
    p.add_argument('--skip_bad_images', action='store_true',
                   help='skip unreadable training images (counted per epoch) instead of stopping')
    p.add_argument('--world_size', default=1, type=int, help='set by the launcher')
    p.add_argument('--local_rank', '--local-rank', default=-1, type=int, help='set by torch.distributed.launch')
    p.add_argument('--dist_url', default='env://')
    p.add_argument('--dist_timeout', default=1800, type=int, help='seconds before a stuck collective fails')
    p.add_argument('--stop_signals', default='TERM,USR1',
                   help='signals that stop the run at the next optimizer step after writing checkpoint-last.pth '
                        '(exit status 75; the same command resumes); none: the default actions (a kill)')


def check_run_args(args):
    """Checks shared by the entry points, before anything is built; also fills the defaults that
    depend on the device."""
    for flag in ('batch_size', 'accum_iter', 'global_batch', 'input_size', 'epochs'):
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            raise UsageError(f"--{flag} must be >= 1, got {value}")
    for flag in ('lr', 'blr', 'min_lr', 'weight_decay', 'warmup_epochs'):
        value = getattr(args, flag, None)
        if value is not None and value < 0:
            raise UsageError(f"--{flag} must be >= 0, got {value}")
    if hasattr(args, 'warmup_epochs') and args.warmup_epochs and args.warmup_epochs >= args.epochs:
        raise UsageError(f"--warmup_epochs {args.warmup_epochs} leaves no epoch of the cosine in --epochs "
                         f"{args.epochs}: pass a warm-up shorter than the run")
    if args.resume and Path(args.resume).is_dir():
        raise UsageError(f"--resume {args.resume} is a folder: pass a checkpoint file in it, such as "
                         f"{Path(args.resume) / 'checkpoint-last.pth'}")
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
    print(f'command: {redact(" ".join(sys.argv))}')
    print(json.dumps(redacted_args(vars(args)), indent=1, default=str))
    seed_everything(args.seed + get_rank())
    time_conv_algorithms()
    return torch.device(args.device)


def time_conv_algorithms():
    """cuDNN times its algorithms for each new convolution shape and keeps the fastest, as facebookresearch/mae's
    entry points set it: a run's shapes are fixed, so this happens in its first steps. The heuristic choice can be
    far slower for transposed convolutions, as LocalMIM's heads (pytorch/pytorch#51933)."""
    torch.backends.cudnn.benchmark = True


def global_batch(args):
    """Images per optimizer step over all processes (MAE's effective batch): batch_size x accum_iter x processes."""
    return args.batch_size * args.accum_iter * args.world_size


def scale_lr(args):
    """lr = blr * effective batch / 256 (MAE), printed with its parts."""
    eff_batch = global_batch(args)
    if args.lr is None:
        args.lr = args.blr * eff_batch / 256
    if args.min_lr > args.lr:
        raise UsageError(f"--min_lr {args.min_lr} is above the lr {args.lr:.2e}: the cosine would raise the lr; "
                         f"pass a --min_lr below it")
    print(f'base lr: {args.lr * 256 / eff_batch:.2e}  actual lr: {args.lr:.2e}  effective batch: {eff_batch}  '
          f'accumulate: {args.accum_iter}  steps: {args.steps_per_epoch}/epoch, {args.total_steps} in all')


def optimizer_step(args, epoch, iteration):
    """The optimizer step of an epoch's iteration (micro-batch): the clock of every schedule."""
    return epoch * args.steps_per_epoch + iteration // args.accum_iter


def set_schedule_steps(args, loader_len):
    args.steps_per_epoch = loader_len // args.accum_iter
    args.total_steps = args.epochs * args.steps_per_epoch
    args.warmup_steps = int(args.warmup_epochs * args.steps_per_epoch)


def seed_everything(seed):
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def seed_micro_batch(args, epoch, iteration):
    """Seed what a training step draws (drop path, dropout: torch, the device included; mixup and cutmix: NumPy)
    by its micro-batch's place in the epoch, micro-batch `iteration * world + rank` of util.datasets.EpochSampler:
    the same micro-batch then gets the same draws on any number of processes."""
    micro_batch = iteration * args.world_size + args.rank
    seed_everything(int(np.random.default_rng([args.seed, epoch, micro_batch]).integers(2 ** 31)))




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


