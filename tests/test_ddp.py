"""DDP through torchrun on the CPU (gloo): N processes share a step's sequences, so they train
exactly like 1 process with the same settings; every stop (Ctrl-C, SIGTERM, a non-finite loss,
a failed checkpoint write) is agreed, so all processes stop at the same iteration."""
import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, TINY

pytestmark = pytest.mark.slow


def torchrun(*args, script='train.py', env=None, **kw):
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
           script, *args]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, **(env or {})}, **kw)


@pytest.mark.parametrize('accum', [1, 2])
def test_two_processes_equal_one(data_dir, tmp_path, accum):
    """accum 1: each process takes half of every batch (the README's torchrun line);
    accum 2: each process takes one of the two micro-steps. In float32: bf16 rounds a half
    batch's gradient differently from a whole one's."""
    args = [f'--data_dir={data_dir}', *TINY, '--dtype=float32', '--dropout=0.0', '--max_iters=12',
            '--eval_interval=6', f'--gradient_accumulation_steps={accum}', '--lr_decay_iters=12']
    one, two = tmp_path / 'one', tmp_path / 'two'
    subprocess.run([sys.executable, 'train.py', f'--out_dir={one}', *args], cwd=ROOT, check=True,
                   capture_output=True, timeout=300)
    p = torchrun(f'--out_dir={two}', *args)
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == 0, stderr[-3000:]
    assert '2 processes' in stdout and stdout.count('eval 12') == 1  # only rank 0 logs
    assert stdout.count('done:') == 1
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


def test_a_step_that_does_not_split_is_one_line(data_dir, tmp_path):
    p = torchrun(f'--data_dir={data_dir}', f'--out_dir={tmp_path}', *TINY, '--batch_size=3')
    _, stderr = p.communicate(timeout=120)
    assert p.returncode != 0
    ours = [line for line in stderr.splitlines() if 'train.py: error:' in line]
    assert len(ours) == 1 and 'does not split evenly over 2 processes' in ours[0], stderr


def workers(parent):
    """{RANK: pid} of the train.py processes below `parent` (Linux /proc)."""
    out = {}
    for d in Path('/proc').iterdir():
        try:
            ppid = int((d / 'stat').read_text().rsplit(')', 1)[1].split()[1])
            env = dict(kv.split('=', 1) for kv in (d / 'environ').read_text().split('\0') if '=' in kv)
        except (OSError, ValueError, IndexError):
            continue
        if ppid == parent and 'RANK' in env:
            out[int(env['RANK'])] = int(d.name)
    return out


@pytest.mark.parametrize('sig', [signal.SIGINT, signal.SIGTERM], ids=['sigint', 'sigterm'])
def test_a_signal_to_one_process_stops_both_with_a_resumable_checkpoint(data_dir, tmp_path, sig):
    out = tmp_path / 'run'
    args = [f'--data_dir={data_dir}', *TINY, '--eval_interval=100000', '--max_iters=100000']
    p = torchrun(f'--out_dir={out}', *args)
    deadline = time.time() + 120
    while not (out / 'last.pt').exists() and time.time() < deadline:  # the eval at iteration 0
        time.sleep(0.1)
    time.sleep(1.0)
    ranks = workers(p.pid)
    assert sorted(ranks) == [0, 1], ranks
    os.kill(ranks[1], sig)  # not rank 0, which logs and saves: it must hear of it
    t = time.time()
    stdout, stderr = p.communicate(timeout=60)
    assert time.time() - t < 30 and p.returncode == 0, stderr[-3000:]
    assert stdout.count('interrupted: saved') == 1
    it = torch.load(out / 'last.pt', weights_only=True)['iter_num']
    assert it > 0
    p = torchrun(f'--out_dir={out}', '--init_from=resume', f'--max_iters={it + 2}')
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == 0 and f'resuming from iteration {it}' in stdout, stderr[-3000:]
    assert torch.load(out / 'last.pt', weights_only=True)['iter_num'] == it + 2


def slow_rank_0(out, log, *args):
    """docs/scaling.md's CPU line on tiny settings, rank 0's checkpoint writes and protocol
    scoring each 2 s longer (tests/fault.py): the others reach every end long before it does."""
    log.mkdir()
    return torchrun('config/tinystories_cpu.py', f'--out_dir={out}', '--threads=1', *TINY, *args,
                    script='tests/fault.py',
                    env={'FAULT': 'slow', 'FAULT_RANK': '0', 'FAULT_AFTER': '2', 'FAULT_LOG': str(log)})


def left_after_rank_0(log):
    """Whether every process left the group after rank 0's last slow work."""
    busy = max(map(float, (log / 'busy').read_text().split()))
    return all(float((log / f'exit.{r}').read_text()) > busy for r in (0, 1))


def test_every_process_waits_for_rank_0_at_the_end(data_dir, tmp_path):
    """A finished run (protocol scoring included), three times, and an interrupted one: exit 0,
    one done: or interrupted line, no abort nor traceback from any process; no process exits
    while rank 0 still writes or scores."""
    for k in range(3):
        p = slow_rank_0(tmp_path / f'run{k}', tmp_path / f'log{k}', f'--data_dir={data_dir}',
                        '--max_iters=6', '--eval_interval=3', '--patience=0')
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0 and 'terminate called' not in stderr and 'Traceback' not in stderr, stderr
        assert stdout.count('done:') == 1 and left_after_rank_0(tmp_path / f'log{k}')
    out, log = tmp_path / 'stopped', tmp_path / 'log-stopped'
    p = slow_rank_0(out, log, f'--data_dir={data_dir}', '--max_iters=100000', '--eval_interval=100000')
    deadline = time.time() + 120
    while not (log / 'busy').exists() and time.time() < deadline:  # the save at iteration 0
        time.sleep(0.1)
    os.kill(workers(p.pid)[1], signal.SIGINT)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 0 and 'terminate called' not in stderr and 'Traceback' not in stderr, stderr
    assert stdout.count('interrupted: saved') == 1 and left_after_rank_0(log)
    assert torch.load(out / 'last.pt', weights_only=True)['iter_num'] > 0


@pytest.mark.parametrize('kind, rank, words', [
    ('nan', 1, 'the loss is not finite at iteration 3'),
    ('save', 0, 'could not write checkpoint'),
])
def test_a_fault_on_one_process_stops_both(data_dir, tmp_path, kind, rank, words):
    """A NaN loss on rank 1 only, or rank 0's second checkpoint write failing: both processes
    stop at the same step with one line, and the last good checkpoint stays."""
    out = tmp_path / 'run'
    p = torchrun(f'--data_dir={data_dir}', f'--out_dir={out}', *TINY, '--max_iters=50',
                 '--eval_interval=2', script='tests/fault.py',
                 env={'FAULT': kind, 'FAULT_RANK': str(rank), 'FAULT_AFTER': '3' if kind == 'nan' else '2'})
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode != 0
    ours = [line for line in stderr.splitlines() if 'train.py: error:' in line]
    assert len(ours) == 1 and words in ours[0], stderr[-3000:]
    assert 'train.py", line' not in stderr  # no traceback from the workers (torchrun has its own)
    ck = torch.load(out / 'last.pt', weights_only=True)
    assert torch.isfinite(torch.cat([v.flatten() for v in ck['model'].values()])).all()
    assert ck['iter_num'] == (2 if kind == 'nan' else 0)
