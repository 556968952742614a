"""Tests of prepare.py on the slice of real TinyStories text in tests/data."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

REPO = Path(__file__).resolve().parents[1]
STORIES = REPO / 'tests' / 'data'
sys.path.insert(0, str(REPO))
import data  # noqa: E402
import prepare  # noqa: E402

N_TRAIN, N_VAL, VOCAB = 250, 80, 512


def parse(path):
    """The stories of a TinyStories .txt file, parsed independently of prepare.py."""
    return [s.strip('\n') for s in path.read_text('utf-8').split('<|endoftext|>\n') if s.strip()]


def write_txt(path, stories):
    path.write_text(''.join(s + '\n<|endoftext|>\n' for s in stories), 'utf-8')


def run(*args, cwd, env=None, timeout=120):
    return subprocess.run([sys.executable, str(REPO / 'prepare.py'), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def decode_bin(d, split):
    """Stories decoded from d/split.bin, checking that each is BOS + ids + EOS."""
    meta = json.loads((d / 'meta.json').read_text())
    sp = spm.SentencePieceProcessor(model_file=str(d / meta['tokenizer_model']))
    a = np.fromfile(d / f'{split}.bin', dtype=np.uint16)
    ends = np.flatnonzero(a == meta['eos_id'])
    starts = np.concatenate([[0], ends[:-1] + 1])
    assert len(a) and ends[-1] == len(a) - 1
    assert (a[starts] == meta['bos_id']).all()
    assert (a == meta['bos_id']).sum() == len(ends)  # BOS only at story starts
    return [sp.decode(a[s + 1:e].tolist()) for s, e in zip(starts, ends)]


@pytest.fixture(scope='module')
def stories():
    train, val = parse(STORIES / 'train.txt'), parse(STORIES / 'valid.txt')
    assert (len(train), len(val)) == (N_TRAIN, N_VAL)  # as tests/data/README.md says
    return train, val


def splits(stories):
    """What prepare.py writes: train, and the validation stories alternating val, test."""
    return {'train': stories[0], 'val': stories[1][0::2], 'test': stories[1][1::2]}


@pytest.fixture(scope='module')
def src_dir(tmp_path_factory, stories):
    d = tmp_path_factory.mktemp('src')
    write_txt(d / 'train.txt', stories[0])
    write_txt(d / 'valid.txt', stories[1])
    return d


@pytest.fixture(scope='module')
def prepared(tmp_path_factory, src_dir):
    out = tmp_path_factory.mktemp('out')
    r = run(f'--source={src_dir}', f'--data_dir={out}', f'--vocab_size={VOCAB}', cwd=out)
    assert r.returncode == 0, r.stderr
    return out / f'tok{VOCAB}', r.stdout


# ---------------------------------------------------------------------------- 1, 2: output
@pytest.mark.slow
def test_round_trip(prepared, stories):
    d, stdout = prepared
    for split, st in splits(stories).items():
        assert decode_bin(d, split) == st
    assert 'test' in data.SPLITS and len(splits(stories)['test']) == N_VAL // 2
    for name in ('tokenizer.model', 'train.bin', 'val.bin', 'test.bin', 'meta.json'):
        assert str(d / name) in stdout


@pytest.mark.slow
def test_bin_and_meta(prepared, stories):
    d, _ = prepared
    meta = data.load_meta(str(d))
    assert meta['vocab_size'] == meta['tokenizer_pieces'] == VOCAB and meta['tokenizer'] == 'bpe'
    assert (meta['bos_id'], meta['eos_id']) == (1, 2)
    for split, st in splits(stories).items():
        a = np.fromfile(d / f'{split}.bin', dtype=np.uint16)
        assert (d / f'{split}.bin').stat().st_size == 2 * meta[f'{split}_tokens'] == 2 * len(a)
        assert a.max() < meta['vocab_size']
        assert meta[f'{split}_bytes'] == sum(len(s.encode('utf-8')) for s in st)
        assert meta[f'{split}_stories'] == len(st)
    assert sorted(os.listdir(d)) == ['meta.json', 'test.bin', 'tokenizer.model', 'tokenizer.vocab',
                                     'train.bin', 'val.bin']


@pytest.mark.slow
def test_exact_round_trip_whole_corpus(prepared):
    """The tokenizer trained on train.txt round-trips every story, the unseen ones of valid.txt
    too (unseen characters go through byte fallback), and the memmap size bound holds."""
    sp = spm.SentencePieceProcessor(model_file=str(prepared[0] / 'tokenizer.model'))
    odd = ['  leading and trailing  ', 'tab\there', 'a\n\n\nb', '\nnl first', 'nl last\n',
           'crlf\r\nline', '¡Hola señor! ¿Qué tal? «así» 1234567890 “quoted” — …',
           'emoji 🙂 and 中文', '<s> </s> <unk> <|endoftext|>', ' ', 'x']
    for s in parse(STORIES / 'train.txt') + parse(STORIES / 'valid.txt') + odd:
        ids = sp.encode(s)
        assert sp.decode(ids) == s
        assert len(ids) <= len(s.encode('utf-8')) + 1  # + 2 for BOS/EOS: the memmap bound


@pytest.mark.slow
def test_write_bin_in_process_matches_pool(prepared, stories, tmp_path):
    model = str(prepared[0] / 'tokenizer.model')
    n1 = prepare.write_bin(iter(stories[0]), model, str(tmp_path / 'a.bin'), 1)
    n2 = prepare.write_bin(iter(stories[0]), model, str(tmp_path / 'b.bin'), 2)
    assert n1 == n2 and n1[0] == N_TRAIN and n1[2] == sum(len(s.encode()) for s in stories[0])
    assert (tmp_path / 'a.bin').read_bytes() == (tmp_path / 'b.bin').read_bytes()
    assert sorted(os.listdir(tmp_path)) == ['a.bin', 'b.bin']  # no .tmp left


# ---------------------------------------------------------------------------- 3: local formats
def splits_of(source):
    train, val, note = prepare.find_splits(str(source))
    return list(train()), list(val()), note


def test_local_formats(tmp_path, src_dir, stories):
    train, val = stories
    assert splits_of(src_dir) == (train, val, None)

    d = tmp_path / 'jsonl'
    d.mkdir()
    for name, st in (('train.jsonl', train), ('valid.jsonl', val)):
        (d / name).write_text(''.join(json.dumps({'text': s}) + '\n' for s in st), 'utf-8')
    assert splits_of(d) == (train, val, None)

    d = tmp_path / 'json'  # a list of objects, and an object per line
    d.mkdir()
    (d / 'TinyStories-train.json').write_text(json.dumps([{'text': s + '\n'} for s in train]))
    (d / 'TinyStories-validation.json').write_text('\n'.join(json.dumps({'text': s}) for s in val))
    assert splits_of(d) == (train, val, None)

    import pyarrow as pa
    import pyarrow.parquet as pq
    d = tmp_path / 'parquet'  # the hub's layout
    d.mkdir()
    pq.write_table(pa.table({'text': train}), d / 'train-00000-of-00001.parquet')
    pq.write_table(pa.table({'text': val}), d / 'validation-00000-of-00001.parquet')
    assert splits_of(d) == (train, val, None)

    d = tmp_path / 'unnamed'  # no file named 'train': all non-validation files are train
    d.mkdir()
    write_txt(d / 'a.txt', train[:100])
    write_txt(d / 'b.txt', train[100:])
    write_txt(d / 'val.txt', val)
    assert splits_of(d) == (train, val, None)


@pytest.mark.slow
def test_single_file_carves_validation(tmp_path, src_dir, stories):
    train = stories[0]
    tr, va, note = splits_of(src_dir / 'train.txt')  # val_fraction 0.01: every 100th story
    assert (tr, va) == ([s for i, s in enumerate(train) if i % 100 != 99], train[99::100])
    assert 'no validation split' in note and 'every 100th' in note
    r = run(f'--source={src_dir / "train.txt"}', f'--data_dir={tmp_path}', f'--vocab_size={VOCAB}',
            '--val_fraction=0.1', cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert 'no validation split' in r.stdout
    d = tmp_path / f'tok{VOCAB}'
    assert decode_bin(d, 'train') == [s for i, s in enumerate(train) if i % 10 != 9]
    assert decode_bin(d, 'val') == train[9::10][0::2] and decode_bin(d, 'test') == train[9::10][1::2]


def test_read_txt_details(tmp_path):
    p = tmp_path / 'x.txt'
    p.write_bytes(b'\xef\xbb\xbf\n\nFirst line.\r\n  Second.  \r\n\n<|endoftext|>  \r\n \n'
                  b'<|endoftext|>\nLast, no separator.\n\n')
    assert data.read_stories(str(p)) == ['First line.\n  Second.  ', 'Last, no separator.']


# ---------------------------------------------------------------------------- 4: errors
def error_cases(tmp):
    empty = tmp / 'empty'
    empty.mkdir()
    (tmp / 'stories.csv').write_text('text\nOnce upon a time.\n')
    bad = tmp / 'latin1'
    bad.mkdir()
    (bad / 'train.txt').write_bytes('Once upon a time.\n<|endoftext|>\nJosé'.encode('latin-1'))
    (tmp / 'notext.jsonl').write_text('{"story": "Once upon a time."}\n')
    one = tmp / 'one'
    one.mkdir()
    write_txt(one / 'train.txt', ['Once upon a time.', 'The end.'])
    write_txt(one / 'valid.txt', ['Only one.'])
    return {
        'missing': ([f'--source={tmp / "nope"}'], 'no such file or directory'),
        'empty dir': ([f'--source={empty}'], 'no .txt/.json/.jsonl/.parquet files'),
        'csv': ([f'--source={tmp / "stories.csv"}'], "unsupported file type '.csv'"),
        'not utf-8': ([f'--source={bad}'], 'not UTF-8 (byte offset 35)'),
        'no text field': ([f'--source={tmp / "notext.jsonl"}'], "no 'text' field"),
        'vocab too big': (['--vocab_size=70000'], '65535'),
        'one validation story': ([f'--source={one}'], 'at least 2 validation stories'),
        'vocab too small': (['--vocab_size=200'], 'at least 260'),
        'bad setting': (['--vocab_sise=512'], "unknown setting 'vocab_sise'"),
    }


@pytest.mark.parametrize('case', ['missing', 'empty dir', 'csv', 'not utf-8', 'no text field',
                                  'one validation story', 'vocab too big', 'vocab too small',
                                  'bad setting'])
@pytest.mark.slow
def test_errors(tmp_path, src_dir, case):
    args, expected = error_cases(tmp_path)[case]
    r = run(f'--source={src_dir}', f'--data_dir={tmp_path / "data"}', *args, cwd=tmp_path)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('prepare.py: error:'), r.stderr
    assert expected in lines[0] and 'Traceback' not in r.stderr
    assert not (tmp_path / 'data').exists()


@pytest.mark.slow
def test_a_local_copy_of_the_hub_dataset_goes_through_datasets(tmp_path, stories):
    """A folder laid out as the hub's roneneldan/TinyStories (data/ with parquet shards of a
    'text' column, train and validation) is read by datasets.load_dataset, the hub's own path."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    hub = tmp_path / 'TinyStories'
    (hub / 'data').mkdir(parents=True)
    train, val = stories
    pq.write_table(pa.table({'text': train[:120]}), hub / 'data' / 'train-00000-of-00002.parquet')
    pq.write_table(pa.table({'text': train[120:]}), hub / 'data' / 'train-00001-of-00002.parquet')
    pq.write_table(pa.table({'text': val}), hub / 'data' / 'validation-00000-of-00001.parquet')
    env = dict(os.environ, HF_HUB_OFFLINE='1', HF_DATASETS_OFFLINE='1', HF_HOME=str(tmp_path / 'hf'))
    r = run(f'--source={hub}', f'--data_dir={tmp_path / "data"}', f'--vocab_size={VOCAB}',
            '--num_proc=2', cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    d = tmp_path / 'data' / f'tok{VOCAB}'
    for split, st in splits(stories).items():
        assert decode_bin(d, split) == st
    assert (tmp_path / 'hf').exists()  # datasets read it (its cache), not prepare's own readers


@pytest.mark.slow
def test_hub_unreachable(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE='1', HF_DATASETS_OFFLINE='1',
               HF_HOME=str(tmp_path / 'hf'))
    r = run(f'--data_dir={tmp_path / "data"}', '--vocab_size=512', cwd=tmp_path, env=env)
    assert r.returncode == 1 and 'Traceback' not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('prepare.py: error:'), r.stderr
    assert "'roneneldan/TinyStories'" in lines[0] and 'https://huggingface.co/datasets/roneneldan/TinyStories' in lines[0]
    assert 'TinyStories-train.txt' in lines[0] and lines[0].endswith('python prepare.py --source=TinyStories/')


# ---------------------------------------------------------------------------- 5: interruptions
@pytest.mark.slow
def test_killed_run_leaves_nothing_complete(tmp_path, src_dir, stories):
    """SIGKILL in the middle of writing train.bin; then a rerun completes the job."""
    crash = ("import os, signal, sys; sys.path.insert(0, sys.argv[1]); import prepare\n"
             "prepare.source, prepare.data_dir, prepare.vocab_size = sys.argv[2:4] + [512]\n"
             "prepare.num_proc, prepare.CHUNK, real, calls = 1, 50, prepare._encode_chunk, []\n"
             "def encode(chunk):\n"
             "    calls.append(1)\n"
             "    if len(calls) == 3: os.kill(os.getpid(), signal.SIGKILL)\n"
             "    return real(chunk)\n"
             "prepare._encode_chunk = encode\n"
             "prepare.main()\n")
    root = tmp_path / 'data'
    r = subprocess.run([sys.executable, '-c', crash, str(REPO), str(src_dir), str(root)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == -9, r.stderr
    d = root / f'tok{VOCAB}'
    assert 'new.train.bin.tmp' in os.listdir(d)
    assert not [f for f in os.listdir(d) if f.endswith(('.bin', '.json')) or f.startswith('tok')]
    with pytest.raises(ValueError, match=f'run `python prepare.py --vocab_size={VOCAB}` first'):
        data.load_meta(str(d))
    r = run(f'--source={src_dir}', f'--data_dir={root}', f'--vocab_size={VOCAB}', cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    for split, st in splits(stories).items():
        assert decode_bin(d, split) == st
    assert not [f for f in os.listdir(d) if f.endswith('.tmp') or f.startswith('new.')]


@pytest.mark.slow
@pytest.mark.parametrize('crash_at', [2, 5, 6])  # a chunk of train.bin, of val.bin, of test.bin
def test_failed_rerun_keeps_previous_data(tmp_path, prepared, stories, monkeypatch, crash_at):
    root = tmp_path / 'data'
    d = root / f'tok{VOCAB}'
    d.mkdir(parents=True)
    names = ('tokenizer.model', 'train.bin', 'val.bin', 'test.bin', 'meta.json')
    for name in names:  # a complete directory from an earlier run
        (d / name).write_bytes((prepared[0] / name).read_bytes())
    before = {name: (d / name).read_bytes() for name in names}
    other = tmp_path / 'other'  # a different source, so a new tokenizer would differ
    other.mkdir()
    write_txt(other / 'train.txt', stories[0][::-1][:200])
    write_txt(other / 'valid.txt', stories[1][:50])
    real, calls = prepare._encode_chunk, []

    def encode(chunk):
        calls.append(1)
        if len(calls) == crash_at:
            raise RuntimeError('simulated crash')
        return real(chunk)
    for k, v in dict(source=str(other), data_dir=str(root), vocab_size=VOCAB, tokenizer='bpe',
                     num_proc=1, CHUNK=50, _encode_chunk=encode).items():
        monkeypatch.setattr(prepare, k, v)
    with pytest.raises(RuntimeError, match='simulated crash'):
        prepare.main()
    assert {name: (d / name).read_bytes() for name in names} == before
    assert data.load_meta(str(d))['train_stories'] == N_TRAIN
    assert decode_bin(d, 'train') == stories[0]
    assert not [f for f in os.listdir(d) if f.endswith('.tmp')]


# ---------------------------------------------------------------------------- 6: char tokenizer
@pytest.mark.slow
def test_char_tokenizer(tmp_path, src_dir, stories):
    r = run(f'--source={src_dir}', f'--data_dir={tmp_path}', '--tokenizer=char',
            f'--vocab_size={VOCAB}', cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    d = tmp_path / f'char{VOCAB}'
    meta = data.load_meta(str(d))
    assert meta['tokenizer'] == 'char' and meta['vocab_size'] == VOCAB
    assert 259 < meta['tokenizer_pieces'] <= VOCAB  # every character seen, plus the bytes
    for split, st in splits(stories).items():
        assert decode_bin(d, split) == st
    a = np.fromfile(d / 'train.bin', dtype=np.uint16)
    assert a.max() < meta['tokenizer_pieces']
