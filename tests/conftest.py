"""What the tests share: the project's root on the import path, running its scripts as a user
would, tiny settings and models, and the data and model fixtures. Tests run on the slice of real
TinyStories in tests/data (nothing outside the repository).

`python -m pytest -q -m "not slow" tests` runs the in-process tests (a minute or two); the slow
ones start the scripts themselves: training, servers, torchrun, exports, benchmarks."""
import csv
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
STORIES = ROOT / 'tests' / 'data'  # train.txt (250 stories), valid.txt (80)
sys.path.insert(0, str(ROOT))

from model import GPT, GPTConfig  # noqa: E402

# train.py settings for a model that trains in seconds
TINY = ['--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=32', '--batch_size=4',
        '--eval_iters=2', '--vocab_size=512', '--log_interval=5', '--dropout=0.1',
        '--warmup_iters=5', '--learning_rate=3e-3', '--min_lr=3e-4', '--threads=1']


def pytest_configure(config):
    config.addinivalue_line('markers', 'slow: runs the scripts themselves (training, servers, '
                                       'exports); deselect with -m "not slow"')
    config.addinivalue_line('markers', 'gpu: the GPU paths (tests/test_gpu.py, run by .ci/gpu); '
                                       'deselected where CUDA is absent')


def pytest_collection_modifyitems(config, items):
    """Without CUDA the gpu tests are deselected, not skipped: CI runs none of them
    (GPU_CHECK_DEVICE=cpu runs them on the CPU, as .ci/gpu's dry run does)."""
    if torch.cuda.is_available() or os.environ.get('GPU_CHECK_DEVICE'):
        return
    gpu = [item for item in items if item.get_closest_marker('gpu')]
    if gpu:
        config.hook.pytest_deselected(items=gpu)
        items[:] = [item for item in items if not item.get_closest_marker('gpu')]


def run(script, *args, ok=True, **kw):
    """Run one of the project's scripts as a user would; returns the CompletedProcess."""
    p = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT,
                       capture_output=True, text=True, timeout=kw.pop('timeout', 300), **kw)
    if ok and p.returncode != 0:
        raise AssertionError(f"{script} {' '.join(map(str, args))} failed:\n{p.stdout}\n{p.stderr}")
    return p


def start_server(out, *args):
    """serve.py on a free loopback port; (process, port) once it listens."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, str(ROOT / 'serve.py'), f'--out_dir={out}', f'--port={port}',
                             *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line.startswith('serving'):
        proc.kill()
        raise AssertionError(f"serve.py did not start: {line}{proc.stderr.read()}")
    return proc, port


def train(data_dir, out, *args, ok=True, **kw):
    """train.py on TINY settings (later args override them)."""
    return run('train.py', f'--data_dir={data_dir}', f'--out_dir={out}', *TINY, *args, ok=ok, **kw)


def one_error_line(p, *words):
    """p failed with one line on stderr, no traceback, holding every one of words."""
    assert p.returncode != 0, p.stdout
    err = p.stderr.strip()
    assert 'Traceback' not in err and len(err.splitlines()) == 1 and 'error:' in err, err
    for w in words:
        assert w in err, err
    return err


def log_rows(out):
    with open(os.path.join(out, 'log.csv')) as f:
        return [(r['iter'], r['train_loss'], r['val_loss']) for r in csv.DictReader(f)]


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


def tiny(**kw):
    """A small random GPT (biases on, so that every parameter counts), seeded."""
    cfg = dict(block_size=32, vocab_size=97, n_layer=2, n_head=2, n_embd=32, dropout=0.0, bias=True)
    cfg.update(kw)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**cfg))
    for block in model.transformer.h:  # the projections start at zero: give the blocks work to do
        for proj in (block.attn.c_proj, block.mlp.c_proj):
            torch.nn.init.normal_(proj.weight, std=0.02)
    return model


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
    """The test slice prepared with a 512-token BPE, once per test session."""
    out = tmp_path_factory.mktemp('data')
    run('prepare.py', f'--source={STORIES}', f'--data_dir={out}', '--vocab_size=512')
    return out


@pytest.fixture(scope='session')
def tiny_ckpt(tmp_path_factory):
    """(out_dir, checkpoint, model) of a random tiny GPT (context 64) with a 512-token tokenizer
    trained on the test slice: made in-process in a second, for the quick tests."""
    from checkpoint import load_checkpoint, save_checkpoint
    from data import read_stories
    from prepare import train_tokenizer
    out = tmp_path_factory.mktemp('tiny')
    path = train_tokenizer(read_stories(str(STORIES / 'train.txt')), str(out / 'tokenizer'), 512)
    model = tiny(bias=False, block_size=64, vocab_size=512).eval()
    save_checkpoint({'model': model.state_dict(), 'model_args': vars(model.config), 'config': {},
                     'iter_num': 0, 'tokenizer': open(path, 'rb').read()}, str(out / 'ckpt.pt'))
    return out, load_checkpoint(str(out / 'ckpt.pt')), model


@pytest.fixture(scope='session')
def trained(data_dir, tmp_path_factory):
    """(out_dir, checkpoint, model) of a small trained model of the default shape options (no
    biases), with a context of 64 tokens so that decoding soon has to restart its window."""
    from checkpoint import load_checkpoint, model_from_checkpoint
    out = tmp_path_factory.mktemp('trained64')
    train(data_dir, out, '--max_iters=200', '--eval_interval=200', '--block_size=64')
    ckpt = load_checkpoint(str(out / 'ckpt.pt'))
    return out, ckpt, model_from_checkpoint(ckpt).eval()
