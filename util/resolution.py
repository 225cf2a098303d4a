"""Progressive resolution (FastMIM-P, Guo et al. 2022): the input size of pre-training as a function of the
optimizer step. `--input_size_schedule 128:0.5,160:0.75,224` trains at 128 px for the first half of the run's
steps, at 160 px up to three quarters, then at 224 px; run_pretrain.py rebuilds the model, its optimizer and the
loader at each change (util.resolution.segments), carrying every weight over. `--batch_size_schedule 256,128,64`
gives each size its own per-process batch: the accumulation adapts so that every size keeps the run's global
batch, and an optimizer step takes the same images whatever the batch (util.datasets.EpochSampler)."""
from util.errors import UsageError


def parse_schedule(text, batches=None):
    """'128:0.5,160:0.75,224' -> [(128, 0.5, None), (160, 0.75, None), (224, 1.0, None)]: each size with the
    fraction of the run's optimizer steps where it ends (the last size runs to the end) and its per-process batch
    from `batches` ('256,128,64', one per size), None without."""
    pairs = []
    parts = [p.strip() for p in text.split(',') if p.strip()]
    for k, part in enumerate(parts):
        size, _, end = part.partition(':')
        try:
            pairs.append((int(size), float(end) if end else 1.0))
            if pairs[-1][0] < 1:
                raise ValueError
        except ValueError:
            raise UsageError(f"--input_size_schedule {text!r}: {part!r} is not SIZE:FRACTION; write it as "
                             f"128:0.5,160:0.75,224 (sizes in px, each with the fraction of the run it ends at)") from None
        if end and k == len(parts) - 1:
            raise UsageError(f"--input_size_schedule {text!r}: the last size runs to the end of the run; leave out "
                             f"its fraction ({size}, not {part})")
    if not pairs:
        raise UsageError(f"--input_size_schedule {text!r} names no size; write it as 128:0.5,160:0.75,224, or leave "
                         f"it out to train at one --input_size")
    ends = [e for _, e in pairs]
    if any(not 0 < e <= 1 for e in ends) or ends != sorted(set(ends)):
        raise UsageError(f"--input_size_schedule {text!r}: the fractions must rise from above 0 to below 1, "
                         f"as in 128:0.5,160:0.75,224")
    if batches is None:
        return [(size, end, None) for size, end in pairs]
    try:
        per_size = [int(b) for b in batches.split(',')]
    except ValueError:
        per_size = []
    if len(per_size) != len(pairs) or min(per_size, default=0) < 1:
        raise UsageError(f"--batch_size_schedule {batches!r}: give one per-process batch for each of the "
                         f"{len(pairs)} sizes of --input_size_schedule {text!r} (as in 256,128,64 for three sizes)")
    return [(size, end, batch) for (size, end), batch in zip(pairs, per_size)]


def accumulation(global_batch, batch, world, size):
    """Micro-batches per optimizer step that make `global_batch` from `batch` per process at `size` px."""
    if global_batch % (batch * world):
        raise UsageError(f"--batch_size_schedule: a batch of {batch} per process at {size} px on {world} process(es) "
                         f"cannot make the global batch of {global_batch} with whole accumulation steps; give "
                         f"each size a batch that divides {global_batch // world}")
    return global_batch // (batch * world)


def segments(schedule, total_steps):
    """[(first step, end step, size, batch)] of the run, one per entry of parse_schedule; a size that would get no
    optimizer step of the run is a UsageError."""
    found, first = [], 0
    for size, end, batch in schedule:
        last = total_steps if end == 1.0 else int(end * total_steps)
        if last <= first:
            raise UsageError(f"--input_size_schedule: {size} px (to {end:g} of the run) gets no optimizer step of "
                             f"the run's {total_steps}: raise its fraction, leave it out, or train longer")
        found.append((first, last, size, batch))
        first = last
    return found


def segment_at(found, step):
    """The segment holding `step` (the last one for the run's end)."""
    return next((s for s in found if s[0] <= step < s[1]), found[-1])
