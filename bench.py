"""
Measure speed and memory honestly, on this machine: training steps, prefill and decoding.

$ python bench.py                          # the 20M and the CPU config's models, random weights
$ python bench.py --quantize=int8          # the same with a variant: --ipex, --compile, --dtype
$ python bench.py --profile=True           # where a decoding step's time goes
$ python bench.py --muon=True --nanogpt=../nanoGPT  # the step against its model's AdamW step and nanoGPT's
$ python bench.py --engine=onnxruntime,openvino,llamacpp  # other engines beside PyTorch, the same model
$ python bench.py --json=True              # one JSON object per result, after the text
Quality is eval.py's job: python eval.py (bits per byte on the held-out test split).
"""
import copy
import os
import statistics
import time
from contextlib import nullcontext
from json import dumps

import torch

from common import configure, die, pick_device, pick_dtype, peak_flops, peak_rss_mb, sync
from inference import QUANTIZE, optimize_for_inference
from model import GPT, GPTConfig, sample

# -----------------------------------------------------------------------------
models = '20m,cpu'       # the models of config/tinystories_{name}.py to time (20m, cpu, cpu_small)
batch_size = 8           # training batch (sequences) and the larger generation batch
block_size = 0           # training context; 0 = the model's
train_iters = 5          # timed training iterations (the median is reported) after one warm-up
rounds = 3               # batch-1 decoding: each side of a ratio measured this many times, alternately
prompt_tokens = 128      # prefill length
decode_prompt = 16       # decoding starts from a prompt of this many tokens
max_new_tokens = 256     # decoded tokens per measurement, with the cache and without
top_p = 0.9              # decoding samples with nucleus sampling, as sample.py does
skip_train = False       # time no training step
skip_generate = False    # time no prefill or decoding
grad_checkpoint = False  # recompute activations in backward (less memory, more time)
dropout = 0.0            # dropout in the timed training step (the configs use 0.1-0.2)
attn_dropout = 0.0       # dropout on the attention weights: the slow attention kernel on CPUs
muon = False             # time the training step with Muon for the block matrices (train.py's muon),
                         # beside the model's AdamW step alone
nanogpt = ''             # the path of a nanoGPT checkout: its model.py's AdamW step alternates with ours
out_dir = 'out'          # where --profile writes its trace
quantize = 'none'        # 'int8': dynamic int8 Linear layers (generation)
ipex = False             # intel_extension_for_pytorch.optimize (needs a torch that IPEX supports)
compile = False          # torch.compile the training step (decoding stays eager)
dtype = 'float32'        # 'bfloat16' measures autocast training and bf16 generation
device = 'cpu'           # 'cpu', 'cuda', ...
threads = 0              # 0 = PyTorch's default (the physical cores)
profile = False          # write a torch.profiler trace of decoding to out_dir, print the top ops
engine = 'torch'         # also decode with these, alternating with PyTorch: onnxruntime,openvino,llamacpp
json = False             # print each result as one JSON object too, after the text
# -----------------------------------------------------------------------------
OTHER_ENGINES = ('onnxruntime', 'openvino', 'llamacpp')
configure(globals(), dict(
    quantize=QUANTIZE, rounds='>= 1', train_iters='>= 1', batch_size='>= 1', max_new_tokens='>= 2',
    engine=(lambda v: all(e in ('', 'torch') + OTHER_ENGINES for e in v.split(',')),
            f"torch or a comma-separated list of {', '.join(OTHER_ENGINES)}")))
# -----------------------------------------------------------------------------
engines = [e for e in engine.split(',') if e not in ('', 'torch')]
if nanogpt and not os.path.isfile(os.path.join(nanogpt, 'model.py')):
    die(f"nanogpt={nanogpt!r} holds no model.py: give the path of a nanoGPT checkout")
if threads:
    torch.set_num_threads(threads)
device = pick_device(device, quantize)
dtype = pick_dtype(dtype, device)
ptdtype = getattr(torch, dtype)
results = []


def report(name, **fields):
    fields['peak_rss_mb'] = round(peak_rss_mb(), 1)
    results.append({'name': name, **fields})
    print(f"{name:<34} " + "  ".join(f"{k}={v}" for k, v in fields.items()), flush=True)


def model_configs():
    """The shapes of the models in config/tinystories_{name}.py for the names in `models`."""
    out = []
    for name in [m for m in models.split(',') if m]:
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'config', f'tinystories_{name}.py')
        if not os.path.isfile(path):
            die(f"unknown model '{name}' in models: no {path}; use names of config/tinystories_*.py "
                "such as 20m,cpu,cpu_small")
        cfg = {}
        exec(open(path).read(), cfg)
        out.append((name, {k: cfg[k] for k in ('n_layer', 'n_head', 'n_embd', 'block_size', 'vocab_size')}))
    return out


PARTS = ('forward', 'backward', 'clip', 'optimizer')


def train_step(model, step_model, opt, T):
    """A function that runs one full training step (forward, backward, clip, optimizer) and
    returns the seconds of each part."""
    autocast = nullcontext() if dtype == 'float32' else torch.autocast(device.split(':')[0], dtype=ptdtype)
    seq = torch.randint(model.config.vocab_size, (batch_size, T + 1), device=device)
    x, y = seq[:, :-1].contiguous(), seq[:, 1:].contiguous()  # as train.py's batches

    def step():
        t = [time.perf_counter()]
        mark = lambda: (sync(device), t.append(time.perf_counter()))
        with autocast:
            _, loss = step_model(x, y)
        mark()
        loss.backward()
        mark()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        mark()
        opt.step()
        opt.zero_grad(set_to_none=True)
        mark()
        return {part: b - a for part, a, b in zip(PARTS, t, t[1:])}
    return step


def nanogpt_model(cfg):
    """nanoGPT's GPT from its model.py in the checkout at `nanogpt`, at this shape, biases off
    (as ours), with its AdamW groups."""
    import importlib.util
    spec = importlib.util.spec_from_file_location('nanogpt_model', os.path.join(nanogpt, 'model.py'))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    ng = mod.GPT(mod.GPTConfig(**{k: getattr(cfg, k) for k in ('block_size', 'vocab_size', 'n_layer',
                                  'n_head', 'n_embd', 'dropout')}, bias=False)).to(device)
    groups = [{'params': [p for p in ng.parameters() if p.dim() >= 2], 'weight_decay': 0.1},
              {'params': [p for p in ng.parameters() if p.dim() < 2], 'weight_decay': 0.0}]
    return ng, torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95))


def bench_train(name, model):
    T = block_size or model.config.block_size
    model.grad_checkpoint = grad_checkpoint
    model.train()
    tokens = batch_size * T
    name = f"{name} train b{batch_size} ctx{T}"
    if dropout or attn_dropout:
        name += f" dropout {dropout}/{attn_dropout}"
    kind = device.split(':')[0]
    opt = model.configure_optimizers(0.1, 1e-4, (0.9, 0.95), kind, muon)
    # the sides of each ratio, stepped alternately so that a drifting machine hits them alike
    steps = {'eager': train_step(model, model, opt, T)} if compile else {}
    if muon:  # the model's AdamW step alone: what Muon, the clip and the rest add to it
        steps['adamw'] = train_step(model, model, model.configure_optimizers(0.1, 1e-4, (0.9, 0.95), kind), T)
    if nanogpt:
        ng, ng_opt = nanogpt_model(model.config)
        steps['nanogpt'] = train_step(ng, ng, ng_opt, T)
    steps['timed'] = train_step(model, torch.compile(model) if compile else model, opt, T)
    times = {k: [] for k in steps}
    for _ in range(train_iters + 1):  # the first is warm-up (and compilation)
        for k, step in steps.items():
            times[k].append(step())
    med = lambda k, part=None: statistics.median(sum(t.values()) if part is None else t[part]
                                                 for t in times[k][1:])
    dt = med('timed')
    row = lambda k: dict(tokens_per_s=round(tokens / med(k), 1), ms_per_iter=round(med(k) * 1000, 1))
    extra = {}
    if compile:
        report(f"{name} eager", **row('eager'))
        extra['vs_eager'] = round(med('eager') / dt, 2)
    if muon:
        report(f"{name} adamw", **row('adamw'))
        extra['vs_adamw'] = round(dt / med('adamw'), 3)  # the step's time over the model's AdamW step
    if nanogpt:  # the models alone, AdamW and eager both
        ours = 'adamw' if muon else 'eager' if compile else 'timed'
        report(f"{name} nanoGPT model.py adamw", **row('nanogpt'),
               vs_nanogpt=round(med('nanogpt') / med(ours), 3))  # ours' speed over nanoGPT's
    report(name + (" muon" if muon else "") + (" grad-ckpt" if grad_checkpoint else "") +
           (" compiled" if compile else ""), **row('timed'),
           mfu=round(model.flops_per_token(T) * tokens / dt / peak, 4),
           **{f'{part}_ms': round(med('timed', part) * 1000, 1) for part in PARTS}, **extra)


@torch.inference_mode()  # as stream(): the ratio is the cache alone
def recompute_generate(model, idx, n):
    """nanoGPT's generate: the whole (cropped) context runs again for every new token."""
    for _ in range(n):
        logits, _ = model(idx[:, -model.config.block_size:])
        idx = torch.cat((idx, sample(logits[:, -1, :], 1.0, None, top_p)), dim=1)
    return idx


def recompute_speed(model, prompt):
    recompute_generate(model, prompt, 2)  # warm-up
    t0 = time.perf_counter()
    recompute_generate(model, prompt, max_new_tokens)
    sync(device)
    return max_new_tokens / (time.perf_counter() - t0)


def decode_speed(model, prompt, temperature):
    """Tokens/s of decoding with the KV cache, from the first new token to the last."""
    stamps = []
    for _ in model.stream(prompt, max_new_tokens, temperature, None, top_p):
        sync(device)
        stamps.append(time.perf_counter())
    return prompt.size(0) * (len(stamps) - 1) / (stamps[-1] - stamps[0])


@torch.no_grad()
def bench_generate(name, model, plain=None):
    """Prefill and decode speed at batch 1 and batch_size. At batch 1 the two sides of each ratio
    (KV cache against recompute; the variant against `plain`, the fp32 model as sample.py runs
    it) are measured alternately, `rounds` times, and their medians reported: a machine's
    speed drifts, and alternating makes the drift hit both sides alike."""
    V = model.config.vocab_size
    for B in (1, batch_size):
        prompt = torch.randint(V, (B, prompt_tokens), device=device)
        # prefill: the prompt in one forward pass that fills the cache
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            next(model.stream(prompt, 1, 1.0, None, top_p))
            sync(device)
            times.append(time.perf_counter() - t0)
        report(f"{name} prefill b{B} {prompt_tokens} tok",
               tokens_per_s=round(B * prompt_tokens / min(times), 1))
        # decode with the KV cache. Random weights predict nearly uniformly (the nucleus is most
        # of the vocabulary); greedy shows the cost without sampling
        prompt = prompt[:, :decode_prompt]
        temps = {'top-p': 1.0, 'greedy': 0.0}
        speeds = {}
        for _ in range(rounds if B == 1 else 1):
            for how, temp in temps.items():
                speeds.setdefault(how, []).append(decode_speed(model, prompt, temp))
                if B == 1 and plain is not None:
                    speeds.setdefault('plain ' + how, []).append(decode_speed(plain, prompt, temp))
            if B == 1:  # the baseline: full recomputation of the context for every token, top-p
                speeds.setdefault('recompute', []).append(recompute_speed(model, prompt))
        speed = {k: statistics.median(v) for k, v in speeds.items()}
        if B == 1 and plain is not None:
            report(f"{name} decode b1 kv-cache plain fp32",
                   **{f'{h}_tokens_per_s': round(speed['plain ' + h], 1) for h in temps})
        for how in temps:
            extra = {'vs_plain_fp32': round(speed[how] / speed['plain ' + how], 2)} if B == 1 and plain is not None else {}
            report(f"{name} decode b{B} kv-cache {how}", tokens_per_s=round(speed[how], 1),
                   ms_per_token=round(1000 * B / speed[how], 2), **extra)
        if B == 1:
            report(f"{name} decode b1 recompute top-p", tokens_per_s=round(speed['recompute'], 1),
                   kv_cache_speedup=round(speed['top-p'] / speed['recompute'], 2))


def placeholder_tokenizer(vocab_size):
    """A SentencePiece model of vocab_size pieces (special, 256 bytes, then placeholders): what
    a GGUF file needs beside random weights."""
    from sentencepiece import sentencepiece_model_pb2 as pb
    m = pb.ModelProto()
    t = pb.ModelProto.SentencePiece
    pieces = [('<unk>', t.UNKNOWN), ('<s>', t.CONTROL), ('</s>', t.CONTROL)]
    pieces += [(f'<0x{b:02X}>', t.BYTE) for b in range(256)]
    pieces += [(f'▁w{i}', t.NORMAL) for i in range(vocab_size - len(pieces))]
    for i, (piece, kind) in enumerate(pieces):
        m.pieces.add(piece=piece, score=-float(i), type=kind)
    m.trainer_spec.model_type = pb.TrainerSpec.BPE
    m.trainer_spec.byte_fallback = True
    return m.SerializeToString()


def bench_engines(name, ckpt, model, torch_variant=None):
    """Each engine's load time (export included), prefill and decoding of the checkpoint, fp32
    and int8 (llama.cpp: f32 and q8_0; OpenVINO: fp32), at batch 1 and batch_size (llama.cpp: 1),
    alternating with PyTorch (`model`, fp32 as sample.py runs it, and torch_variant, the
    --quantize/--dtype/--ipex one, if any) `rounds` times: medians."""
    from engines import make_engine
    runners = {'torch fp32': model}
    if torch_variant:
        runners[f'torch {variant}'] = torch_variant
    for e in engines:
        for q in ('none', 'int8'):
            t0 = time.perf_counter()
            runners[f"{e} {'int8' if q == 'int8' else 'fp32'}"] = make_engine(e, ckpt, q)
            report(f"{name} {e} {q} export+load", seconds=round(time.perf_counter() - t0, 2))
    for runner in runners.values():  # warm-up
        list(runner.stream(torch.randint(model.config.vocab_size, (1, decode_prompt)), 4))
    speeds = {}
    for B in (1, batch_size):
        prompt = torch.randint(model.config.vocab_size, (B, prompt_tokens))
        for _ in range(rounds):
            for k, runner in runners.items():
                if B > 1 and k.startswith('llamacpp'):
                    continue
                t0 = time.perf_counter()
                next(runner.stream(prompt, 1, 1.0, None, top_p))
                speeds.setdefault((k, B, 'prefill'), []).append(B * prompt_tokens / (time.perf_counter() - t0))
                for how, temp in {'top-p': 1.0, 'greedy': 0.0}.items():
                    speeds.setdefault((k, B, how), []).append(decode_speed(runner, prompt[:, :decode_prompt], temp))
    for (k, B, how) in speeds:
        if how == 'prefill':
            med = lambda h: round(statistics.median(speeds[(k, B, h)]), 1)
            report(f"{name} {k} b{B}", prefill_tokens_per_s=med('prefill'),
                   **{f'{h}_tokens_per_s': med(h) for h in ('top-p', 'greedy')})


def bench_profile(name, model):
    from torch.profiler import profile as prof, ProfilerActivity
    prompt = torch.randint(model.config.vocab_size, (1, prompt_tokens), device=device)
    tokens = model.stream(prompt, 32, 1.0, None, top_p)
    next(tokens)  # the prompt's prefill, left out: the profile is of decoding steps alone
    with prof(activities=[ProfilerActivity.CPU]) as p:
        for _ in tokens:
            pass
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"trace_{name}_decode.json")
    p.export_chrome_trace(path)
    # what Python calls, each a trip through PyTorch's dispatcher: the operations inside them not counted
    calls = sum(e.name.startswith('aten::') and not (e.cpu_parent and e.cpu_parent.name.startswith('aten::'))
                for e in p.events())
    print(f"profile of 32 decoding steps ({path}, open in chrome://tracing or ui.perfetto.dev): "
          f"{calls / 32:.0f} PyTorch operations a token")
    print(p.key_averages().table(sort_by='self_cpu_time_total', row_limit=12))


peak = peak_flops(device, dtype, n=2048, seconds=3.0)  # the dtype's own: bf16 matmuls have their own peak
print(f"{torch.get_num_threads()} threads, {os.cpu_count()} cpus, torch {torch.__version__}, "
      f"device {device}, dtype {dtype}, quantize {quantize}, ipex {ipex}, compile {compile}")
report(f"matmul peak {dtype}", gflops=round(peak / 1e9, 1))
for name, cfg in model_configs():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**cfg, dropout=dropout, attn_dropout=attn_dropout)).to(device)
    print(f"--- {name}: {model.get_num_params():,} parameters, {cfg}")
    if not skip_train:
        bench_train(name, model)
    model.eval()
    if engines:  # the weights as a checkpoint holds them, before anything below changes them
        ckpt = {'model': copy.deepcopy(model.state_dict()), 'model_args': dict(cfg, bias=model.config.bias),
                'tokenizer': placeholder_tokenizer(cfg['vocab_size'])}
    plain = None
    variant = ' '.join(v for v in (quantize if quantize != 'none' else '', 'ipex' if ipex else '',
                                   dtype if dtype != 'float32' else '') if v)
    if (not skip_generate or engines) and variant:
        # the fp32 model as sample.py runs it, decoded in the same run: the honest ratio
        plain = optimize_for_inference(copy.deepcopy(model))  # it swaps the Linears in place
    if dtype != 'float32':
        model.to(ptdtype)
    gen_model = optimize_for_inference(model, quantize, ipex)
    if not skip_generate:
        bench_generate(name, gen_model, plain)
    if engines:
        bench_engines(name, ckpt, gen_model if plain is None else plain, variant and gen_model)
    if profile:
        bench_profile(name, gen_model)
if json:
    for r in results:
        print(dumps(r))
