"""Fine-tuning / linear-probing epochs, exact (optionally sharded) evaluation, and the epoch loop."""
import json
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

import util.misc as misc
from util import checkpoint, distributed, lr_sched, metrics, pipeline, preemption
from util.errors import UsageError
from util.pipeline import BadImageError, bad_image_message


def train_one_epoch(model, model_without_ddp, criterion, data_loader, optimizer, loss_scaler, device, epoch, args,
                    mixup_fn=None, log_writer=None, start_iter=0, stop=None, best_acc1=0.):
    """Runs iterations start_iter.. of the epoch (the sampler already skips the earlier ones). With `stop`
    (util/preemption.py) a signal ends the epoch at the next optimizer step with a checkpoint (raises Preempted)."""
    model.train(True)
    logger = metrics.MetricLogger()
    logger.add_meter('lr', metrics.SmoothedValue(window=1, fmt='{value:.3e}'))
    accum, steps_per_epoch = args.accum_iter, args.steps_per_epoch
    amp_dtype = misc.AMP_DTYPES[args.amp]
    check_every = 1 if device.type == 'cpu' else args.print_freq
    optimizer.zero_grad(set_to_none=True)
    iters = steps_per_epoch * accum
    batches = logger.log_every(data_loader, args.print_freq, f'Epoch: [{epoch}]', total=iters - start_iter)
    for it, (samples, targets, _) in enumerate(batches, start=start_iter):
        step = misc.optimizer_step(args, epoch, it)
        update = (it + 1) % accum == 0
        if it % accum == 0:
            lr = lr_sched.adjust_learning_rate(optimizer, step, args)
        samples = pipeline.to_device(samples, device, args.input_size)
        targets = targets.to(device, non_blocking=True)
        misc.seed_micro_batch(args, epoch, it)
        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)
        sync = model.no_sync() if args.distributed and not update else nullcontext()
        with sync:
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss = criterion(model(samples), targets)
            loss_scaler(loss / accum, optimizer, model_without_ddp.parameters(), clip_grad=args.clip_grad,
                        update_grad=update)
        if update:
            optimizer.zero_grad(set_to_none=True)
        if it % check_every == 0 or it == iters - 1:
            metrics.check_finite(loss, epoch, step)
        logger.update(loss=loss.detach(), lr=lr)
        if log_writer is not None and update and it % args.print_freq == 0:
            log_writer.add_scalar('train/loss', loss.item(), step)
            log_writer.add_scalar('train/lr', lr, step)
        if update and it + 1 < iters and stop is not None and stop.requested():  # the last step: fit saves it
            checkpoint.save_mid_epoch(args, epoch, it + 1, step + 1, model_without_ddp, optimizer, loss_scaler,
                                      {'best_acc1': best_acc1})
            raise stop.stop(step + 1)
    logger.synchronize_between_processes()
    print('Averaged stats:', logger)
    stats = logger.averages()
    if getattr(args, 'loader', None) == 'hw':  # linear probing
        stats.update(pipeline.report_hw_decoding(device))
    return stats


@torch.no_grad()
def evaluate(data_loader, model, device, args):
    """Top-1/top-5 accuracy (%) and loss from summed counts; with --dist_eval the ranks' shards are added."""
    model.eval()
    amp_dtype = misc.AMP_DTYPES[args.amp]
    totals = torch.zeros(5, dtype=torch.float64)  # loss sum, top-1 correct, top-5 correct, images, skipped
    for samples, targets, n_bad in data_loader:
        samples, targets = samples.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(samples).float()
        topk = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = topk == targets[:, None]
        totals += torch.tensor([torch.nn.functional.cross_entropy(logits, targets, reduction='sum').item(),
                                hits[:, 0].sum().item(), hits.any(1).sum().item(), len(targets), n_bad],
                               dtype=torch.float64)
    if args.dist_eval and distributed.is_dist():
        totals = totals.to(device)
        dist.all_reduce(totals)
        totals = totals.cpu()
    loss, top1, top5, n, skipped = totals.tolist()
    stats = {'loss': loss / n, 'acc1': 100 * top1 / n, 'acc5': 100 * top5 / n, 'images': int(n)}
    skipped_note = f'; {int(skipped)} unreadable skipped' if skipped else ''
    print(f"* Acc@1 {stats['acc1']:.3f} Acc@5 {stats['acc5']:.3f} loss {stats['loss']:.3f} ({int(n)} images"
          f"{skipped_note})")
    if skipped:
        stats['skipped_images'] = int(skipped)
    return stats


def fit(args, model, model_without_ddp, criterion, train_loader, val_loader, train_sampler, optimizer, loss_scaler,
        device, mixup_fn=None, best_acc1=0., start_iter=0, stop=None):
    """Train and evaluate every epoch; keep checkpoint-last.pth and checkpoint-best.pth; log.txt per epoch.
    start_iter: where the first epoch goes on (a resume from a checkpoint written inside it)."""
    log_writer = None
    if distributed.is_main_process() and args.log_dir:
        from torch.utils.tensorboard import SummaryWriter
        log_writer = SummaryWriter(log_dir=args.log_dir)
    start = time.time()
    for epoch in range(args.start_epoch, args.epochs):
        train_sampler.set_epoch(epoch, start_iter * train_loader.batch_size)
        try:
            train_stats = train_one_epoch(model, model_without_ddp, criterion, train_loader, optimizer, loss_scaler,
                                          device, epoch, args, mixup_fn, log_writer, start_iter, stop, best_acc1)
        except metrics.NonFiniteLoss as e:
            raise UsageError(f"{e}; stopped without writing a checkpoint. Lower --blr or set --clip_grad")
        # every rank evaluates and rank 0 saves the same BatchNorm statistics (the probe's): rank 0's
        distributed.broadcast_buffers(model_without_ddp)
        test_stats = evaluate(val_loader, model, device, args)
        step = misc.optimizer_step(args, epoch + 1, 0)
        if test_stats['acc1'] > best_acc1:
            best_acc1 = test_stats['acc1']
            checkpoint.save_checkpoint(args, epoch, step, model_without_ddp, optimizer, loss_scaler, 'best',
                                 {'test_stats': test_stats, 'best_acc1': best_acc1})
        checkpoint.save_checkpoint(args, epoch, step, model_without_ddp, optimizer, loss_scaler, 'last',
                             {'test_stats': test_stats, 'best_acc1': best_acc1})
        print(f"Accuracy of the network on the {test_stats['images']} val images: {test_stats['acc1']:.2f}% "
              f"(best {best_acc1:.2f}%)")
        record = {**{f'train_{k}': v for k, v in train_stats.items()}, **{f'test_{k}': v for k, v in test_stats.items()},
                  'epoch': epoch, 'best_acc1': best_acc1}
        if distributed.is_main_process() and args.output_dir:
            metrics.append_json_line(Path(args.output_dir) / 'log.txt', record)
            if log_writer is not None:
                log_writer.add_scalar('test/acc1', test_stats['acc1'], epoch)
                log_writer.flush()
        start_iter = 0
        if epoch + 1 < args.epochs and stop is not None and stop.requested():
            raise stop.stop(step)
    print(f'Training time {time.time() - start:.0f} s; best top-1 {best_acc1:.2f}%; outputs in {args.output_dir}')
    print(json.dumps({'final_acc1': test_stats['acc1'] if args.epochs > args.start_epoch else None,
                      'best_acc1': best_acc1}))
    return best_acc1


def resume_then_evaluate_or_fit(args, model, criterion, train_loader, val_loader, train_sampler, optimizer,
                                loss_scaler, device, resume, mixup_fn=None):
    """Resume from `resume` (load_resume_checkpoint's (path, checkpoint)), wrap for DDP, then evaluate the
    checkpoint (--eval) or train."""
    stop = preemption.StopSignals.from_args(args)
    args.recipe_changes, recipe_change = checkpoint.resumed_recipe(args, *resume)
    ckpt = checkpoint.resume_from_checkpoint(args, *resume, model, optimizer, loss_scaler)
    model_ddp = distributed.wrap_ddp(model, args)
    try:
        if args.eval:
            if not ckpt:
                raise UsageError("--eval needs --resume <checkpoint written by this script>")
            test_stats = evaluate(val_loader, model_ddp, device, args)
            if distributed.is_main_process() and args.output_dir:  # the result kept, as a fitted epoch's is
                metrics.append_json_line(Path(args.output_dir) / 'log.txt',
                                         {'eval_of': resume[0], **{f'test_{k}': v for k, v in test_stats.items()}})
        else:
            start_iter = checkpoint.resume_position(args, ckpt)
            step = misc.optimizer_step(args, args.start_epoch, start_iter)
            checkpoint.say_step_mapping(args, ckpt, step)
            metrics.log_run_args(args, resume[0], step, recipe_change)
            fit(args, model_ddp, model, criterion, train_loader, val_loader, train_sampler, optimizer, loss_scaler,
                device, mixup_fn, ckpt.get('best_acc1', 0.), start_iter, stop)
    except BadImageError as e:
        raise UsageError(f"{bad_image_message(e)}; remove or replace it, or pass --skip_bad_images")
    del model_ddp  # before the process group (distributed.finish)
    distributed.finish()
