"""The GPU paths, on a CUDA machine: `.ci/gpu` runs these (docs/scaling.md). Marked `gpu`, they
are deselected where CUDA is absent (conftest.py), so CI runs none of them and skips nothing.
GPU_CHECK_DEVICE=cpu runs them on the CPU against itself: a dry run of the tests' own code.

Tolerances: fp32 on the GPU against the CPU within 1e-4 (TF32 off, PyTorch's default for
matmuls: the sums differ only in order); bf16 and fp16 autocast against fp32 within 2 % of the
loss (their 8- and 11-bit mantissas), gradients pointing the same way (cosine > 0.99)."""
import os
import subprocess
import sys

import pytest
import torch
from torch.nn import functional as F

from conftest import ROOT, TINY, run, tiny, train

DEVICE = os.environ.get('GPU_CHECK_DEVICE', 'cuda')
KIND = DEVICE.split(':')[0]  # autocast's and the scaler's device type
pytestmark = pytest.mark.gpu


def batch(model, B=4, T=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(model.config.vocab_size, (B, T + 1), generator=gen)
    return x[:, :-1], x[:, 1:]


def loss_and_grads(model, x, y, device, dtype=torch.float32):
    """The loss and every parameter's gradient (on the CPU, fp32) of one forward and backward."""
    model = model.to(device)
    model.zero_grad(set_to_none=True)
    with torch.autocast(device.split(':')[0], dtype=dtype, enabled=dtype != torch.float32):
        _, loss = model(x.to(device), y.to(device))
    loss.backward()
    return loss.item(), {n: p.grad.float().cpu() for n, p in model.named_parameters()}


def model128():
    return tiny(n_layer=2, n_head=2, n_embd=128, block_size=64, vocab_size=512, bias=False)


def test_forward_and_backward_match_the_cpu():
    torch.backends.cuda.matmul.allow_tf32 = False  # the default, said: fp32 means fp32 here
    model = model128()
    x, y = batch(model)
    with torch.no_grad():
        ref_logits = model(x, y)[0]
        logits = model.to(DEVICE)(x.to(DEVICE), y.to(DEVICE))[0].cpu()
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    ref_loss, ref_grads = loss_and_grads(model, x, y, 'cpu')
    loss, grads = loss_and_grads(model, x, y, DEVICE)
    assert abs(loss - ref_loss) < 1e-4
    for n in ref_grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-3, atol=1e-5, msg=n)


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_autocast_is_close_to_fp32(dtype):
    model = model128()
    x, y = batch(model)
    ref_loss, ref_grads = loss_and_grads(model, x, y, 'cpu')
    loss, grads = loss_and_grads(model, x, y, DEVICE, dtype)
    assert abs(loss - ref_loss) < 0.02 * ref_loss, (loss, ref_loss)
    for n in ref_grads:
        cos = F.cosine_similarity(grads[n].flatten(), ref_grads[n].flatten(), dim=0)
        assert cos > 0.99, (n, cos.item())


def test_fp16_with_the_gradient_scaler_trains_without_an_inf_step():
    """train.py's fp16 path: autocast, GradScaler, unscale before the clip. 40 steps on one
    batch: every loss finite, no step skipped for an inf or NaN gradient, and the loss falls."""
    model = model128().to(DEVICE)
    x, y = (t.to(DEVICE) for t in batch(model))
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), KIND)
    scaler = torch.amp.GradScaler(KIND, init_scale=2.0 ** 10)
    losses, skipped = [], 0
    for _ in range(40):
        with torch.autocast(KIND, dtype=torch.float16):
            _, loss = model(x, y)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scale = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        skipped += scaler.get_scale() < scale  # the scaler backs off only after an inf/NaN
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert skipped == 0 and losses[-1] < losses[0] - 1.0, (skipped, losses)


def test_sdpa_runs_the_fused_kernel_the_model_asks_for():
    """The model calls SDPA with is_causal and no mask: flash attention can take that. Forced onto
    the flash kernel (the memory-efficient one where flash is missing), the model's output equals
    the plain math kernel's."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    model = tiny(n_layer=2, n_head=2, n_embd=128, block_size=64, vocab_size=512).to(DEVICE)
    x, _ = batch(model)
    x = x.to(DEVICE)
    dtype = torch.bfloat16
    with torch.no_grad(), torch.autocast(KIND, dtype=dtype):
        with sdpa_kernel(SDPBackend.MATH):
            ref = model(x, x)[0].float()
        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
            try:
                with sdpa_kernel(backend):
                    out = model(x, x)[0].float()
                break
            except RuntimeError:  # "No available kernel": try the next
                continue
        else:
            pytest.fail("neither flash nor memory-efficient attention runs the model's attention")
    print(f"\nsdpa kernel: {backend.name} on {DEVICE}")
    torch.testing.assert_close(out, ref, rtol=0.05, atol=0.05)


def test_kv_cache_decoding_equals_recompute():
    from model import KVCache
    model = model128().to(DEVICE).eval()
    x, _ = batch(model, B=2, T=40)
    x = x.to(DEVICE)
    with torch.no_grad():
        full = model(x, x)[0]
        cache = KVCache(model.config, 2, DEVICE)
        steps = [model(x[:, :8], cache=cache)[0]]
        steps += [model(x[:, t:t + 1], cache=cache)[0] for t in range(8, 40)]
    torch.testing.assert_close(torch.cat(steps, 1), full[:, 7:], rtol=1e-4, atol=1e-4)


def test_a_checkpoint_written_on_the_gpu_loads_on_the_cpu_and_back(tmp_path):
    from checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
    model = model128().to(DEVICE)
    x, y = batch(model)
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), KIND)
    model(x.to(DEVICE), y.to(DEVICE))[1].backward()
    opt.step()
    path = str(tmp_path / 'ckpt.pt')
    save_checkpoint({'model': model.state_dict(), 'model_args': vars(model.config),
                     'optimizer': opt.state_dict()}, path)
    on_cpu = load_checkpoint(path)
    assert all(t.device.type == 'cpu' for t in on_cpu['model'].values())
    back = load_checkpoint(path, DEVICE)
    assert all(t.device.type == KIND for t in back['model'].values())
    with torch.no_grad():
        want = model(x.to(DEVICE))[0].cpu()
        torch.testing.assert_close(model_from_checkpoint(on_cpu)(x)[0], want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(model_from_checkpoint(back).to(DEVICE)(x.to(DEVICE))[0].cpu(), want)
    model.load_state_dict(back['model'])
    opt.load_state_dict(back['optimizer'])  # and training goes on from it on the GPU
    opt.step()


@pytest.mark.slow
@pytest.mark.parametrize('dtype', ['bfloat16', 'float16'])
def test_train_compile_sample_and_eval_on_the_device(data_dir, tmp_path, dtype):
    """The scripts on the device: train.py (autocast, compiled), then eval.py and sample.py."""
    out = tmp_path / 'out'
    p = train(data_dir, out, f'--device={DEVICE}', f'--dtype={dtype}', '--compile=True',
              '--max_iters=40', '--eval_interval=20', timeout=600)
    assert f'{DEVICE}, {dtype}' in p.stdout and 'done:' in p.stdout, p.stdout
    ev = run('eval.py', f'--out_dir={out}', f'--device={DEVICE}', '--json=True')
    assert '"bpb"' in ev.stdout
    s = run('sample.py', f'--out_dir={out}', f'--device={DEVICE}', '--start=Once upon a time',
            '--max_new_tokens=30', '--seed=1')
    assert s.stdout.startswith('Once upon a time') and 'tok/s' in s.stderr


@pytest.mark.slow
def test_torchrun_on_the_device(data_dir, tmp_path):
    """DDP under torchrun on the device's backend (nccl on CUDA): as many processes as GPUs."""
    n = max(1, torch.cuda.device_count()) if DEVICE.startswith('cuda') else 2
    p = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone',
                        f'--nproc_per_node={n}', 'train.py', f'--data_dir={data_dir}',
                        f'--out_dir={tmp_path}', *TINY, f'--device={DEVICE}',
                        '--max_iters=20', '--eval_interval=10'],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    backend = 'nccl' if DEVICE.startswith('cuda') else 'gloo'
    assert f"{n} process" in p.stdout and f"({backend})" in p.stdout, p.stdout
    assert p.stdout.count('done:') == 1, p.stdout
