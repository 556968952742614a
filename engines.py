"""
Decoding through other inference engines, with model.py's sampler, stop token and context rule,
so that sample.py (and bench.py) give the same stories whichever engine runs the model.

    engine = LlamaCpp(ckpt, quant='q8_0')   # the checkpoint exported to GGUF, run by llama.cpp
    for token in engine.stream(idx, max_new_tokens, temperature, top_k, top_p, stop_token): ...
"""
import atexit
import os
import tempfile

import numpy as np
import torch

from common import die
from model import sample

try:  # this module is imported only where an engine is asked for
    import llama_cpp
except ImportError:
    llama_cpp = None


class LlamaCpp:
    """A checkpoint run by llama.cpp (pip install llama-cpp-python): exported to a GGUF file on
    the fly (export.py's format), loaded into memory, the file removed. One sequence at a time."""

    def __init__(self, ckpt, quant='f32', threads=0):
        if llama_cpp is None:
            die("engine='llamacpp' needs llama-cpp-python (it builds llama.cpp, some minutes): "
                "pip install llama-cpp-python gguf")
        from export import export_gguf
        self.block_size = ckpt['model_args']['block_size']
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, f'model-{quant}.gguf')
            export_gguf(ckpt, path, quant)
            # n_ctx is a hard limit in llama.cpp: the model's context, which stream() keeps to
            self.llm = llama_cpp.Llama(path, n_ctx=self.block_size, n_batch=self.block_size,
                                       n_threads=threads or torch.get_num_threads(), use_mmap=False,
                                       verbose=False)
        atexit.register(self.llm.close)  # before interpreter shutdown, where its __del__ fails

    def logits(self, tokens):
        """Run tokens after those already in the cache; the logits (1, vocab) after the last."""
        self.llm.eval(tokens)
        last = llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)  # llama.cpp's own array
        return torch.from_numpy(np.ctypeslib.as_array(last, shape=(1, self.llm.n_vocab())).copy())

    def stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, stop_token=None):
        """model.GPT.stream for one prompt idx (1, T): yields (1, 1) tokens."""
        if idx.size(0) != 1:
            raise ValueError("engine='llamacpp' decodes one sequence at a time")
        context = idx[0, -self.block_size:].tolist()
        self.llm.reset()
        logits = self.logits(context)
        for _ in range(max_new_tokens):
            token = sample(logits, temperature, top_k, top_p)
            yield token
            if token.item() == stop_token:
                return
            context.append(token.item())
            if self.llm.n_tokens == self.block_size:  # full: restart from the most recent half
                context = context[-(self.block_size // 2):]
                self.llm.reset()
                logits = self.logits(context)
            else:
                logits = self.logits([token.item()])
