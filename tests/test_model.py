"""model.py checked against independent references: a NumPy implementation of LayerNorm and of
causal self-attention with RoPE (forward, and backward by analytic formula or finite differences),
causality, KV-cache equivalence, RoPE's relative-position property, and the samplers."""
import math

import numpy as np
import pytest
import torch

from conftest import tiny
from model import GPT, GPTConfig, KVCache, apply_rope, rope_cache, sample

torch.set_num_threads(2)


# ---------------------------------------------------------------- NumPy references (float64)

def np_layernorm(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def np_layernorm_backward(x, w, dy, eps=1e-5):
    """Analytic gradients of LayerNorm: dx, dw, db (Ba et al. 2016)."""
    mu = x.mean(-1, keepdims=True)
    rstd = 1 / np.sqrt(x.var(-1, keepdims=True) + eps)
    xhat = (x - mu) * rstd
    dxhat = dy * w
    dx = rstd * (dxhat - dxhat.mean(-1, keepdims=True) - xhat * (dxhat * xhat).mean(-1, keepdims=True))
    red = tuple(range(x.ndim - 1))
    return dx, (dy * xhat).sum(red), dy.sum(red)


def np_rope(x, pos0=0, theta=10000.0):
    """RoPE written from the paper: pair (2i, 2i+1) of position t rotated by t * theta^(-2i/d)."""
    T, d = x.shape[-2], x.shape[-1]
    out = np.empty_like(x)
    for t in range(T):
        for i in range(d // 2):
            a = (pos0 + t) * theta ** (-2 * i / d)
            x1, x2 = x[..., t, 2 * i], x[..., t, 2 * i + 1]
            out[..., t, 2 * i] = x1 * math.cos(a) - x2 * math.sin(a)
            out[..., t, 2 * i + 1] = x1 * math.sin(a) + x2 * math.cos(a)
    return out


def np_attention(x, Wqkv, bqkv, Wo, bo, n_head):
    """Causal multi-head self-attention with RoPE on q and k; x (B, T, C), weights as nn.Linear."""
    B, T, C = x.shape
    hd = C // n_head
    q, k, v = np.split(x @ Wqkv.T + bqkv, 3, axis=-1)
    heads = lambda a: a.reshape(B, T, n_head, hd).transpose(0, 2, 1, 3)
    q, k, v = np_rope(heads(q)), np_rope(heads(k)), heads(v)
    att = q @ k.transpose(0, 1, 3, 2) / math.sqrt(hd)
    att = np.where(np.tril(np.ones((T, T), bool)), att, -np.inf)
    att = np.exp(att - att.max(-1, keepdims=True))
    att /= att.sum(-1, keepdims=True)
    y = (att @ v).transpose(0, 2, 1, 3).reshape(B, T, C)
    return y @ Wo.T + bo


# ---------------------------------------------------------------- modules against references

def test_layernorm_forward_backward_matches_numpy():
    model = tiny().double()
    ln = model.transformer.h[0].ln_1
    torch.nn.init.normal_(ln.weight)
    torch.nn.init.normal_(ln.bias)
    x = torch.randn(3, 5, 32, dtype=torch.float64, requires_grad=True)
    y = ln(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    w, b = ln.weight.detach().numpy(), ln.bias.detach().numpy()
    np.testing.assert_allclose(y.detach().numpy(), np_layernorm(x.detach().numpy(), w, b), atol=1e-10)
    dx, dw, db = np_layernorm_backward(x.detach().numpy(), w, dy.numpy())
    np.testing.assert_allclose(x.grad.numpy(), dx, atol=1e-10)
    np.testing.assert_allclose(ln.weight.grad.numpy(), dw, atol=1e-10)
    np.testing.assert_allclose(ln.bias.grad.numpy(), db, atol=1e-10)


@pytest.mark.parametrize('compiling', [False, True])  # torch.compile gets the real-number form
def test_rope_matches_numpy_definition(monkeypatch, compiling):
    monkeypatch.setattr(torch.compiler, 'is_compiling', lambda: compiling)
    x = torch.randn(2, 3, 7, 8, dtype=torch.float64)
    cos, sin = rope_cache(10, 8)
    got = apply_rope(x, cos[3:10].double(), sin[3:10].double())
    np.testing.assert_allclose(got.numpy(), np_rope(x.numpy(), pos0=3), atol=1e-6)


def test_attention_forward_and_backward_match_numpy():
    model = tiny().double()
    attn = model.transformer.h[0].attn
    torch.nn.init.normal_(attn.c_attn.bias, std=0.1)
    torch.nn.init.normal_(attn.c_proj.bias, std=0.1)
    torch.nn.init.normal_(attn.c_attn.weight, std=0.3)
    T = 6
    x = torch.randn(2, T, 32, dtype=torch.float64, requires_grad=True)
    rope = model.rope_cos[:T].double(), model.rope_sin[:T].double()
    y = attn(x, rope)
    params = [p.detach().numpy().copy() for p in
              (attn.c_attn.weight, attn.c_attn.bias, attn.c_proj.weight, attn.c_proj.bias)]
    ref = np_attention(x.detach().numpy(), *params, n_head=2)
    np.testing.assert_allclose(y.detach().numpy(), ref, atol=1e-5)  # rope tables are float32

    # backward: autograd against central finite differences of the NumPy forward
    dy = np.random.default_rng(0).standard_normal(ref.shape)
    y.backward(torch.from_numpy(dy))
    f = lambda xs, ps: (np_attention(xs, *ps, n_head=2) * dy).sum()
    rng, h = np.random.default_rng(1), 1e-6
    xs = x.detach().numpy().copy()
    for _ in range(8):
        i = tuple(rng.integers(s) for s in xs.shape)
        xp, xm = xs.copy(), xs.copy()
        xp[i] += h
        xm[i] -= h
        assert x.grad.numpy()[i] == pytest.approx((f(xp, params) - f(xm, params)) / (2 * h), abs=1e-5)
    grads = [attn.c_attn.weight.grad, attn.c_attn.bias.grad, attn.c_proj.weight.grad, attn.c_proj.bias.grad]
    for j, g in enumerate(grads):
        for _ in range(4):
            i = tuple(rng.integers(s) for s in params[j].shape)
            pp = [p.copy() for p in params]
            pm = [p.copy() for p in params]
            pp[j][i] += h
            pm[j][i] -= h
            assert g.numpy()[i] == pytest.approx((f(xs, pp) - f(xs, pm)) / (2 * h), abs=1e-5)


def test_rope_scores_depend_only_on_distance():
    cos, sin = rope_cache(64, 16)
    q, k = torch.randn(16), torch.randn(16)
    rot = lambda v, t: apply_rope(v.view(1, 1, 1, 16), cos[t], sin[t]).flatten()
    for d in (0, 1, 5, 20):
        scores = [rot(q, t + d) @ rot(k, t) for t in (0, 7, 30, 43)]
        assert max(scores) - min(scores) < 1e-4
    assert abs(rot(q, 10) @ rot(k, 0) - rot(q, 11) @ rot(k, 0)) > 1e-3  # and do depend on it


# ---------------------------------------------------------------- the whole model

@pytest.mark.parametrize("pos_emb", ["rope", "learned"])
def test_causality(pos_emb):
    model = tiny(pos_emb=pos_emb).eval()
    idx = torch.randint(0, 97, (2, 20))
    logits, _ = model(idx, targets=idx)
    changed = idx.clone()
    changed[:, 12:] = torch.randint(0, 97, (2, 8))
    logits2, _ = model(changed, targets=changed)
    torch.testing.assert_close(logits[:, :12], logits2[:, :12], rtol=0, atol=1e-6)
    assert (logits[:, 12:] - logits2[:, 12:]).abs().max() > 1e-3


def test_loss_is_mean_cross_entropy_and_last_logits_without_targets():
    model = tiny().eval()
    idx, tgt = torch.randint(0, 97, (2, 10)), torch.randint(0, 97, (2, 10))
    logits, loss = model(idx, targets=tgt)
    assert logits.shape == (2, 10, 97)
    logp = torch.log_softmax(logits.double(), -1)
    ref = -logp.gather(-1, tgt.unsqueeze(-1)).mean()
    assert loss.item() == pytest.approx(ref.item(), abs=1e-5)
    last, none = model(idx)
    assert none is None and last.shape == (2, 1, 97)
    torch.testing.assert_close(last[:, 0], logits[:, -1], rtol=0, atol=1e-5)


def test_kv_cache_matches_full_recompute_every_step_across_block_size():
    """The logits behind each sampled token equal a fresh forward pass over the context the
    cache holds: the prompt, then every generated token, and after the cache fills (16 tokens)
    the most recent 8, run again."""
    model = tiny(block_size=16).eval()
    idx = torch.randint(0, 97, (2, 5))
    calls = []
    orig = model.forward

    def spy(ids, targets=None, cache=None):
        out = orig(ids, targets, cache)
        calls.append((ids.size(1), out[0][:, -1]))
        return out
    model.forward = spy
    out = model.generate(idx, 40, temperature=0)
    model.forward = orig
    assert out.shape == (2, 45)
    # the first call is the prompt's; after it, a call of one token is each step, and one of 7
    # tokens the refill of a full cache (whose logits are not sampled from)
    used = [calls[0][1]] + [logits for T, logits in calls[1:] if T == 1]
    assert len(used) == 41 and {T for T, _ in calls[1:]} == {1, 7}
    start = 0
    for n, logits in zip(range(5, 46), used):  # n: tokens so far; the cache holds start..n-1
        if n - start > 16:
            start = n - 8
        ref, _ = orig(out[:, start:n])
        torch.testing.assert_close(logits, ref[:, -1], rtol=0, atol=1e-5)
    assert start > 0  # the window moved


@pytest.mark.parametrize("pos_emb", ["rope", "learned"])
def test_a_batch_of_rows_at_their_own_positions_matches_each_row_alone(pos_emb):
    """What a server's batch does: sequences of different lengths in rows of one cache, each
    step one token per row at that row's position, equal to a full forward pass of each."""
    model = tiny(block_size=32, pos_emb=pos_emb).eval()
    seqs = [torch.randint(0, 97, (1, n)) for n in (3, 11, 7)]
    cache = KVCache(model.config, 3)
    with torch.no_grad():
        for i, s in enumerate(seqs):
            model(s, cache=cache.rows(i, i + 1))  # each prompt into its own row
        for _ in range(12):
            token = torch.randint(0, 97, (3, 1))
            logits = model(token, cache=cache)[0][:, -1]
            seqs = [torch.cat((s, token[[i]]), 1) for i, s in enumerate(seqs)]
            for i, s in enumerate(seqs):
                torch.testing.assert_close(logits[i], model(s)[0][0, -1], rtol=0, atol=1e-5)
    assert cache.pos.tolist() == [15, 23, 19]


def test_a_cache_takes_several_tokens_after_earlier_ones_and_refuses_too_many():
    """A second call of several tokens sees the first call's keys (an explicit mask, rows at
    different positions too), and a row that would pass block_size is refused."""
    model = tiny(block_size=16).eval()
    ids = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        for first in ([5, 5], [5, 8]):  # both rows at one position, then at two
            cache = KVCache(model.config, 2)
            for r, n in enumerate(first):
                model(ids[r:r + 1, :n], cache=cache.rows(r, r + 1))
            logits = [model(ids[r:r + 1, n:n + 4], cache=cache.rows(r, r + 1))[0][0, -1] for r, n in enumerate(first)]
            for r, n in enumerate(first):
                torch.testing.assert_close(logits[r], model(ids[r:r + 1, :n + 4])[0][0, -1], rtol=0, atol=1e-5)
        with pytest.raises(AssertionError, match='block_size'):
            model(ids[:, :5], cache=cache)  # row 1 holds 12 tokens: 17 > 16


def test_prompt_longer_than_block_size_is_cropped():
    model = tiny(block_size=16).eval()
    idx = torch.randint(0, 97, (1, 40))
    out = model.generate(idx, 3, temperature=0)
    ref_logits, _ = model(idx[:, -16:])
    assert out[0, 40].item() == ref_logits[0, -1].argmax().item()


def test_greedy_is_deterministic_and_stop_token_ends_generation():
    """A row that emits the stop token keeps emitting it; generation ends once every row has."""
    model = tiny().eval()
    idx = torch.randint(0, 97, (3, 4))
    a = model.generate(idx, 20, temperature=0)
    b = model.generate(idx, 20, temperature=0)
    assert torch.equal(a, b)
    stop = a[0, 6].item()  # the token row 0 greedily emits third
    first = [next((j for j in range(4, 24) if a[r, j] == stop), None) for r in range(3)]
    c = model.generate(idx, 20, temperature=0, stop_token=stop)
    for r, j in enumerate(first):  # each row as before up to its stop token, then only that
        end = 24 if j is None else j
        assert torch.equal(c[r, :end], a[r, :end]) and (c[r, end:] == stop).all()
    expected = 24 if None in first else max(first) + 1
    assert c.size(1) == expected
    one = model.generate(idx[:1], 20, temperature=0, stop_token=stop)  # alone: it ends at its stop
    assert one.size(1) == first[0] + 1 < 24 and torch.equal(one[0], a[0, :first[0] + 1])


def test_top_k_and_top_p_never_sample_outside_their_sets():
    torch.manual_seed(0)
    logits = torch.randn(4, 50) * 3
    probs = torch.softmax(logits, -1)
    topk = [set(torch.topk(logits[r], 5).indices.tolist()) for r in range(4)]
    sorted_p, order = probs.sort(-1, descending=True)
    nucleus = []
    for r in range(4):
        k = int((sorted_p[r].cumsum(0) < 0.8).sum()) + 1  # smallest prefix reaching 0.8
        nucleus.append(set(order[r, :k].tolist()))
    for _ in range(200):
        t = sample(logits, 1.0, top_k=5).squeeze(1)
        assert all(t[r].item() in topk[r] for r in range(4))
        t = sample(logits, 1.0, top_p=0.8).squeeze(1)
        assert all(t[r].item() in nucleus[r] for r in range(4))
    seen = {sample(logits, 1.0, top_p=0.8)[0].item() for _ in range(400)}
    assert seen == nucleus[0]  # and every token of the nucleus can come out
    assert torch.equal(sample(logits, 0).squeeze(1), logits.argmax(-1))


@pytest.mark.parametrize("top_k, top_p", [(None, 0.7), (3, 0.9), (None, 0.3), (4, None)])
def test_sampling_follows_the_renormalised_truncated_distribution(top_k, top_p):
    # the reference sorts the vocabulary, as Holtzman et al. describe: keep the top_k most
    # likely tokens and the smallest prefix reaching top_p, then renormalise
    torch.manual_seed(0)
    logits = torch.tensor([2.0, 1.5, 1.4, 0.5, 0.0, -0.5, -1.0, -3.0])
    p, order = torch.softmax(logits, -1).sort(descending=True)
    keep = torch.ones(8, dtype=torch.bool)
    if top_k:
        keep[top_k:] = False
    if top_p:
        keep &= p.cumsum(0) - p < top_p
    expected = torch.zeros(8).scatter(0, order, torch.where(keep, p, 0.0))
    expected /= expected.sum()
    n = 40_000
    draws = sample(logits.expand(n, 8), 1.0, top_k, top_p).squeeze(1)
    freq = torch.bincount(draws, minlength=8).float() / n
    assert (freq - expected).abs().max() < 0.01, (freq, expected)


def test_dropout_and_attn_dropout_act_only_when_set_and_only_in_training():
    x = torch.randint(0, 97, (2, 16))
    for kw, random_in_training in [({}, False), ({'dropout': 0.5}, True), ({'attn_dropout': 0.5}, True)]:
        model = tiny(**kw).train()
        assert torch.equal(model(x)[0], model(x)[0]) != random_in_training, kw
        model.eval()
        assert torch.equal(model(x)[0], model(x)[0]), kw


def test_tiny_model_overfits_one_batch():
    model = tiny()
    idx = torch.randint(0, 97, (4, 32))
    opt = model.configure_optimizers(0.0, 3e-3, (0.9, 0.99))
    for _ in range(150):
        _, loss = model(idx[:, :-1], targets=idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05


def test_weight_tying_survives_save_and_load(tmp_path):
    model = tiny()
    assert model.lm_head.weight is model.transformer.wte.weight
    torch.save(model.state_dict(), tmp_path / "m.pt")
    m2 = tiny(bias=True)
    torch.nn.init.zeros_(m2.lm_head.weight)
    m2.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True))
    assert m2.lm_head.weight is m2.transformer.wte.weight
    torch.testing.assert_close(m2.transformer.wte.weight, model.lm_head.weight)
    idx = torch.randint(0, 97, (1, 8))
    torch.testing.assert_close(m2(idx)[0], model(idx)[0])


def test_20m_model_size_and_weight_decay_groups():
    model = GPT(GPTConfig(block_size=512, vocab_size=16000, n_layer=8, n_head=6, n_embd=384))
    assert model.get_num_params() == 20_306_304  # 16000*384 + 8 * (12*384^2 + 2*384) + 384
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95))
    decayed, plain = opt.param_groups
    assert all(p.dim() == 2 for p in decayed['params']) and all(p.dim() == 1 for p in plain['params'])


def test_gradient_checkpointing_gives_same_loss_and_grads():
    model = tiny(dropout=0.1)
    idx = torch.randint(0, 97, (2, 16))
    grads = []
    for gc in (False, True):
        model.grad_checkpoint = gc
        model.zero_grad()
        torch.manual_seed(1)
        _, loss = model(idx, targets=idx)
        loss.backward()
        grads.append((loss.item(), model.lm_head.weight.grad.clone()))
    assert grads[0][0] == grads[1][0]
    torch.testing.assert_close(grads[0][1], grads[1][1])


def test_a_tiny_temperature_or_top_p_samples_the_most_likely_token_and_returns():
    """logits / 1e-300 would be inf - inf = NaN in the softmax, and nucleus sampling's
    rejection loop would never end on NaN probabilities."""
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    for t in (1e-300, 1e-30, 1e-8):
        assert torch.equal(sample(logits, t, top_p=0.5).squeeze(1), logits.argmax(-1))
        assert torch.equal(sample(logits, t, top_k=3).squeeze(1), logits.argmax(-1))
    # a top_p below float32's smallest number: the nucleus is the most likely token, not empty
    assert torch.equal(sample(logits, 2.0, top_p=1e-300).squeeze(1), logits.argmax(-1))
