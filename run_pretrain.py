"""LocalMIM / MAE pre-training, with optional FreezeOut. Single process, torchrun or torch.distributed.launch."""
import argparse
import datetime
import time
from pathlib import Path

import torch

import models_mim
from models_common import kept_units
import util.misc as misc
from util import checkpoint, distributed, metrics, preemption, resolution
from util.distributed import CUDA_GRAPH_MODES
from util.errors import UsageError
from engine_pretrain import train_one_epoch
from util.datasets import build_pretrain_loader, eval_transform
from util.pipeline import LOADERS, BadImageError, bad_image_message
from util.freezeout import RULES, SCALES, FreezeOut, param_groups


def get_args_parser():
    p = argparse.ArgumentParser('LocalMIM / MAE pre-training')
    p.add_argument('--batch_size', default=64, type=int, help='per-GPU batch; effective = batch_size * accum_iter * GPUs')
    p.add_argument('--epochs', default=400, type=int)
    p.add_argument('--accum_iter', default=1, type=int, help='micro-batches per optimizer step')
    # model
    p.add_argument('--model', default='MIM_vit_base_patch16', type=str,
                   help=f'one of {", ".join(models_mim.all_models())}')
    p.add_argument('--input_size', type=int,
                   help="side of the training crops in px (default: the model's own, 224 for the ImageNet-sized "
                        "models, 32 or 64 for the small ones)")
    p.add_argument('--input_size_schedule', metavar='SIZE:FRACTION,...,SIZE',
                   help='progressive resolution (FastMIM-P): e.g. 128:0.5,160:0.75,224 trains at 128 px for the first '
                        'half of the optimizer steps, 160 px to three quarters, then 224 px (replaces --input_size)')
    p.add_argument('--batch_size_schedule', metavar='BATCH,...',
                   help='with --input_size_schedule: the per-GPU batch at each of its sizes, e.g. 256,128,64 (replaces '
                        '--batch_size); the accumulation adapts so that every size keeps the global batch '
                        '(--global_batch, else the first batch x --accum_iter x GPUs)')
    p.add_argument('--mask_ratio', default=0.75, type=float, help='fraction of patches removed')
    p.add_argument('--hog_nbins', type=int, help='LocalMIM: orientation bins of the HOG targets')
    p.add_argument('--hog_bias', action='store_true', help='LocalMIM: fixed random bias in the HOG gradients (ViT-L)')
    p.add_argument('--norm_pix_loss', action='store_true',
                   help='MAE, LocalMIM on Swin with --target pixel: per-patch normalised pixel targets')
    p.add_argument('--target', choices=['hog', 'pixel'], help='LocalMIM on Swin: what the decoders predict')
    p.add_argument('--shared_mask', action='store_true',
                   help='LocalMIM on Swin: one mask per step for the whole batch (Haoqing-Wang/LocalMIM), not one per sample')
    p.add_argument('--original_merged_coords', action='store_true',
                   help="LocalMIM on Swin: Haoqing-Wang/LocalMIM's token coordinates after patch merging, which place "
                        "the middle stages' windows and relative positions wrongly (to reproduce its pre-training)")
    p.add_argument('--loss_weights',
                   help="LocalMIM: weight per decoder's loss: uniform (paper), inverse_depth (1/k), or a list 4,3,2,1")
    p.add_argument('--all_stages', action='store_true',
                   help='LocalMIM: a decoder on every block, scales assigned by depth (finest first)')
    # optimizer and schedule
    p.add_argument('--weight_decay', type=float, default=0.05)
    p.add_argument('--lr', type=float, default=None, help='absolute lr (default: blr * effective batch / 256)')
    p.add_argument('--blr', type=float, default=2e-4, help='base lr for an effective batch of 256')
    p.add_argument('--min_lr', type=float, default=0., help='lr at the end of the cosine')
    p.add_argument('--warmup_epochs', type=float, default=40)
    # FreezeOut
    p.add_argument('--freezeout', action='store_true', help='progressively freeze the encoder (FreezeOut)')
    p.add_argument('--how_scale', choices=list(SCALES), default='cubic', help='FreezeOut: t_i schedule')
    p.add_argument('--t_0', type=float, default=0.8, help='FreezeOut: fraction of the run the first unit trains')
    misc.add_bool_flag(p, 'scale_lr', True, 'FreezeOut: peak lr of unit i is lr / t_i')
    p.add_argument('--dont_freeze_pe', action='store_true',
                   help='FreezeOut: never freeze the patch embedding + cls token; the unit schedule starts at block 0')
    p.add_argument('--freezeout_lr', choices=['layerwise', 'global'], default='layerwise',
                   help='FreezeOut: per-unit lr and cosine (layerwise), or the ordinary lr until each unit freezes')
    p.add_argument('--freezeout_rules', choices=RULES,
                   help='FreezeOut: original (the default: utkutpcgl/freezeout_localmim_rho, exactly) or project '
                        '(no-grad frozen prefix); see docs/freezeout.md')
    p.add_argument('--freeze_decoders', action='store_true',
                   help='FreezeOut + LocalMIM, project rules: drop the decoders (and loss terms) of taps inside '
                        'the frozen prefix (the original rules always do)')
    p.add_argument('--layer_scale', type=float, metavar='INIT',
                   help='LayerScale in the encoder blocks with this initial value (timm\'s init_values, e.g. 1e-5); '
                        'fine-tuning, probing, kNN and the timm export take it from the checkpoint')
    p.add_argument('--pos_embed', choices=models_mim.POS_EMBEDS,
                   help='position embedding of encoder and decoders: the fixed 2-D sin-cos table (MAE, LocalMIM) or '
                        'axial 2-D rotary embeddings (rope); fine-tuning, probing and kNN take it from the checkpoint')
    p.add_argument('--grad_ckpt', action='store_true',
                   help='activation checkpointing of the trainable encoder blocks: less memory, one more block forward')
    distributed.add_compile_arg(p)
    p.add_argument('--init_from', default='',
                   help='start from the weights of a pre-training checkpoint (this project\'s, Haoqing-Wang/LocalMIM\'s or '
                        'facebookresearch/mae\'s with decoder), not its optimizer or schedule; --resume restores a run')
    p.add_argument('--save_freq', default=20, type=int, help='keep checkpoint-<epoch>.pth every N epochs')
    p.add_argument('--save_every_iters', default=0, type=int,
                   help='also write checkpoint-last.pth every N optimizer steps inside an epoch (0: off)')
    p.add_argument('--keep_last', default=0, type=int, help='keep only the N newest checkpoint-<epoch>.pth (0: all)')
    p.add_argument('--log_every_step', action='store_true',
                   help='append each optimizer step\'s loss, frozen units and per-group lr to output_dir/steps.txt '
                        '(reads the loss: a GPU sync per step)')
    p.add_argument('--repeated_aug', default=1, type=int, metavar='N',
                   help='read and decode each image once for N differently cropped and masked views in the same batch '
                        '(--batch_size counts views; an epoch takes len/N images)')
    p.add_argument('--masks_per_image', default=1, type=int, metavar='K',
                   help='mask each crop K times in the same batch (data2vec 2.0, EMAE): one decode, crop, patch '
                        'embedding and target (HOG or pixels) for K masked samples (--batch_size counts masked '
                        'samples; an epoch takes len/K images)')
    p.add_argument('--mask_sets', choices=['random', 'complementary'], default='random',
                   help='with --masks_per_image: K independent masks, or K masks whose visible sets are disjoint '
                        '(EMAE; K <= 1 / (1 - mask_ratio))')
    p.add_argument('--loader', choices=LOADERS, default='fast',
                   help='input pipeline: fast (uint8 batches, torch resize), roi (as fast, decoding only the crop '
                        'box of an RGB JPEG: nvImageCodec), pil (PIL resize, as facebookresearch/mae), device '
                        '(JPEG decode with nvJPEG, crop and resize on the GPU) or hw (as device, the crop box decoded '
                        'by the GPU\'s hardware JPEG decoder: nvImageCodec)')
    misc.add_run_args(p, './output_dir')
    p.set_defaults(**models_mim.BUILD_DEFAULTS)  # the model flags' defaults have one owner
    return p


def check_args(args):
    """Fail at start, in one line, on a flag that would fail (or silently mislead) later."""
    if not 0 < args.mask_ratio < 1:
        raise UsageError(f"--mask_ratio must be in (0, 1), got {args.mask_ratio}")
    if args.batch_size_schedule and args.input_size_schedule is None:
        raise UsageError("--batch_size_schedule gives a batch per size of --input_size_schedule: pass that too")
    schedule = resolution.parse_schedule(args.input_size_schedule, args.batch_size_schedule) \
        if args.input_size_schedule is not None else []
    if args.repeated_aug < 1 or args.masks_per_image < 1:
        raise UsageError(f"--repeated_aug {args.repeated_aug} and --masks_per_image {args.masks_per_image} must "
                         f"be at least 1")
    per_image = args.repeated_aug * args.masks_per_image
    for batch in [b for *_, b in schedule if b] or [args.batch_size]:
        if batch % per_image:
            raise UsageError(f"the batch {batch} (--batch_size, --batch_size_schedule) must be a multiple of "
                             f"--repeated_aug x --masks_per_image = {per_image}: each image contributes that many "
                             f"masked samples to a batch")
    if args.masks_per_image > 1 and args.shared_mask:
        raise UsageError("--shared_mask gives every sample of a step the same mask: --masks_per_image would repeat "
                         "it; leave one of them out")
    if args.mask_sets == 'complementary':
        with torch.device('meta'):
            units = models_mim.build(args).num_mask_units
        keep = kept_units(units, args.mask_ratio)
        if args.masks_per_image * keep > units:
            raise UsageError(f"--mask_sets complementary: {args.masks_per_image} masks keeping {keep} of {units} "
                             f"units each cannot be disjoint; at --mask_ratio {args.mask_ratio} use "
                             f"--masks_per_image {units // max(1, keep)} or fewer")
    check_accumulation(args, args.accum_iter)
    if args.compile_scope and not args.compile:
        raise UsageError(f"--compile_scope {args.compile_scope} needs --compile")
    if args.freeze_decoders and not args.freezeout:
        raise UsageError("--freeze_decoders needs --freezeout")
    if args.freeze_decoders and not args.model.startswith('MIM_'):
        raise UsageError("--freeze_decoders applies to LocalMIM's tap decoders (MIM_vit_*), not to MAE")
    if args.input_size_schedule is not None and args.input_size:
        raise UsageError("--input_size_schedule sets the input size of every step: leave --input_size out")
    with torch.device('meta'):  # every size fits the model
        for size, *_ in schedule:
            models_mim.build(argparse.Namespace(**{**vars(args), 'input_size': size}))


def check_accumulation(args, accum_iter):
    if args.compile in CUDA_GRAPH_MODES and accum_iter > 1:
        raise UsageError(f"--compile {args.compile} replays CUDA graphs, which would overwrite the gradients kept "
                         f"between micro-batches: with --accum_iter above 1 (here {accum_iter}) use --compile default "
                         f"or max-autotune-no-cudagraphs")


def build_optimizer(args, model, device):
    """AdamW with MAE's betas over the decay / no-decay groups (per FreezeOut unit with --freezeout), fused on CUDA."""
    return torch.optim.AdamW(param_groups(model, args.weight_decay, per_unit=args.freezeout), lr=args.lr,
                             betas=(0.9, 0.95), fused=device.type == 'cuda')


def at_input_size(args, model, optimizer, device):
    """(model, optimizer, loader, sampler) at the run's new --input_size and --batch_size: the same model built for
    it with every weight carried over (its fixed position tables are computed for the new grid), the optimizer's
    state carried over, and the loader's batches of crops and mask noise of that size."""
    resized = models_mim.build(args).to(device)
    models_mim.load_at_size(resized, model.state_dict())
    resized_optimizer = build_optimizer(args, resized, device)
    resized_optimizer.load_state_dict(optimizer.state_dict())
    _, data_loader, sampler = pretrain_loader(args, resized)
    return resized, resized_optimizer, data_loader, sampler


def pretrain_loader(args, model):
    """util.datasets.build_pretrain_loader for `model`: mask noise of its units, and the units a mask keeps."""
    return build_pretrain_loader(args, model.num_mask_units, kept_units(model.num_mask_units, args.mask_ratio))


def batch_note(args, batch, accum):
    """How a size of --input_size_schedule makes the global batch, said where --batch_size_schedule sets it."""
    return f' (batch {batch} x --accum_iter {accum})' if args.batch_size_schedule else ''


def log_prediction_figure(writer, model, images, args, epoch):
    """The first training image, masked, with the model's predictions (visualize.py) in TensorBoard."""
    import visualize
    img = eval_transform(args.input_size)(images[0][0])
    model.eval()
    with torch.compiler.set_stance('force_eager'):  # compiled blocks (--compile_scope blocks) would compile anew
        writer.add_figure('predictions', visualize.figure(model, img, args.mask_ratio), epoch)
    model.train()


def main(args):
    check_args(args)
    device = misc.setup_run(args)
    stop = preemption.StopSignals.from_args(args)

    resume_path, ckpt = checkpoint.load_resume_checkpoint(args)
    schedule = resolution.parse_schedule(args.input_size_schedule, args.batch_size_schedule) \
        if args.input_size_schedule is not None else None
    if schedule:  # built at the size (and batch) its checkpoint was written at, then changed for its step (below)
        saved = checkpoint.saved_run_args(ckpt)
        args.input_size = saved.get('input_size') or schedule[0][0]
        if args.batch_size_schedule:
            args.batch_size = saved.get('batch_size') or schedule[0][2]
    model = models_mim.build(args)
    args.input_size = model.patch_embed.img_size[0]  # the model's own size unless --input_size named one
    if args.init_from:  # a run's own checkpoint-last.pth, when there is one, still wins (resume below)
        models_mim.load_weights(model, checkpoint.load_checkpoint_file(args.init_from).get('model', {}))
        print(f'Initialised from the weights of {args.init_from}')
    model.to(device)
    # augmentation and mask noise are drawn per sample from (seed, epoch, index): see util/pipeline.py
    images, data_loader, sampler = pretrain_loader(args, model)
    print(f'train set: {images.root}, {len(images)} images, {len(images.classes)} classes')
    args.train_images = len(images)
    args.accum_iter = checkpoint.run_accumulation(args, resume_path, ckpt)
    misc.set_schedule_steps(args, len(data_loader))
    if args.steps_per_epoch == 0:
        raise UsageError(f"{len(images)} images give no full optimizer step at --batch_size "
                         f"{args.batch_size} x --accum_iter {args.accum_iter} x {args.world_size} processes")
    run_batch = misc.global_batch(args)  # every size keeps it
    per_size = [(size, end, batch or args.batch_size)
                for size, end, batch in schedule or [(args.input_size, 1.0, None)]]
    sizes = [(*segment, resolution.accumulation(run_batch, segment[3], args.world_size, segment[2]))
             for segment in resolution.segments(per_size, args.total_steps)]  # (first, end, size, batch, accum)
    for *_, accum in sizes:  # the accumulation of every size, adapted or not, meets the same check
        check_accumulation(args, accum)
    if schedule:
        print('input size: ' + ', '.join(f'{size} px{batch_note(args, batch, accum)} from step {first}'
                                         for first, _, size, batch, accum in sizes))
    n_params = sum(p.numel() for p in model.parameters())
    print(f'Model {args.model}: {n_params / 1e6:.2f}M parameters')

    misc.scale_lr(args)
    args.recipe_changes, recipe_change = checkpoint.resumed_recipe(args, resume_path, ckpt)

    freezeout = None
    if args.freezeout:
        try:
            freezeout = FreezeOut.from_args(args, model)
        except ValueError as e:
            raise UsageError(str(e)) from None
        print(f'FreezeOut ({args.freezeout_rules} rules): first frozen step per unit: '
              + ', '.join(f'{s}' for s in freezeout.freeze_steps))
    optimizer = build_optimizer(args, model, device)
    loss_scaler = misc.LossScaler(device.type, enabled=args.amp == 'fp16')
    checkpoint.resume_from_checkpoint(args, resume_path, ckpt, model, optimizer, loss_scaler)
    start_iter = checkpoint.resume_position(args, ckpt)
    step = misc.optimizer_step(args, args.start_epoch, start_iter)
    checkpoint.say_step_mapping(args, ckpt, step)
    if freezeout is not None:
        freezeout.update(model, step)
    model_ddp = distributed.wrap_for_training(model, args)
    metrics.log_run_args(args, resume_path, step, recipe_change)

    log_writer = None
    if distributed.is_main_process() and args.log_dir:
        from torch.utils.tensorboard import SummaryWriter
        log_writer = SummaryWriter(log_dir=args.log_dir)

    print(f'Start training for {args.epochs} epochs from epoch {args.start_epoch}, iteration {start_iter} (step {step})')
    last_ckpt = checkpoint.find_resume_checkpoint(args) or 'none'
    start_time = time.time()
    for epoch in range(args.start_epoch, args.epochs):
        epoch_start = time.time()
        while True:  # the epoch, in parts of one input size (one part without --input_size_schedule)
            step = misc.optimizer_step(args, epoch, start_iter)
            _, end, size, batch, accum = resolution.segment_at(sizes, step)
            if (size, batch) != (args.input_size, args.batch_size):
                del model_ddp
                epoch_steps = start_iter // args.accum_iter  # start_iter counts micro-batches of the old batch
                # the engine's loader and device crops follow them
                args.input_size, args.batch_size, args.accum_iter = size, batch, accum
                start_iter = epoch_steps * args.accum_iter
                model, optimizer, data_loader, sampler = at_input_size(args, model, optimizer, device)
                if freezeout is not None:
                    freezeout.update(model, step)
                model_ddp = distributed.wrap_for_training(model, args)
                print(f'input size {size} px from step {step}{batch_note(args, batch, accum)}')
            iters = args.steps_per_epoch * args.accum_iter
            end_iter = min(iters, (end - epoch * args.steps_per_epoch) * args.accum_iter)
            sampler.set_epoch(epoch, start_iter * data_loader.batch_size)  # in images
            try:
                stats, model_ddp = train_one_epoch(model_ddp, model, data_loader, optimizer, loss_scaler, device,
                                                   epoch, args, freezeout, log_writer, start_iter, stop, end_iter)
            except metrics.NonFiniteLoss as e:
                raise UsageError(f"{e}; stopped without writing a checkpoint (last good one: {last_ckpt}). "
                                 f"Lower --blr, raise --warmup_epochs or try --amp bf16")
            except BadImageError as e:
                raise UsageError(f"{bad_image_message(e)}; remove or replace it, or pass --skip_bad_images")
            if end_iter == iters:
                break
            start_iter = end_iter
        start_iter = 0
        step = misc.optimizer_step(args, epoch + 1, 0)
        path = checkpoint.save_checkpoint(args, epoch, step, model, optimizer, loss_scaler, 'last')
        if args.save_freq > 0 and ((epoch + 1) % args.save_freq == 0 or epoch + 1 == args.epochs):
            checkpoint.save_checkpoint(args, epoch, step, model, optimizer, loss_scaler, str(epoch))
            checkpoint.remove_old_checkpoints(args.output_dir, args.keep_last)
            if log_writer is not None:
                log_prediction_figure(log_writer, model, images, args, epoch)
        last_ckpt = path or last_ckpt
        record = {**{f'train_{k}': v for k, v in stats.items()}, 'epoch': epoch, 'step': step,
                  'epoch_time': round(time.time() - epoch_start, 3), 'n_parameters': n_params}
        if freezeout is not None:
            record['frozen_units'] = model.frozen_units
            record['lr_unit0'] = next(g['lr'] for g in optimizer.param_groups if g.get('unit') == 0)
        if distributed.is_main_process() and args.output_dir:
            metrics.append_json_line(Path(args.output_dir) / 'log.txt', record)
            if log_writer is not None:
                log_writer.flush()
        if epoch + 1 < args.epochs and stop.requested():
            raise stop.stop(step)

    total = datetime.timedelta(seconds=int(time.time() - start_time))
    print(f'Training time {total}. Checkpoints and log.txt in {Path(args.output_dir).resolve()}, '
          f'TensorBoard in {Path(args.log_dir).resolve()}')
    del model_ddp  # before the process group (distributed.finish)
    distributed.finish()


if __name__ == '__main__':
    misc.run_main(main, get_args_parser())
