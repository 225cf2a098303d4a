"""A run's recipe: the arguments that define what a run computes (schedule, objective, data, seed). A resumed run
is the run it was: util.checkpoint compares its checkpoint's recipe with the new one and refuses a change in one
line, unless --new_recipe is given; then each change is said, applied, and recorded in the checkpoint's arguments
(`recipe_changes`) and in log.txt with the step it took effect at. Every flag of every entry point is on one side
of this file (tests/test_recipe.py checks it)."""
import argparse
import math

from util.errors import UsageError
from util.misc import global_batch

RECIPE = frozenset({
    # optimizer and schedule; --lr is compared as the base lr it makes (blr), so that --new_global_batch, which
    # rescales the lr, is not a change of recipe
    'blr', 'min_lr', 'weight_decay', 'epochs', 'warmup_epochs', 'layer_decay', 'clip_grad',
    # the objective and the model
    'model', 'input_size', 'input_size_schedule', 'mask_ratio', 'hog_nbins', 'hog_bias', 'norm_pix_loss', 'target',
    'shared_mask', 'original_merged_coords', 'loss_weights', 'all_stages', 'layer_scale', 'pos_embed', 'drop_path',
    'global_pool', 'nb_classes', 'amp',
    # FreezeOut
    'freezeout', 'how_scale', 't_0', 'scale_lr', 'dont_freeze_pe', 'freezeout_lr', 'freezeout_rules',
    'freeze_decoders',
    # sample order, masks and augmentation
    'seed', 'repeated_aug', 'masks_per_image', 'mask_sets', 'color_jitter', 'aa', 'smoothing', 'reprob', 'remode',
    'recount', 'resplit', 'mixup',
    'cutmix', 'cutmix_minmax', 'mixup_prob', 'mixup_switch_prob', 'mixup_mode',
    # the data (set by the entry point from what --data_path holds)
    'train_images',
})

NOT_RECIPE = frozenset({
    # compared elsewhere: the global batch by util.checkpoint.run_accumulation (--new_global_batch), the lr as blr
    'lr', 'global_batch', 'new_global_batch', 'new_recipe', 'batch_size', 'batch_size_schedule', 'accum_iter',
    # where the data and outputs are, and how they are read and written
    'data_path', 'shard_cache', 'output_dir', 'log_dir', 'resume', 'auto_resume', 'start_epoch', 'init_from',
    'finetune', 'save_freq', 'save_every_iters', 'keep_last', 'log_every_step', 'print_freq', 'num_workers',
    'pin_mem', 'loader', 'skip_bad_images', 'dump_features', 'load_features',
    # how the same computation is run: devices, launch, compilation, memory, stops
    'device', 'world_size', 'local_rank', 'dist_url', 'dist_timeout', 'stop_signals', 'compile', 'compile_scope',
    'grad_ckpt',
    # evaluation only (no training step to resume)
    'eval', 'dist_eval', 'k', 'temperature',
})


def recipe_values(run_args):
    """The recipe entries of a dict of arguments; 'blr' is the base lr the run's lr makes (lr x 256 / global batch),
    whether it came from --blr or --lr."""
    values = {k: run_args[k] for k in RECIPE if k in run_args}
    if run_args.get('lr') is not None and {'batch_size', 'accum_iter', 'world_size'} <= set(run_args):
        values['blr'] = run_args['lr'] * 256 / global_batch(argparse.Namespace(**run_args))
    return values


def same(old, new):
    if isinstance(old, float) and isinstance(new, float):
        return math.isclose(old, new, rel_tol=1e-9, abs_tol=0.)  # a base lr rescaled by another global batch
    return old == new


def changes(saved, run_args):
    """[(name, old, new)] for each recipe entry that differs; entries a checkpoint does not hold (written before
    they existed) are not compared."""
    old, new = recipe_values(saved), recipe_values(run_args)
    return [(k, old[k], new[k]) for k in sorted(old.keys() & new.keys()) if not same(old[k], new[k])]


def describe(found):
    def shown(value):
        return f'{value:.6g}' if isinstance(value, float) else value
    return ', '.join(f'{name}: {shown(old)} -> {shown(new)}' for name, old, new in found)


def check_resume(args, path, saved):
    """The recipe changes of a resume from `path` (whose arguments are `saved`): [] when nothing changed;
    a UsageError listing them unless --new_recipe, else the changes, said in one line."""
    found = changes(saved, vars(args))
    if not found:
        return []
    if not args.new_recipe:
        raise UsageError(f"{path} was trained with another recipe ({describe(found)}): pass its values to resume "
                         f"it, add --new_recipe to go on with the new ones (recorded in log.txt), or start over "
                         f"in another --output_dir")
    print(f'New recipe from {path} on: {describe(found)}')
    return found
