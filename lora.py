"""
LoRA (Hu et al. 2021, https://arxiv.org/abs/2106.09685): fine-tune a frozen model through a
low-rank update of some of its Linears, W x + (alpha / r) B A x, with A (r x in) random and
B (out x r) zero, so that training starts exactly at the base model and only A and B learn.

    add_lora(model, rank=8, alpha=16, targets='c_attn,c_proj,c_fc')  # freezes the rest
    adapter = lora_state(model)                                       # only A and B
    merged = merge(base_state_dict, adapter, alpha / rank)            # plain weights again
"""
import math

import torch
import torch.nn as nn


class LoRALinear(nn.Module):
    """A frozen Linear plus its trainable low-rank update."""

    def __init__(self, base, rank, alpha):
        super().__init__()
        self.base, self.scale = base, alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear (and PEFT) do

    def forward(self, x):
        return self.base(x) + (x @ self.lora_A.t() @ self.lora_B.t()) * self.scale


def add_lora(model, rank, alpha, targets):
    """Wrap every Linear inside the blocks whose name is one of `targets` (comma-separated,
    e.g. 'c_attn,c_proj,c_fc'; c_proj is both attention's and the MLP's) and freeze everything
    else. Returns the names of the wrapped Linears."""
    names = {t.strip() for t in targets.split(',') if t.strip()}
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = []
    for parent_name, parent in model.transformer.h.named_modules():
        for name, child in list(parent.named_children()):
            if name in names and isinstance(child, nn.Linear):
                setattr(parent, name, LoRALinear(child, rank, alpha))
                wrapped.append(f'transformer.h.{parent_name}.{name}')
    return wrapped


def lora_state(model):
    """The adapter's tensors only: {'transformer.h.0.attn.c_attn.lora_A': ..., ...}."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if '.lora_' in k}


def merge(state, adapter, scale):
    """The base model's state dict with each adapted weight replaced by W + scale B A."""
    state = dict(state)
    for key in adapter:
        if key.endswith('.lora_A'):
            module = key[:-len('.lora_A')]
            delta = adapter[f'{module}.lora_B'].float() @ adapter[key].float() * scale
            state[f'{module}.weight'] = state[f'{module}.weight'] + delta.to(state[f'{module}.weight'].dtype)
    return state


def unwrap_state(state):
    """A LoRA model's state dict under the base model's names (its 'base.' level removed), the
    adapter left out."""
    return {k.replace('.base.', '.'): v for k, v in state.items() if '.lora_' not in k}
