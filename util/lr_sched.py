"""Per-optimizer-step learning-rate schedule: linear warm-up, then half-cycle cosine (MAE)."""
import math


def cosine_schedule(step, total_steps, warmup_steps, peak, final=0.):
    if step < warmup_steps:
        return peak * step / warmup_steps
    progress = min(1., (step - warmup_steps) / max(1e-8, total_steps - warmup_steps))
    return final + (peak - final) * 0.5 * (1. + math.cos(math.pi * progress))


def adjust_learning_rate(optimizer, step, args, freezeout=None):
    """Set every group's lr for optimizer step `step`; with FreezeOut, it gives each group's lr."""
    base = cosine_schedule(step, args.total_steps, args.warmup_steps, args.lr, args.min_lr)
    for group in optimizer.param_groups:
        lr = base if freezeout is None else freezeout.group_lr(group, step)
        group['lr'] = lr * group.get('lr_scale', 1.)
    return base
