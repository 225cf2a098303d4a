"""FreezeOut (Brock et al., 2017) for the encoder: per-unit lr, per-unit cosine, progressive freezing.

Units in order: 0 = patch embedding, i = block i-1 (with --dont_freeze_pe the patch embedding is no
unit and follows the ordinary schedule). Unit i trains for a fraction t_i of the run,
t_i = scale(t_0 + (1 - t_0) i / N), and is frozen afterwards; frozen units always form a prefix.
Everything is a function of the optimizer step s, so a resumed run is exact. Two rule sets:

'original' (utkutpcgl/freezeout_localmim_rho): every group warms up to lr; unit i's cosine then spans
(T - W) t_i post-warm-up steps to 0 and the unit is frozen from W + floor((T - W) t_i) + 1; each
LocalMIM tap (norm + decoder) follows the unit of the block it reads and is dropped with it; the cls
token is no unit (ordinary schedule, never frozen), so backward still runs through frozen blocks.

'project': the cls token belongs to unit 0, so the frozen prefix runs without autograd; unit i warms up
to its own peak and its cosine ends at t_i T; taps follow the ordinary schedule unless --freeze_decoders.
"""
import math

from util.lr_sched import cosine_schedule

SCALES = {'linear': lambda x: x, 'squared': lambda x: x ** 2, 'cubic': lambda x: x ** 3}
RULES = ('original', 'project')


class FreezeOut:
    def __init__(self, *, num_units, tap_units=(), total_steps, warmup_steps, lr, min_lr=0., t_0=0.8,
                 how_scale='cubic', scale_lr=True, freeze_pe=True, lr_mode='layerwise', rules):
        """num_units: patch embedding + blocks. tap_units: the unit holding the block each LocalMIM tap reads.
        freeze_pe=False (--dont_freeze_pe): the patch embedding keeps the ordinary schedule and the unit
        schedule starts at block 0. lr_mode='global': every unit keeps the ordinary lr until it freezes."""
        if not 0 < t_0 <= 1:
            raise ValueError(f"--t_0 must be in (0, 1], got {t_0}")
        if rules not in RULES:
            raise ValueError(f"--freezeout_rules must be one of {', '.join(RULES)}, got {rules!r}")
        self.total_steps, self.warmup_steps, self.rules = total_steps, warmup_steps, rules
        self.lr, self.min_lr, self.scale_lr, self.lr_mode = lr, min_lr, scale_lr, lr_mode
        self.tap_units = list(tap_units)
        scale = SCALES[how_scale]
        first = 0 if freeze_pe else 1
        # t = None: not a unit (the patch embedding under --dont_freeze_pe)
        self.t = [None] * first + [scale(t_0 + (1 - t_0) * i / (num_units - first - 1))
                                   for i in range(num_units - first)]
        self.freeze_steps = [self._freeze_step(t) for t in self.t]
        if self.freeze_steps[first] <= warmup_steps:
            raise ValueError(
                f"FreezeOut unit {first} would freeze at step {self.freeze_steps[first]}, inside the "
                f"{warmup_steps}-step warm-up (t_0={t_0}, how_scale={how_scale}): raise --t_0 or lower --warmup_epochs")

    @classmethod
    def from_args(cls, args, model):
        """The run's FreezeOut from run_pretrain.py's arguments."""
        return cls(num_units=model.num_units, tap_units=[b + 1 for b in getattr(model, 'taps', [])],
                   total_steps=args.total_steps, warmup_steps=args.warmup_steps, lr=args.lr, min_lr=args.min_lr,
                   t_0=args.t_0, how_scale=args.how_scale, scale_lr=args.scale_lr, freeze_pe=not args.dont_freeze_pe,
                   lr_mode=args.freezeout_lr, rules=args.freezeout_rules)

    def _freeze_step(self, t):
        """First step at which a unit with fraction t is frozen (math.inf: never)."""
        if t is None or t >= 1:
            return math.inf
        if self.rules == 'original':
            return self.warmup_steps + math.floor((self.total_steps - self.warmup_steps) * t) + 1
        return math.ceil(t * self.total_steps)

    def frozen_set(self, step):
        return {u for u, s in enumerate(self.freeze_steps) if step >= s}

    def num_frozen(self, step):
        return len(self.frozen_set(step))

    def ordinary_lr(self, step):
        """Warm-up, then cosine to min_lr over the whole run (facebookresearch/mae)."""
        return cosine_schedule(step, self.total_steps, self.warmup_steps, self.lr, self.min_lr)

    def unit_lr(self, unit, step):
        if step >= self.freeze_steps[unit]:
            return 0.
        t = self.t[unit]
        if t is None or self.lr_mode == 'global' or (t >= 1 and self.rules == 'project'):
            return self.ordinary_lr(step)
        peak = self.lr / t if self.scale_lr else self.lr
        W = self.warmup_steps
        if self.rules == 'project':
            return cosine_schedule(step, t * self.total_steps, W, peak)
        if step < W:
            return self.lr * step / W
        return peak / 2 * (1 + math.cos(math.pi * (step - W) / ((self.total_steps - W) * t)))

    def group_lr(self, group, step):
        """lr of an optimizer group at `step`: its unit's, its tap's unit's (original rules) or the ordinary one."""
        if group.get('unit') is not None:
            return self.unit_lr(group['unit'], step)
        if group.get('tap') is not None and self.rules == 'original':
            return self.unit_lr(self.tap_units[group['tap']], step)
        return self.ordinary_lr(step)

    def update(self, model, step):
        """Bring the model's frozen units to their state at `step`; True when they changed."""
        frozen = self.frozen_set(step)
        if frozen == model.frozen:
            return False
        model.set_frozen(frozen)
        return True


def param_groups(model, weight_decay, per_unit):
    """AdamW groups, each named for the per-step record: 'unit<i>' (FreezeOut unit), 'tap<k>' (a LocalMIM
    tap's norm + decoder), 'cls_token' (when it is no unit) or 'rest', each split into decay / no decay.
    Weight decay on every parameter of more than one dimension whose name does not end in '.bias', cls and
    mask tokens included (timm's add_weight_decay, as facebookresearch/mae and Haoqing-Wang/LocalMIM)."""
    groups = {}
    for name, p in model.named_parameters():
        no_decay = p.ndim <= 1 or name.endswith('.bias')
        unit = model.unit_of(name) if per_unit else None
        tap = int(name.split('.')[1]) if per_unit and name.startswith(('decoders.', 'tap_norms.')) else None
        label = (f'unit{unit}' if unit is not None else f'tap{tap}' if tap is not None
                 else 'cls_token' if per_unit and name == 'cls_token' else 'rest')
        key = (label, no_decay)
        if key not in groups:
            groups[key] = {'params': [], 'weight_decay': 0. if no_decay else weight_decay, 'unit': unit, 'tap': tap,
                           'name': label}
        groups[key]['params'].append(p)
    return list(groups.values())
