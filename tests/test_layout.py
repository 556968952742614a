"""The code map the README draws: scripts (the commands a user runs) stand on modules (one
idea each) and never import each other; model.py stays readable in one sitting."""
import ast

from conftest import ROOT

SCRIPTS = {'prepare', 'train', 'sample', 'eval', 'export', 'serve', 'bench', 'bench_serve', 'words', 'plot'}


def project_imports(path):
    """The project's own files that path imports (anywhere in it, lazily too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split('.')[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split('.')[0])
    return {n for n in names if (ROOT / f'{n}.py').exists()}


def test_no_file_imports_a_script():
    files = {p.stem: p for p in ROOT.glob('*.py')}
    assert SCRIPTS <= files.keys()
    wrong = {name: project_imports(p) & SCRIPTS for name, p in files.items() if project_imports(p) & SCRIPTS}
    assert not wrong, wrong
    for name in files.keys() - SCRIPTS:  # a module does nothing when imported but define things
        assert "if __name__ == '__main__'" not in files[name].read_text(), name


def test_model_py_is_at_most_300_lines():
    assert len((ROOT / 'model.py').read_text().splitlines()) <= 300
