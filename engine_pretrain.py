"""One pre-training epoch: accumulation without intermediate all-reduce, AMP, FreezeOut step boundaries."""
from contextlib import nullcontext

import torch

import util.misc as misc
from util import lr_sched


def train_one_epoch(model, model_without_ddp, data_loader, optimizer, loss_scaler, device, epoch, args,
                    freezeout=None, log_writer=None):
    """Returns (epoch averages, model): under DDP the wrapper is rebuilt when FreezeOut changes the
    trainable set, and the caller keeps the new one."""
    model.train(True)
    logger = misc.MetricLogger()
    logger.add_meter('lr', misc.SmoothedValue(window=1, fmt='{value:.3e}'))
    accum = args.accum_iter
    steps_per_epoch = args.steps_per_epoch
    amp_dtype = misc.AMP_DTYPES[args.amp]
    check_every = 1 if device.type == 'cpu' else args.print_freq  # reading the loss syncs a GPU
    tb_buffer = []
    optimizer.zero_grad(set_to_none=True)
    header = f'Epoch: [{epoch}]'
    for it, (samples, _) in enumerate(logger.log_every(data_loader, args.print_freq, header,
                                                       total=steps_per_epoch * accum)):
        step = epoch * steps_per_epoch + it // accum
        update = (it + 1) % accum == 0
        if it % accum == 0:  # lr and freezing change only at optimizer-step boundaries
            if freezeout is not None and freezeout.update(model_without_ddp, step):
                print(f'FreezeOut: {model_without_ddp.frozen_units} unit(s) frozen from step {step}')
                model = misc.wrap_ddp(model_without_ddp, args)
            lr = lr_sched.adjust_learning_rate(optimizer, step, args, freezeout)

        samples = samples.to(device, non_blocking=True)
        sync = model.no_sync() if args.distributed and not update else nullcontext()
        with sync:
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss, losses = model(samples, args.mask_ratio)
            loss_scaler(loss / accum, optimizer, model_without_ddp.parameters(), update_grad=update)
        if update:
            optimizer.zero_grad(set_to_none=True)

        if it % check_every == 0 or it == steps_per_epoch * accum - 1:
            misc.check_finite(loss, epoch, step)
        logger.update(loss=loss.detach(), lr=lr, **losses)
        if log_writer is not None and update:
            unit_lrs = {f'lr_unit/{g["unit"]}': g['lr'] for g in optimizer.param_groups
                        if g.get('unit') is not None and g['weight_decay'] == 0}
            tb_buffer.append((step, {'train/loss': loss.detach(), 'train/lr': lr, **unit_lrs,
                                     **{f'train/{k}': v for k, v in losses.items()}}))
            if len(tb_buffer) >= args.print_freq:
                flush_tensorboard(log_writer, tb_buffer)
    flush_tensorboard(log_writer, tb_buffer)

    logger.synchronize_between_processes()
    print('Averaged stats:', logger)
    return logger.averages(), model


def flush_tensorboard(writer, buffer):
    """Per-step scalars are buffered on the device and read in one go, so logging does not sync every step."""
    if writer is None or not buffer:
        return
    for step, scalars in buffer:
        for name, value in scalars.items():
            writer.add_scalar(name, misc.to_float(value), step)
    buffer.clear()
