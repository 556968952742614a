"""
Prepare TinyStories for training: train a SentencePiece tokenizer and write the token ids.

    python prepare.py                                   # from the Hugging Face hub
    python prepare.py --source=../shared/tinystories

Output, in data_dir/tok{vocab_size} (or char{vocab_size}), so several sizes live side by side:
tokenizer.model, train.bin, val.bin and test.bin (numpy uint16 ids, each story as BOS + ids +
EOS), and meta.json, written last: it is the marker that the directory is complete.

The validation stories are split in two: the 1st, 3rd, 5th... are `val` (what train.py
evaluates, keeps the best checkpoint by and stops early on), the 2nd, 4th, 6th... are `test`,
held out: nothing is chosen on it, so a figure on it is an honest estimate for unseen stories.
train.py, sample.py, eval.py and bench.py import the helpers below (tok_dir, load_meta, ...).
"""
import itertools
import json
import os
import random
import re
import time

import numpy as np
import sentencepiece as spm
from tqdm import tqdm

# -----------------------------------------------------------------------------
source = 'roneneldan/TinyStories'  # a hub dataset; an existing file or directory is local files
data_dir = 'data'
vocab_size = 4096       # what config/tinystories_cpu.py uses; see docs/tuning.md
tokenizer = 'bpe'       # 'bpe' or 'char'
vocab_sample = 200_000  # stories used to train the tokenizer (a fixed random sample)
num_proc = 0            # tokenizing processes; 0 = os.cpu_count()
val_fraction = 0.01     # share of train carved off as validation when the source has none
# -----------------------------------------------------------------------------

EXTENSIONS = ('.txt', '.json', '.jsonl', '.parquet')
SEPARATOR = '<|endoftext|>'
CHUNK = 1000  # stories per task sent to a tokenizing process
SPLITS = ('train', 'val', 'test')


def tok_dir(data_dir, vocab_size, tokenizer='bpe'):
    return os.path.join(data_dir, f"{'char' if tokenizer == 'char' else 'tok'}{vocab_size}")


def load_meta(dir):
    """meta.json of a prepared directory, checked against the files it describes."""
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


# ---------------------------------------------------------------------------- reading stories
def decode_utf8(data, path, offset=0):
    try:
        return data.decode('utf-8')  # strict: a wrong encoding must not slip into the tokenizer
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 (byte offset {offset + e.start}): "
                         "re-encode the file as UTF-8") from None


def read_txt(path):
    def add(lines):  # a story: its lines, less the blank ones at either end
        while lines and not lines[-1].strip():
            lines.pop()
        while lines and not lines[0].strip():
            lines.pop(0)
        if lines:
            stories.append('\n'.join(lines))

    # Streamed line by line, so memory holds the stories, not the whole file as bytes and str.
    stories, lines, offset = [], [], 0
    with open(path, 'rb') as f:
        for raw in f:
            line = decode_utf8(raw, path, offset).rstrip('\n').removesuffix('\r')
            if offset == 0:
                line = line.removeprefix('\ufeff')  # a byte order mark is not text
            offset += len(raw)
            if line.strip() == SEPARATOR:
                add(lines)
                lines = []
            else:
                lines.append(line)
    add(lines)  # a last story without a separator after it
    return stories


def json_texts(records, path):
    out = []
    for i, r in enumerate(records):
        if not isinstance(r, dict) or not isinstance(r.get('text'), str):
            raise ValueError(f"{path}: record {i} has no 'text' field (expected objects like "
                             '{"text": "Once upon a time..."})')
        if r['text'].strip():
            out.append(r['text'].strip())
    return out


def read_stories(path):
    """The stories of one local file: .txt (TinyStories format), .json, .jsonl or .parquet."""
    ext = os.path.splitext(path)[1].lower()
    if ext == '.txt':
        return read_txt(path)
    if ext in ('.json', '.jsonl'):
        with open(path, 'rb') as f:
            text = decode_utf8(f.read(), path)
        try:
            if ext == '.json' and text.lstrip().startswith('['):
                return json_texts(json.loads(text), path)  # a list of objects
            lines = [json.loads(line) for line in text.splitlines() if line.strip()]
            return json_texts(lines, path)  # an object per line
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
    if ext == '.parquet':
        import pyarrow.parquet as pq  # installed with datasets; never touches the network
        table = pq.read_table(path)
        if 'text' not in table.column_names:
            raise ValueError(f"{path}: no 'text' column (columns: {', '.join(table.column_names)})")
        return [t.strip() for t in table.column('text').to_pylist() if t and t.strip()]
    raise ValueError(f"{path}: unsupported file type '{ext}' (use {', '.join(EXTENSIONS)})")


def find_splits(source, val_fraction=0.01):
    """(train_stories, val_stories, note) from a local file, a directory, or the hub.
    note is None, or says that validation was carved off the end of train."""
    train, val = [], []
    source = os.path.expanduser(source)
    if os.path.isfile(source):
        train = read_stories(source)
    elif os.path.isdir(source):
        files = sorted(f for f in os.listdir(source) if f.lower().endswith(EXTENSIONS))
        if not files:
            raise ValueError(f"no {'/'.join(EXTENSIONS)} files in directory {source}")
        named_train = any('train' in f.lower() for f in files)
        for f in files:
            is_train = 'train' in f.lower()
            is_val = 'val' in f.lower() and not is_train  # 'valid', 'validation', 'val'
            if is_train or is_val or not named_train:  # no 'train' names: the rest is train
                (val if is_val else train).extend(read_stories(os.path.join(source, f)))
    elif re.fullmatch(r'[\w-][\w.-]*(/[\w.-]+)?', source) and not source.endswith(EXTENSIONS):
        train, val = load_hub(source)
    else:
        raise ValueError(f"source '{source}': no such file or directory")
    if len(train) + len(val) == 0:
        raise ValueError(f"no stories found in {source}")
    note = None
    if not val:
        if len(train) < 3:
            raise ValueError(f"{source}: need at least 3 stories to carve validation and test "
                             "splits")
        n = max(2, int(len(train) * val_fraction))
        train, val = train[:-n], train[-n:]
        note = (f"{source} has no validation split: using the last {n:,} of "
                f"{len(train) + n:,} training stories as validation and test "
                f"(val_fraction={val_fraction})")
    if not train:
        raise ValueError(f"no training stories in {source} (file names containing 'train')")
    if len(val) < 2:
        raise ValueError(f"{source}: need at least 2 validation stories (one for val, one for "
                         f"test), found {len(val)}")
    return train, val, note


def split_val_test(stories):
    """Validation stories alternate between val (1st, 3rd, ...) and the held-out test (2nd, ...)."""
    return stories[0::2], stories[1::2]


def load_hub(name):
    import datasets  # slow to import, and only the hub needs it
    import huggingface_hub
    # its retry warnings would bury the one-line error below when the hub is unreachable
    datasets.logging.set_verbosity_error()
    huggingface_hub.utils.logging.set_verbosity_error()
    print(f"loading {name} from the Hugging Face hub (about 1.9 GB the first time)...", flush=True)
    try:
        ds = datasets.load_dataset(name)
    except Exception as e:  # offline, DNS, unknown repo...: say what to do instead
        why = f"{type(e).__name__}: {e}".splitlines()[0]
        raise ValueError(f"could not reach '{name}' on the Hugging Face hub ({why}): download "
                         "TinyStories elsewhere and pass --source=PATH to local files") from None
    split = lambda s: [t.strip() for t in ds[s]['text'] if t and t.strip()] if s in ds else []
    return split('train'), split('validation')


# ---------------------------------------------------------------------------- tokenizer
def check_vocab(vocab_size, tokenizer):
    if tokenizer not in ('bpe', 'char'):
        raise ValueError(f"--tokenizer must be 'bpe' or 'char', got '{tokenizer}'")
    if vocab_size > 65535:
        raise ValueError("token ids are stored as uint16: choose --vocab_size ≤ 65535")
    if vocab_size < 3 + 256 + 1:
        raise ValueError(f"--vocab_size={vocab_size} is too small: the tokenizer needs at least "
                         "260 ids (3 special + 256 byte pieces + characters)")


def train_tokenizer(stories, model_prefix, vocab_size, tokenizer='bpe', sample=200_000, seed=0):
    """Train SentencePiece on a fixed random sample of stories; returns the .model path.
    The options make decode(encode(story)) == story exactly, for any text."""
    check_vocab(vocab_size, tokenizer)
    picked = random.Random(seed).sample(range(len(stories)), min(sample, len(stories)))
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=(stories[i] for i in sorted(picked)), model_prefix=model_prefix,
            vocab_size=vocab_size, model_type=tokenizer,
            # Exact round trip: no normalization, spaces kept as they are, and any character the
            # vocabulary lacks ('\n' included, if it were rare) falls back to its UTF-8 bytes
            # instead of <unk>. The dummy prefix '▁' is removed again by decode.
            normalization_rule_name='identity', remove_extra_whitespaces=False,
            byte_fallback=True, add_dummy_prefix=True, allow_whitespace_only_pieces=True,
            split_digits=True,
            # Rare characters go to bytes rather than take vocabulary slots (bpe); a char
            # tokenizer keeps every character it saw, up to vocab_size, and may use fewer ids.
            character_coverage=0.99995 if tokenizer == 'bpe' else 1.0,
            hard_vocab_limit=tokenizer == 'bpe',
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            max_sentence_length=1 << 16,  # bytes: whole stories are the "sentences"
            num_threads=os.cpu_count(), minloglevel=2)  # minloglevel: no page of progress logs
    except RuntimeError as e:
        m = re.search(r'smaller than required_chars\. (\d+) vs (\d+)', str(e))
        if m:
            raise ValueError(f"--vocab_size={vocab_size} is too small for this text: "
                             f"it needs at least {m[2]} (256 byte pieces + 3 special + "
                             "its characters)") from None
        raise
    return model_prefix + '.model'


# ---------------------------------------------------------------------------- token ids
_sp = None  # the SentencePiece model of this process, loaded once


def _load_model(path):
    global _sp
    _sp = spm.SentencePieceProcessor(model_file=path)


def _encode_chunk(stories):
    ids = _sp.encode(stories, add_bos=True, add_eos=True, num_threads=1)
    flat = itertools.chain.from_iterable(ids)
    return len(stories), np.fromiter(flat, dtype=np.uint16, count=sum(map(len, ids)))


def write_bin(stories, sp_model_path, out_path, num_proc):
    """Write BOS + ids + EOS of every story to out_path as uint16; returns (n_tokens, n_bytes).
    Streams into a memmap of out_path + '.tmp', renamed only when complete."""
    n_bytes = sum(len(s.encode('utf-8')) for s in stories)
    # Every piece covers at least one byte of text, except the dummy prefix '▁' and BOS/EOS:
    # so bytes + 3 per story bounds the number of tokens, and the file is cut to size after.
    bound = n_bytes + 3 * len(stories)
    tmp = out_path + '.tmp'
    arr = np.memmap(tmp, dtype=np.uint16, mode='w+', shape=(max(bound, 1),))
    chunks = (stories[i:i + CHUNK] for i in range(0, len(stories), CHUNK))
    n, pool = 0, None
    try:
        if num_proc > 1:
            import multiprocessing
            pool = multiprocessing.Pool(num_proc, initializer=_load_model,
                                        initargs=(sp_model_path,))
            results = pool.imap(_encode_chunk, chunks)  # in order, a few chunks ahead
        else:
            _load_model(sp_model_path)
            results = map(_encode_chunk, chunks)
        with tqdm(total=len(stories), unit='stories', desc=os.path.basename(out_path),
                  disable=None, leave=False) as bar:
            for count, ids in results:
                if n + len(ids) > bound:
                    raise RuntimeError(f"token bound exceeded writing {out_path}")
                arr[n:n + len(ids)] = ids
                n += len(ids)
                bar.update(count)
        if pool:
            pool.close()
            pool.join()
        arr.flush()
        del arr
        os.truncate(tmp, 2 * n)
        with open(tmp, 'rb+') as f:
            os.fsync(f.fileno())
        os.replace(tmp, out_path)
    finally:
        if pool:
            pool.terminate()
        if os.path.exists(tmp):  # failed or interrupted: leave nothing that looks complete
            os.remove(tmp)
    return n, n_bytes


def write_json(obj, path):
    with open(path + '.tmp', 'w') as f:
        json.dump(obj, f, indent=2)
        f.write('\n')
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + '.tmp', path)


# ---------------------------------------------------------------------------- main
def main():
    t0 = time.time()
    procs = num_proc or os.cpu_count()
    check_vocab(vocab_size, tokenizer)  # before reading a large corpus
    train, val, note = find_splits(source, val_fraction)
    if note:
        print(note)
    val, test = split_val_test(val)
    print(f"{len(train):,} training, {len(val):,} validation and {len(test):,} test stories "
          f"from {source} ({time.time() - t0:.1f}s)")
    d = tok_dir(data_dir, vocab_size, tokenizer)
    os.makedirs(d, exist_ok=True)
    # Everything is built under 'new.' names first, so a complete directory from an earlier run
    # stays usable until the swap at the end; a crash leaves no train.bin or meta.json behind.
    new = lambda name: os.path.join(d, 'new.' + name)
    t = time.time()
    model = train_tokenizer(train, new('tokenizer'), vocab_size, tokenizer, vocab_sample)
    sp = spm.SentencePieceProcessor(model_file=model)
    print(f"trained a {tokenizer} tokenizer of {sp.get_piece_size()} ids on "
          f"{min(vocab_sample, len(train)):,} stories ({time.time() - t:.1f}s)")
    counts = {}
    for split, stories in zip(SPLITS, (train, val, test)):
        t = time.time()
        tokens, nbytes = write_bin(stories, model, new(f'{split}.bin'), procs)
        counts.update({f'{split}_tokens': tokens, f'{split}_bytes': nbytes,
                       f'{split}_stories': len(stories)})
        dt = max(time.time() - t, 1e-6)
        print(f"{split}: {tokens:,} tokens, {nbytes / tokens:.2f} bytes/token "
              f"({dt:.1f}s, {nbytes / 1e6 / dt:.1f} MB/s)")
    if os.path.exists(os.path.join(d, 'meta.json')):
        os.remove(os.path.join(d, 'meta.json'))  # the old set is incomplete from here on
    for name in ('tokenizer.model', 'tokenizer.vocab') + tuple(f'{s}.bin' for s in SPLITS):
        os.replace(new(name), os.path.join(d, name))
    # vocab_size is the size asked for (the model's embedding); a char tokenizer may use fewer
    # ids (tokenizer_pieces), all below it.
    meta = dict(vocab_size=vocab_size, tokenizer=tokenizer, tokenizer_model='tokenizer.model',
                tokenizer_pieces=sp.get_piece_size(), bos_id=sp.bos_id(), eos_id=sp.eos_id(),
                **counts, source=source, dtype='uint16')
    write_json(meta, os.path.join(d, 'meta.json'))
    for name in ('tokenizer.model',) + tuple(f'{s}.bin' for s in SPLITS) + ('meta.json',):
        print(f"wrote {os.path.join(d, name)}")
    print(f"done in {time.time() - t0:.1f}s")


if __name__ == '__main__':
    from common import configure, die
    config = configure(globals())
    try:
        main()
    except (ValueError, OSError) as e:
        die(str(e))
