"""
What turns a trained model into a faster one for sampling, each variant behind its own setting:
dynamic int8 (quantize='int8'), Intel's IPEX (ipex=True), and otherwise, on the CPU, a weight
layout that lets every core read its share of each weight matrix and a leaner decoding step.
"""
import warnings

import torch
import torch.nn.functional as F

from common import import_ipex

QUANTIZE = ('none', 'int8')  # the quantize setting's choices


class ThreadedLinear(torch.nn.Module):
    """A Linear whose output rows are cut into contiguous blocks, 8 a thread, multiplied as a
    batch (one torch.bmm) that the threads share. Decoding multiplies each weight matrix by one
    vector, and the time goes in reading the weights: MKL does that product on one core, and
    8 blocks a thread read them faster than one (docs/benchmarks.md). Same values as the
    Linear, in another memory order."""

    def __init__(self, linear, threads):
        super().__init__()
        out_f, in_f = linear.weight.shape
        parts = max(p for p in range(1, 8 * threads + 1) if out_f % p == 0)
        w = linear.weight.detach().view(parts, out_f // parts, in_f)
        self.register_buffer('blocks', w.transpose(1, 2).contiguous())  # (parts, in, out/parts)
        self.bias = linear.bias

    def forward(self, x):
        parts, in_f, _ = self.blocks.shape
        rows = x if x.dim() == 2 else x.reshape(-1, in_f)
        y = torch.bmm(rows.expand(parts, -1, -1), self.blocks)  # (parts, rows, out/parts)
        if y.size(1) == 1:  # one row (a decoding step): the blocks already lie side by side
            y = y.view(*x.shape[:-1], -1)
        else:
            y = y.transpose(0, 1).reshape(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias


def native_gelu(x):
    """F.gelu by PyTorch's own kernel, not oneDNN's, which F.gelu calls on a CPU and which costs
    several times more for one row (docs/benchmarks.md); the two differ by one unit in the last
    place at most."""
    was = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        return F.gelu(x)
    finally:
        torch.backends.mkldnn.enabled = was


class OneTokenForward:
    """GPT.forward for a decoding step: one new token a row, every row of the cache at one place.
    The same math, written out in functions over the model's weights, because a token of a
    small model is mostly PyTorch's cost per operation and per module call, not arithmetic
    (docs/benchmarks.md): no module calls, q and k rotated together by one complex product with
    the position's rotation made once a step, k and v written straight into the cache, no mask,
    no dropout. Every other call (a prompt, rows at different places, targets, training) runs the
    model's own forward."""

    def __init__(self, model):
        self.model, self.forward = model, model.forward

    def __call__(self, idx, targets=None, cache=None):
        m, (B, T) = self.model, idx.shape
        if cache is None or targets is not None or T != 1 or m.training or \
                (B > 1 and bool((cache.pos != cache.pos[0]).any())):
            return self.forward(idx, targets, cache)
        C, nh, rope = m.config.n_embd, m.config.n_head, m.config.pos_emb == 'rope'
        p = int(cache.pos[0])  # the new token's position
        assert p < cache.kv.size(4), f"{p + 1} tokens > block_size {cache.kv.size(4)}"
        cache.pos += 1
        # every layer's keys and values up to the new token, (B, nh, p + 1, hd) each: views of the cache
        keys, values = (kv.unbind(0) for kv in cache.kv.narrow(4, 0, p + 1).unbind(1))
        x = F.embedding(idx.view(B), m.transformer.wte.weight)  # (B, C)
        if rope:  # cos + i sin of the position's angles, as apply_rope builds them
            rotation = torch.complex(m.rope_cos[p].float(), m.rope_sin[p].float())
        else:
            x = x + m.transformer.wpe.weight[p]
        cast = x.dtype != torch.float32  # there are no bfloat16 complex numbers
        for block, k_all, v_all in zip(m.transformer.h, keys, values):
            attn, mlp = block.attn, block.mlp
            h = F.layer_norm(x, (C,), block.ln_1.weight, block.ln_1.bias)
            # .forward: the layer's math without the module call around it
            qkv = attn.c_attn.forward(h).view(B, 3, nh, 1, C // nh)  # q, k, v: (B, nh, 1, hd) each
            qk = qkv[:, :2]
            if rope:  # q and k as complex pairs, rotated in one product
                qk = torch.view_as_complex((qk.float() if cast else qk).unflatten(-1, (-1, 2))) * rotation
                qk = torch.view_as_real(qk).flatten(-2)
                qk = qk.type_as(x) if cast else qk
            q, k = qk.unbind(1)
            k_all[:, :, p:] = k
            v_all[:, :, p:] = qkv[:, 2]
            y = F.scaled_dot_product_attention(q, k_all, v_all)
            x = x + attn.c_proj.forward(y.reshape(B, C))  # T = 1: the heads already side by side
            h = F.layer_norm(x, (C,), block.ln_2.weight, block.ln_2.bias)
            x = x + mlp.c_proj.forward(native_gelu(mlp.c_fc.forward(h)))
        x = F.layer_norm(x, (C,), m.transformer.ln_f.weight, m.transformer.ln_f.bias)
        return m.lm_head.forward(x).view(B, 1, -1), None


def optimize_for_inference(model, quantize='none', ipex=False):
    """The model as sample.py and bench.py run it. Use the model returned: int8 makes a copy,
    the CPU layout and the decoding step change `model` itself."""
    if quantize == 'int8':
        # dynamic int8: weights stored as int8, activations quantized on the fly, per matmul.
        # The tied lm_head is quantized too (a large matmul every token); the embedding lookup
        # keeps its float copy, as a lookup costs nothing to speak of.
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')  # torch.ao.quantization is deprecated, still works
            model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    if ipex:
        model = import_ipex().optimize(model)
    if quantize == 'none' and not ipex and next(model.parameters()).device.type == 'cpu':
        # the embedding keeps the tied matrix for its lookups
        threads = torch.get_num_threads()
        for m in [m for m in model.modules() if not isinstance(m, torch.nn.Linear)]:
            for name, child in list(m.named_children()):
                if isinstance(child, torch.nn.Linear):  # one at a time: the old weight goes at once
                    setattr(m, name, ThreadedLinear(child, threads))
        model.forward = OneTokenForward(model)  # what calling the model runs, for this model only
    return model
