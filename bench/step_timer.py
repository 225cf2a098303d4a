"""Timing and memory of one real pre-training step (forward, backward, AdamW, AMP), shared by the benchmarks."""
import statistics
import time
from contextlib import nullcontext

import torch

import util.misc as misc
from util import pipeline
from util.distributed import compile_model
from util.freezeout import param_groups


class SavedActivations:
    """Bytes of tensors autograd keeps for backward: the activation memory freezing is meant to save
    (on CPU there is no allocator peak to read)."""

    def __init__(self):
        self.bytes = 0

    def __enter__(self):
        def pack(t):
            self.bytes += t.numel() * t.element_size()
            return t
        self.ctx = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self.ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self.ctx.__exit__(*exc)


class StepRunner:
    """One model with its optimizer and scaler, stepping on a fixed in-memory batch."""

    def __init__(self, model, batch, amp='none', lr=1e-4, compile=None, freezeout=False, compile_scope='model',
                 fused=None):
        """compile: None (eager) or a torch.compile mode: 'default', or 'reduce-overhead' (CUDA graphs of the
        compiled forward and backward on CUDA; on CPU the same as 'default'), of the whole model or of its
        blocks (compile_scope, as run_pretrain.py's --compile_scope). fused: fused AdamW, by default where
        run_pretrain.py uses it (CUDA)."""
        misc.time_conv_algorithms()  # as the entry points
        self.model, self.batch = model, batch
        self.compiled = compile is not None
        # static shapes: a second batch size of the same model class in this process would otherwise get a
        # graph with symbolic sizes (torch's automatic dynamic shapes), unlike a run of its own
        self.forward = compile_model(model, compile, compile_scope, dynamic=False) if self.compiled else model
        self.device = batch.device
        self.dtype = misc.AMP_DTYPES[amp]
        # the optimizer of run_pretrain.py: per-unit groups (and lr) with --freezeout, else decay / no decay
        groups = param_groups(model, 0.05, per_unit=freezeout)
        self.optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95),
                                           fused=self.device.type == 'cuda' if fused is None else fused)
        self.scaler = misc.LossScaler(self.device.type, enabled=amp == 'fp16')

    def step(self, measure_activations=False, batch=None, noise=None):
        """One training step on the fixed batch, or on `batch` (with its mask noise) from a loader."""
        ctx = SavedActivations() if measure_activations else nullcontext()
        batch = self.batch if batch is None else batch
        if self.compiled:  # a new step: CUDA graphs may reuse the previous step's output memory
            torch.compiler.cudagraph_mark_step_begin()
        with ctx, torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            loss, _ = self.forward(batch, 0.75, noise)
        self.scaler(loss, self.optimizer, self.model.parameters())
        self.optimizer.zero_grad(set_to_none=True)
        return ctx.bytes if measure_activations else None

    def warm_up(self, label, steps=2):
        """The first `steps` steps, untimed by the benchmarks: compilation and CUDA-graph capture happen here, so
        their seconds are printed as they finish (a benchmark cut off by a time limit still shows them)."""
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        if self.device.type == 'cuda':
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        if steps:
            print(f'{label}: first {steps} steps in {seconds:.1f} s' + (' (compilation included)' if self.compiled
                                                                        else ''), flush=True)
        return seconds

    def time_steps(self, n, batches=None, clock=time.perf_counter):
        """Seconds per step over n steps (synchronised on GPU): on the fixed batch, or on (samples, noise, _)
        batches drawn from `batches` inside the timed region, so loading and the copy count. `clock`:
        wall time, or time.process_time (the CPU time of all the process's threads)."""
        if self.device.type == 'cuda':
            torch.cuda.synchronize()
        start = clock()
        for _ in range(n):
            if batches is None:
                self.step()
            else:
                samples, noise, _ = next(batches)
                self.step(batch=pipeline.to_device(samples, self.device, self.batch.shape[-1]),
                          noise=noise.to(self.device, non_blocking=True))
        if self.device.type == 'cuda':
            torch.cuda.synchronize()
        return (clock() - start) / n

    def peak_memory_mb(self):
        """GPU: allocator peak over one step; CPU: bytes saved for backward."""
        if self.device.type == 'cuda':
            torch.cuda.reset_peak_memory_stats()
            self.step()
            return torch.cuda.max_memory_allocated() / 2 ** 20
        return self.step(measure_activations=True) / 2 ** 20


def summarise(samples):
    return {'median': statistics.median(samples), 'min': min(samples), 'max': max(samples), 'n': len(samples)}


def alternate(runners, reps, steps, warmup=2, batches=None, clock=time.perf_counter):
    """Seconds per step of every runner, `reps` times, interleaved (A B C A B C ...) so drift hits all alike;
    with `batches`, all runners draw from that one stream."""
    for name, r in runners.items():
        r.warm_up(name, warmup)
    times = {name: [] for name in runners}
    for _ in range(reps):
        for name, r in runners.items():
            times[name].append(r.time_steps(steps, batches, clock))
    return {name: summarise(t) for name, t in times.items()}
