"""One pre-training epoch: accumulation without intermediate all-reduce, AMP, FreezeOut step boundaries,
checkpoints inside the epoch, and a start part-way through it for an exact resume."""
import json
from contextlib import nullcontext
from pathlib import Path

import torch

import util.misc as misc
from util import checkpoint, distributed, lr_sched, metrics, pipeline


def train_one_epoch(model, model_without_ddp, data_loader, optimizer, loss_scaler, device, epoch, args,
                    freezeout=None, log_writer=None, start_iter=0, stop=None, end_iter=None):
    """Runs iterations start_iter.. of the epoch (the loader's sampler already skips the earlier ones), up to
    end_iter when given (where --input_size_schedule changes the size inside the epoch). With `stop`
    (util/preemption.py) a signal ends the epoch at the next optimizer step with a checkpoint (raises Preempted).
    Returns (epoch averages, model): under DDP the wrapper is rebuilt when FreezeOut changes the trainable
    set, and the caller keeps the new one."""
    model.train(True)
    logger = metrics.MetricLogger()
    logger.add_meter('lr', metrics.SmoothedValue(window=1, fmt='{value:.3e}'))
    accum = args.accum_iter
    iters = args.steps_per_epoch * accum
    amp_dtype = misc.AMP_DTYPES[args.amp]
    check_every = 1 if device.type == 'cpu' else args.print_freq  # reading the loss syncs a GPU
    step_log = Path(args.output_dir) / 'steps.txt' if args.log_every_step and distributed.is_main_process() else None
    tb_buffer, skipped = [], 0
    optimizer.zero_grad(set_to_none=True)
    end_iter = iters if end_iter is None else end_iter
    batches = logger.log_every(data_loader, args.print_freq, f'Epoch: [{epoch}]', total=end_iter - start_iter)
    for it, (samples, noise, n_bad) in enumerate(batches, start=start_iter):
        step = misc.optimizer_step(args, epoch, it)
        update = (it + 1) % accum == 0
        if it % accum == 0:  # lr and freezing change only at optimizer-step boundaries
            if freezeout is not None and freezeout.update(model_without_ddp, step):
                print(f'FreezeOut: {model_without_ddp.frozen_units} unit(s) frozen from step {step}')
                model = distributed.wrap_for_training(model_without_ddp, args)
            lr = lr_sched.adjust_learning_rate(optimizer, step, args, freezeout)

        samples = pipeline.to_device(samples, device, args.input_size)
        noise = noise.to(device, non_blocking=True)
        skipped += n_bad
        sync = model.no_sync() if args.distributed and not update else nullcontext()
        with sync:
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss, losses = model(samples, args.mask_ratio, noise)
            loss_scaler(loss / accum, optimizer, model_without_ddp.parameters(), update_grad=update)
        if update:
            optimizer.zero_grad(set_to_none=True)

        # the scalars kept for the log leave the step's outputs in one copy: CUDA graphs (--compile reduce-overhead)
        # write the next step's outputs into the same memory
        loss_kept, *kept = torch.stack([loss.detach(), *losses.values()]).unbind()
        losses = dict(zip(losses, kept))
        if it % check_every == 0 or it == iters - 1 or (step_log and update):
            value = metrics.check_finite(loss_kept, epoch, step)
            if step_log and update:  # one line per optimizer step, with the lr each group had in it
                lrs = {g['name']: g['lr'] for g in optimizer.param_groups}
                with open(step_log, 'a') as f:
                    f.write(json.dumps({'iter': epoch * iters + it, 'step': step, 'loss': value,
                                        'frozen_units': model_without_ddp.frozen_units, 'lrs': lrs}) + '\n')
        logger.update(loss=loss_kept, lr=lr, **losses)
        if log_writer is not None and update:
            unit_lrs = {f'lr/{g["name"]}': g['lr'] for g in optimizer.param_groups if g['weight_decay'] == 0}
            tb_buffer.append((step, {'train/loss': loss_kept, 'train/lr': lr, **unit_lrs,
                                     **{f'train/{k}': v for k, v in losses.items()}}))
            if len(tb_buffer) >= args.print_freq:
                flush_tensorboard(log_writer, tb_buffer)
        if update and it + 1 < iters:  # the epoch's last step is saved by the caller
            stopping = stop is not None and stop.requested()
            if stopping or args.save_every_iters and (step + 1) % args.save_every_iters == 0:
                checkpoint.save_mid_epoch(args, epoch, it + 1, step + 1, model_without_ddp, optimizer, loss_scaler)
            if stopping:
                raise stop.stop(step + 1)
    flush_tensorboard(log_writer, tb_buffer)

    logger.synchronize_between_processes()
    print('Averaged stats:', logger)
    stats = logger.averages()
    if args.loader == 'hw':
        stats.update(pipeline.report_hw_decoding(device))
    if args.skip_bad_images:
        stats['skipped_images'] = int(distributed.all_reduce_mean(skipped) * distributed.get_world_size())
        print(f'skipped {stats["skipped_images"]} unreadable image(s) this epoch')
    return stats, model


def flush_tensorboard(writer, buffer):
    """Per-step scalars are buffered on the device and read in one go, so logging does not sync every step."""
    if writer is None or not buffer:
        return
    for step, scalars in buffer:
        for name, value in scalars.items():
            writer.add_scalar(name, metrics.to_float(value), step)
    buffer.clear()
