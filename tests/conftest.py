import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


@pytest.fixture(scope='session')
def small_data(tmp_path_factory):
    """A small ImageFolder (train/ and val/, 10 classes) cut from the embedded real dataset."""
    from util.datasets import embedded_dataset_root
    src = embedded_dataset_root()
    dst = tmp_path_factory.mktemp('data')
    for split, n in (('train', 8), ('val', 4)):
        for cls in sorted((src / split).iterdir()):
            (dst / split / cls.name).mkdir(parents=True)
            for f in sorted(cls.iterdir())[:n]:
                shutil.copy(f, dst / split / cls.name / f.name)
    return dst


def small_mae(depth):
    """An MAE small enough that tracing it takes a second, for tests about compiling rather than the model."""
    import models_mim
    return models_mim.MAE(img_size=16, patch_size=4, embed_dim=16, depth=depth, num_heads=1, decoder_dim=8,
                          decoder_depth=1, decoder_heads=1)


def free_port():
    """A TCP port nothing listens on now: tests run in parallel, so no two launches may share a fixed port."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def script_env(env=None):
    """The environment of a test's subprocess: one thread, and a free port for torchrun and
    torch.distributed.launch (PET_MASTER_PORT is their --master_port default)."""
    return {**os.environ, 'OMP_NUM_THREADS': '1', 'PET_MASTER_PORT': str(free_port()), **(env or {})}


def run_script(*args, env=None, timeout=300, check=True):
    """Run a repo script (or `-m module`) with this interpreter; returns the CompletedProcess. A script run with
    the standard environment is forked from tests/script_server.py, which has imported torch and timm once."""
    args = [str(a) for a in args]
    if args[0].endswith('.py') and env is None:
        proc = run_forked(args, timeout)
    else:
        proc = subprocess.run([sys.executable, *args], cwd=REPO, env=script_env(env), capture_output=True, text=True,
                              timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f'{args} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}')
    return proc


_server = []  # this pytest worker's script server, started by its first script run


def run_forked(args, timeout):
    if not _server:
        _server.append(subprocess.Popen([sys.executable, str(REPO / 'tests' / 'script_server.py')], cwd=REPO,
                                        env=script_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
    server = _server[0]
    with tempfile.TemporaryDirectory() as folder:
        out, err = Path(folder) / 'stdout', Path(folder) / 'stderr'
        server.stdin.write(json.dumps({'argv': args, 'env': script_env(), 'cwd': str(REPO), 'stdout': str(out),
                                       'stderr': str(err)}) + '\n')
        server.stdin.flush()

        def reply(key):
            line = server.stdout.readline()
            if not line:  # its traceback, if any, is in this worker's stderr
                raise RuntimeError(f'tests/script_server.py has ended (exit status {server.wait()})')
            return json.loads(line)[key]
        pid = reply('pid')
        timed_out = []

        def kill():  # the script and its loader workers: the child leads its own process group
            timed_out.append(True)
            os.killpg(pid, signal.SIGKILL)
        timer = threading.Timer(timeout, kill)
        timer.start()
        returncode = reply('returncode')
        timer.cancel()
        if timed_out:
            raise subprocess.TimeoutExpired([sys.executable, *args], timeout, out.read_text(), err.read_text())
        return subprocess.CompletedProcess([sys.executable, *args], returncode, out.read_text(), err.read_text())


def worker_pid(rank, marker):
    """The pid of the training process of `rank` (not the launcher, not a loader worker) whose command line holds
    `marker` (its output folder), or None."""
    for pid in (int(p) for p in os.listdir('/proc') if p.isdigit()):
        try:
            cmdline = open(f'/proc/{pid}/cmdline', 'rb').read().decode()
            environ = open(f'/proc/{pid}/environ', 'rb').read().decode()
            parent = open(f'/proc/{pid}/stat').read().rsplit(')', 1)[1].split()[1]
            launcher = open(f'/proc/{parent}/cmdline', 'rb').read().decode()
        except OSError:
            continue
        # started by the launcher: its loader workers share its command line and environment
        if 'run_pretrain.py' in cmdline and marker in cmdline and 'torch.distributed' in launcher \
                and f'\0RANK={rank}\0' in f'\0{environ}':
            return pid
    return None


TINY_PRETRAIN = ['--model', 'MIM_vit_tiny_patch4', '--input_size', '32', '--batch_size', '16', '--num_workers', '0',
                 '--warmup_epochs', '0.5', '--print_freq', '2']


@pytest.fixture(scope='session')
def pretrain_ckpt(tmp_path_factory, small_data):
    """A LocalMIM checkpoint (MIM_vit_tiny_patch4, 32 px) written by run_pretrain.py."""
    out = tmp_path_factory.mktemp('pretrain')
    run_script('run_pretrain.py', *TINY_PRETRAIN, '--data_path', small_data, '--output_dir', out, '--epochs', '1')
    return out / 'checkpoint-last.pth'


def pytest_collection_modifyitems(config, items):
    # the slow tests first: with one worker per core, minutes-long tests started last would run on alone
    items.sort(key=lambda item: 'slow' not in item.keywords)
    import torch
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason='needs CUDA (run by scripts/gpu_check.sh on a GPU machine)')
    for item in items:
        if 'cuda' in item.keywords:
            item.add_marker(skip)


# ------------------------------------------------------------------ runs stopped and resumed

def steps_logged(out):
    path = out / 'steps.txt'
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line)['iter'] for line in lines if line.endswith('}')]


def wait_for(condition, proc, timeout=240):
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, 'the run ended before the signal'
        assert time.time() < deadline, 'timed out'
        time.sleep(0.05)


def until_training(proc):
    """Read a run's output until it prints 'Start training' and return it (proc.communicate() gives the rest). By then
    every rank's stop handlers are in place (the ranks have met in DDP's first broadcast), so a signal sent now stops
    the run at one of its first optimizer steps; one sent once steps are logged can land past the end of a short run
    on a loaded machine."""
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if 'Start training for' in line:
            return ''.join(seen)
    raise AssertionError('the run ended before it started training:\n' + ''.join(seen)[-3000:])


class FileServer:
    """A local HTTP server of a folder (http.server), on a free port in a thread: it logs the paths asked (query
    left out) and waits `delay` seconds before each answer."""

    def __init__(self, folder, delay=0.):
        import functools
        import http.server
        self.requests, self.delay = [], delay
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self):
                server.requests.append(self.path.split('?')[0])
                time.sleep(server.delay)
                super().do_GET()

            def log_message(self, *args):
                pass
        self.httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(Handler, directory=folder))
        self.url = f'http://127.0.0.1:{self.httpd.server_address[1]}'
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def file_server(tmp_path):
    """FileServer of tmp_path/www, stopped after the test."""
    (tmp_path / 'www').mkdir()
    server = FileServer(tmp_path / 'www')
    yield server
    server.close()


def same_weights(a, b):
    """The largest difference between the final weights of the runs in folders a and b."""
    import torch
    wa, wb = (torch.load(d / 'checkpoint-last.pth')['model'] for d in (a, b))
    return max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)


def start(args, env=None):
    """A command in a process group of its own (setsid), as a scheduler would signal it."""
    return subprocess.Popen([sys.executable, *map(str, args)], cwd=REPO, env=script_env(env), start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
