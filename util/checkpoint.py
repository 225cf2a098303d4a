"""Checkpoints: atomic writes, the RNG states of every rank, exact resume with fallback to an older file,
and safe loading: only tensors and plain values are unpickled, so a checkpoint cannot run code."""
import argparse
import os
import pickle
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from util import recipe
from util.distributed import get_rank, get_world_size, is_dist, is_main_process
from util.errors import UsageError
from util.redact import redacted_args
from util.misc import global_batch, seed_everything


class CheckpointWriteError(UsageError):
    """A checkpoint could not be written (a full disk, a quota); the previous file is intact."""


def atomic_save(obj, path):
    """Write to a temporary file in the same folder, fsync, then rename: a reader never sees half a file. A failed
    write (a full disk, or any OSError) removes the temporary file, keeps the previous `path` and raises
    CheckpointWriteError naming the folder and its free space."""
    path = Path(path)
    tmp = path.with_name(f'.{path.name}.tmp{os.getpid()}')
    try:
        with open(tmp, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save turns the OSError of a failed write into a RuntimeError
        tmp.unlink(missing_ok=True)
        cause = e if isinstance(e, OSError) else e.__context__
        if not isinstance(cause, OSError):
            raise
        free = shutil.disk_usage(path.parent).free
        raise CheckpointWriteError(
            f"cannot write {path.name} to {path.parent} ({cause.strerror}; "
            f"{free / 2**30:.2f} GiB free there); the previous checkpoint is kept: free space or pass another "
            f"--output_dir, then run the same command to resume") from None
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def rng_state():
    """Every generator's state as tensors and plain values (a plain torch.load opens the checkpoint)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {'torch': torch.get_rng_state(), 'python': random.getstate(),
             'numpy': {'name': name, 'keys': torch.from_numpy(keys.astype(np.int64)), 'pos': pos,
                       'has_gauss': has_gauss, 'cached_gaussian': cached}}
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state['torch'])
    numpy_state = state['numpy']
    if isinstance(numpy_state, dict):
        numpy_state = (numpy_state['name'], numpy_state['keys'].numpy().astype(np.uint32), numpy_state['pos'],
                       numpy_state['has_gauss'], numpy_state['cached_gaussian'])
    np.random.set_state(numpy_state)  # older checkpoints: NumPy's own tuple
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
             'epoch': epoch, 'step': step, 'args': redacted_args(vars(args)), 'rng': rngs, **(extra or {})}
    path = Path(args.output_dir) / f'checkpoint-{name}.pth'
    atomic_save(state, path)
    return path


def save_mid_epoch(args, epoch, next_iter, step, model, optimizer, loss_scaler, extra=None):
    """checkpoint-last.pth inside `epoch` before iteration `next_iter` (optimizer step `step`): its epoch is the last
    completed one. next_iter counts this run's micro-batches; a resume converts it (resume_position)."""
    return save_checkpoint(args, epoch - 1, step, model, optimizer, loss_scaler, 'last',
                           {'next_iter': next_iter, **(extra or {})})


# Beyond tensors and plain values, the only types a checkpoint may hold: the arguments facebookresearch/mae and
# Haoqing-Wang/LocalMIM save (argparse.Namespace) and the NumPy RNG state of this project's older checkpoints.
SAFE_TYPES = [argparse.Namespace, np.ndarray, np.dtype, type(np.dtype(np.uint32)), type(np.dtype(np.float64)),
              np._core.multiarray._reconstruct, (np._core.multiarray._reconstruct, 'numpy.core.multiarray._reconstruct')]


def load_checkpoint_file(path):
    """A checkpoint's contents, unpickled with weights_only=True and the SAFE_TYPES allow-list: a file that
    needs any other type is refused, and nothing in it runs."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"checkpoint {path} is a folder: pass a checkpoint file in it, such as "
                         f"{path / 'checkpoint-last.pth'}")
    if not path.is_file():
        raise UsageError(f"checkpoint {path} does not exist; check --resume / --finetune")
    with open(path, 'rb') as f:
        magic = f.read(2)
    if magic != b'PK' and magic[:1] != b'\x80':  # torch.save writes a zip file (a pickle before torch 1.6)
        raise UsageError(f"{path} is not a checkpoint (not a file written by torch.save); pass a "
                         f"checkpoint-<epoch>.pth or checkpoint-last.pth")
    try:
        with torch.serialization.safe_globals(SAFE_TYPES):
            found = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r'GLOBAL (\S+)', str(e))
        raise UsageError(f"checkpoint {path} holds a {found.group(1) if found else 'non-tensor'} object, which "
                         f"loading would have to run; refused (only tensors and plain values load)") from None
    except Exception as e:
        raise UsageError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e}); "
                         f"it may be truncated: pass an earlier checkpoint with --resume")
    if not isinstance(found, dict):
        raise UsageError(f"{path} holds a {type(found).__name__}, not a checkpoint; pass a checkpoint-<epoch>.pth "
                         f"or checkpoint-last.pth")
    return found


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


def saved_run_args(ckpt):
    """A checkpoint's run arguments as a dict (saved as a dict here, as an argparse.Namespace by the originals)."""
    saved = ckpt.get('args') or {}
    return saved if isinstance(saved, dict) else vars(saved)  # facebookresearch/mae saves a Namespace


def run_accumulation(args, path, ckpt):
    """The --accum_iter with which this run's processes and --batch_size make its global batch: the one of the
    checkpoint it resumes, else --global_batch when given. A run brought back on another number of processes (a
    requeue, an elastic restart) so goes on with its recipe: the same images in every optimizer step, the same lr
    and schedule. Says so in one line when the processes or the accumulation change; one line naming what keeps
    the global batch when nothing can."""
    saved = saved_run_args(ckpt)
    evaluating = getattr(args, 'eval', False)  # --eval of fine-tuning and probing takes no step
    resumed = bool(path) and not evaluating and {'batch_size', 'accum_iter', 'world_size'} <= set(saved)
    kept = global_batch(argparse.Namespace(**saved)) if resumed else None
    if kept and args.global_batch and args.global_batch != kept and not args.new_global_batch:
        raise UsageError(f"--global_batch {args.global_batch} differs from the global batch of {kept} that {path} "
                         f"trained with: leave --global_batch out to keep {kept}, or add --new_global_batch")
    target = kept if kept and not args.new_global_batch else args.global_batch
    if not target:
        return args.accum_iter
    world = args.world_size
    source = (f"{path} trained with a global batch of {kept} ({saved['batch_size']} x --accum_iter "
              f"{saved['accum_iter']} x {saved['world_size']} processes)" if target == kept
              else f"--global_batch {target}")
    if target % (args.batch_size * world):
        fits = [b for b in range(args.batch_size, 0, -1) if target % (b * world) == 0]
        remedy = f'--batch_size {fits[0]}' if fits else f'a number of processes that divides {target}'
        other = (f", or --new_global_batch to go on with {global_batch(args)} (another lr and schedule)"
                 if target == kept else '')
        raise UsageError(f"{source}, which --batch_size {args.batch_size} x {world} processes cannot make with "
                         f"whole accumulation steps: pass {remedy}{other}")
    accum = target // (args.batch_size * world)
    if target == kept and (accum != args.accum_iter or world != saved['world_size']):
        print(f"Resuming on {world} process(es) (the checkpoint: {saved['world_size']}): --batch_size "
              f"{args.batch_size} x --accum_iter {accum} keeps its global batch of {kept}")
    elif accum != args.accum_iter:
        print(f"--global_batch {target} on {world} process(es) at --batch_size {args.batch_size}: --accum_iter {accum}")
    return accum


def resume_position(args, ckpt):
    """The micro-batch of its first epoch where a resumed run goes on. A checkpoint inside an epoch is written at an
    optimizer step; the images its epoch consumed up to there are counted in the global batch that wrote it, so the
    position holds on any number of processes. With --new_global_batch a position between two of the new steps is
    rounded down to the earlier one (those images are seen again), and said."""
    saved = saved_run_args(ckpt)
    if not ckpt.get('next_iter'):
        return 0
    images = ckpt['next_iter'] // saved.get('accum_iter', 1) * global_batch(argparse.Namespace(**saved))
    steps, replayed = divmod(images, global_batch(args))
    if replayed:
        print(f'Resuming at optimizer step {steps} of the epoch with a new global batch: {replayed} images of the '
              f'epoch are seen again')
    return steps * args.accum_iter


def say_step_mapping(args, ckpt, step):
    """Where the steps per epoch changed (a new global batch, or data of another size under --new_recipe), a resumed
    run goes on at the same epoch and place in it, so at the same fraction of every schedule: its step count
    changes, and that is said."""
    if ckpt.get('step') is not None and step != ckpt['step']:
        print(f"Resuming at step {step} of {args.total_steps} ({args.steps_per_epoch} per epoch): the place in the "
              f"run of the checkpoint's step {ckpt['step']} ({saved_run_args(ckpt).get('steps_per_epoch')} per "
              f"epoch); the schedules go on at the same epoch")


def resumed_recipe(args, path, ckpt):
    """(history, change) of the run resumed from (path, ckpt): the recipe changes of its checkpoint and this
    resume's, each {'step', 'epoch', 'changes': {name: [old, new]}}, and this resume's change (None when nothing
    changed). A change is refused in one line without --new_recipe (util/recipe.py)."""
    if not path or getattr(args, 'eval', False):
        return [], None
    saved = saved_run_args(ckpt)
    found = recipe.check_resume(args, path, saved)
    change = {'step': ckpt.get('step'), 'epoch': ckpt.get('epoch', -1) + 1,
              'changes': {name: [old, new] for name, old, new in found}} if found else None
    return list(saved.get('recipe_changes', [])) + ([change] if change else []), change


def resume_from_checkpoint(args, path, ckpt, model, optimizer, loss_scaler):
    """Restore model, optimizer, scaler and RNG from load_resume_checkpoint's (path, checkpoint); sets
    args.start_epoch and returns the checkpoint ({} if none). The optimizer's hyperparameters other than the lr
    (set each step) are this run's: the checkpoint's unless --new_recipe changed a flag that sets them."""
    if not path:
        return {}
    saved = saved_run_args(ckpt)
    if saved.get('model') and saved['model'] != args.model:
        raise UsageError(f"{path} was written by --model {saved['model']}, not {args.model}; "
                         f"pass --model {saved['model']} or another --output_dir")
    if 'model' not in ckpt:
        raise UsageError(f"{path} holds no model weights (its entries: {', '.join(sorted(ckpt)) or 'none'}); pass "
                         f"a checkpoint written by a training run")
    try:
        model.load_state_dict(ckpt['model'])
    except RuntimeError:
        shapes = [name for name, *_ in recipe.changes(saved, vars(args))]
        raise UsageError(f"the weights in {path} do not fit this model"
                         + (f" (changed: {', '.join('--' + n for n in shapes)})" if shapes else '')
                         + "; resume with the flags that wrote it, or start from its weights with --init_from "
                           "/ --finetune in another --output_dir") from None
    if 'optimizer' in ckpt and optimizer is not None:
        flags_set = [{k: v for k, v in g.items() if k not in ('params', 'lr')} for g in optimizer.param_groups]
        try:
            optimizer.load_state_dict(ckpt['optimizer'])
        except ValueError:
            raise UsageError(f"the optimizer state in {path} has other parameter groups than this run's "
                             f"(another version's weight-decay grouping, or other FreezeOut flags); resume with "
                             f"the code and flags that wrote it, or start from its weights in another --output_dir")
        for group, hyper in zip(optimizer.param_groups, flags_set):
            group.update(hyper)
        loss_scaler.load_state_dict(ckpt['scaler'])
        args.start_epoch = ckpt['epoch'] + 1
        if len(ckpt.get('rng', [])) == get_world_size():
            set_rng_state(ckpt['rng'][get_rank()])
        else:  # another world size: fresh per-rank streams
            seed_everything(args.seed + get_rank() + args.start_epoch)
    print(f"Resumed from {path} (epoch {ckpt.get('epoch')}, step {ckpt.get('step', 0)})")
    if args.start_epoch >= args.epochs and not getattr(args, 'eval', False):
        raise UsageError(f"nothing to do: {path} is at epoch {args.start_epoch} of {args.epochs}; to train longer, "
                         f"pass a larger --epochs with --new_recipe")
    return ckpt
