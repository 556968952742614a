"""
Decoding through other inference engines, with model.py's sampler, stop token and context rule,
so that sample.py (and bench.py, serve.py) give the same stories whichever engine runs the model.

    engine = make_engine('onnxruntime', ckpt, quantize='int8')
    for token in engine.stream(idx, max_new_tokens, temperature, top_k, top_p, stop_token): ...

Each engine gets the checkpoint exported on the fly (formats.py) into a temporary folder:
llama.cpp a GGUF file, ONNX Runtime its own fused graph, OpenVINO the standard ONNX graph. The
graphs take the key/value cache as inputs and return it.
"""
import atexit
import importlib
import os
import tempfile

import numpy as np
import torch

from common import die, need
from formats import ONNX_GRAPHS, export_gguf, model_args, onnx_name, quantize_weights
from model import decode

ENGINES = ('torch', 'onnxruntime', 'openvino', 'llamacpp')


class Engine:
    """What an engine provides: reset() empties its cache; step(ids) runs the tokens ids (B, T)
    after the cached ones and returns the logits (B, vocab) after the last. stream() is
    model.GPT.stream's loop on top of them."""
    block_size = 0

    def stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, stop_token=None):
        return decode(self.reset, self.step, idx, self.block_size, max_new_tokens, temperature,
                      top_k, top_p, stop_token)


_exports = {}  # (checkpoint, file name): its path, exported once per process


def exported(ckpt, export, name):
    """The path of export(ckpt, path) in a temporary folder that lives until the process ends."""
    key = (id(ckpt), name)
    if key not in _exports:
        d = tempfile.TemporaryDirectory()
        atexit.register(d.cleanup)
        _exports[key] = os.path.join(d.name, name)
        export(ckpt, _exports[key])
    return _exports[key]


class LlamaCpp(Engine):
    """llama.cpp through llama-cpp-python, on the GGUF export (q8_0 for int8); one sequence."""

    def __init__(self, ckpt, quantize='none', threads=0):
        try:
            import llama_cpp
        except ImportError:
            need('engines', "engine='llamacpp' needs llama-cpp-python (its install builds llama.cpp: minutes)")
        self.llama_cpp, self.block_size = llama_cpp, ckpt['model_args']['block_size']
        quant = 'q8_0' if quantize == 'int8' else 'f32'
        path = exported(ckpt, lambda c, p: export_gguf(c, p, quant), f'model-{quant}.gguf')
        # n_ctx is a hard limit in llama.cpp: the model's context, which stream() keeps to
        self.llm = llama_cpp.Llama(path, n_ctx=self.block_size, n_batch=self.block_size,
                                   n_threads=threads or torch.get_num_threads(), use_mmap=False,
                                   verbose=False)
        atexit.register(self.llm.close)  # before interpreter shutdown, where its __del__ fails

    def reset(self):
        self.llm.reset()

    def step(self, ids):
        if ids.size(0) != 1:
            raise ValueError("engine='llamacpp' decodes one sequence at a time")
        self.llm.eval(ids[0].tolist())
        last = self.llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)  # llama.cpp's own array
        return torch.from_numpy(np.ctypeslib.as_array(last, shape=(1, self.llm.n_vocab())).copy())


class OnnxGraph(Engine):
    """The model as an ONNX graph, run by ONNX Runtime (its own fused graph) or OpenVINO (the
    standard one): each call takes the past keys and values and returns them with the new ones
    appended."""

    def __init__(self, ckpt, engine, quantize='none', threads=0, device='cpu'):
        args = model_args(ckpt, 'onnx')
        self.block_size = args['block_size']
        L, nh, hd = args['n_layer'], args['n_head'], args['n_embd'] // args['n_head']
        threads = threads or torch.get_num_threads()
        try:
            import onnx  # noqa: F401  (both graphs are written with it)
            runtime = importlib.import_module(engine)
        except ImportError as e:
            need('engines', f"engine='{engine}' needs {e.name}")
        # OpenVINO cannot read ONNX Runtime's own operators; it takes the standard graph
        graph, quant = 'ort' if engine == 'onnxruntime' else 'standard', 'int8' if quantize == 'int8' else 'f32'
        self.path = exported(ckpt, ONNX_GRAPHS[graph], onnx_name(graph))
        if quant == 'int8':  # ONNX Runtime's int8 matmuls, which OpenVINO reads as its own
            src = self.path
            self.path = exported(ckpt, lambda c, p: quantize_weights(src, p), onnx_name(graph, quant))
        if graph == 'ort':  # a key and a value input per layer
            self.empty = lambda B: {f'past_key_values.{i}.{kv}': np.zeros((B, nh, 0, hd), np.float32)
                                    for i in range(L) for kv in ('key', 'value')}
            opts = runtime.SessionOptions()
            opts.intra_op_num_threads = threads
            # spinning threads would keep the cores busy between calls, slowing what runs beside
            opts.add_session_config_entry('session.intra_op.allow_spinning', '0')
            session = runtime.InferenceSession(self.path, opts, providers=['CPUExecutionProvider'])
            self.run = lambda feed: session.run(None, feed)
        else:
            self.empty = lambda B: {'past': np.zeros((L, 2, B, nh, 0, hd), np.float32)}
            # f32 everywhere: an Intel GPU ('GPU') would compute in f16 unless asked for f32
            config = {'INFERENCE_PRECISION_HINT': 'f32'}
            if device == 'cpu':
                config['INFERENCE_NUM_THREADS'] = threads
            core = runtime.Core()
            compiled = core.compile_model(core.read_model(self.path), device.upper(), config)
            self.run = lambda feed: list(compiled(feed).values())
        self.past = None

    def reset(self):
        self.past = None  # the graph's cache inputs, holding nothing: made at the next step

    def step(self, ids):
        past = self.past or self.empty(ids.size(0))
        logits, *present = self.run({'input_ids': ids.numpy(), **past})
        self.past = dict(zip(past, present))  # outputs in the order of the inputs
        return torch.from_numpy(logits[:, -1])


def make_engine(engine, ckpt, quantize='none', threads=0, device='cpu'):
    """The checkpoint's model run by `engine` (not 'torch': that is model.py itself). device is
    'cpu', or for OpenVINO 'gpu' (an Intel GPU, through OpenVINO's own driver)."""
    if device != 'cpu' and not (engine == 'openvino' and device == 'gpu'):
        die(f"engine='{engine}' runs on the CPU here (OpenVINO also on an Intel GPU: --device=gpu); "
            f"got --device={device}")
    if engine == 'llamacpp':
        return LlamaCpp(ckpt, quantize, threads)
    if engine in ('onnxruntime', 'openvino'):
        return OnnxGraph(ckpt, engine, quantize, threads, device)
    die(f"bad value engine={engine!r}: use one of {', '.join(ENGINES)}")
