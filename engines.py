"""
Decoding through other inference engines, with model.py's sampler, stop token and context rule,
so that sample.py (and bench.py) give the same stories whichever engine runs the model.

    engine = make_engine('onnxruntime', ckpt, quantize='int8')
    for token in engine.stream(idx, max_new_tokens, temperature, top_k, top_p, stop_token): ...

Each engine gets the checkpoint exported on the fly into a temporary folder: llama.cpp a GGUF
file and OpenVINO an ONNX graph (export.py's formats), ONNX Runtime an ONNX graph of its own
fused operators (export_ort); both graphs take the key/value cache as inputs and return it.
"""
import atexit
import importlib
import logging
import os
import tempfile

import numpy as np
import torch

from common import die, model_from_checkpoint
from export import export_onnx, model_args
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
    """The model as an ONNX graph, run by ONNX Runtime (export_ort: its own fused operators) or
    OpenVINO (export.py --format=onnx): each call takes the past keys and values and returns
    them with the new ones appended."""

    def __init__(self, ckpt, engine, quantize='none', threads=0, device='cpu'):
        args = model_args(ckpt, 'onnx')
        self.block_size = args['block_size']
        L, nh, hd = args['n_layer'], args['n_head'], args['n_embd'] // args['n_head']
        threads = threads or torch.get_num_threads()
        try:
            import onnx  # noqa: F401  (both graphs are written with it)
            runtime = importlib.import_module(engine)
        except ImportError as e:
            die(f"engine='{engine}' needs {e.name}: pip install {engine} onnx onnxscript")
        if engine == 'onnxruntime':  # a key and a value input per layer
            path = exported(ckpt, export_ort, 'model-ort.onnx')
            self.empty = lambda B: {f'past_key_values.{i}.{kv}': np.zeros((B, nh, 0, hd), np.float32)
                                    for i in range(L) for kv in ('key', 'value')}
        else:
            path = exported(ckpt, export_onnx, 'model.onnx')
            self.empty = lambda B: {'past': np.zeros((L, 2, B, nh, 0, hd), np.float32)}
        if quantize == 'int8':  # OpenVINO reads ONNX Runtime's int8 matmuls as its own
            src = path
            path = exported(ckpt, lambda c, p: quantize_weights(src, p), 'int8-' + os.path.basename(src))
        self.path = path
        if engine == 'onnxruntime':
            opts = runtime.SessionOptions()
            opts.intra_op_num_threads = threads
            # spinning threads would keep the cores busy between calls, slowing what runs beside
            opts.add_session_config_entry('session.intra_op.allow_spinning', '0')
            session = runtime.InferenceSession(path, opts, providers=['CPUExecutionProvider'])
            self.run = lambda feed: session.run(None, feed)
        else:
            # f32 everywhere: an Intel GPU ('GPU') would compute in f16 unless asked for f32
            config = {'INFERENCE_PRECISION_HINT': 'f32'}
            if device == 'cpu':
                config['INFERENCE_NUM_THREADS'] = threads
            core = runtime.Core()
            compiled = core.compile_model(core.read_model(path), device.upper(), config)
            self.run = lambda feed: list(compiled(feed).values())

    def start(self, context):
        self.past = self.empty(context.size(0))  # the graph's cache inputs, holding nothing yet
        return self.step(context)

    def step(self, tokens, pos=None):
        logits, *present = self.run({'input_ids': tokens.numpy(), **self.past})
        self.past = dict(zip(self.past, present))  # outputs in the order of the inputs
        return torch.from_numpy(logits[:, -1])


def export_ort(ckpt, path):
    """The model in ONNX Runtime's own operators, written node by node: per layer two
    LayerNormalizations, four matmuls, a Gelu and one GroupQueryAttention, which rotates q and k
    (RoPE), appends k and v to the cache and attends causally: what some 40 nodes of export.py's
    graph do, half of its time per token in ONNX Runtime's profile. The caches are per layer,
    (B, n_head, P, head_dim) under Optimum's names; the output layer has its own transposed copy
    of the embedding, a plain MatMul that int8 can take."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    args = model_args(ckpt, 'onnx')
    model = model_from_checkpoint(ckpt)
    C, nh, V = args['n_embd'], args['n_head'], args['vocab_size']
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    weights, nodes = [], []

    def weight(name, a):
        weights.append(numpy_helper.from_array(np.ascontiguousarray(a), name))
        return name

    def op(kind, inputs, output, domain='', **attrs):
        nodes.append(helper.make_node(kind, inputs, [output], domain=domain, **attrs))
        return output

    def linear(x, name):
        y = op('MatMul', [x, weight(name, sd[name + '.weight'].T)], name + '.out')
        if name + '.bias' not in sd:
            return y
        return op('Add', [y, weight(name + '.bias', sd[name + '.bias'])], name + '.biased')

    def norm(x, name):
        w = [weight(name, sd[name + '.weight'])]
        if name + '.bias' in sd:
            w.append(weight(name + '.bias', sd[name + '.bias']))
        return op('LayerNormalization', [x, *w], name + '.out', axis=-1, epsilon=1e-5)

    def tensor(name, dtype, shape):
        return helper.make_tensor_value_info(name, dtype, shape)

    # GroupQueryAttention takes the total length and each row's last position (int32)
    new = op('Shape', ['input_ids'], 'new', start=1, end=2)
    past = op('Shape', ['past_key_values.0.key'], 'past', start=2, end=3)
    total = op('Cast', [op('Add', [past, new], 'total64')], 'total_1d', to=TensorProto.INT32)
    total = op('Squeeze', [total], 'total')  # a scalar
    last = op('Sub', [total, weight('one', np.array(1, np.int32))], 'last')
    seqlens = op('Expand', [last, op('Shape', ['input_ids'], 'batch', start=0, end=1)], 'seqlens_k')
    cos, sin = weight('rope_cos', model.rope_cos.numpy()), weight('rope_sin', model.rope_sin.numpy())

    inputs = [tensor('input_ids', TensorProto.INT64, ['batch', 'new'])]
    outputs = [tensor('logits', TensorProto.FLOAT, ['batch', 'new', V])]
    x = op('Gather', [weight('wte', sd['transformer.wte.weight']), 'input_ids'], 'x.0')
    for i in range(args['n_layer']):
        h = f'transformer.h.{i}.'
        cache = [f'past_key_values.{i}.key', f'past_key_values.{i}.value']
        inputs += [tensor(n, TensorProto.FLOAT, ['batch', nh, 'past', C // nh]) for n in cache]
        outputs += [tensor(f'present.{i}.{kv}', TensorProto.FLOAT, ['batch', nh, 'total', C // nh])
                    for kv in ('key', 'value')]
        qkv = linear(norm(x, h + 'ln_1'), h + 'attn.c_attn')  # packed: q, k, v side by side
        nodes.append(helper.make_node(
            'GroupQueryAttention', [qkv, '', '', *cache, seqlens, total, cos, sin],
            [h + 'attn.y', f'present.{i}.key', f'present.{i}.value'], domain='com.microsoft',
            num_heads=nh, kv_num_heads=nh, do_rotary=1, rotary_interleaved=1))  # model.py's pairs
        x = op('Add', [x, linear(h + 'attn.y', h + 'attn.c_proj')], h + 'attn.res')
        gelu = op('Gelu', [linear(norm(x, h + 'ln_2'), h + 'mlp.c_fc')], h + 'mlp.gelu',
                  domain='com.microsoft')  # erf's, as nn.GELU
        x = op('Add', [x, linear(gelu, h + 'mlp.c_proj')], f'x.{i + 1}')
    op('MatMul', [norm(x, 'transformer.ln_f'), weight('lm_head', sd['transformer.wte.weight'].T)], 'logits')
    graph = helper.make_graph(nodes, 'gpt', inputs, outputs, weights)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid('', 17),
                                                      helper.make_opsetid('com.microsoft', 1)]), path)


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
