"""FreezeOut (Brock et al., 2017) for the encoder: per-unit lr, per-unit cosine, progressive freezing.

Units in order: 0 = patch embedding + cls token, i = block i-1. Unit i ends
its schedule at optimizer step T_i = t_i * T and is frozen from then on; the
frozen units always form a prefix, which the model runs without autograd.
Everything is a function of the optimizer step, so a resumed run is exact.
"""
from util.lr_sched import cosine_schedule

SCALES = {'linear': lambda x: x, 'squared': lambda x: x ** 2, 'cubic': lambda x: x ** 3}


class FreezeOut:
    def __init__(self, num_units, total_steps, warmup_steps, lr, min_lr, t_0=0.8, how_scale='cubic',
                 scale_lr=True, freeze_pe=True, lr_mode='layerwise'):
        """freeze_pe=False (--dont_freeze_pe): unit 0 keeps the ordinary schedule and the unit schedule
        starts at block 0. lr_mode='global': every unit keeps the ordinary lr until it freezes."""
        if not 0 < t_0 <= 1:
            raise ValueError(f"--t_0 must be in (0, 1], got {t_0}")
        self.total_steps, self.warmup_steps = total_steps, warmup_steps
        self.lr, self.min_lr, self.scale_lr, self.lr_mode = lr, min_lr, scale_lr, lr_mode
        scale = SCALES[how_scale]
        first = 0 if freeze_pe else 1
        self.t = [1.] * first + [scale(t_0 + (1 - t_0) * i / (num_units - first - 1))
                                 for i in range(num_units - first)]
        self.end_steps = [t * total_steps for t in self.t]
        first_end = self.end_steps[first]
        if self.t[first] < 1 and first_end <= warmup_steps:
            raise ValueError(
                f"FreezeOut unit {first} would freeze at step {first_end:.0f}, inside the {warmup_steps}-step warm-up "
                f"(t_0={t_0}, how_scale={how_scale}): raise --t_0 or lower --warmup_epochs")

    def is_frozen(self, unit, step):
        return self.t[unit] < 1 and step >= self.end_steps[unit]

    def frozen_set(self, step):
        return {u for u in range(len(self.t)) if self.is_frozen(u, step)}

    def num_frozen(self, step):
        return len(self.frozen_set(step))

    def unit_lr(self, unit, step):
        """Warm-up to the unit's peak (lr / t_i with scale_lr), then cosine to 0 at T_i; the last unit
        (t = 1) keeps the ordinary schedule down to min_lr."""
        if self.is_frozen(unit, step):
            return 0.
        if self.t[unit] >= 1 or self.lr_mode == 'global':
            return cosine_schedule(step, self.total_steps, self.warmup_steps, self.lr, self.min_lr)
        peak = self.lr / self.t[unit] if self.scale_lr else self.lr
        return cosine_schedule(step, self.end_steps[unit], self.warmup_steps, peak)

    def update(self, model, step):
        """Bring the model's frozen units to their state at `step`; True when they changed."""
        frozen = self.frozen_set(step)
        if frozen == model.frozen:
            return False
        model.set_frozen(frozen)
        return True


def param_groups(model, weight_decay, per_unit):
    """AdamW groups: (FreezeOut unit or None) x (decay, no decay). No decay on 1-D params and tokens (MAE)."""
    groups = {}
    for name, p in model.named_parameters():
        no_decay = p.ndim <= 1 or name.endswith('token')
        unit = model.unit_of(name) if per_unit else None
        key = (-1 if unit is None else unit, no_decay)
        if key not in groups:
            groups[key] = {'params': [], 'weight_decay': 0. if no_decay else weight_decay, 'unit': unit}
        groups[key]['params'].append(p)
    return [groups[k] for k in sorted(groups)]
