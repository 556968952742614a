"""
Score a checkpoint by the evaluation protocol (protocol.py): loss per token, perplexity and bits
per byte, on stories it was neither trained nor chosen on.

$ python eval.py                          # out/ckpt.pt on the prepared test split
$ python eval.py --split=val              # the split the best checkpoint was chosen on
$ python eval.py --text=stories.txt       # any TinyStories-format file (.txt, .json(l), .parquet)
$ python eval.py --json=True              # also one JSON object, after the text

Each story is scored on its own, from its begin-of-story token, every token once; bits per
byte = total loss in nats / ln 2 / the stories' UTF-8 bytes. train.py ends with the same
figures for val and test.
"""
import os
import sys
from json import dumps

import torch

from checkpoint import load_checkpoint, model_from_checkpoint
from common import configure, die, pick_device
from data import tok_dir
from inference import QUANTIZE, optimize_for_inference
from protocol import score, split_stories, text_stories
from tokenizer import tokenizer

# -----------------------------------------------------------------------------
out_dir = 'out'          # where the checkpoint is
ckpt_name = 'ckpt.pt'    # 'ckpt.pt' (the best) or 'last.pt'
split = 'test'           # a prepared split: 'test' (held out) or 'val' (the checkpoint was chosen on it)
text = ''                # or any file of stories, instead of a prepared split
data_dir = ''            # where the split is prepared; '' = where the checkpoint was trained from
batch_size = 16          # windows scored at once
quantize = 'none'        # 'int8': dynamic int8 Linear layers, as sample.py --quantize=int8
device = 'auto'          # 'auto' (cuda, xpu, mps, then cpu) or one of them
threads = 0              # CPU threads; 0 = PyTorch's default
json = False             # print the result as one JSON object too
# -----------------------------------------------------------------------------
configure(globals(), {'split': ('test', 'val', 'train'), 'quantize': QUANTIZE, 'batch_size': '>= 1',
                      'threads': '>= 0'})
# -----------------------------------------------------------------------------

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
        stories, n_bytes = text_stories(text, tokenizer(ckpt))
    else:
        data_path = tok_dir(data_dir or cfg.get('data_dir', 'data'), ckpt['model_args']['vocab_size'],
                            cfg.get('tokenizer', 'bpe'))
        name = f"{split} split of {data_path}"
        stories, n_bytes = split_stories(data_path, split, ckpt['tokenizer'])
except (ValueError, OSError) as e:
    die(str(e))
print(f"scoring {len(stories):,} stories ({sum(map(len, stories)) - len(stories):,} tokens) of {name} "
      f"with {path}...", file=sys.stderr, flush=True)
r = score(model, stories, n_bytes, batch_size, desc=name)
print(f"{path} on {name}: {r['bpb']:.4f} bits/byte, loss {r['loss']:.4f} nats/token, "
      f"perplexity {r['ppl']:.2f} ({r['stories']:,} stories, {r['tokens']:,} tokens, "
      f"{r['bytes']:,} bytes)")
if json:
    print(dumps({'name': f"eval {name}", **r}))
