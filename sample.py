"""
Sample stories from a trained model, streamed to the terminal as they are written.

$ python sample.py --start "Once upon"
$ python sample.py --start=FILE:prompt.txt --num_samples=3 --temperature=0.8 --top_p=0.9
"""
import os
import random
import sys
import time

import torch

from checkpoint import load_checkpoint, model_from_checkpoint
from common import configure, die, pick_device, pick_dtype
from engines import ENGINES
from inference import QUANTIZE, optimize_for_inference
from tokenizer import TextStream, prompt_ids, tokenizer

# -----------------------------------------------------------------------------
out_dir = 'out'          # where the checkpoint is
ckpt_name = 'ckpt.pt'    # the best checkpoint by validation loss; 'last.pt' is the latest
start = ''               # the story's beginning, or FILE:path to read it from a file
num_samples = 1
max_new_tokens = 500     # a story ends earlier, at its end-of-story token
temperature = 0.8        # 0 = greedy (always the most likely token)
greedy = False           # the same as temperature=0
top_k = None             # sample only from the k most likely tokens
top_p = 0.95             # sample only from the smallest set of tokens reaching this probability
seed = -1                # -1 = a fresh one each run, printed: --seed=N repeats its story
device = 'auto'          # 'auto' (cuda, xpu, mps, then cpu), 'cpu', 'cuda', 'mps', ...
dtype = 'auto'           # 'auto' (bfloat16 on a GPU that has it, else float32), 'float32', 'bfloat16'
quantize = 'none'        # 'int8': dynamic int8 quantization of the Linear layers (CPU)
ipex = False             # intel_extension_for_pytorch.optimize on the model
threads = 0              # CPU threads; 0 = PyTorch's default
engine = 'torch'         # or 'onnxruntime', 'openvino', 'llamacpp': the checkpoint exported on the fly, run there
# -----------------------------------------------------------------------------
configure(globals(), dict(
    temperature='>= 0', top_p='(0, 1]', top_k=(lambda v: isinstance(v, int) and v >= 1, 'a positive integer or None'),
    num_samples='>= 1', max_new_tokens='>= 0', quantize=QUANTIZE, engine=ENGINES, threads='>= 0'))
# -----------------------------------------------------------------------------

if engine != 'torch' and (ipex or dtype not in ('auto', 'float32')):
    die(f"engine={engine!r} runs the model in fp32 (or its own int8 with --quantize=int8): "
        "ipex and dtype apply to engine='torch' only")
if greedy:
    temperature = 0.0
if temperature == 0 and num_samples > 1:  # greedy decoding always writes the same story
    print(f"note: greedy decoding writes one story, the same every time: printing it once "
          f"(--temperature above 0 for {num_samples} different ones)", file=sys.stderr)
    num_samples = 1
if start.startswith('FILE:'):
    try:
        with open(start[5:], encoding='utf-8') as f:
            start = f.read()
    except (OSError, UnicodeDecodeError) as e:
        die(f"cannot read the start text from '{start[5:]}' ({getattr(e, 'strerror', None) or e})")

if threads:
    torch.set_num_threads(threads)
if seed == -1:
    seed = random.SystemRandom().randrange(1_000_000)  # printed below, to write the story again
torch.manual_seed(seed)
ckpt_path = os.path.join(out_dir, ckpt_name)
ckpt = load_checkpoint(ckpt_path)
sp = tokenizer(ckpt)
if engine != 'torch':  # int8 is the engine's own int8 path
    from engines import make_engine
    model = make_engine(engine, ckpt, quantize, threads, 'cpu' if device == 'auto' else device)
    device = 'cpu'
else:
    device = pick_device(device, quantize)
    dtype = pick_dtype(dtype, device)
    model = model_from_checkpoint(ckpt, ckpt_path)
    model.eval().to(device)
    if dtype != 'float32':
        model.to(getattr(torch, dtype))
    model = optimize_for_inference(model, quantize, ipex)

prompt = prompt_ids(sp, start)
if start and len(prompt) == 1:
    die("the start text gives no tokens")
block = ckpt['model_args']['block_size']
if max_new_tokens > 10 * block:
    print(f"note: up to {max_new_tokens:,} tokens, over 10 contexts ({10 * block:,} tokens) of this "
          f"model: a story stops at its end; Ctrl-C stops it sooner", file=sys.stderr)
idx = torch.tensor([prompt], dtype=torch.long, device=device)
for k in range(num_samples):
    if num_samples > 1:
        print(f"--- sample {k + 1}")
    text, n = TextStream(sp, prompt), 0
    t0 = time.time()
    print(start, end='', flush=True)
    for token in model.stream(idx, max_new_tokens, temperature, top_k, top_p, stop_token=sp.eos_id()):
        if token.item() == sp.eos_id():
            break
        text.add(token.item())
        print(text.fresh(), end='', flush=True)
        n += 1
    print(text.fresh(final=True), end='')
    dt = time.time() - t0
    again = '' if temperature == 0 or k < num_samples - 1 else \
        f"; --seed={seed} writes {'it' if num_samples == 1 else 'these'} again"
    print(f"\n[{n} tokens, {n / dt:.1f} tok/s{again}]", file=sys.stderr)
