"""
Stories on disk: reading them from TinyStories' files, the splits prepare.py writes, and the
one way every file here is written (whole or not at all).

    for s in iter_stories('valid.txt'): ...              # .txt, .json, .jsonl, .parquet
    meta = load_meta(tok_dir('data', 4096))              # data/tok4096/meta.json, checked
    for ids in story_ids('data/tok4096', 'test', meta['bos_id']): ...      # BOS + ids + EOS
    with atomic_write('out/x.json', 'w') as f: f.write(...)
"""
import json
import os
import re
from contextlib import contextmanager

import numpy as np

EXTENSIONS = ('.txt', '.json', '.jsonl', '.parquet')
SEPARATOR = '<|endoftext|>'
SPLITS = ('train', 'val', 'test')
BATCH = 1000  # stories read at once from a parquet file


@contextmanager
def atomic_write(path, mode='wb'):
    """A file written whole or not at all: into path.tmp, flushed to disk, then renamed over
    path, so that a crash at any moment leaves the old file or the new one, never half of one."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):  # failed or interrupted: nothing that looks complete
            os.remove(tmp)


def write_json(obj, path):
    with atomic_write(path, 'w') as f:
        json.dump(obj, f, indent=2)
        f.write('\n')


# ---------------------------------------------------------------------------- stories in files
def decode_utf8(data, path, offset=0):
    try:
        return data.decode('utf-8')  # strict: a wrong encoding must not slip into the tokenizer
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 (byte offset {offset + e.start}): "
                         "re-encode the file as UTF-8") from None


def story(lines):
    """One story from its lines, less the blank ones at either end ('' if nothing is left)."""
    while lines and not lines[-1].strip():
        lines.pop()
    while lines and not lines[0].strip():
        lines.pop(0)
    return '\n'.join(lines)


def iter_txt(path):
    """The stories of a TinyStories .txt file, read line by line: memory holds one story."""
    lines, offset = [], 0
    with open(path, 'rb') as f:
        for raw in f:
            line = decode_utf8(raw, path, offset).rstrip('\n').removesuffix('\r')
            if offset == 0:
                line = line.removeprefix('\ufeff')  # a byte order mark is not text
            offset += len(raw)
            if line.strip() == SEPARATOR:
                if s := story(lines):
                    yield s
                lines = []
            else:
                lines.append(line)
    if s := story(lines):  # a last story without a separator after it
        yield s


def texts(records, path, first=0):
    """The stripped, non-empty 'text' fields of JSON records (numbered from `first`)."""
    for i, r in enumerate(records, first):
        if not isinstance(r, dict) or not isinstance(r.get('text'), str):
            raise ValueError(f"{path}: record {i} has no 'text' field (expected objects like "
                             '{"text": "Once upon a time..."})')
        if r['text'].strip():
            yield r['text'].strip()


def iter_stories(path):
    """The stories of one local file, streamed: .txt (TinyStories format), .json, .jsonl or
    .parquet (read in batches of rows). ValueError or OSError says what is wrong with it."""
    ext = os.path.splitext(path)[1].lower()
    if ext == '.txt':
        yield from iter_txt(path)
    elif ext in ('.json', '.jsonl'):
        try:
            with open(path, 'rb') as f:
                head = f.read(1000).lstrip()
            if ext == '.json' and head.startswith(b'['):  # one list of objects: read whole
                with open(path, 'rb') as f:
                    yield from texts(json.loads(decode_utf8(f.read(), path)), path)
                return
            with open(path, 'rb') as f:  # an object per line
                offset = 0
                for i, raw in enumerate(f):
                    line = decode_utf8(raw, path, offset)
                    offset += len(raw)
                    if line.strip():
                        yield from texts([json.loads(line)], path, i)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
    elif ext == '.parquet':
        import pyarrow.parquet as pq  # installed with datasets; never touches the network
        f = pq.ParquetFile(path)
        if 'text' not in f.schema_arrow.names:
            raise ValueError(f"{path}: no 'text' column (columns: {', '.join(f.schema_arrow.names)})")
        for batch in f.iter_batches(batch_size=BATCH, columns=['text']):
            yield from (t.strip() for t in batch.column(0).to_pylist() if t and t.strip())
    else:
        raise ValueError(f"{path}: unsupported file type '{ext}' (use {', '.join(EXTENSIONS)})")


def read_stories(path):
    """All the stories of one local file, as a list."""
    return list(iter_stories(path))


# ---------------------------------------------------------------------------- prepared splits
def tok_dir(data_dir, vocab_size, tokenizer='bpe'):
    """Where prepare.py writes a tokenizer's splits: data_dir/tok{N}, or char{N}."""
    return os.path.join(data_dir, f"{'char' if tokenizer == 'char' else 'tok'}{vocab_size}")


def load_meta(dir):
    """meta.json of a prepared directory, checked against the files it describes; ValueError
    with the prepare.py command to run if it is not complete."""
    m = re.search(r'(char)?(\d+)$', os.path.basename(os.path.normpath(dir)))
    hint = ('--tokenizer=char ' if m and m[1] else '') + f"--vocab_size={m[2] if m else 'N'}"
    rerun = f"no prepared data in {dir}: run `python prepare.py {hint}` first"
    try:
        with open(os.path.join(dir, 'meta.json')) as f:
            meta = json.load(f)
        for split in SPLITS:
            if os.path.getsize(os.path.join(dir, f'{split}.bin')) != 2 * meta[f'{split}_tokens']:
                raise ValueError
        if not os.path.isfile(os.path.join(dir, meta['tokenizer_model'])):
            raise ValueError
    except (OSError, ValueError, KeyError, TypeError):
        raise ValueError(rerun) from None
    return meta


def tokenizer_of(dir, meta):
    """The bytes of a prepared directory's SentencePiece model."""
    with open(os.path.join(dir, meta['tokenizer_model']), 'rb') as f:
        return f.read()


def story_ids(dir, split, bos_id):
    """The stories of a prepared split, each its ids as stored (BOS + ids + EOS, an int64
    array), read a million tokens at a time: a split of gigabytes streams through."""
    ids = np.memmap(os.path.join(dir, f'{split}.bin'), dtype=np.uint16, mode='r')
    start, step = 0, 1 << 20
    for at in range(0, len(ids), step):
        for b in np.flatnonzero(ids[at:at + step] == bos_id) + at:
            if b > start:
                yield ids[start:b].astype(np.int64)
            start = b
    if len(ids):
        yield ids[start:].astype(np.int64)


def story_lengths(dir, split, bos_id):
    """The number of ids of each story of a prepared split (BOS + ids + EOS)."""
    ids = np.memmap(os.path.join(dir, f'{split}.bin'), dtype=np.uint16, mode='r')
    return np.diff(np.append(np.flatnonzero(ids == bos_id), len(ids)))
