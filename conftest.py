"""Shared test fixtures. Tests run from the project root; the data is ../shared/tinystories."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent
SHARED = ROOT.parent / 'shared' / 'tinystories'


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
    """A slice of the shared TinyStories prepared with a 512-token BPE, once per test session."""
    src = tmp_path_factory.mktemp('src')
    (src / 'train.txt').write_text(stories_slice(SHARED / 'train.txt', 400), encoding='utf-8')
    (src / 'valid.txt').write_text(stories_slice(SHARED / 'valid.txt', 60), encoding='utf-8')
    out = tmp_path_factory.mktemp('data')
    run('prepare.py', f'--source={src}', f'--data_dir={out}', '--vocab_size=512')
    return out
