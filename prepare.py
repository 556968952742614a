"""
Prepare TinyStories for training: train a SentencePiece tokenizer and write the token ids.

    python prepare.py                                   # from the Hugging Face hub
    python prepare.py --source=TinyStories/             # local files (TinyStories-train.txt, -valid.txt)

Output, in data_dir/tok{vocab_size} (or char{vocab_size}), so several sizes live side by side:
tokenizer.model, train.bin, val.bin and test.bin (numpy uint16 ids, each story as BOS + ids +
EOS), and meta.json, written last: it is the marker that the directory is complete.

The validation stories are split in two: the 1st, 3rd, 5th... are `val` (what train.py
evaluates, keeps the best checkpoint by and stops early on), the 2nd, 4th, 6th... are `test`,
held out: nothing is chosen on it, so a figure on it is an honest estimate for unseen stories.
"""
import collections
import itertools
import multiprocessing
import os
import random
import re
import signal
import time

import numpy as np
import sentencepiece as spm
from tqdm import tqdm

from data import EXTENSIONS, SPLITS, atomic_write, iter_stories, tok_dir, write_json

# -----------------------------------------------------------------------------
source = 'roneneldan/TinyStories'  # a hub dataset; an existing file or directory is local files
data_dir = 'data'        # the splits go to data_dir/tok{vocab_size} (or char{vocab_size})
vocab_size = 4096       # what config/tinystories_cpu.py uses; see docs/tuning.md
tokenizer = 'bpe'       # 'bpe' or 'char'
vocab_sample = 100_000  # stories the tokenizer trains on (a fixed random sample: ~1M sentences)
num_proc = 0            # tokenizing processes; 0 = os.cpu_count()
val_fraction = 0.01     # share of train carved off as validation when the source has none
# -----------------------------------------------------------------------------

CHUNK = 1000  # stories per task sent to a tokenizing process
HUB_FILES = 'https://huggingface.co/datasets/roneneldan/TinyStories/tree/main'


def find_splits(source, val_fraction=0.01):
    """(train, val, note) for a local file, a directory, or a hub dataset. train() and val()
    each return a new iterator over the split's stories: a corpus of any size streams through,
    read twice where needed, never held in memory. Where the source has no validation split,
    every (1/val_fraction)-th story is validation, and note says so (else note is None)."""
    source = os.path.expanduser(source)
    val = None
    if os.path.isfile(source):
        train = lambda: iter_stories(source)
    elif os.path.isdir(source):
        files = sorted(f for f in os.listdir(source) if f.lower().endswith(EXTENSIONS))
        if not files and os.path.isdir(os.path.join(source, 'data')):  # a copy of a hub dataset
            return find_splits_of(load_hub(source), source, val_fraction)
        if not files:
            raise ValueError(f"no {'/'.join(EXTENSIONS)} files in directory {source}")
        named_train = any('train' in f.lower() for f in files)
        is_val = lambda f: 'val' in f.lower() and 'train' not in f.lower()  # valid, validation
        val_files = [os.path.join(source, f) for f in files if is_val(f)]
        train_files = [os.path.join(source, f) for f in files  # no 'train' names: the rest is train
                       if not is_val(f) and ('train' in f.lower() or not named_train)]
        train = lambda: itertools.chain.from_iterable(map(iter_stories, train_files))
        if val_files:
            val = lambda: itertools.chain.from_iterable(map(iter_stories, val_files))
    elif re.fullmatch(r'[\w-][\w.-]*(/[\w.-]+)?', source) and not source.endswith(EXTENSIONS):
        return find_splits_of(load_hub(source), source, val_fraction)
    else:
        raise ValueError(f"source '{source}': no such file or directory")
    return checked_splits(train, val, source, val_fraction)


def find_splits_of(ds, source, val_fraction):
    """find_splits for a datasets.DatasetDict (the hub's layout: train and validation)."""
    if 'train' not in ds:
        raise ValueError(f"{source} has no 'train' split (splits: {', '.join(ds)})")
    val = (lambda: hub_stories(ds, 'validation')) if 'validation' in ds else None
    return checked_splits(lambda: hub_stories(ds, 'train'), val, source, val_fraction)


def checked_splits(train, val, source, val_fraction):
    """find_splits' result, validation carved from train where there is none, and checked."""
    note = None
    if val is None:
        if not 0 < val_fraction < 1:
            raise ValueError(f"--val_fraction={val_fraction} must be in (0, 1)")
        k, every = max(2, round(1 / val_fraction)), train
        if len(list(itertools.islice(every(), 2 * k))) < 2 * k:  # small: still 2 validation stories
            k = max(2, sum(1 for _ in every()) // 2)
        train = lambda: (s for i, s in enumerate(every()) if i % k != k - 1)
        val = lambda: itertools.islice(every(), k - 1, None, k)
        note = (f"{source} has no validation split: every {k}th story is validation or test "
                f"(val_fraction={val_fraction})")
    if next(train(), None) is None:
        raise ValueError(f"no training stories in {source} (file names containing 'train')")
    if len(list(itertools.islice(val(), 2))) < 2:
        raise ValueError(f"{source}: need at least 2 validation stories (one for val, one for "
                         f"test)" + (", or more stories to carve them from" if note else ""))
    return train, val, note


def split_val_test(val):
    """The validation stories alternate between val (1st, 3rd, ...) and the held-out test
    (2nd, 4th, ...): (val(), test()) iterators from the function val()."""
    return lambda: itertools.islice(val(), 0, None, 2), lambda: itertools.islice(val(), 1, None, 2)


def load_hub(name):
    """The dataset `name` through datasets.load_dataset: from the hub (cached after the first
    download, and memory-mapped, not loaded), or a local folder laid out as the hub's."""
    import datasets  # slow to import, and only the hub needs it
    import huggingface_hub
    # its retry warnings would bury the one-line error below when the hub is unreachable
    datasets.logging.set_verbosity_error()
    huggingface_hub.utils.logging.set_verbosity_error()
    if not os.path.isdir(name):
        print(f"loading {name} from the Hugging Face hub (about 1.9 GB the first time)...", flush=True)
    try:
        return datasets.load_dataset(name)
    except Exception as e:  # offline, DNS, unknown repo...: say what to do instead
        why = f"{type(e).__name__}: {e}".splitlines()[0][:120]
        raise ValueError(f"could not reach '{name}' on the Hugging Face hub ({why}): download "
                         f"TinyStories-train.txt and TinyStories-valid.txt from {HUB_FILES} into a "
                         f"folder TinyStories/, then: python prepare.py --source=TinyStories/") from None


def hub_stories(ds, split):
    """The stories of one split of a datasets.DatasetDict, read in batches of rows."""
    for batch in ds[split].iter(batch_size=CHUNK):
        yield from (t.strip() for t in batch['text'] if t and t.strip())


# ---------------------------------------------------------------------------- tokenizer
def check_vocab(vocab_size):
    if vocab_size > 65535:
        raise ValueError("token ids are stored as uint16: choose --vocab_size ≤ 65535")
    if vocab_size < 3 + 256 + 1:
        raise ValueError(f"--vocab_size={vocab_size} is too small: the tokenizer needs at least "
                         "260 ids (3 special + 256 byte pieces + characters)")


def sample_stories(stories, k, seed=0):
    """A fixed random sample of k stories from a stream, in their order in it (all of them if
    there are at most k), holding only the sample (reservoir sampling, Vitter's algorithm R);
    and the number of stories seen."""
    rng, picked, n = random.Random(seed), [], 0
    for n, s in enumerate(stories, 1):
        if n <= k:
            picked.append((n, s))
        elif (j := rng.randrange(n)) < k:
            picked[j] = (n, s)
    return [s for _, s in sorted(picked)], n


def train_tokenizer(stories, model_prefix, vocab_size, tokenizer='bpe'):
    """Train SentencePiece on the stories (a sample: sample_stories); returns the .model path.
    The options make decode(encode(story)) == story exactly, for any text."""
    check_vocab(vocab_size)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(stories), model_prefix=model_prefix,
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
    if multiprocessing.current_process().name != 'MainProcess':
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to report, once


def _encode_chunk(stories):
    """(stories, UTF-8 bytes, BOS + ids + EOS of each as one uint16 array) of a list of stories."""
    ids = _sp.encode(stories, add_bos=True, add_eos=True, num_threads=1)
    flat = itertools.chain.from_iterable(ids)
    return (len(stories), sum(len(s.encode('utf-8')) for s in stories),
            np.fromiter(flat, dtype=np.uint16, count=sum(map(len, ids))))


def write_bin(stories, sp_model_path, out_path, num_proc):
    """Write BOS + ids + EOS of every story of the iterable to out_path as uint16; returns
    (stories, tokens, bytes). Chunks of stories stream to num_proc processes, a bounded number
    in flight, and their ids are appended in order (data.atomic_write: all or nothing)."""
    chunks = iter(lambda: list(itertools.islice(stories, CHUNK)), [])
    totals, pool = np.zeros(3, dtype=np.int64), None
    try:
        with atomic_write(out_path) as f, tqdm(unit='stories', desc=os.path.basename(out_path),
                                               disable=None, leave=False) as bar:
            def write(count, n_bytes, ids):
                f.write(ids.tobytes())
                totals[:] += (count, len(ids), n_bytes)
                bar.update(count)
            if num_proc > 1:
                pool = multiprocessing.Pool(num_proc, initializer=_load_model, initargs=(sp_model_path,))
                pending = collections.deque()  # in order, at most 2 chunks a process ahead
                for chunk in chunks:
                    pending.append(pool.apply_async(_encode_chunk, (chunk,)))
                    if len(pending) >= 2 * num_proc:
                        write(*pending.popleft().get())
                while pending:
                    write(*pending.popleft().get())
                pool.close()
                pool.join()
            else:
                _load_model(sp_model_path)
                for chunk in chunks:
                    write(*_encode_chunk(chunk))
    finally:
        if pool:
            pool.terminate()
    return tuple(int(x) for x in totals)


# ---------------------------------------------------------------------------- main
def main():
    t0 = time.time()
    procs = num_proc or os.cpu_count()
    check_vocab(vocab_size)  # before reading a large corpus
    train, val, note = find_splits(source, val_fraction)
    if note:
        print(note)
    val, test = split_val_test(val)
    d = tok_dir(data_dir, vocab_size, tokenizer)
    os.makedirs(d, exist_ok=True)
    # Everything is built under 'new.' names first, so a complete directory from an earlier run
    # stays usable until the swap at the end; a crash leaves no train.bin or meta.json behind.
    new = lambda name: os.path.join(d, 'new.' + name)
    t = time.time()
    print(f"reading the training stories for the tokenizer's sample of {vocab_sample:,}...", flush=True)
    stories = tqdm(train(), unit='stories', desc='train', disable=None, leave=False)
    picked, n_train = sample_stories(stories, vocab_sample)
    print(f"training a {vocab_size}-id {tokenizer} tokenizer on {len(picked):,} stories...", flush=True)
    model = train_tokenizer(picked, new('tokenizer'), vocab_size, tokenizer)
    del picked
    sp = spm.SentencePieceProcessor(model_file=model)
    print(f"trained a {tokenizer} tokenizer of {sp.get_piece_size()} ids on "
          f"{min(vocab_sample, n_train):,} of {n_train:,} training stories ({time.time() - t:.1f}s)")
    counts = {}
    for split, stories in zip(SPLITS, (train, val, test)):
        t = time.time()
        n, tokens, nbytes = write_bin(stories(), model, new(f'{split}.bin'), procs)
        counts.update({f'{split}_tokens': tokens, f'{split}_bytes': nbytes, f'{split}_stories': n})
        dt = max(time.time() - t, 1e-6)
        print(f"{split}: {n:,} stories, {tokens:,} tokens, {nbytes / tokens:.2f} bytes/token "
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
    config = configure(globals(), {'tokenizer': ('bpe', 'char'), 'num_proc': '>= 0'})
    try:
        main()
    except (ValueError, OSError) as e:
        die(str(e))
