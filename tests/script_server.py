"""Fork server of the test suite's script runs (tests/conftest.py run_script).

Each `python script.py` spends about 3 s importing torch, torchvision and timm before the script does anything,
most of a tiny test run. This process imports them and this repository's modules once; each request then runs
in a forked child as a fresh `python script.py ARGS` would: as __main__, with its own argv, environment, working
folder, sys.path[0], stdout and stderr files, and the exit status the interpreter would give (an uncaught
exception or sys.exit leaves the child as it leaves a fresh interpreter, atexit handlers included).

One JSON line per request on stdin: {"argv", "env", "cwd", "stdout", "stderr"}; replies on stdout:
{"pid": N} once the child runs (its own process group, which a timeout kills), {"returncode": N} when it ends.
"""
import importlib
import json
import os
import runpy
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PRELOAD = ('torch', 'torchvision', 'timm', 'run_pretrain', 'run_finetune', 'run_linprobe', 'run_knn', 'visualize')


def run_child(request):
    os.setpgid(0, 0)
    for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, request['stdout'], os.O_WRONLY | os.O_CREAT),
                            (2, request['stderr'], os.O_WRONLY | os.O_CREAT)):
        opened = os.open(path, flags)
        os.dup2(opened, fd)
        os.close(opened)
    os.chdir(request['cwd'])
    os.environ.clear()
    os.environ.update(request['env'])
    script = os.path.abspath(request['argv'][0])
    sys.argv = list(request['argv'])
    sys.path[0] = os.path.dirname(script)
    runpy.run_path(script, run_name='__main__')
    sys.exit(0)


def reply(message):
    sys.stdout.write(json.dumps(message) + '\n')
    sys.stdout.flush()


def main():
    sys.path.insert(0, str(REPO))
    for name in PRELOAD:
        importlib.import_module(name)
    sys.path.remove(str(REPO))
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            run_child(request)
        reply({'pid': pid})
        _, status = os.waitpid(pid, 0)
        reply({'returncode': os.waitstatus_to_exitcode(status)})


if __name__ == '__main__':
    main()
