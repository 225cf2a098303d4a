"""Metric logging: smoothed values read from the device only when printed, progress with ETA, JSON-line logs,
and the check that stops a run on a non-finite loss."""
import datetime
import json
import math
import os
import time
from collections import defaultdict, deque
from pathlib import Path

import numpy as np
import torch

from util.distributed import all_reduce_mean, is_main_process
from util.redact import redacted_args


def to_float(v):
    return v.item() if isinstance(v, torch.Tensor) else float(v)


class SmoothedValue:
    """Recent window and global average of a metric; tensors are read (one sync) only when printed."""

    def __init__(self, window=20, fmt='{median:.4f} ({global_avg:.4f})'):
        self.window, self.fmt = deque(maxlen=window), fmt
        self.total, self.count = 0., 0

    def update(self, value, n=1):
        self.window.append(value)
        self.total = self.total + value * n
        self.count += n

    def _recent(self):
        vals = list(self.window)
        if vals and isinstance(vals[0], torch.Tensor):
            return torch.stack([v.float() for v in vals]).tolist()
        return vals

    @property
    def median(self):
        return float(np.median(self._recent()))

    @property
    def value(self):
        return to_float(self.window[-1])

    @property
    def global_avg(self):
        return to_float(self.total) / max(1, self.count)

    def synchronize_between_processes(self):
        self.total = all_reduce_mean(to_float(self.total))

    def __str__(self):
        return self.fmt.format(median=self.median, global_avg=self.global_avg, value=self.value)


class MetricLogger:
    def __init__(self, delimiter='  '):
        self.meters = defaultdict(SmoothedValue)
        self.delimiter = delimiter

    def add_meter(self, name, meter):
        self.meters[name] = meter

    def update(self, **kwargs):
        for k, v in kwargs.items():
            self.meters[k].update(v.detach() if isinstance(v, torch.Tensor) else v)

    def synchronize_between_processes(self):
        for meter in self.meters.values():
            meter.synchronize_between_processes()

    def averages(self):
        return {k: m.global_avg for k, m in self.meters.items()}

    def __str__(self):
        return self.delimiter.join(f'{k}: {m}' for k, m in self.meters.items())

    def log_every(self, iterable, print_freq, header='', total=None):
        """Yield from `iterable`, printing progress, ETA, step time and data time every `print_freq` items."""
        total = len(iterable) if total is None else total
        step_time, data_time = SmoothedValue(fmt='{avg:.4f}'), SmoothedValue()
        start = end = time.time()
        width = len(str(total))
        for i, obj in enumerate(iterable):
            if i >= total:
                break
            data_time.update(time.time() - end)
            yield obj
            step_time.update(time.time() - end)
            if i % print_freq == 0 or i == total - 1:
                eta = datetime.timedelta(seconds=int(np.mean(step_time._recent()) * (total - i - 1)))
                mem = f'  max mem: {torch.cuda.max_memory_allocated() / 2 ** 20:.0f}MB' if torch.cuda.is_available() else ''
                print(f'{header} [{i:>{width}}/{total}]  eta: {eta}  {self}  time: {step_time.median:.4f}'
                      f'  data: {data_time.median:.4f}{mem}')
            end = time.time()
        elapsed = datetime.timedelta(seconds=int(time.time() - start))
        print(f'{header} Total time: {elapsed} ({(time.time() - start) / max(1, total):.4f} s / it)')


def read_json_lines(path, key=None):
    """The records of a log.txt written by append_json_line: per epoch (and a result), or with key='run_args'
    the arguments of each start and resume (log_run_args)."""
    found = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [r for r in found if (key in r if key else 'run_args' not in r)]


def log_run_args(args, resumed_from, step, recipe_change):
    """log.txt's line for a start or a resume: the full arguments the run goes on with, the step, and the recipe
    change this resume made (util/recipe.py), so that every part of a run's recipe reads back from log.txt."""
    if is_main_process() and args.output_dir:
        append_json_line(Path(args.output_dir) / 'log.txt', {'run_args': redacted_args(vars(args)), 'step': step,
                                                             'resumed_from': resumed_from or None,
                                                             'new_recipe': recipe_change})


def append_json_line(path, record):
    """One JSON line per epoch, written by rank 0 with a flush+fsync so a killed run keeps its log."""
    with open(path, 'a') as f:
        f.write(json.dumps(record, default=str) + '\n')
        f.flush()
        os.fsync(f.fileno())


class NonFiniteLoss(RuntimeError):
    pass


def check_finite(loss, epoch, step):
    value = loss.item()
    if not math.isfinite(value):
        raise NonFiniteLoss(f"loss is {value} at epoch {epoch}, step {step}")
    return value
