"""Preemption: a scheduler's warning signal (SIGTERM, SIGUSR1) stops the run at the next optimizer-step boundary,
on every rank together, after checkpoint-last.pth is written there; the same command resumes it exactly."""
import atexit
import functools
import multiprocessing
import multiprocessing.util  # registers multiprocessing's exit handler now, before _kill_loader_workers below
import signal

import torch
import torch.distributed as dist

from util.distributed import is_dist
from util.errors import UsageError

# sysexits' EX_TEMPFAIL: stopped on request with nothing lost; running the same command again resumes the run
EXIT_PREEMPTED = 75


class Preempted(Exception):
    """Raised on every rank once the checkpoint of the stop is written; the entry point exits with EXIT_PREEMPTED."""

    def __init__(self, signum, step):
        super().__init__(f'stopped by {signal.Signals(signum).name} at optimizer step {step} after writing '
                         f'checkpoint-last.pth; run the same command to resume')


def parse_signals(names):
    """'TERM,USR1' -> [SIGTERM, SIGUSR1]; '' or 'none' -> []."""
    if names.strip().lower() in ('', 'none'):
        return []
    found = []
    for name in names.split(','):
        name = name.strip().upper()
        sig = getattr(signal, name if name.startswith('SIG') else f'SIG{name}', None)
        if not isinstance(sig, signal.Signals) or sig in (signal.SIGKILL, signal.SIGSTOP):
            raise UsageError(f"--stop_signals: {name!r} is not a signal a process can catch; "
                             f"pass a comma-separated list such as TERM,USR1 (or none)")
        found.append(sig)
    return found


def _ignore(signals, worker_id):
    for sig in signals:
        signal.signal(sig, signal.SIG_IGN)


def _kill_loader_workers():
    """At exit, before multiprocessing's own exit handler (atexit runs the last registered first): that one stops
    daemonic children, the loader workers among them, with SIGTERM, which the workers ignore, and would then wait
    for them forever. A run that fails with an error keeps its loader alive to this point (the traceback holds it)."""
    workers = [child for child in multiprocessing.active_children() if child.daemon]
    if workers:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would report each killed worker as an error
        for worker in workers:
            worker.kill()


atexit.register(_kill_loader_workers)


def loader_worker_init(args):
    """A DataLoader worker_init_fn under which the workers ignore the stop signals: launchers and schedulers signal
    whole process groups, and a worker killed by the signal would fail the main process before its checkpoint."""
    return functools.partial(_ignore, tuple(parse_signals(args.stop_signals)))


class StopSignals:
    """Catches the given signals. The handler only records the signal (no I/O, no collective: it may run inside a
    checkpoint write, and a second signal changes nothing). The training loop asks `requested()` at each
    optimizer-step boundary, and every rank gets the same answer."""

    def __init__(self, signals):
        self.received = 0
        self.enabled = bool(signals)
        for sig in signals:
            signal.signal(sig, self._record)
        # the vote runs on a CPU (gloo) group: reading a NCCL result would sync the GPU every step
        self.group = None
        if self.enabled and is_dist() and dist.get_backend() != 'gloo':
            self.group = dist.new_group(backend='gloo')

    @classmethod
    def from_args(cls, args):
        """After the process group is set up: every rank must join the vote's group."""
        return cls(parse_signals(args.stop_signals))

    def _record(self, signum, frame):
        self.received = self.received or signum

    def requested(self):
        """Whether any rank got a signal: one all-reduce of one number per call under torch.distributed."""
        if not self.enabled:
            return False
        if is_dist():
            vote = torch.tensor([self.received], dtype=torch.int64)
            dist.all_reduce(vote, op=dist.ReduceOp.MAX, group=self.group)
            self.received = int(vote)
        return bool(self.received)

    def stop(self, step):
        return Preempted(self.received, step)
