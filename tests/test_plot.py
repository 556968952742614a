"""plot.py draws a run's log.csv into a PNG (matplotlib is installed for the tests)."""
import shutil

import pytest

from conftest import ROOT, one_error_line, run

pytestmark = pytest.mark.slow


def test_plot_writes_a_png_of_the_log(tmp_path):
    shutil.copy(ROOT / 'docs' / 'log_tinystories_cpu.csv', tmp_path / 'log.csv')
    p = run('plot.py', f'--out_dir={tmp_path}')
    png = (tmp_path / 'log.png').read_bytes()
    assert p.stdout.strip() == f"wrote {tmp_path / 'log.png'}"
    assert png[:8] == b'\x89PNG\r\n\x1a\n' and len(png) > 10_000


def test_plot_without_a_log_is_one_line(tmp_path):
    one_error_line(run('plot.py', f'--out_dir={tmp_path}', ok=False), 'log.csv', 'train a model first')
