"""
Score a checkpoint by the evaluation protocol: loss per token, perplexity and bits per byte.

$ python eval.py                          # out/ckpt.pt on the prepared test split
$ python eval.py --split=val              # the split the best checkpoint was chosen on
$ python eval.py --text=stories.txt       # any TinyStories-format file (.txt, .json(l), .parquet)
$ python eval.py --json=True              # also one JSON object, after the text

The protocol is the same for every model, so that figures compare across trainers and
tokenizers: each story is scored on its own, from its begin-of-story token; every token of the
story's text is scored once, given the earlier tokens of the same story (a story longer than the
context slides a window of stride half the context, so each token keeps at least half a context
of history); the end-of-story token is not scored. Bits per byte = total loss in nats / ln 2 /
the stories' UTF-8 bytes. train.py ends with the same figures for val and test.
"""
import math
import os
from json import dumps

import numpy as np
import torch
from torch.nn import functional as F
from tqdm import tqdm

# -----------------------------------------------------------------------------
out_dir = 'out'
ckpt_name = 'ckpt.pt'
split = 'test'           # a prepared split: 'test' (held out) or 'val' (the checkpoint was chosen on it)
text = ''                # or any file of stories, instead of a prepared split
data_dir = ''            # where the split is prepared; '' = where the checkpoint was trained from
batch_size = 16          # windows scored at once
quantize = 'none'        # 'int8': dynamic int8 Linear layers, as sample.py --quantize=int8
device = 'auto'
threads = 0              # CPU threads; 0 = PyTorch's default
json = False             # print the result as one JSON object too
# -----------------------------------------------------------------------------


def windows(story, T):
    """(inputs, targets) windows of one story's ids (BOS first) for a context of T: targets are
    -100 where a token was scored by an earlier window, so every token counts once."""
    out, scored, start = [], 1, 0  # ids[0], the BOS, is never a target
    while scored < len(story):
        window = story[start:start + T + 1]
        out.append((window[:-1], [t if start + 1 + j >= scored else -100 for j, t in enumerate(window[1:])]))
        scored = start + len(window)
        start += T // 2
    return out


@torch.inference_mode()
def score(model, stories, n_bytes, batch_size=16, desc='eval'):
    """The protocol's figures for `stories` (lists of ids, each BOS + the story's tokens) whose
    text holds n_bytes UTF-8 bytes. Under torchrun every process scores its share of the
    batches and all get the figures of one process: each batch's sum, added in the same order."""
    import torch.distributed as dist
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    device = next(model.parameters()).device
    pieces = [w for s in stories for w in windows(s, model.config.block_size)]
    pieces.sort(key=lambda p: -len(p[0]))  # similar lengths together: little padding
    starts = range(0, len(pieces), batch_size)
    sums = torch.zeros(len(starts), 2, dtype=torch.float64, device=device)  # loss, tokens per batch
    model.eval()
    for b in tqdm(range(rank, len(starts), world), desc=desc, unit='batch', disable=rank or None, leave=False):
        batch = pieces[starts[b]:starts[b] + batch_size]
        L = len(batch[0][0])
        x = torch.tensor([x + [0] * (L - len(x)) for x, _ in batch], device=device)
        y = torch.tensor([y + [-100] * (L - len(y)) for _, y in batch], device=device)
        logits, _ = model(x, y)  # padding sits after the real tokens: causality keeps it out
        sums[b, 0] = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1),
                                     ignore_index=-100, reduction='sum').item()
        sums[b, 1] = (y != -100).sum().item()
    if world > 1:
        dist.all_reduce(sums)  # every batch was scored by one process, zeros elsewhere
    total, count = 0.0, 0
    for loss, n in sums.tolist():
        total, count = total + loss, count + int(n)
    loss = total / count
    return dict(loss=round(loss, 4), ppl=round(math.exp(loss), 3),
                bpb=round(total / math.log(2) / n_bytes, 4), tokens=count, bytes=n_bytes,
                stories=len(stories))


def split_stories(data_path, split, tokenizer_proto):
    """The stories of a prepared split (.bin: BOS + ids + EOS each) and their bytes (meta.json);
    the split must have been made with the checkpoint's tokenizer."""
    from prepare import load_meta
    meta = load_meta(data_path)  # ValueError: not prepared
    with open(os.path.join(data_path, meta['tokenizer_model']), 'rb') as f:
        if f.read() != tokenizer_proto:
            raise ValueError(f"the tokenizer in {data_path} is not the checkpoint's: point "
                             f"--data_dir at the data it was trained on, or score a file with --text")
    ids = np.fromfile(os.path.join(data_path, f'{split}.bin'), dtype=np.uint16).astype(np.int64)
    starts = np.flatnonzero(ids == meta['bos_id'])
    ends = np.append(starts[1:], len(ids)) - 1  # each story's EOS: not scored
    return [ids[s:e].tolist() for s, e in zip(starts, ends)], meta[f'{split}_bytes']


def text_stories(path, tokenizer_proto):
    """The stories of a text file, tokenized as the checkpoint was trained, and their bytes."""
    import sentencepiece as spm
    from prepare import read_stories
    sp = spm.SentencePieceProcessor(model_proto=tokenizer_proto)
    stories = read_stories(path)  # ValueError or OSError: one line for the user
    if not stories:
        raise ValueError(f"{path} holds no stories")
    return ([[sp.bos_id()] + ids for ids in sp.encode(stories)],
            sum(len(s.encode('utf-8')) for s in stories))


def main():
    from common import die, load_checkpoint, model_from_checkpoint, pick_device
    from inference import optimize_for_inference
    from prepare import tok_dir
    if split not in ('val', 'test', 'train'):
        die(f"bad value split={split!r}: use 'test', 'val' or 'train'")
    if quantize not in ('none', 'int8'):
        die(f"bad value quantize={quantize!r}: use 'none' or 'int8'")
    if threads:
        torch.set_num_threads(threads)
    dev = pick_device(device, quantize)
    path = os.path.join(out_dir, ckpt_name)
    ckpt = load_checkpoint(path, dev)
    model = model_from_checkpoint(ckpt, path).to(dev).eval()
    if quantize == 'int8':
        model = optimize_for_inference(model, quantize)
    cfg = ckpt.get('config', {})
    try:
        if text:
            name = os.path.basename(text)
            stories, n_bytes = text_stories(text, ckpt['tokenizer'])
        else:
            data_path = tok_dir(data_dir or cfg.get('data_dir', 'data'), ckpt['model_args']['vocab_size'],
                                cfg.get('tokenizer', 'bpe'))
            name = f"{split} split of {data_path}"
            stories, n_bytes = split_stories(data_path, split, ckpt['tokenizer'])
    except (ValueError, OSError) as e:
        die(str(e))
    r = score(model, stories, n_bytes, batch_size, desc=name)
    print(f"{path} on {name}: {r['bpb']:.4f} bits/byte, loss {r['loss']:.4f} nats/token, "
          f"perplexity {r['ppl']:.2f} ({r['stories']:,} stories, {r['tokens']:,} tokens, "
          f"{r['bytes']:,} bytes)")
    if json:
        print(dumps({'name': f"eval {name}", **r}))


if __name__ == '__main__':
    from common import configure
    configure(globals())
    main()
