"""Preemption and faults on clusters: a stop signal checkpoints at the next optimizer step and the run resumes
exactly (pre-training, fine-tuning, probing), the SLURM requeue script, torchrun restarts, a full disk."""
import errno
import json
import os
import resource
import signal
import subprocess
import sys

import pytest
import torch

from conftest import (REPO, TINY_PRETRAIN, run_script, same_weights, script_env, start, until_training,
                      steps_logged, wait_for, worker_pid)
from util import checkpoint, metrics, preemption
from util.errors import UsageError


@pytest.fixture()
def restore_signal_handlers():
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


def test_stop_signals_parse_and_refuse_what_cannot_be_caught():
    assert preemption.parse_signals('TERM,usr1') == [signal.SIGTERM, signal.SIGUSR1]
    assert preemption.parse_signals('SIGUSR2') == [signal.SIGUSR2]
    assert preemption.parse_signals('none') == [] and preemption.parse_signals('') == []
    for bad in ('KILL', 'TERM,NOPE'):
        with pytest.raises(UsageError, match='--stop_signals'):
            preemption.parse_signals(bad)


def test_a_signal_is_only_recorded_and_asked_for_at_the_boundary(restore_signal_handlers):
    stop = preemption.StopSignals([signal.SIGTERM, signal.SIGUSR1])
    assert not stop.requested()
    os.kill(os.getpid(), signal.SIGUSR1)
    os.kill(os.getpid(), signal.SIGTERM)  # a second signal changes nothing
    assert stop.requested() and stop.requested()
    assert 'stopped by SIGUSR1 at optimizer step 7' in str(stop.stop(7))
    assert not preemption.StopSignals([]).requested()


def test_a_stopped_run_drops_what_its_frames_held_before_leaving_the_process_group(monkeypatch):
    """A DDP wrapper that outlives the process group destroys the group itself without releasing the GIL, which can
    hang a gloo exit (util/distributed.finish): the stop's traceback must not keep the run's objects alive."""
    import argparse
    import weakref
    from util import distributed, misc

    class Wrapper:  # stands for the DDP wrapper a run's main() holds in a local
        pass

    alive = {}

    def main(args):
        wrapper = Wrapper()
        alive['wrapper'] = weakref.ref(wrapper)
        raise preemption.Preempted(signal.SIGTERM, 7)

    monkeypatch.setattr(distributed, 'finish', lambda: alive.update(at_finish=alive['wrapper']() is not None))
    monkeypatch.setattr(sys, 'argv', ['run_pretrain.py'])
    with pytest.raises(SystemExit) as exit_:
        misc.run_main(main, argparse.ArgumentParser())
    assert exit_.value.code == preemption.EXIT_PREEMPTED and alive['at_finish'] is False


def test_a_failed_checkpoint_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / 'checkpoint-last.pth'
    checkpoint.atomic_save({'step': 1}, path)
    real_save = torch.save

    def full_disk(obj, f):
        real_save(obj, f)
        raise OSError(errno.ENOSPC, 'No space left on device')

    monkeypatch.setattr(torch, 'save', full_disk)
    with pytest.raises(checkpoint.CheckpointWriteError) as e:
        checkpoint.atomic_save({'step': 2}, path)
    message = str(e.value)
    assert f'to {tmp_path} (No space left on device;' in message and 'GiB free there' in message
    assert '\n' not in message
    assert [p.name for p in tmp_path.iterdir()] == ['checkpoint-last.pth']  # no temporary file left
    assert torch.load(path) == {'step': 1}


# ------------------------------------------------------------------ runs on CPU

@pytest.mark.slow
def test_sigterm_to_the_process_group_checkpoints_at_the_next_step_and_resumes_exactly(tmp_path, small_data):
    """SIGTERM twice to the whole group (loader workers included) in the middle of an epoch, with --accum_iter 2,
    FreezeOut and bf16: exit 75, nothing replayed on resume, and the uninterrupted run's weights bitwise."""
    run = [*TINY_PRETRAIN, '--data_path', small_data, '--epochs', '1', '--num_workers', '1', '--accum_iter', '2',
           '--batch_size', '8', '--freezeout', '--how_scale', 'linear', '--t_0', '0.5', '--warmup_epochs', '0.5',
           '--amp', 'bf16', '--log_every_step']
    ref, out = tmp_path / 'ref', tmp_path / 'stopped'
    run_script('run_pretrain.py', *run, '--output_dir', ref)
    proc = start(['run_pretrain.py', *run, '--output_dir', out])
    output = until_training(proc)
    os.killpg(proc.pid, signal.SIGTERM)
    os.killpg(proc.pid, signal.SIGTERM)  # a unit freezes at step 4 of 5: after the stop
    output += proc.communicate(timeout=120)[0]
    assert proc.returncode == preemption.EXIT_PREEMPTED, output[-2000:]
    assert 'after writing checkpoint-last.pth; run the same command to resume' in output
    ckpt = torch.load(out / 'checkpoint-last.pth')
    done = len(steps_logged(out))
    assert (ckpt['epoch'], ckpt['step'], ckpt['next_iter']) == (-1, done, 2 * done) and done < 5
    run_script('run_pretrain.py', *run, '--output_dir', out)
    iters = steps_logged(out)
    assert len(iters) == len(set(iters)) == len(steps_logged(ref))  # no step lost, none computed twice
    assert json.loads((out / 'steps.txt').read_text().splitlines()[-1])['frozen_units'] > 0  # a freeze after resume
    assert same_weights(ref, out) == 0


@pytest.mark.slow
@pytest.mark.parametrize('script,extra', [('run_finetune.py', ['--mixup', '0.8', '--cutmix', '1.0']),
                                          ('run_linprobe.py', [])])
def test_fine_tuning_and_probing_stop_on_a_signal_and_resume_exactly(tmp_path, small_data, pretrain_ckpt, script,
                                                                       extra):
    run = [script, '--model', 'vit_tiny_patch4', '--input_size', '32', '--batch_size', '8', '--num_workers', '1',
           '--warmup_epochs', '0.5', '--print_freq', '1', '--data_path', small_data, '--finetune', pretrain_ckpt,
           '--epochs', '2', *extra]
    ref, out = tmp_path / 'ref', tmp_path / 'stopped'
    run_script(*run, '--output_dir', ref)
    proc = start([*run, '--output_dir', out])
    seen = []
    for line in proc.stdout:  # the progress line of iteration 4 of 10 in epoch 0
        seen.append(line)
        if 'Epoch: [0] [ 4/10]' in line:
            os.killpg(proc.pid, signal.SIGUSR1)
            break
    seen += proc.stdout.readlines()
    proc.wait(timeout=120)
    assert proc.returncode == preemption.EXIT_PREEMPTED, ''.join(seen)[-2000:]
    ckpt = torch.load(out / 'checkpoint-last.pth')
    assert ckpt['epoch'] == -1 and 4 < ckpt['next_iter'] < 10 and ckpt['step'] == ckpt['next_iter']
    run_script(*run, '--output_dir', out)
    assert same_weights(ref, out) == 0
    logs = [metrics.read_json_lines(d / 'log.txt') for d in (ref, out)]
    assert [r['test_acc1'] for r in logs[0]] == [r['test_acc1'] for r in logs[1]]


TWO_PROCESS = [*TINY_PRETRAIN, '--batch_size', '8', '--num_workers', '1', '--epochs', '2', '--log_every_step',
               '--device', 'cpu']


@pytest.fixture(scope='module')
def two_process_reference(tmp_path_factory, small_data):
    out = tmp_path_factory.mktemp('two_process_reference')
    run_script('-m', 'torch.distributed.run', '--nproc_per_node=2', 'run_pretrain.py', *TWO_PROCESS,
               '--data_path', small_data, '--output_dir', out)
    return out


@pytest.mark.slow
def test_sigterm_to_torch_distributed_launch_stops_both_ranks_at_one_step(tmp_path, small_data):
    """The launcher passes SIGTERM on to its workers; the ranks vote, and rank 0's checkpoint holds the step of the
    stop. A long schedule, so that a signal delayed by a loaded machine still lands inside the run (the resume's
    exactness under a launcher: the SLURM test below)."""
    out = tmp_path / 'stopped'
    proc = start(['-m', 'torch.distributed.launch', '--nproc_per_node=2', 'run_pretrain.py', *TWO_PROCESS,
                  '--epochs', '100', '--data_path', small_data, '--output_dir', out])
    wait_for(lambda: len(steps_logged(out)) >= 2, proc)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert 'stopped by SIGTERM at optimizer step' in output, output[-3000:]
    ckpt = torch.load(out / 'checkpoint-last.pth')
    assert ckpt['step'] == len(steps_logged(out)) < 500
    assert 'Training time' not in output


@pytest.mark.slow
def test_torchrun_restarts_a_killed_worker_and_ends_with_the_uninterrupted_weights(tmp_path, small_data,
                                                                                    two_process_reference):
    """SIGKILL rank 1 mid-run under --max_restarts 1: the restarted workers join a new rendezvous (a store prefix
    per attempt) and resume from the last checkpoint."""
    out = tmp_path / 'restarted'
    proc = start(['-m', 'torch.distributed.run', '--nproc_per_node=2', '--max_restarts=1', 'run_pretrain.py',
                  *TWO_PROCESS, '--data_path', small_data, '--save_every_iters', '2', '--output_dir', out])
    wait_for(lambda: len(steps_logged(out)) >= 3, proc)  # after the first periodic checkpoint (step 2) of 10
    rank1 = worker_pid(1, str(out))
    assert rank1, 'rank 1 not found (did the run end first?)'
    os.kill(rank1, signal.SIGKILL)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, output[-3000:]
    assert output.count('Resumed from') == 1
    assert same_weights(two_process_reference, out) < 1e-6


@pytest.mark.slow
def test_slurm_script_requeues_on_the_time_limit_warning_and_the_rerun_resumes(tmp_path, small_data,
                                                                               two_process_reference):
    """scripts/slurm_pretrain.sh outside SLURM, with a stand-in scontrol: SIGUSR1 to the batch shell goes through
    record.sh and torchrun to the training, which checkpoints and stops; the script requeues the job."""
    bin_dir, calls = tmp_path / 'bin', tmp_path / 'scontrol.calls'
    bin_dir.mkdir()
    (bin_dir / 'scontrol').write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (bin_dir / 'scontrol').chmod(0o755)
    out, logs = tmp_path / 'run', tmp_path / 'logs'
    env = script_env({'PATH': f"{bin_dir}:{os.environ['PATH']}", 'SLURM_JOB_ID': '4242', 'NPROC': '2',
                      'RECORD_DIR': str(logs)})
    cmd = ['bash', 'scripts/slurm_pretrain.sh', *TWO_PROCESS, '--data_path', str(small_data), '--output_dir', str(out)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    until_training(proc)
    proc.send_signal(signal.SIGUSR1)
    output = proc.communicate(timeout=120)[0]
    assert calls.read_text() == 'requeue 4242\n', output[-3000:]
    ckpt = torch.load(out / 'checkpoint-last.pth')
    assert ckpt['epoch'] == -1 and ckpt['next_iter'] == len(steps_logged(out)) < 10
    [first_log] = list(logs.iterdir())
    assert 'stopped by SIGUSR1' in first_log.read_text()
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:]
    assert calls.read_text() == 'requeue 4242\n' and len(list(logs.iterdir())) == 2
    iters = steps_logged(out)
    assert len(iters) == len(set(iters)) == len(steps_logged(two_process_reference))
    assert same_weights(two_process_reference, out) == 0


@pytest.mark.slow
def test_a_full_disk_stops_the_run_in_one_line_and_keeps_the_last_checkpoint(tmp_path, small_data):
    """The file-size limit (RLIMIT_FSIZE) makes every checkpoint write fail as a full disk would."""
    out = tmp_path / 'run'
    run = ['run_pretrain.py', *TINY_PRETRAIN, '--data_path', small_data, '--output_dir', out]
    run_script(*run, '--epochs', '1')
    before = (out / 'checkpoint-last.pth').read_bytes()
    limit = len(before) // 2

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run([sys.executable, *map(str, run), '--epochs', '2', '--new_recipe'], cwd=REPO, env=script_env(),
                          preexec_fn=small_files, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f'error: cannot write checkpoint-last.pth to {out} (File too large;'), last
    assert 'GiB free there); the previous checkpoint is kept' in last
    assert (out / 'checkpoint-last.pth').read_bytes() == before
    assert sorted(p.name for p in out.glob('*.pth*')) == ['checkpoint-0.pth', 'checkpoint-last.pth']
    assert not list(out.glob('.checkpoint-*'))
