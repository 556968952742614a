"""
What turns a trained model into a faster one for sampling, each variant behind its own setting:
dynamic int8 (quantize='int8'), Intel's IPEX (ipex=True), and otherwise, on the CPU, a weight
layout that lets every core read its share of each weight matrix.
"""
import warnings

import torch

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
        y = torch.bmm(x.reshape(1, -1, in_f).expand(parts, -1, -1), self.blocks)
        y = y.transpose(0, 1).reshape(*x.shape[:-1], -1)  # the blocks side by side again
        return y if self.bias is None else y + self.bias


def optimize_for_inference(model, quantize='none', ipex=False):
    """The model as sample.py and bench.py run it. Use the model returned: int8 makes a copy,
    the CPU layout changes `model` itself."""
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
    return model
