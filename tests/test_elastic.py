"""A run brought back on another number of processes (a requeue with fewer or more GPUs, an elastic job that lost
a node) keeps its recipe: the checkpoint's global batch (the accumulation adapts), the images of every optimizer
step, the lr and the schedule, and ends with the uninterrupted run's weights up to the order of the reduction."""
import argparse
import json
import os
import signal
import subprocess

import pytest
import torch

from bench.fault_drill import children
from conftest import (REPO, TINY_PRETRAIN, free_port, run_script, same_weights, script_env, start,
                      until_training, wait_for)
from util import checkpoint
from util.errors import UsageError

# 80 images, a global batch of 16: 5 optimizer steps per epoch, 10 in the run
RUN = [*TINY_PRETRAIN, '--batch_size', '8', '--num_workers', '1', '--epochs', '2', '--save_freq', '1',
       '--log_every_step', '--device', 'cpu']
TWO = ['-m', 'torch.distributed.run', '--nproc_per_node=2', 'run_pretrain.py']
ONE = ['run_pretrain.py', '--accum_iter', '2']
# what the order of a gradient reduction may change (more than two processes sum in DDP's own order)
REDUCTION_ORDER = 1e-5


def saved(**kw):
    return {'args': {'batch_size': 8, 'accum_iter': 1, 'world_size': 2, **kw}}


def resumed_on(world, batch, accum=1, global_batch=None, new_global_batch=False):
    return argparse.Namespace(world_size=world, batch_size=batch, accum_iter=accum, global_batch=global_batch,
                              new_global_batch=new_global_batch)


def test_the_accumulation_adapts_to_keep_the_global_batch(capsys):
    ckpt = saved()  # 8 x 1 x 2 = 16
    assert checkpoint.run_accumulation(resumed_on(1, 8), 'ck.pth', ckpt) == 2
    assert 'Resuming on 1 process(es) (the checkpoint: 2): --batch_size 8 x --accum_iter 2 keeps its global ' \
           'batch of 16' in capsys.readouterr().out
    assert checkpoint.run_accumulation(resumed_on(4, 4), 'ck.pth', ckpt) == 1
    assert checkpoint.run_accumulation(resumed_on(2, 8), 'ck.pth', ckpt) == 1
    assert capsys.readouterr().out.count('\n') == 1  # the same processes and accumulation: nothing to say
    assert checkpoint.run_accumulation(resumed_on(1, 8), '', {}) == 1  # not a resume
    with pytest.raises(UsageError, match=r'ck.pth trained with a global batch of 16 \(8 x --accum_iter 1 x 2 '
                                         r'processes\), which --batch_size 6 x 1 processes .* pass --batch_size 4, '
                                         r'or --new_global_batch to go on with 6'):
        checkpoint.run_accumulation(resumed_on(1, 6), 'ck.pth', ckpt)
    with pytest.raises(UsageError, match='pass a number of processes that divides 16'):
        checkpoint.run_accumulation(resumed_on(3, 8), 'ck.pth', ckpt)
    assert checkpoint.run_accumulation(resumed_on(1, 6, new_global_batch=True), 'ck.pth', ckpt) == 1


def test_a_global_batch_flag_sets_the_accumulation_from_the_start(capsys):
    """--global_batch keeps the recipe on any number of processes even before the first checkpoint (an elastic job
    that loses a node before it has saved); a resumed checkpoint must agree with it."""
    assert checkpoint.run_accumulation(resumed_on(1, 8, global_batch=32), '', {}) == 4
    assert '--global_batch 32 on 1 process(es) at --batch_size 8: --accum_iter 4' in capsys.readouterr().out
    assert checkpoint.run_accumulation(resumed_on(4, 8, global_batch=32), '', {}) == 1
    assert capsys.readouterr().out == ''
    assert checkpoint.run_accumulation(resumed_on(1, 8, global_batch=16), 'ck.pth', saved()) == 2
    with pytest.raises(UsageError, match=r'--global_batch 24, which --batch_size 8 x 2 '
                                         r'processes cannot make with whole accumulation steps: pass --batch_size 6$'):
        checkpoint.run_accumulation(resumed_on(2, 8, global_batch=24), '', {})
    with pytest.raises(UsageError, match='--global_batch 32 differs from the global batch of 16 that ck.pth trained '
                                         'with: leave --global_batch out to keep 16, or add --new_global_batch'):
        checkpoint.run_accumulation(resumed_on(1, 8, global_batch=32), 'ck.pth', saved())
    assert checkpoint.run_accumulation(resumed_on(1, 8, global_batch=32, new_global_batch=True), 'ck.pth',
                                       saved()) == 4


def test_the_position_in_the_epoch_is_counted_in_images(capsys):
    ckpt = {**saved(), 'next_iter': 3}  # 3 steps of 16 images done in the epoch
    assert checkpoint.resume_position(resumed_on(1, 8, accum=2), ckpt) == 6
    assert checkpoint.resume_position(resumed_on(4, 4), ckpt) == 3
    assert checkpoint.resume_position(resumed_on(1, 8, accum=2), {**saved(), 'next_iter': 0}) == 0
    two_step_accum = {'args': {'batch_size': 4, 'accum_iter': 2, 'world_size': 1}, 'next_iter': 4}  # 2 steps of 8
    assert checkpoint.resume_position(resumed_on(2, 4), two_step_accum) == 2
    assert capsys.readouterr().out == ''
    changed = resumed_on(1, 32)  # a new global batch of 32 after 48 images: the 16 after step 1 again
    assert checkpoint.resume_position(changed, ckpt) == 1
    assert '16 images of the epoch are seen again' in capsys.readouterr().out


def steps(out):
    return [json.loads(line)['step'] for line in (out / 'steps.txt').read_text().splitlines()]


@pytest.fixture(scope='module')
def references(tmp_path_factory, small_data):
    """The uninterrupted run on two processes (8 images each) and on one (8 images, accumulated twice)."""
    refs = {}
    for name, launch in (('two', TWO), ('one', ONE)):
        refs[name] = tmp_path_factory.mktemp(f'uninterrupted_{name}')
        run_script(*launch, *RUN, '--data_path', small_data, '--output_dir', refs[name])
    # the same micro-batches; DDP's average of two gradients and the accumulation of two halves round alike
    assert same_weights(refs['two'], refs['one']) == 0
    return refs


@pytest.mark.slow
@pytest.mark.parametrize('before,after', [(TWO, ONE[:1]), (ONE, TWO)], ids=['2->1', '1->2'])
def test_a_run_stopped_mid_epoch_resumes_on_another_number_of_processes(tmp_path, small_data, references, before,
                                                                        after):
    """SIGTERM inside epoch 0; the rerun on the other number of processes is given --batch_size 8 only (the
    accumulation default, 1): it adapts the accumulation, goes on at the next image, and ends where the
    uninterrupted runs end."""
    out = tmp_path / 'run'
    proc = start([*before, *RUN, '--data_path', small_data, '--output_dir', out])
    until_training(proc)
    os.killpg(proc.pid, signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    ckpt = torch.load(out / 'checkpoint-last.pth')
    assert ckpt['epoch'] == -1 and 1 <= ckpt['step'] < 5, output[-2000:]  # inside the first epoch
    proc = run_script(*after, *RUN, '--data_path', small_data, '--output_dir', out)
    world = 2 if after == TWO else 1
    assert (f'Resuming on {world} process(es) (the checkpoint: {3 - world}): --batch_size 8 x --accum_iter '
            f'{3 - world} keeps its global batch of 16') in proc.stdout
    assert steps(out) == list(range(10))  # no optimizer step lost or taken twice
    for ref in references.values():
        assert same_weights(ref, out) < REDUCTION_ORDER


@pytest.mark.slow
@pytest.mark.parametrize('written_by,after', [('two', ONE[:1]), ('one', TWO)], ids=['2->1', '1->2'])
def test_a_run_resumed_at_an_epoch_boundary_on_another_number_of_processes(tmp_path, small_data, references,
                                                                           written_by, after):
    out = tmp_path / 'run'
    run_script(*after, *RUN, '--data_path', small_data, '--output_dir', out,
               '--resume', references[written_by] / 'checkpoint-0.pth')
    assert steps(out) == list(range(5, 10))
    assert same_weights(references[written_by], out) < REDUCTION_ORDER


FINETUNE = ['--model', 'vit_tiny_patch4', '--input_size', '32', '--batch_size', '8', '--num_workers', '1',
            '--warmup_epochs', '0.5', '--print_freq', '1', '--epochs', '2']
CLASSIFIERS = {'run_finetune.py': ['--mixup', '0.8', '--cutmix', '1.0', '--drop_path', '0.1'],
               'run_linprobe.py': []}  # the probe: BatchNorm statistics per micro-batch


@pytest.mark.slow
@pytest.mark.parametrize('script', CLASSIFIERS)
def test_fine_tuning_and_probing_are_the_same_on_one_or_two_processes(tmp_path, small_data, pretrain_ckpt, script):
    """A micro-batch holds the same images on any number of processes, and its draws (mixup, cutmix, drop path)
    are seeded by its place in the epoch: 2 x 8 images and 1 x 8 accumulated twice train alike; then a run
    stopped inside an epoch on two processes and finished on one ends there too."""
    run = [script, *FINETUNE, *CLASSIFIERS[script], '--data_path', small_data, '--finetune', pretrain_ckpt]
    run_script(*TWO[:-1], *run, '--output_dir', tmp_path / 'two')
    run_script(*run, '--accum_iter', '2', '--output_dir', tmp_path / 'one')
    assert trained_difference(tmp_path / 'two', tmp_path / 'one') < REDUCTION_ORDER
    out = tmp_path / 'stopped'
    proc = start([*TWO[:-1], *run, '--output_dir', out])
    for line in proc.stdout:  # rank 0's progress line of iteration 2 of 5 in epoch 0
        if 'Epoch: [0] [2/5]' in line:
            proc.send_signal(signal.SIGTERM)  # torchrun passes it on to its workers
            break
    output = proc.communicate(timeout=120)[0]
    ckpt = torch.load(out / 'checkpoint-last.pth')
    assert ckpt['epoch'] == -1 and 2 < ckpt['next_iter'] < 5, output[-2000:]
    proc = run_script(*run, '--output_dir', out)
    assert 'keeps its global batch of 16' in proc.stdout
    assert trained_difference(tmp_path / 'two', out) < REDUCTION_ORDER


def trained_difference(a, b):
    """same_weights without the probe's BatchNorm running statistics: each process keeps its own, averaged over the
    micro-batches it saw in the order it saw them (a layout's, by design; evaluation takes rank 0's)."""
    wa, wb = (torch.load(d / 'checkpoint-last.pth')['model'] for d in (a, b))
    kept = [k for k in wa if not k.endswith(('running_mean', 'running_var', 'num_batches_tracked'))]
    return max((wa[k].float() - wb[k].float()).abs().max().item() for k in kept)


# ------------------------------------------------------------------ several nodes, as several torchrun agents

def agent(out, port, data, *, nnodes, restarts, host, extra=()):
    """One node: a torchrun agent with one worker, meeting the others through the c10d rendezvous on `port`; the
    host's agent holds the rendezvous store, as the head node of a cluster job does."""
    return start(['-m', 'torch.distributed.run', f'--nnodes={nnodes}', '--nproc_per_node=1', '--rdzv_backend=c10d',
                  f'--rdzv_endpoint=localhost:{port}', '--rdzv_id=rehearsal', f'--max_restarts={restarts}',
                  '--signals_to_handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1',
                  # a lost node is noticed after 3 missed heartbeats, 1 s apart (torchrun's default: 5 s)
                  f'--rdzv_conf=is_host={int(host)},last_call_timeout=3,keep_alive_interval=1,keep_alive_max_attempt=3',
                  'run_pretrain.py', *RUN, *extra, '--data_path', data, '--output_dir', out])


@pytest.mark.slow
def test_two_nodes_stopped_through_one_resume_bitwise(tmp_path, small_data, references):
    """SIGUSR1 to one node's agent only, as a node-local preemption notice: both ranks stop at the same optimizer
    step after one checkpoint and exit 75 (the other node's agent reports it; both agents exit 1), and the same two
    nodes started again end with the weights of one agent running two workers, bitwise."""
    out, port = tmp_path / 'run', free_port()
    head, other = (agent(out, port, small_data, nnodes=2, restarts=0, host=h) for h in (True, False))
    untold = until_training(head)  # a run that ended before the signal would keep the head in its exit barrier
    other.send_signal(signal.SIGUSR1)
    told, untold = other.communicate(timeout=120)[0], untold + head.communicate(timeout=120)[0]
    assert other.returncode == head.returncode == 1
    assert 'exitcode  : 75' in untold and 'stopped by SIGUSR1 at optimizer step' in told + untold, untold[-3000:]
    ckpt = torch.load(out / 'checkpoint-last.pth')
    assert ckpt['step'] == len(steps(out)) < 10 and ckpt['args']['world_size'] == 2
    port = free_port()
    head, other = (agent(out, port, small_data, nnodes=2, restarts=0, host=h) for h in (True, False))
    for p in (head, other):
        assert p.wait(timeout=300) == 0, p.communicate()[0][-3000:]
    assert steps(out) == list(range(10))
    assert same_weights(references['two'], out) == 0


@pytest.mark.slow
@pytest.mark.parametrize('keeps', ['checkpoint', 'global_batch'])
def test_an_elastic_job_that_loses_a_node_goes_on_with_the_recipe(tmp_path, small_data, references, keeps):
    """--nnodes 1:2 --max_restarts 1: one node (its agent and its worker) SIGKILLed; the head node re-forms the job
    alone with twice the accumulation and ends with the uninterrupted weights. Lost after the checkpoint of step 2,
    the steps since it are computed again; lost before any checkpoint, the run starts over, and only --global_batch
    tells it the recipe's global batch."""
    out, port = tmp_path / 'run', free_port()
    extra, lost_after = (['--save_every_iters', '2'], 3) if keeps == 'checkpoint' else (['--global_batch', '16'], 1)
    head, other = (agent(out, port, small_data, nnodes='1:2', restarts=1, host=h, extra=extra) for h in (True, False))
    wait_for(lambda: (out / 'steps.txt').exists() and len(steps(out)) >= lost_after, head)
    for pid in [other.pid, *children(other.pid)]:
        os.kill(pid, signal.SIGKILL)
    output = head.communicate(timeout=300)[0]
    assert head.returncode == 0, output[-3000:]
    assert torch.load(out / 'checkpoint-last.pth')['args']['accum_iter'] == 2
    if keeps == 'checkpoint':
        assert 'Resuming on 1 process(es) (the checkpoint: 2): --batch_size 8 x --accum_iter 2 keeps its global ' \
               'batch of 16' in output
        assert 0 <= len(steps(out)) - 10 < 2  # at most the steps since the last checkpoint (every 2 steps)
    else:
        assert '--global_batch 16 on 1 process(es) at --batch_size 8: --accum_iter 2' in output
    assert sorted(set(steps(out))) == list(range(10))
    for ref in references.values():
        assert same_weights(ref, out) < REDUCTION_ORDER


SLURM_STAND_INS = {
    # one copy of the job step's command per node, all on this machine; the pids for scancel
    'srun': '''while [[ $1 == --* ]]; do shift; done
pids=()
for ((node = 0; node < SLURM_NNODES; node++)); do SLURM_NODEID=$node "$@" & pids+=($!); done
printf '%s\\n' "${pids[@]}" > "$STAND_IN_DIR/srun.pids"
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status''',
    'scancel': '''echo "scancel $*" >> "$STAND_IN_DIR/calls"
while read -r pid; do kill -s "${1#--signal=}" "$pid"; done < "$STAND_IN_DIR/srun.pids"''',
    'scontrol': '''if [[ $1 == show ]]; then printf 'localhost\\nlocalhost\\n'; else echo "scontrol $*" >> "$STAND_IN_DIR/calls"; fi''',
}


@pytest.mark.slow
def test_slurm_script_on_two_nodes_requeues_on_the_warning_and_resumes_bitwise(tmp_path, small_data, references):
    """scripts/slurm_pretrain.sh's several-node branch with stand-ins for srun, scancel and scontrol (two nodes as two
    torchrun agents on this machine): the time-limit warning to the batch shell reaches both nodes' workers through
    scancel, which stop at one step; the job is requeued; the next attempt ends with the uninterrupted weights."""
    bin_dir, out = tmp_path / 'bin', tmp_path / 'run'
    bin_dir.mkdir()
    for name, body in SLURM_STAND_INS.items():
        (bin_dir / name).write_text(f'#!/usr/bin/env bash\n{body}\n')
        (bin_dir / name).chmod(0o755)
    env = script_env({'PATH': f"{bin_dir}:{os.environ['PATH']}", 'STAND_IN_DIR': str(bin_dir), 'SLURM_JOB_ID': '4343',
                      'SLURM_NNODES': '2', 'SLURM_JOB_NODELIST': 'node[1-2]', 'NPROC': '1',
                      'MASTER_PORT': str(free_port()), 'RECORD_DIR': str(tmp_path / 'logs')})
    cmd = ['bash', 'scripts/slurm_pretrain.sh', *RUN, '--data_path', str(small_data), '--output_dir', str(out)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    until_training(proc)
    proc.send_signal(signal.SIGUSR1)
    output = proc.communicate(timeout=120)[0]
    assert (bin_dir / 'calls').read_text() == 'scancel --signal=USR1 4343.0\nscontrol requeue 4343\n', output[-3000:]
    ckpt = torch.load(out / 'checkpoint-last.pth')
    assert ckpt['epoch'] == -1 and ckpt['step'] == len(steps(out)) < 10 and ckpt['args']['world_size'] == 2
    env['MASTER_PORT'] = str(free_port())
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:]
    assert steps(out) == list(range(10))
    assert same_weights(references['two'], out) == 0
