"""
The evaluation protocol, the same for every model so that figures compare across trainers and
tokenizers: each story is scored on its own, from its begin-of-story token; every token of the
story's text is scored once, given the earlier tokens of the same story (a story longer than the
context slides a window of stride half the context, so each token keeps at least half a context
of history); the end-of-story token is not scored. Bits per byte = total loss in nats / ln 2 /
the stories' UTF-8 bytes. eval.py scores a checkpoint by it; train.py ends with it.

    r = score(model, *split_stories(data_path, 'test', ckpt['tokenizer']))   # r['bpb'], ...
"""
import math

import torch
from torch.nn import functional as F
from tqdm import tqdm

import data


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


def window_tokens(length, T):
    """How many tokens windows() runs through the model for a story of `length` ids."""
    n, scored, start = 0, 1, 0
    while scored < length:
        n += min(T, length - start - 1)
        scored, start = start + min(T + 1, length - start), start + T // 2
    return n


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
    """The stories of a prepared split as the protocol takes them (BOS + ids, the EOS left
    out) and their bytes; ValueError unless the split was made with the checkpoint's tokenizer."""
    meta = data.load_meta(data_path)
    if data.tokenizer_of(data_path, meta) != tokenizer_proto:
        raise ValueError(f"the tokenizer in {data_path} is not the checkpoint's: point "
                         f"--data_dir at the data it was trained on, or score a file with --text")
    return ([s[:-1].tolist() for s in data.story_ids(data_path, split, meta['bos_id'])],
            meta[f'{split}_bytes'])


def text_stories(path, sp):
    """The stories of a text file (prepare.py's formats), tokenized by sp, and their bytes;
    ValueError or OSError if it cannot be read."""
    stories = data.read_stories(path)
    if not stories:
        raise ValueError(f"{path} holds no stories")
    return [[sp.bos_id()] + ids for ids in sp.encode(stories)], sum(len(s.encode('utf-8')) for s in stories)
