"""
The Words task (as TinyStories-Instruct prompts a story): write a story that uses given words.

$ python words.py                                  # data/tok4096 -> data/words/tok4096
$ python train.py config/finetune_words.py --init_from=out/ckpt.pt          # every weight: out-words/
$ python train.py config/finetune_words.py --init_from=out/ckpt.pt --lora_rank=8 \
      --learning_rate=2e-3 --min_lr=2e-4 --out_dir=out-words-lora8         # LoRA: out-words-lora8/
$ python words.py --score=out-words                # held-out prompts: does each story use every word?
$ python words.py --score=out,out-words,out-words-lora8  # the same prompts: gains over the first,
                                                   # and each later one's as a share of the second's

Each story of the prepared splits becomes the prompt "Words: w1, w2, w3" + "\\nStory:" and then the
story, the words being three of its content words, picked by a hash of the story (the same
every time). The splits stay the splits: the task's test prompts come from stories that no
training saw. A model trained for many passes over a small corpus knows its training stories by
heart, and fine-tuning on them only deepens that: --train_text=FILE takes other stories for the
task's training split. Beside each .bin, a .mask.bin marks the tokens training scores: the story's
and its end, not the prompt's.
"""
import hashlib
import os
import random
import re
from json import dumps

import numpy as np
import sentencepiece as spm
import torch

from checkpoint import load_checkpoint, model_from_checkpoint
from common import configure, die
from data import SPLITS, atomic_write, load_meta, read_stories, story_ids, tok_dir, tokenizer_of, write_json
from tokenizer import prompt_ids, tokenizer

# -----------------------------------------------------------------------------
data_dir = 'data'        # where prepare.py wrote the stories (data_dir/tok{vocab_size})
vocab_size = 4096        # the tokenizer's size, as prepared
out_data_dir = 'data/words'  # the task's splits, in the same layout (train.py --data_dir=...)
train_text = ''          # a file of other stories for the training split (prepare.py's formats):
                         # stories the model has not learned by heart, where its own are few
n_words = 3
max_train = 20000        # stories in the task's training split (the full dataset has 2.1M)
score = ''               # an out_dir (or several, comma-separated): score on the test split's prompts
ckpt_name = 'ckpt.pt'    # 'ckpt.pt' (the best) or 'last.pt'
prompts = 200            # held-out prompts scored
samples = 1              # stories written per prompt, each with its own draws
temperature = 0.8        # sampling as sample.py does
top_p = 0.95
max_new_tokens = 300
batch_size = 16          # prompts decoded at once
seed = 1337              # the same draws for every model scored
threads = 0
json = False             # also print the result as one JSON object
# -----------------------------------------------------------------------------
# words too common to be a task: function words and the verbs every story has
COMMON = set("""the and but for nor yet with from into onto upon over under about after before
again then than that this these those there their they them she her hers him his its our ours
you your yours are was were been being have has had does did not yes all any can could would
should will just very too also one two some more most much many other own same such only now
when where why how what who which while said says say went come came get got see saw look
looked like liked want wanted let day time once""".split())


def content_words(story):
    """The story's words a task can ask for: three letters or more, not among COMMON, and
    written in lower case somewhere in it (so not only a name)."""
    words = re.findall(r"[A-Za-z]+(?:'[A-Za-z]+)*", story)
    return sorted({w for w in words if w.islower() and "'" not in w and len(w) >= 3 and w not in COMMON})


def pick_words(story, n=3):
    """n of the story's content words, the same every time for the same story (None if fewer)."""
    words = content_words(story)
    if len(words) < n:
        return None
    rng = random.Random(int(hashlib.sha256(story.encode('utf-8')).hexdigest()[:16], 16))
    return rng.sample(words, n)


def prompt_text(words):
    return f"Words: {', '.join(words)}\nStory:"


def uses(story, word):
    """Whether the story has the word as a whole word, in any case."""
    return re.search(rf"\b{re.escape(word)}\b", story, re.IGNORECASE) is not None


def read_split(src, split, sp):
    """The stories of a prepared split, as text, one at a time."""
    for ids in story_ids(src, split, sp.bos_id()):
        yield sp.decode(ids[1:-1].tolist())  # less BOS and EOS


def make(src, dst):
    """The task's splits from the prepared ones (or train_text's stories), the same tokenizer."""
    meta = load_meta(src)
    sp = spm.SentencePieceProcessor(model_proto=tokenizer_of(src, meta))
    os.makedirs(dst, exist_ok=True)
    out = {k: meta[k] for k in ('vocab_size', 'tokenizer', 'tokenizer_model', 'tokenizer_pieces',
                                'bos_id', 'eos_id')}
    for split in SPLITS:
        ids, mask, n_bytes, n = [], [], 0, 0
        stories = read_stories(train_text) if split == 'train' and train_text else read_split(src, split, sp)
        for story in stories:
            words = pick_words(story, n_words)
            if words is None:
                continue
            head, body = prompt_ids(sp, prompt_text(words)), sp.encode(story) + [meta['eos_id']]
            ids.append(np.array(head + body, dtype=np.uint16))
            mask.append(np.array([0] * len(head) + [1] * len(body), dtype=np.uint8))  # scored: the story
            n_bytes += len((prompt_text(words) + ' ' + story).encode('utf-8'))
            n += 1
            if split == 'train' and n == max_train:
                break
        ids, mask = np.concatenate(ids), np.concatenate(mask)
        for name, values in ((f'{split}.bin', ids), (f'{split}.mask.bin', mask)):
            with atomic_write(os.path.join(dst, name)) as f:
                f.write(values.tobytes())
        out.update({f'{split}_tokens': len(ids), f'{split}_bytes': n_bytes, f'{split}_stories': n})
        print(f"{split}: {n:,} prompts and stories, {len(ids):,} tokens, {int(mask.sum()):,} of them scored")
    with atomic_write(os.path.join(dst, meta['tokenizer_model'])) as f:
        f.write(tokenizer_of(src, meta))
    write_json({**out, 'source': src, 'train_text': train_text, 'task': 'words', 'dtype': 'uint16'},
               os.path.join(dst, 'meta.json'))
    print(f"wrote {dst}: train with --data_dir={os.path.dirname(dst)}")


@torch.inference_mode()
def word_use(model, sp, tasks):
    """For each (words, prompt ids): the story the model writes, and how many words it uses."""
    gen = torch.Generator().manual_seed(seed)
    results = [None] * len(tasks)
    order = sorted(range(len(tasks)), key=lambda i: len(tasks[i][1]))  # equal lengths batch together
    while order:
        n = len(tasks[order[0]][1])
        batch = [i for i in order if len(tasks[i][1]) == n][:batch_size]
        order = [i for i in order if i not in batch]
        idx = torch.tensor([tasks[i][1] for i in batch])
        torch.manual_seed(int(torch.randint(2**31, (1,), generator=gen)))  # the same draws each run
        out = model.generate(idx, max_new_tokens, temperature, top_p=top_p, stop_token=sp.eos_id())
        for row, i in zip(out[:, n:].tolist(), batch):
            story = sp.decode(row[:row.index(sp.eos_id())] if sp.eos_id() in row else row)
            results[i] = story, sum(uses(story, w) for w in tasks[i][0])
    return results


def interval(used, stat, n=2000):
    """The 90 % interval of stat(used) when the prompts are drawn again (the same draw for every
    model: a paired comparison), or None where some redraw leaves it undefined (a ratio whose
    denominator is then 0). used: (models, prompts) words used."""
    rng = np.random.default_rng(seed)
    with np.errstate(divide='ignore', invalid='ignore'):  # a draw where a gain is 0
        draws = [stat(used[:, rng.integers(0, used.shape[1], used.shape[1])]) for _ in range(n)]
    return np.percentile(draws, [5, 95]) if np.isfinite(draws).all() else None


if __name__ == '__main__':
    configure(globals(), dict(n_words='>= 1', prompts='>= 1', samples='>= 1', temperature='>= 0',
                              top_p='(0, 1]', max_new_tokens='>= 1', batch_size='>= 1', threads='>= 0'))
    if threads:
        torch.set_num_threads(threads)
    if not score:
        try:
            make(tok_dir(data_dir, vocab_size), tok_dir(out_data_dir, vocab_size))
        except (ValueError, OSError) as e:
            die(str(e))
        raise SystemExit
    out_dirs = score.split(',')
    make_it = lambda d: (f"train it: python train.py config/tinystories_cpu.py --out_dir={d}" if d == out_dirs[0]
                         else f"fine-tune it: python train.py config/finetune_words.py --init_from="
                              f"{out_dirs[0]}/ckpt.pt --out_dir={d}")  # noqa: E731
    ckpts = [load_checkpoint(os.path.join(d, ckpt_name), hint=f"{make_it(d)}, or name another run in --score")
             for d in out_dirs]
    if len({c['tokenizer'] for c in ckpts}) > 1:
        die(f"--score={score}: the checkpoints have different tokenizers; compare models of one tokenizer")
    sp = tokenizer(ckpts[0])
    src = tok_dir(data_dir, ckpts[0]['model_args']['vocab_size'])
    try:
        load_meta(src)
        stories = list(read_split(src, 'test', sp))
    except (ValueError, OSError) as e:
        die(str(e))
    tasks = [(w, prompt_ids(sp, prompt_text(w))) for w in map(pick_words, stories) if w][:prompts]
    used, every = [], []  # per model: words used per prompt (all samples), stories using every word
    for d, ckpt in zip(out_dirs, ckpts):
        results = word_use(model_from_checkpoint(ckpt).eval(), sp, tasks * samples)
        used.append(np.reshape([k for _, k in results], (samples, len(tasks))).sum(0))
        every.append(sum(k == n_words for _, k in results) / len(results))
        if len(out_dirs) == 1:
            print(f"example:\n{prompt_text(tasks[0][0])}{results[0][0]}")
    used = np.array(used) / (n_words * samples)  # (models, prompts): the share of each prompt's words
    share = used.mean(1)
    for m, d in enumerate(out_dirs):
        line = f"{d}: {share[m]:.1%} of the words used, {every[m]:.1%} of the stories use every one"
        if m > 0:
            lo, hi = interval(used, lambda u: 100 * (u[m].mean() - u[0].mean()))
            line += (f"; {100 * (share[m] - share[0]):+.1f} points over {out_dirs[0]} "
                     f"(90 % interval {lo:+.1f} to {hi:+.1f})")
        if m > 1 and share[1] != share[0]:
            gain = lambda u: (u[m].mean() - u[0].mean()) / (u[1].mean() - u[0].mean())
            bounds = interval(used, gain)
            line += f"; {gain(used):.0%} of {out_dirs[1]}'s gain " + (
                f"(90 % interval {bounds[0]:.0%} to {bounds[1]:.0%})" if bounds is not None else
                f"(no interval: in some redraws of the prompts {out_dirs[1]} gains nothing, so the "
                f"share is undefined; more --prompts or --samples narrow it)")
        elif m > 1:
            line += f"; {out_dirs[1]} gained nothing, so no share of its gain"
        print(line)
    print(f"({len(tasks)} held-out prompts x {samples} stories, {n_words} words each)")
    if json:
        models = [{'out_dir': d, 'every_word': e, 'words': s} for d, e, s in zip(out_dirs, every, share)]
        print(dumps({'prompts': len(tasks), 'samples': samples, 'models': models}))
