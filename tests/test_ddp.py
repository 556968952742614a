"""DDP through torchrun on the CPU (gloo): 2 processes x batch B train exactly like 1 process
that accumulates gradients over 2 micro-batches of B, when both see the same batches."""
import csv
import subprocess
import sys

import torch

from conftest import ROOT
from test_train import TINY


def test_two_ranks_equal_one_rank_with_accumulation(data_dir, tmp_path):
    args = [f'--data_dir={data_dir}', *TINY, '--dropout=0.0', '--max_iters=12', '--eval_interval=6',
            '--gradient_accumulation_steps=2', '--lr_decay_iters=12']
    one, two = tmp_path / 'one', tmp_path / 'two'
    subprocess.run([sys.executable, 'train.py', f'--out_dir={one}', *args], cwd=ROOT, check=True,
                   capture_output=True, timeout=300)
    p = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone',
                        '--nproc_per_node=2', 'train.py', f'--out_dir={two}', *args],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert '2 process(es)' in p.stdout and p.stdout.count('eval 12') == 1  # only rank 0 logs
    a = torch.load(one / 'last.pt', weights_only=True)
    b = torch.load(two / 'last.pt', weights_only=True)
    assert a['iter_num'] == b['iter_num'] == 12
    for k in a['model']:
        torch.testing.assert_close(a['model'][k], b['model'][k], rtol=1e-4, atol=1e-5)
    rows = [list(csv.DictReader(open(d / 'log.csv'))) for d in (one, two)]
    assert [r['iter'] for r in rows[0]] == [r['iter'] for r in rows[1]] == ['0', '6', '12']
    for r1, r2 in zip(*rows):
        assert abs(float(r1['val_loss']) - float(r2['val_loss'])) < 1e-4
    assert float(rows[0][-1]['val_loss']) < float(rows[0][0]['val_loss'])  # it learned something
