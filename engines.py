"""
Decoding through other inference engines, with model.py's sampler, stop token and context rule,
so that sample.py (and bench.py) give the same stories whichever engine runs the model.

    engine = make_engine('onnxruntime', ckpt, quantize='int8')
    for token in engine.stream(idx, max_new_tokens, temperature, top_k, top_p, stop_token): ...

Each engine gets the checkpoint exported on the fly (export.py's formats) into a temporary
folder: llama.cpp a GGUF file, ONNX Runtime and OpenVINO an ONNX graph with the key/value cache
as an input and an output.
"""
import atexit
import logging
import os
import tempfile

import numpy as np
import torch

from common import die
from model import decode

ENGINES = ('torch', 'onnxruntime', 'openvino', 'llamacpp')


class Engine:
    """What an engine provides: start(context) runs the prompts (B, T) from an empty cache,
    step(tokens, pos) runs one token (B, 1) more; both return the logits (B, vocab) after the
    last. stream() is model.GPT.stream's loop on top of them."""
    block_size = 0

    def stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, stop_token=None):
        return decode(self.start, self.step, idx, self.block_size, max_new_tokens, temperature,
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
            die("engine='llamacpp' needs llama-cpp-python (it builds llama.cpp, some minutes): "
                "pip install llama-cpp-python gguf")
        from export import export_gguf
        self.llama_cpp, self.block_size = llama_cpp, ckpt['model_args']['block_size']
        quant = 'q8_0' if quantize == 'int8' else 'f32'
        path = exported(ckpt, lambda c, p: export_gguf(c, p, quant), f'model-{quant}.gguf')
        # n_ctx is a hard limit in llama.cpp: the model's context, which stream() keeps to
        self.llm = llama_cpp.Llama(path, n_ctx=self.block_size, n_batch=self.block_size,
                                   n_threads=threads or torch.get_num_threads(), use_mmap=False,
                                   verbose=False)
        atexit.register(self.llm.close)  # before interpreter shutdown, where its __del__ fails

    def logits(self, tokens):
        self.llm.eval(tokens)
        last = self.llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)  # llama.cpp's own array
        return torch.from_numpy(np.ctypeslib.as_array(last, shape=(1, self.llm.n_vocab())).copy())

    def start(self, context):
        if context.size(0) != 1:
            raise ValueError("engine='llamacpp' decodes one sequence at a time")
        self.llm.reset()
        return self.logits(context[0].tolist())

    def step(self, tokens, pos=None):
        return self.logits(tokens[0].tolist())


class OnnxGraph(Engine):
    """The ONNX export (export.py --format=onnx) run by ONNX Runtime or OpenVINO: each call
    takes the past keys and values and returns them with the new ones appended."""

    def __init__(self, ckpt, engine, quantize='none', threads=0, device='cpu'):
        from export import export_onnx
        args = ckpt['model_args']
        self.block_size = args['block_size']
        self.empty = (args['n_layer'], 2, 0, args['n_head'], 0, args['n_embd'] // args['n_head'])
        threads = threads or torch.get_num_threads()
        path = exported(ckpt, export_onnx, 'model.onnx')
        if quantize == 'int8':  # OpenVINO reads ONNX Runtime's int8 matmuls as its own
            path = exported(ckpt, lambda c, p: quantize_weights(path, p), 'model-int8.onnx')
        self.path = path
        if engine == 'onnxruntime':
            try:
                import onnxruntime as ort
            except ImportError:
                die("engine='onnxruntime' needs onnxruntime: pip install onnxruntime onnx onnxscript")
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = threads
            # spinning threads would keep the cores busy between calls, slowing what runs beside
            opts.add_session_config_entry('session.intra_op.allow_spinning', '0')
            session = ort.InferenceSession(path, opts, providers=['CPUExecutionProvider'])
            self.run = lambda feed: session.run(None, feed)
        else:
            try:
                import openvino as ov
            except ImportError:
                die("engine='openvino' needs openvino: pip install openvino onnx onnxscript")
            # f32 everywhere: an Intel GPU ('GPU') would compute in f16 unless asked for f32
            config = {'INFERENCE_PRECISION_HINT': 'f32'}
            if device == 'cpu':
                config['INFERENCE_NUM_THREADS'] = threads
            core = ov.Core()
            compiled = core.compile_model(core.read_model(path), device.upper(), config)
            self.run = lambda feed: list(compiled(feed).values())

    def start(self, context):
        shape = list(self.empty)
        shape[2] = context.size(0)
        self.past = np.zeros(shape, dtype=np.float32)
        return self.step(context)

    def step(self, tokens, pos=None):
        logits, self.past = self.run({'input_ids': tokens.numpy(), 'past': self.past})
        return torch.from_numpy(logits[:, -1])


def quantize_weights(src, dst):
    """src's matrix multiplications with int8 weights (ONNX Runtime's MatMulNBits: a scale per
    128 weights, int8 arithmetic on the CPU), the activations as they are. The output layer's
    weight is the embedding's, transposed at run time: stored transposed first, so that it is
    quantized too (the embedding's lookup keeps the fp32 table)."""
    import onnx
    from onnx import numpy_helper
    try:
        from onnxruntime.quantization import matmul_nbits_quantizer as nbits
    except ImportError:
        die("--quantize=int8 on the ONNX graph needs onnxruntime's quantizer: pip install onnxruntime")
    graph = onnx.load(src)
    weights = {w.name: w for w in graph.graph.initializer}
    for node in list(graph.graph.node):
        if node.op_type == 'Transpose' and node.input[0] in weights:
            perm = next((a.ints for a in node.attribute if a.name == 'perm'), None)  # None: reversed
            w = numpy_helper.to_array(weights[node.input[0]]).transpose(perm)
            graph.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w), node.output[0]))
            graph.graph.node.remove(node)
    config = nbits.DefaultWeightOnlyQuantConfig(block_size=128, is_symmetric=True, accuracy_level=4, bits=8)
    quantizer = nbits.MatMulNBitsQuantizer(graph, algo_config=config)
    logging.disable(logging.INFO)  # a line per node it leaves as it is
    try:
        quantizer.process()
    finally:
        logging.disable(logging.NOTSET)
    quantizer.model.save_model_to_file(dst, use_external_data_format=False)


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
