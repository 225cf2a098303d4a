"""Every command the README and docs/ show (the recipes researchers copy and edit, and the commands named next to
measured figures) is accepted by the entry point it runs: its flags exist and take the values written, and the
pre-training recipes build their model and FreezeOut schedule without a refusal, the evaluation recipes name a
classifier that exists."""
import importlib
import re
import shlex

import pytest
import torch

import models_mim
import models_vit
from conftest import REPO
from util import misc
from util.freezeout import FreezeOut

DOCS = [REPO / 'README.md', *sorted((REPO / 'docs').glob('*.md'))]
SHELL_SCRIPTS = {'scripts/gpu_check.sh': 'bench/gpu_check.py'}  # wrappers that pass their arguments on
ASSIGNMENT = re.compile(r'^([A-Za-z_][A-Za-z0-9_]*)=(.*)$', re.S)
LOOP = re.compile(r'^for (\w+) in (\S+).*; do$')


def doc_commands():
    """(where, words) for each command in a ```bash block or an inline `python ...py ...` span, with line
    continuations joined, the block's variables expanded as the shell would and a for-loop's variable set to its
    first value; variables the block does not set (the node's $MASTER, $NODE_RANK) stay as written."""
    commands = []
    for doc in DOCS:
        text = doc.read_text()
        for block in re.finditer(r'```bash\n(.*?)```', text, re.S):
            line_no = text.count('\n', 0, block.start()) + 2
            env = {}
            for line in re.split(r'(?<!\\)\n', block.group(1)):
                where = f'{doc.name}:{line_no}'
                line_no += line.count('\n') + 1
                line = re.sub(r'\$\{?(\w+)\}?', lambda m: env.get(m.group(1), m.group(0)), line)
                words = shlex.split(line.replace('\\\n', ' '), comments=True)
                assignment = ASSIGNMENT.match(words[0]) if len(words) == 1 else None
                loop = LOOP.match(' '.join(words))
                if assignment:
                    env[assignment.group(1)] = assignment.group(2)
                elif loop:
                    env[loop.group(1)] = loop.group(2)
                elif words:
                    commands.append((where, words))
        prose = re.sub(r'```.*?```', lambda m: '\n' * m.group(0).count('\n'), text, flags=re.S)  # blocks: above
        for span in re.finditer(r'`((?:python|bash|torchrun) [^`]*?(?:\.(?:py|sh)\b|-m tools\.)[^`]*)`', prose):
            commands.append((f'{doc.name}:{prose.count(chr(10), 0, span.start()) + 1}',
                             shlex.split(span.group(1).replace('\n', ' '))))
    return commands


def entry_point(words):
    """The Python file a command runs and the arguments it passes to it (after launchers, record.sh, env vars;
    up to a shell operator: `&`, `;`, a pipe or a redirection)."""
    ends = [i for i, w in enumerate(words) if w in {'&', '&&', ';', '|', '||'} or w.startswith(('>', '2>'))]
    words = words[:ends[0]] if ends else words
    for i, w in enumerate(words):
        if w in SHELL_SCRIPTS:
            return SHELL_SCRIPTS[w], words[i + 1:]
        if w.endswith('.py') and not w.startswith('-'):
            return w, words[i + 1:]
        if w.startswith('tools.') and words[i - 1] == '-m':
            return w.replace('.', '/') + '.py', words[i + 1:]
    return None, None


def alternatives(argv):
    """`--flag a|b` in prose means either value: one argument list per choice."""
    lists = [[]]
    for w in argv:
        choices = w.split('|') if '|' in w and not w.startswith('-') else [w]
        lists = [prefix + [c] for prefix in lists for c in choices]
    return lists


COMMANDS = [(where, *entry_point(words)) for where, words in doc_commands()]
COMMANDS = [c for c in COMMANDS if c[1] is not None]


def test_the_docs_show_the_entry_points_commands():
    """The scan finds the recipes (a change of the docs' format must not make the test below pass vacuously)."""
    scripts = {script for _, script, _ in COMMANDS}
    assert {'run_pretrain.py', 'run_finetune.py', 'run_linprobe.py', 'run_knn.py', 'visualize.py',
            'bench/bench_pretrain.py', 'bench/profile_step.py', 'bench/study.py'} <= scripts
    pretrain = [argv for _, script, argv in COMMANDS if script == 'run_pretrain.py']
    assert len(pretrain) >= 20 and any('--freezeout' in argv and '--t_0' in argv for argv in pretrain)
    assert not any('$' in w for argv in pretrain for w in argv), 'unexpanded variable in a pre-training recipe'


@pytest.mark.parametrize('where,script,argv', COMMANDS, ids=[f'{w} {s}' for w, s, _ in COMMANDS])
def test_doc_command_is_accepted(where, script, argv, capsys):
    module = importlib.import_module(script[:-3].replace('/', '.'))
    for args_list in alternatives([re.sub(r'<[^>]*>', 'PLACEHOLDER', a) for a in argv]):  # <run>/checkpoint..
        try:
            args = module.get_args_parser().parse_args(args_list)
        except SystemExit as e:
            if e.code == 0:  # --help
                continue
            pytest.fail(f'{where}: {script} refuses {" ".join(args_list)}: {capsys.readouterr().err.strip()}')
        if script == 'run_pretrain.py':
            check_pretraining_recipe(module, args)
        elif script in ('run_finetune.py', 'run_linprobe.py', 'run_knn.py'):
            assert args.model in models_vit.MODELS, f'{where}: unknown classifier --model {args.model}'


def check_pretraining_recipe(run_pretrain, args):
    """run_pretrain.main's checks up to the data: flags, the model (built on the meta device: no memory, no
    time) and the FreezeOut schedule, on an ImageNet-sized epoch."""
    run_pretrain.check_args(args)
    with torch.device('meta'):
        model = models_mim.build(args)
    misc.set_schedule_steps(args, 1_281_167 // (args.batch_size * 8))
    misc.scale_lr(args)
    if args.freezeout:
        FreezeOut.from_args(args, model)


def test_every_link_of_the_docs_names_a_file_in_the_tree():
    for doc in [*DOCS, REPO / 'CONTRIBUTING.md']:
        for target in re.findall(r'\]\(([^)#\s]+)(?:#[^)]*)?\)', doc.read_text()):
            if '://' in target:
                continue
            assert (doc.parent / target).exists(), f'{doc.name} links to {target}, which is not in the tree'


def test_every_figure_at_the_front_door_says_what_it_is():
    """The README's figures are each labelled: measured (and where), an estimate (and its command), counted,
    tested, or another paper's."""
    readme = (REPO / 'README.md').read_text()
    section = readme[readme.index('## What to expect'):readme.index('## Documentation')]
    rows = [r for r in section.splitlines() if r.startswith('| ') and not r.startswith('| |')]
    assert len(rows) >= 6
    for row in rows:
        kind = row.strip('|').split('|')[-1]
        assert re.search(r"\b(measured|estimate|counted|tested|paper's)\b", kind), row
    assert 'docs/measurements.md' in section


def test_the_front_door_and_the_guide_stay_short_and_quote_no_dated_figure():
    """README within 6,000 characters, the guide (docs/ but the measurements) within 60,000; dated figures live in
    docs/measurements.md."""
    readme = (REPO / 'README.md').read_text()
    guide = [d for d in (REPO / 'docs').glob('*.md') if d.name != 'measurements.md']
    assert len(readme.encode()) <= 6000 and sum(len(d.read_text()) for d in guide) <= 60000
    for doc in [REPO / 'README.md', *guide]:
        assert not re.search(r'\b20\d\d-\d\d-\d\d\b', doc.read_text()), doc.name
