"""Shared test fixtures. Tests run from the project root on the slice of real TinyStories in
tests/data (nothing outside the repository)."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent
STORIES = ROOT / 'tests' / 'data'  # train.txt (250 stories), valid.txt (80)


def run(script, *args, ok=True, **kw):
    """Run one of the project's scripts as a user would; returns the CompletedProcess."""
    p = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT,
                       capture_output=True, text=True, timeout=kw.pop('timeout', 300), **kw)
    if ok and p.returncode != 0:
        raise AssertionError(f"{script} {' '.join(map(str, args))} failed:\n{p.stdout}\n{p.stderr}")
    return p


def stories_slice(path, n):
    """The first n stories of a TinyStories .txt file, in the same format."""
    out, count = [], 0
    with open(path, encoding='utf-8') as f:
        for line in f:
            out.append(line)
            if line.strip() == '<|endoftext|>':
                count += 1
                if count == n:
                    break
    return ''.join(out)


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
    """The test slice prepared with a 512-token BPE, once per test session."""
    out = tmp_path_factory.mktemp('data')
    run('prepare.py', f'--source={STORIES}', f'--data_dir={out}', '--vocab_size=512')
    return out


@pytest.fixture(scope='session')
def trained(data_dir, tmp_path_factory):
    """(out_dir, checkpoint, model) of a small trained model of the default shape options (no
    biases), with a context of 64 tokens so that decoding soon has to restart its window."""
    from common import load_checkpoint, model_from_checkpoint
    from test_train import train
    out = tmp_path_factory.mktemp('trained64')
    train(data_dir, out, '--max_iters=200', '--eval_interval=200', '--block_size=64')
    ckpt = load_checkpoint(str(out / 'ckpt.pt'))
    return out, ckpt, model_from_checkpoint(ckpt).eval()
