"""
Train a GPT on prepared TinyStories, on a laptop CPU or on many GPUs.

One process (CPU or one GPU):
$ python train.py config/tinystories_cpu.py
Several processes or GPUs on one machine (DDP; nccl on CUDA, gloo on the CPU):
$ torchrun --standalone --nproc_per_node=4 train.py config/tinystories_20m.py
Several machines: the same with --nnodes, --node_rank and --rdzv_endpoint (see README.md).
Continue a run (its settings come from the checkpoint; flags given here override them):
$ python train.py --init_from=resume --max_iters=3000
Fine-tune a trained model (all of it, or a LoRA adapter with lora_rank > 0):
$ python train.py config/finetune_words.py --init_from=out/ckpt.pt --lora_rank=8
"""
import math
import os
import signal
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
from tqdm import tqdm

from checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint, sha256
from common import DEVICES, configure, die, first_line, import_ipex, peak_flops, pick_device, pick_dtype
from data import load_meta, story_lengths, tok_dir, tokenizer_of
from model import GPT, GPTConfig
from protocol import score, split_stories, window_tokens
from runlog import RunLog

# -----------------------------------------------------------------------------
# defaults: the CPU quick start's model (config/tinystories_cpu.py); config/*.py and --key=value override
# I/O
out_dir = 'out'          # checkpoints (ckpt.pt the best, last.pt the latest) and log.csv
eval_interval = 250      # evaluate, log to CSV and checkpoint every this many iterations
log_interval = 10        # print the pace every this many iterations
eval_iters = 40          # batches per evaluation (the same batches every time)
init_from = 'scratch'    # 'scratch', 'resume' (out_dir/last.pt, with the settings it was run with),
                         # or the path of a checkpoint to fine-tune from
patience = 0             # stop after this many evaluations without a better val loss; 0 = never
# data (made by prepare.py)
data_dir = 'data'        # where prepare.py wrote data_dir/tok{vocab_size}
vocab_size = 4096        # the tokenizer's size, as prepared
tokenizer = 'bpe'
batch_size = 16          # sequences per micro-step (per process under DDP)
block_size = 256         # context length in tokens
gradient_accumulation_steps = 1  # a step is batch_size x this many sequences, however many processes
# model
n_layer = 6              # transformer blocks
n_head = 4               # attention heads per block
n_embd = 256             # the width of the residual stream
dropout = 0.1
attn_dropout = 0.0       # dropout on the attention weights too (nanoGPT: = dropout); slower
bias = False             # biases in Linears and LayerNorms (GPT-2 has them)
pos_emb = 'rope'         # 'rope', or 'learned' (GPT-2's absolute positions) to compare
grad_checkpoint = False  # recompute activations in backward: less memory, more time
# LoRA fine-tuning (lora.py), from init_from=PATH: only the adapter trains, and only it is saved
lora_rank = 0            # 0 = off: fine-tuning trains every weight
lora_alpha = 16.0        # the update is scaled by lora_alpha / lora_rank
lora_targets = 'c_attn,c_proj,c_fc'  # the Linears inside the blocks that get an adapter
# AdamW and the learning-rate schedule: linear warmup, then a decay to min_lr at lr_decay_iters
learning_rate = 1e-3
max_iters = 2000
weight_decay = 0.1       # decoupled weight decay of the matrices, not of norms and biases
muon = False             # Muon for the matrices inside the blocks, AdamW for the rest
beta1 = 0.9              # AdamW's momentum
beta2 = 0.99             # AdamW's decay of the squared gradients
grad_clip = 1.0          # clip the gradient norm at this value; 0 = off
warmup_iters = 100
lr_decay_iters = 2000    # usually = max_iters
min_lr = 1e-4            # usually learning_rate / 10
lr_schedule = 'cosine'   # 'cosine' decay after the warmup; 'wsd' (warmup-stable-decay, Hu et al. 2024):
                         # the full rate, then a straight line down over the last decay_fraction
decay_fraction = 0.2     # of lr_decay_iters, for 'wsd'
# system
device = 'auto'          # 'auto' (cuda, xpu, mps, then cpu), 'cpu', 'cuda', 'cuda:1', 'xpu', 'mps'
dtype = 'auto'           # 'float32', 'bfloat16' (autocast), 'float16'; 'auto' = bfloat16 where
                         # its matmuls are native (a GPU, a CPU with AVX512-BF16 or AMX)
compile = False          # torch.compile: slow to start (it compiles), then faster steps
ipex = False             # intel_extension_for_pytorch.optimize (needs a torch that IPEX supports)
threads = 0              # CPU threads for torch; 0 = PyTorch's default (the physical cores)
# run logs beside out_dir/log.csv (the logs group of packages: pip install -e ".[logs]")
tensorboard = False      # TensorBoard event files in out_dir/tensorboard: tensorboard --logdir=out
wandb_log = False        # Weights & Biases (WANDB_MODE=offline keeps it on disk)
wandb_project = 'tinygpt'
wandb_run_name = ''      # '' = the out_dir's name
seed = 1337              # the weights, dropout and the data order
# -----------------------------------------------------------------------------
given = {}  # the settings set on the command line, and where: a config file's path or '--name'
config = configure(globals(), dict(
    batch_size='>= 1', block_size='>= 1', learning_rate='> 0', max_iters='>= 0', eval_interval='>= 1',
    eval_iters='>= 1', log_interval='>= 1', gradient_accumulation_steps='>= 1', dropout='[0, 1)',
    attn_dropout='[0, 1)', warmup_iters='>= 0', grad_clip='>= 0', patience='>= 0', lora_rank='>= 0',
    lora_alpha='> 0', threads='>= 0', tokenizer=('bpe', 'char'), pos_emb=('rope', 'learned'),
    lr_schedule=('cosine', 'wsd'), decay_fraction='(0, 1]',
    min_lr=(lambda v: 0 <= v <= learning_rate, 'in [0, learning_rate]'),
    n_embd=(lambda v: v > 0 and n_head > 0 and v % n_head == 0 and v // n_head % 2 == 0,
            'a multiple of n_head with an even head size (RoPE rotates pairs)'),
    init_from=(lambda v: v in ('scratch', 'resume') or os.path.isfile(v),
               "'scratch', 'resume' or the path of an existing checkpoint"),
    dtype=('auto', 'float32', 'bfloat16', 'float16'),
    device=(lambda v: v == 'auto' or v.split(':')[0] in DEVICES, "auto, cpu, cuda, cuda:N, xpu or mps")),
    given=given)
# -----------------------------------------------------------------------------

# A resumed run continues the run it resumes: the checkpoint's settings are the base, and what
# the command line sets overrides them.
ckpt = None
SHAPE = ('n_layer', 'n_head', 'n_embd', 'vocab_size', 'bias', 'pos_emb')
if init_from == 'resume':
    ckpt_path = os.path.join(out_dir, 'last.pt')
    ckpt = load_checkpoint(ckpt_path if os.path.exists(ckpt_path) else os.path.join(out_dir, 'ckpt.pt'))
    for k, v in ckpt['config'].items():
        if k in config and k not in given.keys() | {'init_from', 'out_dir'}:
            config[k] = globals()[k] = v
    for k in sorted(given.keys() - {'init_from', 'out_dir'}):
        was = ckpt['config'].get(k)
        if k in SHAPE + ('lora_rank', 'lora_targets') and config[k] != was:
            die(f"{k}={config[k]!r} does not fit the checkpoint's model ({k}={was!r}): "
                f"the shape of a resumed model cannot change")
        if k in ckpt['config'] and config[k] != was and int(os.environ.get('RANK', 0)) == 0:
            print(f"resume: {k} = {config[k]!r} (the run had {was!r})")

# fine-tuning: the model, its shape and its tokenizer come from the checkpoint it starts from
base, base_path = None, init_from if init_from not in ('scratch', 'resume') else None
if base_path:
    base = load_checkpoint(base_path)
    for k in SHAPE:
        if k in given and config[k] != base['model_args'][k]:
            die(f"{k}={config[k]!r} does not fit {base_path}'s model ({k}={base['model_args'][k]!r}): "
                f"fine-tuning keeps the shape of the model it starts from")
        config[k] = globals()[k] = base['model_args'][k]
    block_size = config['block_size'] = min(block_size, base['model_args']['block_size'])
# A shorter run than its config's schedule (--max_iters=30 of 2,400) scales the schedule with it,
# unless the command line sets the schedule too.
if init_from != 'resume' and given.get('max_iters') == '--max_iters' and max_iters < lr_decay_iters \
        and not {'lr_decay_iters', 'warmup_iters'} & {k for k, w in given.items() if w.startswith('--')}:
    was = warmup_iters, lr_decay_iters
    warmup_iters = config['warmup_iters'] = round(warmup_iters * max_iters / lr_decay_iters)
    lr_decay_iters = config['lr_decay_iters'] = max_iters
    if int(os.environ.get('RANK', 0)) == 0:
        print(f"schedule: warmup {warmup_iters} and decay {lr_decay_iters} iterations, the config's "
              f"{was[0]} and {was[1]} scaled to max_iters={max_iters} (--warmup_iters and "
              f"--lr_decay_iters set them yourself)")
if lora_rank and (init_from == 'scratch' or muon):
    die("lora_rank > 0 fine-tunes a trained model with AdamW: set --init_from=PATH of its "
        "checkpoint (and --muon=False)")

# distributed data parallel: torchrun sets RANK, LOCAL_RANK and WORLD_SIZE
ddp = int(os.environ.get('RANK', -1)) != -1
device = pick_device(device)
if ddp:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    rank, local_rank, world_size = (int(os.environ[k]) for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE'))
    if device.startswith('cuda'):
        device = f'cuda:{local_rank}'
        torch.cuda.set_device(device)
    dist.init_process_group(backend='nccl' if device.startswith('cuda') else 'gloo')
else:
    rank, local_rank, world_size = 0, 0, 1
master = rank == 0
# The N processes share a step's batch_size x gradient_accumulation_steps sequences, so a step
# is the same with 1 process or N: each does `accum` micro-steps of `micro` sequences.
g = math.gcd(gradient_accumulation_steps, world_size)
accum, micro = gradient_accumulation_steps // g, batch_size * g // world_size
if micro * world_size != batch_size * g:
    die(f"a step of batch_size x gradient_accumulation_steps = {batch_size} x "
        f"{gradient_accumulation_steps} sequences does not split evenly over {world_size} "
        f"processes: make batch_size or gradient_accumulation_steps a multiple of {world_size // g}")
dtype = pick_dtype(dtype, device, train=True)
device_type = device.split(':')[0]
if threads:
    torch.set_num_threads(threads)
torch.manual_seed(seed + rank)  # dropout differs per process; the data order is shared (below)
ptdtype = getattr(torch, dtype)
autocast = nullcontext() if dtype == 'float32' else torch.autocast(device_type, dtype=ptdtype)
log = print if master else (lambda *a, **k: None)


written = []  # the files this run wrote; a new run that fails before its first step removes them


def end(status=0, error=None):
    """Leave every process with the same exit status; rank 0 says why (one line). All processes
    call it at the same point: none leaves the group while another still works in it (a gloo
    process that exits while another is busy can abort at its exit)."""
    if ddp:
        dist.barrier()
        dist.destroy_process_group()
    if runlog is not None:
        runlog.close()
    if status and master and resumed_at is None and iter_num == 0:  # nothing trained: nothing kept
        for path in written:
            if os.path.exists(path):
                os.remove(path)
        if made_out_dir and not os.listdir(out_dir):
            os.rmdir(out_dir)
    if error and master:
        die(error)
    sys.exit(status)


def duration(seconds):
    return f"{seconds / 3600:.1f} hours" if seconds > 5400 else f"{seconds / 60:.0f} minutes" \
        if seconds > 90 else f"{seconds:.0f} s"


def resume_command():
    """The exact command that continues this run."""
    run = f"torchrun --standalone --nproc_per_node={world_size} train.py" if ddp else "python train.py"
    return f"{run} --init_from=resume" + ('' if out_dir == 'out' else f" --out_dir={out_dir}")


resumed_at, iter_num, made_out_dir, runlog = None, 0, False, None


# ---------------------------------------------------------------------------- resume or start
if init_from != 'resume' and os.path.exists(os.path.join(out_dir, 'last.pt')):
    die(f"{out_dir} already holds a training run: continue it with `{resume_command()}`, or "
        f"choose another --out_dir (nothing was overwritten)")
if ckpt is not None:
    if ckpt['iter_num'] >= max_iters:
        log(f"{out_dir} is already at iteration {ckpt['iter_num']} of max_iters={max_iters}: "
            f"nothing to train; continue with a larger --max_iters (and --lr_decay_iters)")
        end(0)
    if block_size > ckpt['model_args']['block_size']:
        die(f"block_size={block_size} is larger than the checkpoint's "
            f"{ckpt['model_args']['block_size']}: resume with --block_size="
            f"{ckpt['model_args']['block_size']} or less")

# ---------------------------------------------------------------------------- data
data_path = tok_dir(data_dir, vocab_size, tokenizer)
try:
    meta = load_meta(data_path)
except ValueError as e:
    die(str(e))
if meta['vocab_size'] != vocab_size:
    die(f"{data_path} holds vocab_size {meta['vocab_size']}, not {vocab_size}: rerun prepare.py")
data = {}
for split in ('train', 'val'):
    path = os.path.join(data_path, f'{split}.bin')
    n = os.path.getsize(path) // 2 if os.path.exists(path) else 0
    if n <= block_size + 1:
        die(f"{path} has {n} tokens, not enough for block_size={block_size}: rerun prepare.py "
            f"with more data or lower --block_size")
    data[split] = path
tokenizer_proto = tokenizer_of(data_path, meta)
if (ckpt or base) is not None and (ckpt or base)['tokenizer'] != tokenizer_proto:
    die(f"the tokenizer in {data_path} is not the one the checkpoint was trained with (prepare.py "
        f"was rerun?): use data prepared with that checkpoint's tokenizer, or train from scratch")
bytes_per_token = meta['val_bytes'] / meta['val_tokens']  # turns nats/token into bits/byte


def get_batch(split, ix):
    """Sequences starting at offsets ix; a fresh memmap each time, so memory stays flat. Where a
    task's data has a mask beside it (words.py), the targets it marks 0 are not scored."""
    arr = np.memmap(data[split], dtype=np.uint16, mode='r')
    x = torch.stack([torch.from_numpy(arr[i:i + block_size].astype(np.int64)) for i in ix.tolist()])
    y = torch.stack([torch.from_numpy(arr[i + 1:i + 1 + block_size].astype(np.int64)) for i in ix.tolist()])
    mask_path = data[split][:-len('.bin')] + '.mask.bin'
    if os.path.exists(mask_path):
        mask = np.memmap(mask_path, dtype=np.uint8, mode='r')
        scored = torch.stack([torch.from_numpy(mask[i + 1:i + 1 + block_size] == 1) for i in ix.tolist()])
        y[~scored] = -100  # cross_entropy's ignore_index
    if device_type == 'cuda':
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def n_tokens(split):
    return os.path.getsize(data[split]) // 2


# every process draws the same offsets for the whole step and takes its own slice of them, so
# N processes x batch B see exactly what 1 process with N x the accumulation sees
data_gen = torch.Generator().manual_seed(seed)

# ---------------------------------------------------------------------------- model
model_args = dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size,
                  vocab_size=vocab_size, dropout=dropout, attn_dropout=attn_dropout, bias=bias,
                  pos_emb=pos_emb)
lora_base = None  # a LoRA run: (path, SHA-256) of the checkpoint it adapts
if ckpt is None and base is None:
    model = GPT(GPTConfig(**model_args))
    iter_num, best_val_loss, bad_evals = 0, float('inf'), 0
else:
    start = ckpt or base
    start['model_args'].update(dropout=dropout, attn_dropout=attn_dropout)  # these may change
    if ckpt is not None and 'lora' in ckpt:  # resuming a LoRA run: its base, the adapter below
        lora_base = start['base'], start['base_sha256']
        start = {**start, 'model': start['base_model']}
    model = model_from_checkpoint(start, ckpt_path if ckpt else base_path)
    if block_size < model.config.block_size:  # train on shorter sequences: crop the RoPE tables
        model.config.block_size = block_size
    model_args['block_size'] = start['model_args']['block_size']
    iter_num, best_val_loss, bad_evals = 0, float('inf'), 0
if lora_rank:
    from lora import add_lora
    wrapped = add_lora(model, lora_rank, lora_alpha, lora_targets)
    if not wrapped:
        die(f"lora_targets={lora_targets!r} names no Linear inside the blocks: use some of c_attn, c_proj, c_fc")
    if lora_base is None:  # a new LoRA run on init_from
        lora_base = os.path.abspath(base_path), sha256(base_path)
    elif model.load_state_dict(ckpt['lora'], strict=False).unexpected_keys:
        die(f"{ckpt_path}'s adapter does not fit lora_targets={lora_targets!r}: the file is damaged")
if ckpt is not None:
    iter_num, best_val_loss, bad_evals = ckpt['iter_num'], ckpt['best_val_loss'], ckpt['bad_evals']
    if rank == 0:
        torch.set_rng_state(ckpt['rng'])
    else:
        torch.manual_seed(seed + rank + iter_num)
    data_gen.set_state(ckpt['data_rng'])
model.grad_checkpoint = grad_checkpoint
model.to(device)
optimizer = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type, muon)
if ckpt is not None:
    try:
        optimizer.load_state_dict(ckpt['optimizer'])
    except ValueError:  # other parameter groups: AdamW's state resumed with Muon, or back
        die(f"the checkpoint's optimizer state does not fit muon={muon}: resume with the muon "
            f"setting it was trained with ({ckpt['config'].get('muon', False)})")
    log(f"resuming from iteration {iter_num} (best val loss {best_val_loss:.4f})")
resumed_at = iter_num if ckpt is not None else None
wandb_id = ckpt.get('wandb_id') if ckpt is not None else None
ckpt = base = start = None  # free the memory
scaler = torch.amp.GradScaler(device_type, enabled=dtype == 'float16')
raw_model = model  # checkpoints are saved from this one: no '_orig_mod.' or 'module.' prefixes
if ipex:
    model, optimizer = import_ipex().optimize(model, optimizer=optimizer)
    raw_model = model
if compile:
    model = torch.compile(model)
if ddp:
    model = DDP(model, device_ids=[local_rank] if device_type == 'cuda' else None)
peak = peak_flops(device, dtype) if master else 0.0  # the dtype's own peak: MFU of what it can do
tokens_per_iter = batch_size * block_size * gradient_accumulation_steps
log(f"model: {raw_model.get_num_params():,} parameters ({n_layer} layers x {n_embd}, {n_head} heads, "
    f"context {block_size}); data: {data_path}, {meta['train_tokens']:,} training tokens; a step: "
    f"{tokens_per_iter:,} tokens, {max_iters:,} steps; {device}, {dtype}, {world_size} "
    f"process{'es' if world_size > 1 else ''}{f' ({dist.get_backend()})' if ddp else ''} of "
    f"{torch.get_num_threads()} threads", flush=True)
if lora_rank:
    n = sum(p.numel() for p in raw_model.parameters() if p.requires_grad)
    log(f"LoRA rank {lora_rank} on {len(wrapped)} Linears: {n:,} trainable parameters "
        f"({n / (raw_model.get_num_params() - n):.2%} of the base model), the base frozen")
# Regularisation fits how often the run sees its data: up to about 4 passes, repeated text is
# worth nearly as much as new (Muennighoff et al. 2023); far beyond, a model memorises it. The two
# CPU recipes tie at about 6 passes of the quick start's, 5.6 of the small one's (docs/tuning.md
# sections 16 and 18).
passes = max_iters * tokens_per_iter / meta['train_tokens']
if base_path:
    pass  # fine-tuning: a few passes over a task's data are the point
elif passes > 6 and dropout == 0:
    log(f"note: {max_iters:,} iterations read the training data {passes:.0f} times: a small corpus, "
        "which this model will memorise without dropout; config/tinystories_cpu_small.py is the recipe for it")
elif 0 < passes < 4 and dropout > 0:
    read = f"{passes:.0%} of the training data" if passes < 1 else f"the training data {passes:.1f} times"
    log(f"note: {max_iters:,} iterations read {read}: too few repeats for dropout to pay, it only "
        "slows learning; config/tinystories_cpu.py is the recipe for it")


@torch.no_grad()
def estimate_loss():
    """Mean loss on eval_iters fixed batches of each split (same batches every evaluation)."""
    out = {}
    model.eval()
    for split in ('train', 'val'):
        gen = torch.Generator().manual_seed(seed + 1)
        losses = torch.zeros(eval_iters)
        for k in tqdm(range(eval_iters), desc=f'eval {split}', unit='batch', leave=False,
                      disable=None if master else True):
            ix = torch.randint(n_tokens(split) - block_size - 1, (batch_size,), generator=gen)
            with autocast:
                _, loss = raw_model(*get_batch(split, ix))
            losses[k] = loss.item()
        out[split] = losses.mean().item()
    model.train()
    return out


def get_lr(it):
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    if lr_schedule == 'wsd':  # the share of the decay still to go, 1 until it starts
        left = min(1.0, (lr_decay_iters - it) / max(1, decay_fraction * lr_decay_iters))
        return min_lr + left * (learning_rate - min_lr)
    ratio = (it - warmup_iters) / max(1, lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


def checkpoint_state():
    """Everything needed to continue exactly: on one process a resumed run repeats the losses of
    an uninterrupted one bit for bit (under DDP only rank 0's dropout RNG is kept)."""
    state = {'model': raw_model.state_dict(), 'optimizer': optimizer.state_dict(),
             'model_args': model_args, 'config': config, 'iter_num': iter_num,
             'best_val_loss': best_val_loss, 'bad_evals': bad_evals, 'rng': torch.get_rng_state(),
             'data_rng': data_gen.get_state(), 'tokenizer': tokenizer_proto, 'wandb_id': runlog.wandb_id,
             'meta': {k: v for k, v in meta.items() if isinstance(v, (int, float, str))}}
    if lora_rank:  # the adapter instead of the model, and where its base is
        from lora import lora_state
        del state['model']
        state.update(lora=lora_state(raw_model), base=lora_base[0], base_sha256=lora_base[1],
                     lora_args={'lora_rank': lora_rank, 'lora_alpha': lora_alpha, 'lora_targets': lora_targets})
    return state


# ---------------------------------------------------------------------------- training loop
if master:
    made_out_dir = not os.path.exists(out_dir)
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        die(f"cannot create out_dir '{out_dir}' ({e.strerror}): choose another --out_dir")
    if not os.access(out_dir, os.W_OK):
        die(f"out_dir '{out_dir}' is not writable: choose another --out_dir")
written.append(os.path.join(out_dir, 'log.csv'))
runlog = RunLog(out_dir, resumed_at, tensorboard, wandb_log, wandb_project, wandb_run_name, wandb_id,
                config) if master else None

# Every reason to stop is agreed by all processes, once per step (the largest code wins), so
# under DDP they stop at the same iteration and none is left waiting in an all-reduce.
GO, EARLY_STOP, INTERRUPTED, SAVE_FAILED, NOT_FINITE = range(5)


def agree(code, finite=None):
    """The largest code of all processes; NOT_FINITE where `finite`, a bool tensor on the
    device, is False. It stays there until here: one host sync a step, not one a micro-step."""
    if ddp or finite is not None:
        t = torch.tensor(code, device=device)
        if finite is not None:
            t = torch.where(finite, t, NOT_FINITE)
        if ddp:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        code = int(t.item())
    return code


# The closing scoring's work, for the estimates: the tokens of every window of val and test
scoring_tokens = sum(window_tokens(n - 1, block_size) for split in ('val', 'test')
                     for n in story_lengths(data_path, split, meta['bos_id']))
evals_left = lambda it: len({i for i in range(it + 1, max_iters + 1) if i % eval_interval == 0} | {max_iters})
eval_s = score_s = 0.0  # seconds an evaluation takes (with its saves), and the closing scoring
saved_at = resumed_at    # the iteration that out_dir/last.pt holds
stop, scoring = [], False  # Ctrl-C or SIGTERM: stop after this step, save, exit


def on_signal(sig, frame):
    if scoring:  # the checkpoints are written: nothing to finish
        log(f"\nstopped during the closing scoring: {out_dir}/ckpt.pt is saved; python eval.py "
            f"--out_dir={out_dir} scores it")
        sys.exit(130)
    if stop and sig == signal.SIGINT:  # the second Ctrl-C: at once
        log(f"\nquit: {out_dir}/last.pt holds iteration {saved_at}" if saved_at is not None else
            "\nquit before the first checkpoint: nothing was saved")
        sys.exit(130)
    stop.append(True)
    log(f"\n{'Ctrl-C' if sig == signal.SIGINT else 'SIGTERM'}: finishing this step, then saving "
        f"{out_dir}/last.pt (Ctrl-C again quits at once)", flush=True)


signal.signal(signal.SIGINT, on_signal)
signal.signal(signal.SIGTERM, on_signal)
model.train()
t_start = t0 = time.time()
iters_timed = 0
save_error = None
early = False
first_step = iter_num
while True:
    lr = get_lr(iter_num)
    for group in optimizer.param_groups:
        group['lr'] = lr

    if (iter_num % eval_interval == 0 or iter_num == max_iters) and iter_num != resumed_at:
        t = time.time()
        losses = estimate_loss()
        score_s = (time.time() - t) * scoring_tokens / (2 * eval_iters * batch_size * block_size) / world_size
        bpb = losses['val'] / math.log(2) / bytes_per_token
        log(f"eval {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}, "
            f"val {bpb:.4f} bits/byte")
        improved = losses['val'] < best_val_loss
        best_val_loss = min(best_val_loss, losses['val'])
        bad_evals = 0 if improved else bad_evals + 1
        early = bool(patience) and bad_evals >= patience
        if master:
            state = checkpoint_state()
            runlog.eval(iter_num, {'train_loss': losses['train'], 'val_loss': losses['val'], 'val_bpb': bpb, 'lr': lr})
            try:
                for name in (['ckpt.pt'] if improved else []) + ['last.pt']:
                    save_checkpoint(state, os.path.join(out_dir, name))
                    written.append(os.path.join(out_dir, name))
                saved_at = iter_num
            except OSError as e:
                save_error = str(e)
        eval_s = time.time() - t
        t0 += eval_s  # the pace counts steps only
    if iter_num >= max_iters:
        break

    # one optimizer step: accum micro-steps on this process's share of the step's sequences
    ix = torch.randint(n_tokens('train') - block_size - 1, (accum, world_size, micro), generator=data_gen)
    finite = torch.ones((), dtype=torch.bool, device=device)
    for micro_step in range(accum):
        if ddp:  # all-reduce the gradients only on the last micro-step
            model.require_backward_grad_sync = micro_step == accum - 1
        X, Y = get_batch('train', ix[micro_step, rank])
        try:
            with autocast:
                _, loss = model(X, Y)
        except torch._dynamo.exc.BackendCompilerFailed as e:  # compile=True: inductor needs a C++ compiler
            end(1, f"torch.compile failed ({first_line(e)}): install a C++ compiler (g++) or use --compile=False")
        finite &= torch.isfinite(loss)
        scaler.scale(loss / accum).backward()
    status = agree(max(SAVE_FAILED * bool(save_error), INTERRUPTED * bool(stop), EARLY_STOP * early), finite)
    if status == NOT_FINITE:  # before the step: the weights in memory stay finite
        kept = f"the last good checkpoint {out_dir}/last.pt is kept" if saved_at is not None and (
            iter_num or resumed_at is not None) else "nothing was trained, so nothing is kept"
        end(1, f"the loss is not finite at iteration {iter_num}: stopped; {kept} (try a lower "
               f"learning_rate, or dtype=bfloat16/float32)")
    if status == SAVE_FAILED:
        end(1, save_error or "rank 0 could not write its checkpoint")
    if status == EARLY_STOP:
        log(f"early stop: no better val loss in {patience} evaluations (best {best_val_loss:.4f})")
        break
    if grad_clip:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    iter_num += 1

    if status == INTERRUPTED:
        if master:
            try:
                save_checkpoint(checkpoint_state(), os.path.join(out_dir, 'last.pt'))
            except OSError as e:
                save_error = str(e)
        if agree(SAVE_FAILED * bool(save_error)):  # the others wait for rank 0's save
            end(1, save_error)
        log(f"interrupted: saved {out_dir}/last.pt at iteration {iter_num}; continue with "
            f"`{resume_command()}`")
        end(0)
    iters_timed += 1
    if iter_num - first_step == 1:  # the first step warms up: the pace is timed from here
        t0, iters_timed = time.time(), 0
    done_steps = iter_num - first_step
    if master and (iter_num % log_interval == 0 or done_steps == 4) and iters_timed:
        dt = (time.time() - t0) / iters_timed
        t0, iters_timed = time.time(), 0
        mfu = raw_model.flops_per_token(block_size) * tokens_per_iter / dt / (peak * world_size)
        eta = dt * (max_iters - iter_num) + evals_left(iter_num) * eval_s + score_s
        if done_steps == 4 and max_iters - first_step > 8:  # the whole run's estimate, once
            whole = dt * (max_iters - first_step) + evals_left(first_step) * eval_s + score_s
            n = evals_left(first_step)
            log(f"estimate: {max_iters - first_step:,} steps of {dt:.2f} s, {n} "
                f"evaluation{'s' if n > 1 else ''} of {eval_s:.1f} s and the closing scoring ({score_s:.0f} s): about "
                f"{duration(whole)} on this machine (--max_iters=N runs shorter: the schedule scales)")
            if device_type == 'cuda':  # the steady state's, once the first steps have run
                log(f"peak GPU memory: {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")
        if iter_num % log_interval == 0:
            runlog.pace(iter_num, {'loss': loss.item(), 'lr': lr, 'tokens_per_s': tokens_per_iter / dt, 'mfu': mfu})
            log(f"iter {iter_num}: loss {loss.item():.4f}, lr {lr:.2e}, {dt * 1000:.0f} ms/iter, "
                f"{tokens_per_iter / dt:,.0f} tok/s, mfu {mfu * 100:.1f}%, eta {int(eta // 60)}m{int(eta % 60):02d}s")

# ---------------------------------------------------------------------------- the result
if agree(SAVE_FAILED * bool(save_error)):  # the last evaluation's checkpoint was not written
    end(1, save_error or "rank 0 could not write its checkpoint")
# The best checkpoint by the evaluation protocol, on val and on the held-out test. Rank 0 reads
# it and sends its weights to the others (their machines may not see out_dir); each process
# scores a share of the stories.
wall = time.time() - t_start
best_path = os.path.join(out_dir, 'ckpt.pt')
if master:
    best = load_checkpoint(best_path, device)
    best_model, best_iter = model_from_checkpoint(best, best_path).to(device), best['iter_num']
    best = None
else:
    best_model, best_iter = GPT(GPTConfig(**model_args)).to(device), None
if ddp:
    for t in best_model.state_dict().values():
        dist.broadcast(t, 0)
scoring = True
log(f"scoring the best checkpoint (iteration {best_iter}) by the protocol on val and test "
    f"(about {score_s:.0f} s)", flush=True)
scores = {s: score(best_model, *split_stories(data_path, s, tokenizer_proto), batch_size,
                   desc=f'protocol: {s}') for s in ('val', 'test')}
log(f"done: best iteration {best_iter}, val {scores['val']['bpb']:.4f} bits/byte, "
    f"test {scores['test']['bpb']:.4f} bits/byte (eval.py protocol), "
    f"{wall / 60:.1f} min, {best_path}")
end(0)
