"""Imports run one way: no module of the project imports, directly or through others, a module that imports it.
Imports inside functions count too, since a late import only hides a circle."""
import ast
from pathlib import Path

from conftest import REPO

PACKAGES = ('util', 'tools', 'bench')


def project_modules(root):
    """{dotted name: file} for the top-level modules and those of PACKAGES under `root`."""
    files = list(root.glob('*.py')) + [f for pkg in PACKAGES for f in (root / pkg).glob('*.py')]
    return {'.'.join(f.relative_to(root).with_suffix('').parts): f for f in files if f.stem != '__init__'}


def local_imports(path, modules):
    """The project modules that `path` imports anywhere in its body: `import a.b`, `from a import b` (b a module
    or a name in a), `from a.b import c`."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found |= {f'{node.module}.{alias.name}' for alias in node.names} | {node.module}
    return found & set(modules)


def import_cycles(root):
    """Every strongly connected set of two or more project modules in the import graph (Tarjan), as sorted lists,
    plus any module that imports itself."""
    modules = project_modules(root)
    graph = {name: local_imports(path, modules) for name, path in modules.items()}
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_the_project_has_no_import_cycle():
    assert len(project_modules(REPO)) > 30
    assert import_cycles(REPO) == []


def test_a_circle_through_a_late_import_is_found(tmp_path):
    (tmp_path / 'util').mkdir()
    (tmp_path / 'models_a.py').write_text('import models_b\nimport torch\n')
    (tmp_path / 'models_b.py').write_text('def f():\n    from util.misc import UsageError\n')
    (tmp_path / 'util' / 'misc.py').write_text('from util import distributed\n')
    (tmp_path / 'util' / 'distributed.py').write_text('def g():\n    import models_a\n')
    (tmp_path / 'run_x.py').write_text('import models_a\n')
    assert import_cycles(tmp_path) == [['models_a', 'models_b', 'util.distributed', 'util.misc']]
    (tmp_path / 'util' / 'distributed.py').write_text('import os\n')
    assert import_cycles(tmp_path) == []
