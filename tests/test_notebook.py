"""walkthrough.ipynb, run top to bottom by Jupyter's own machinery (nbclient and an ipykernel),
as a learner opens it with no trained model yet: it trains its tiny one and every cell runs."""
import nbformat
import pytest
from nbclient import NotebookClient

from conftest import ROOT

pytestmark = pytest.mark.slow


def test_the_notebook_is_committed_without_outputs():
    nb = nbformat.read(ROOT / 'walkthrough.ipynb', as_version=4)
    code = [c for c in nb.cells if c.cell_type == 'code']
    assert code and all(not c.outputs and c.execution_count is None for c in code)


def test_the_notebook_runs_from_top_to_bottom(tmp_path):
    nb = nbformat.read(ROOT / 'walkthrough.ipynb', as_version=4)
    assert nb.cells[1].source == "out_dir = 'out'  # the run to look at"
    nb.cells[1].source = f"out_dir = {str(tmp_path / 'out')!r}"  # no checkpoint there: it trains one
    NotebookClient(nb, timeout=600, kernel_name='python3', resources={'metadata': {'path': str(ROOT)}}).execute()
    text = '\n'.join(o.get('text', '') for c in nb.cells if c.cell_type == 'code' for o in c.outputs)
    images = [o for c in nb.cells if c.cell_type == 'code' for o in c.outputs if 'image/png' in o.get('data', {})]
    assert 'done: best iteration 300' in text and "the same output as the block's attention: True" in text
    assert 'temperature 1.5:' in text and 'bits/byte' in text and len(images) == 2
    assert (tmp_path / 'out' / 'ckpt.pt').exists()
