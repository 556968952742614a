"""The whole GPT in one file, to be read top to bottom: a decoder-only transformer (GPT-2,
Radford et al. 2019, https://github.com/openai/gpt-2) with rotary position embeddings (RoPE,
Su et al. 2021, https://arxiv.org/abs/2104.09864) in place of learned positions, a key/value
cache for fast sampling, and the samplers. Names and shape follow nanoGPT (karpathy/nanoGPT).
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint


@dataclass
class GPTConfig:
    block_size: int = 512     # context length in tokens
    vocab_size: int = 4096
    n_layer: int = 8
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.0      # on the embeddings and on each sublayer's output
    attn_dropout: float = 0.0  # on the attention weights: it takes PyTorch off its fused CPU kernel
    bias: bool = False        # biases in Linears and LayerNorms: True is GPT-2; False is a bit faster
    pos_emb: str = 'rope'     # 'rope', or 'learned' (GPT-2's absolute positions) to compare
    rope_theta: float = 10000.0


def rope_cache(T, head_dim, theta=10000.0):
    """cos and sin of the angle t * theta^(-2i/d) for every position t < T and pair i < d/2."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2).float() / head_dim)
    angles = torch.outer(torch.arange(T).float(), inv_freq)  # (T, head_dim/2)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate each pair (x1, x2) of x's last dim (..., T, hd) by its position's angle, as x1 + i x2
    times cos + i sin: lengths stay, and q.k depends only on the distance between positions."""
    if torch.compiler.is_compiling():  # inductor has no complex numbers: the same product in reals
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2).type_as(x)
    dt = torch.promote_types(x.dtype, torch.float32)  # there are no bfloat16 complex numbers
    pairs = torch.view_as_complex(x.to(dt).unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * torch.complex(cos.to(dt), sin.to(dt))).flatten(-2).type_as(x)


class KVCache:
    """The keys and values of every layer for B rows, each with its own length (a server's batch).
    A forward pass appends T tokens to every row: claim() places them, append() stores them."""

    def __init__(self, config, batch_size, device=None, dtype=None):
        hd = config.n_embd // config.n_head
        self.kv = torch.zeros(config.n_layer, 2, batch_size, config.n_head, config.block_size, hd,
                              device=device, dtype=dtype)
        self.pos = torch.zeros(batch_size, dtype=torch.long, device=device)  # tokens held, per row

    def rows(self, start, stop):
        """Rows start..stop-1 as a cache of their own, sharing this one's memory."""
        view = object.__new__(KVCache)
        view.kv, view.pos = self.kv[:, :, start:stop], self.pos[start:stop]
        return view

    def claim(self, T):
        """The positions (B, T) of each row's next T tokens. The mask of the keys they see is None
        where plain causal attention is right: all rows at one place, with one token or from 0."""
        self.t = self.pos[:, None] + torch.arange(T, device=self.pos.device)
        first, last = (int(p) for p in self.pos.aminmax())
        self.n, self.first = last + T, first if first == last else None  # keys in use; a shared start
        assert self.n <= self.kv.size(4), f"{self.n} tokens > block_size {self.kv.size(4)}"
        same = first == last and (T == 1 or first == 0)
        self.mask = None if same else torch.arange(self.n, device=self.t.device) <= self.t[:, None, :, None]
        self.pos += T
        return self.t

    def append(self, layer, k, v):
        """Store k, v (B, nh, T, hd) at the claimed positions; return every key and value so far."""
        if self.first is not None:  # every row at one place: a slice, cheaper than indexing
            self.kv[layer, :, :, :, self.first:self.n] = torch.stack((k, v))
        else:
            rows = torch.arange(k.size(0), device=k.device)[:, None]
            self.kv[layer, 0, rows, :, self.t] = k.transpose(1, 2)  # (B, T, nh, hd): rows x positions
            self.kv[layer, 1, rows, :, self.t] = v.transpose(1, 2)
        return self.kv[layer, 0, :, :, :self.n], self.kv[layer, 1, :, :, :self.n], self.mask


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer=0):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be a multiple of n_head"
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head, self.attn_dropout, self.layer = config.n_head, config.attn_dropout, layer

    def forward(self, x, rope=None, cache=None):
        """x: (B, T, C); with a cache, the queries also see the keys of the tokens before them."""
        B, T, C = x.size()
        # (B, T, 3C) -> (3, B, nh, T, hd): q, k, v, with the heads as a batch dimension
        qkv = self.c_attn(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if rope is not None:
            q, k = apply_rope(qkv[:2], *rope).unbind(0)  # q and k rotate in one go
        mask = None
        if cache is not None:
            k, v, mask = cache.append(self.layer, k, v)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                           dropout_p=self.attn_dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, C)  # re-assemble the heads side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-norm: normalise the input of each sublayer and add its output to the residual stream."""

    def __init__(self, config, layer=0):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, rope=None, cache=None):
        x = x + self.attn(self.ln_1(x), rope, cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.pos_emb in ('rope', 'learned'), f"unknown pos_emb {config.pos_emb!r}"
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        if config.pos_emb == 'learned':
            self.transformer.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # weight tying (Press & Wolf 2017): the output layer reuses the token embedding
        self.transformer.wte.weight = self.lm_head.weight
        if config.pos_emb == 'rope':  # fixed tables, not parameters: rebuilt, not saved in checkpoints
            cos, sin = rope_cache(config.block_size, config.n_embd // config.n_head, config.rope_theta)
            self.register_buffer('rope_cos', cos, persistent=False)
            self.register_buffer('rope_sin', sin, persistent=False)
        self.grad_checkpoint = False  # recompute each block in backward: less memory, more time
        self.apply(self._init_weights)
        # each residual branch's last Linear starts at zero, so each block starts as the identity
        # and learns what to add (Fixup, Zhang et al. 2019; GPT-2 scaled it by 1/sqrt(2 L) instead)
        for pn, p in self.named_parameters():
            if pn.endswith('c_proj.weight'):
                torch.nn.init.zeros_(p)

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            torch.nn.init.zeros_(module.bias)

    def get_num_params(self):  # the tied embedding counts once
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx, targets=None, cache=None):
        """idx: (B, T) token ids. With targets: all logits and the mean cross-entropy; without, the
        last position's only (no lm_head elsewhere). With a KVCache they continue each of its rows."""
        B, T = idx.size()
        assert cache is not None or T <= self.config.block_size, f"{T} tokens > block_size {self.config.block_size}"
        t = slice(0, T) if cache is None else cache.claim(T)  # the tokens' positions
        x = self.transformer.wte(idx)
        rope = None
        if self.config.pos_emb == 'rope':  # (T or B x T, hd/2) -> broadcast over the heads
            rope = self.rope_cos[t].unsqueeze(-3), self.rope_sin[t].unsqueeze(-3)
        else:
            x = x + self.transformer.wpe.weight[t]
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            if self.grad_checkpoint and self.training:
                x = checkpoint(block, x, rope, use_reentrant=False)
            else:
                x = block(x, rope, cache)
        x = self.transformer.ln_f(x)
        if targets is None:
            return self.lm_head(x[:, [-1], :]), None
        logits = self.lm_head(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1))
        return logits, loss

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type='cpu', muon=False):
        """AdamW; weight decay on the matrices (Linears, embedding) only, not on biases or norms.
        muon=True: Muon (muon.py) for the matrices inside the blocks, AdamW for the rest."""
        params = [p for p in self.parameters() if p.requires_grad]
        hidden = {id(p) for p in self.transformer.h.parameters() if muon and p.dim() == 2}
        groups = [{'params': [p for p in params if p.dim() >= 2 and id(p) not in hidden], 'weight_decay': weight_decay},
                  {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}]
        if muon:
            from muon import Muon  # its own file: the model does not need to know its optimizer
            muon_group = {'params': [p for p in params if id(p) in hidden], 'weight_decay': weight_decay, 'muon': True}
            return Muon([muon_group] + groups, lr=learning_rate, betas=betas)
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type == 'cuda')  # fastest on CUDA

    def flops_per_token(self, T=None):
        """Training FLOPs per token (PaLM, appendix B): 6 per parameter (the tied embedding once)
        plus 12 L C T for attention; 4 for a frozen one (LoRA's base: no gradient of its own)."""
        cfg, T = self.config, T or self.config.block_size
        frozen = sum(p.numel() for p in self.parameters() if not p.requires_grad)
        return 6 * self.get_num_params() - 2 * frozen + 12 * cfg.n_layer * cfg.n_embd * T

    @torch.inference_mode()  # no_grad, and no autograd bookkeeping on tensors either
    def stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, stop_token=None):
        """Yield (B, 1) new tokens, one per step, continuing the prompts idx (B, T). The prompt
        runs once (prefill) to fill the cache; each step then runs one token."""
        w = self.transformer.wte.weight  # float in every variant (int8 too)
        cache = KVCache(self.config, idx.size(0), w.device, w.dtype)
        step = lambda ids: self(ids, cache=cache)[0][:, -1, :]
        yield from decode(cache.pos.zero_, step, idx, self.config.block_size, max_new_tokens,
                          temperature, top_k, top_p, stop_token)

    @torch.no_grad()  # not inference_mode: the ids it returns may go into training
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, stop_token=None):
        """idx (B, T) and up to max_new_tokens sampled tokens (fewer when every row reached
        stop_token); temperature 0 is greedy, top_k and top_p restrict the choices."""
        new = list(self.stream(idx, max_new_tokens, temperature, top_k, top_p, stop_token))
        return torch.cat([idx] + new, dim=1)


def slide(context, cached, block_size):
    """The context rule, for a cache of `cached` tokens to take one more: None while there is room;
    when full, the context's last half (..., n): all but its last token run anew, then that one."""
    return None if cached < block_size else context[..., -(block_size // 2):]


def decode(reset, step, idx, block_size, max_new_tokens, temperature, top_k, top_p, stop_token):
    """The sampling loop of GPT.stream, for any model: reset() empties its cache, step(ids)
    runs the tokens ids (B, T) after those in the cache and returns the logits after the last."""
    context = idx[:, -block_size:]
    reset()
    logits, cached = step(context), context.size(1)
    done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
    for _ in range(max_new_tokens):
        token = sample(logits, temperature, top_k, top_p)
        if stop_token is not None:  # finished rows keep emitting the stop token
            token[done] = stop_token
            done |= token.squeeze(1) == stop_token
        yield token
        if stop_token is not None and done.all():
            return
        context = torch.cat((context, token), dim=1)
        if (window := slide(context, cached, block_size)) is not None:
            context, cached = window, window.size(1) - 1
            reset()
            step(context[:, :-1])
        logits, cached = step(token), cached + 1


def draw(probs, generator=None):
    """One index per row of probs (B, vocab), with probability proportional to its weight (never
    one of weight 0): one uniform draw per row, much cheaper on a CPU than torch.multinomial."""
    cdf = probs.cumsum(dim=-1)
    u = (1.0 - torch.rand(probs.size(0), 1, device=probs.device, generator=generator)) * cdf[:, -1:]
    return torch.searchsorted(cdf, u)


def sample(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """One token id per row of logits (B, vocab): greedy for temperature 0, else drawn from
    softmax(logits / temperature), only among the top_k most likely tokens and the smallest set
    whose probability reaches top_p (nucleus sampling, Holtzman et al. 2019); a token must be
    in both. generator: a torch.Generator for the random draws (default: the global one)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    # less the largest logit first: however small the temperature, the largest is then 0 / t = 0
    logits = (logits.float() - logits.float().max(dim=-1, keepdim=True).values) / temperature
    probs = F.softmax(logits.nan_to_num(nan=0.0), dim=-1)  # 0 / 0 (t = 1e-300): the largest
    if top_k is not None and top_k < probs.size(-1):
        kth = torch.topk(probs, top_k).values[:, [-1]]
        probs = probs.masked_fill(probs < kth, 0.0)  # weight 0: never drawn
    token = draw(probs, generator)
    if top_p is None or top_p >= 1.0:
        return token
    assert top_p > 0, "top_p must be in (0, 1]"
    # The nucleus without sorting the vocabulary: a token is in it when the tokens more likely
    # than it hold less than top_p (the most likely always is). Redraw the rows whose token is not
    # (rejection sampling): the kept draws follow the renormalised nucleus exactly.
    while True:
        above = torch.where(probs > probs.gather(-1, token), probs, 0.0).sum(dim=-1, keepdim=True)
        inside = (above < top_p) | (above == 0)
        if inside.all():
            return token
        token = torch.where(inside, token, draw(probs, generator))
