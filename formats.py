"""
A checkpoint in the files other tools read, each checked in tests/ by the tool itself:

- export_hf: a transformers folder (Starcoder2ForCausalLM, safetensors, its tokenizer), which
  loads with no code of ours. Starcoder2 is this GPT exactly: pre-norm LayerNorm, separate
  q/k/v/o projections, rotary positions on the whole head, a GELU MLP (c_fc, c_proj) and the
  output layer tied to the embedding.
- export_peft: a LoRA run's adapter in PEFT's format, for the base's export_hf folder.
- export_gguf: one .gguf file for llama.cpp, its starcoder2 architecture with the SentencePiece
  tokenizer inside (f32, f16 or q8_0 weights).
- export_onnx: one ONNX graph in ONNX's standard operators (ONNX Runtime, OpenVINO), and
  export_ort: ONNX Runtime's own fused graph (what --engine=onnxruntime runs). Both take the
  key/value cache as inputs and return it; quantize_weights makes either int8.

export.py is the command that writes them; engines.py writes them on the fly to run them.
"""
import logging
import os
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from checkpoint import model_from_checkpoint
from common import die, need
from model import apply_rope
from tokenizer import tokenizer

def rotate_half_order(w, n_head):
    """The rows of q or k (or their bias) reordered within each head from interleaved pairs
    (model.py's RoPE rotates (x0, x1), (x2, x3), ...) to halves (transformers rotates
    (x0, x_{d/2}), ...): the same rotation, so q.k is unchanged."""
    hd = w.size(0) // n_head
    return w.reshape(n_head, hd // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def model_args(ckpt, fmt):
    """The checkpoint's model arguments, if the format's architecture holds the model."""
    args = ckpt['model_args']
    if args.get('pos_emb', 'rope') != 'rope':
        die(f"--format={fmt} exports RoPE models only; this one has pos_emb={args['pos_emb']!r}")
    return args


def hf_state(sd, args):
    """Our state dict under Starcoder2's names; LayerNorms without a bias get zero biases."""
    C, nh, bias = args['n_embd'], args['n_head'], args['bias']
    out = {'model.embed_tokens.weight': sd['transformer.wte.weight']}

    def norm(ours, theirs):
        out[f'{theirs}.weight'] = sd[f'{ours}.weight']
        out[f'{theirs}.bias'] = sd[f'{ours}.bias'] if bias else torch.zeros(C)

    def linear(ours, theirs, w, b=None):
        out[f'{theirs}.weight'] = w
        if bias:
            out[f'{theirs}.bias'] = sd[f'{ours}.bias'] if b is None else b

    for i in range(args['n_layer']):
        h, m = f'transformer.h.{i}', f'model.layers.{i}'
        norm(f'{h}.ln_1', f'{m}.input_layernorm')
        norm(f'{h}.ln_2', f'{m}.post_attention_layernorm')
        w = sd[f'{h}.attn.c_attn.weight'].split(C)
        b = sd[f'{h}.attn.c_attn.bias'].split(C) if bias else (None,) * 3
        for j, name in enumerate('qkv'):
            rope = (lambda t: rotate_half_order(t, nh)) if name in 'qk' else (lambda t: t)
            linear(None, f'{m}.self_attn.{name}_proj', rope(w[j]), b[j] if b[j] is None else rope(b[j]))
        linear(f'{h}.attn.c_proj', f'{m}.self_attn.o_proj', sd[f'{h}.attn.c_proj.weight'])
        linear(f'{h}.mlp.c_fc', f'{m}.mlp.c_fc', sd[f'{h}.mlp.c_fc.weight'])
        linear(f'{h}.mlp.c_proj', f'{m}.mlp.c_proj', sd[f'{h}.mlp.c_proj.weight'])
    norm('transformer.ln_f', 'model.norm')
    return {k: v.float().contiguous() for k, v in out.items()}


def export_hf(ckpt, path):
    try:
        from safetensors.torch import save_file
        from sentencepiece import sentencepiece_model_pb2
        from tokenizers import processors
        from transformers import PreTrainedTokenizerFast, Starcoder2Config
        from transformers.convert_slow_tokenizer import SpmConverter
    except ImportError:
        need('export', "--format=hf needs transformers, safetensors and protobuf")
    args = model_args(ckpt, 'hf')
    sp = tokenizer(ckpt)
    cfg = Starcoder2Config(
        vocab_size=args['vocab_size'], hidden_size=args['n_embd'], intermediate_size=4 * args['n_embd'],
        num_hidden_layers=args['n_layer'], num_attention_heads=args['n_head'],
        num_key_value_heads=args['n_head'], hidden_act='gelu', max_position_embeddings=args['block_size'],
        rope_theta=args.get('rope_theta', 10000.0), norm_epsilon=1e-5, use_bias=args['bias'],
        tie_word_embeddings=True, sliding_window=None, residual_dropout=0.0, embedding_dropout=0.0,
        attention_dropout=0.0, bos_token_id=sp.bos_id(), eos_token_id=sp.eos_id(),
        architectures=['Starcoder2ForCausalLM'])
    os.makedirs(path, exist_ok=True)
    cfg.save_pretrained(path)
    save_file(hf_state(ckpt['model'], args), os.path.join(path, 'model.safetensors'),
              metadata={'format': 'pt'})
    with open(os.path.join(path, 'tokenizer.model'), 'wb') as f:
        f.write(ckpt['tokenizer'])
    # the tokenizer as tokenizers' BPE built from the SentencePiece model's own settings (its
    # normalizer, dummy prefix, byte fallback), encoding every text as SentencePiece does, with
    # the begin-of-story token first as our stories have it
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(ckpt['tokenizer'])
    backend = SpmConverter.build_tokenizer_from_spm_proto(
        proto, {p.piece: i for i, p in enumerate(proto.pieces)}, legacy=True)
    bos, eos, unk = (sp.id_to_piece(i) for i in (sp.bos_id(), sp.eos_id(), sp.unk_id()))
    backend.post_processor = processors.TemplateProcessing(
        single=f'{bos} $A', pair=f'{bos} $A {bos} $B', special_tokens=[(bos, sp.bos_id())])
    PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=eos, unk_token=unk,
                            model_max_length=args['block_size']).save_pretrained(path)
    print(f"wrote {path}: a Starcoder2ForCausalLM model and its tokenizer for transformers")


def export_peft(ckpt, path):
    """A LoRA run's adapter in PEFT's format, for the base's --format=hf export: each of our
    Linears under Starcoder2's names (c_attn's update split into q, k and v, which share A)."""
    if 'lora' not in ckpt:
        die("--format=peft exports a LoRA adapter: this checkpoint is a whole model (use --format=hf)")
    try:
        from safetensors.torch import save_file
    except ImportError:
        need('finetune', "--format=peft needs safetensors")
    import json
    from data import atomic_write
    args, lora = model_args(ckpt, 'peft'), ckpt['lora_args']
    C, nh = args['n_embd'], args['n_head']
    out, targets = {}, set()

    def adapter(name, A, B):
        out[f'base_model.model.{name}.lora_A.weight'] = A.float().clone()  # q, k, v: one A each
        out[f'base_model.model.{name}.lora_B.weight'] = B.float().contiguous()
        targets.add(name.rsplit('.', 1)[1])

    for key, A in ckpt['lora'].items():
        if not key.endswith('.lora_A'):
            continue
        module = key[:-len('.lora_A')]
        B = ckpt['lora'][f'{module}.lora_B']
        i, where = module.split('.')[2], module.split('.', 3)[3]  # 'transformer.h.{i}.attn.c_attn'
        m = f'model.layers.{i}'
        if where == 'attn.c_attn':  # q and k rows in transformers' RoPE order, as hf_state does
            for Bj, name in zip(B.split(C), 'qkv'):
                adapter(f'{m}.self_attn.{name}_proj', A, rotate_half_order(Bj, nh) if name in 'qk' else Bj)
        else:
            adapter(f'{m}.' + {'attn.c_proj': 'self_attn.o_proj', 'mlp.c_fc': 'mlp.c_fc',
                               'mlp.c_proj': 'mlp.c_proj'}[where], A, B)
    os.makedirs(path, exist_ok=True)
    save_file(out, os.path.join(path, 'adapter_model.safetensors'), metadata={'format': 'pt'})
    config = {'peft_type': 'LORA', 'task_type': 'CAUSAL_LM', 'r': lora['lora_rank'],
              'lora_alpha': lora['lora_alpha'], 'lora_dropout': 0.0, 'bias': 'none',
              'target_modules': sorted(targets), 'fan_in_fan_out': False, 'inference_mode': True,
              'base_model_name_or_path': os.path.join(os.path.dirname(ckpt['base']), 'hf')}
    with atomic_write(os.path.join(path, 'adapter_config.json'), 'w') as f:
        json.dump(config, f, indent=2)
    print(f"wrote {path}: the LoRA adapter for peft, on the base's export (python export.py "
          f"--format=hf --out_dir={os.path.dirname(ckpt['base'])})")


def export_gguf(ckpt, path, quant='f32'):
    """The model as llama.cpp's starcoder2 architecture (the graph of hf_state's Starcoder2),
    its SentencePiece tokenizer inside, in one .gguf file."""
    try:
        import gguf
    except ImportError:
        need('export', "--format=gguf needs the gguf package")
    args = model_args(ckpt, 'gguf')
    sp = tokenizer(ckpt)
    C, V = args['n_embd'], args['vocab_size']
    w = gguf.GGUFWriter(path, 'starcoder2')
    w.add_name(os.path.splitext(os.path.basename(path))[0])
    w.add_context_length(args['block_size'])
    w.add_embedding_length(C)
    w.add_block_count(args['n_layer'])
    w.add_feed_forward_length(4 * C)
    w.add_head_count(args['n_head'])
    w.add_head_count_kv(args['n_head'])
    w.add_layer_norm_eps(1e-5)
    w.add_rope_freq_base(args.get('rope_theta', 10000.0))
    w.add_rope_dimension_count(C // args['n_head'])
    qtype = {'f32': gguf.GGMLQuantizationType.F32, 'f16': gguf.GGMLQuantizationType.F16,
             'q8_0': gguf.GGMLQuantizationType.Q8_0}[quant]
    w.add_file_type({'f32': gguf.LlamaFileType.ALL_F32, 'f16': gguf.LlamaFileType.MOSTLY_F16,
                     'q8_0': gguf.LlamaFileType.MOSTLY_Q8_0}[quant])
    # SentencePiece's own model: llama.cpp's 'llama' tokenizer is SentencePiece's algorithm
    # (scores, byte fallback, the leading-space marker); a char tokenizer with fewer pieces than
    # the embedding has rows gets unused placeholders
    token_type = lambda i: (gguf.TokenType.UNKNOWN if sp.is_unknown(i) else gguf.TokenType.CONTROL
                            if sp.is_control(i) else gguf.TokenType.BYTE if sp.is_byte(i) else
                            gguf.TokenType.UNUSED if sp.is_unused(i) else gguf.TokenType.NORMAL)
    n = sp.get_piece_size()
    w.add_tokenizer_model('llama')
    w.add_tokenizer_pre('default')
    w.add_token_list([sp.id_to_piece(i) for i in range(n)] + [f'[PAD{i}]' for i in range(n, V)])
    w.add_token_scores([sp.get_score(i) for i in range(n)] + [-1e4] * (V - n))
    w.add_token_types([token_type(i) for i in range(n)] + [gguf.TokenType.UNUSED] * (V - n))
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_unk_token_id(sp.unk_id())
    w.add_add_bos_token(True)  # a story starts with its begin-of-story token
    w.add_add_eos_token(False)
    w.add_add_space_prefix(True)
    # llama.cpp's names for Starcoder2's tensors; its starcoder2 graph requires every bias
    names = {'model.embed_tokens': 'token_embd', 'model.norm': 'output_norm'}
    layer = {'input_layernorm': 'attn_norm', 'self_attn.q_proj': 'attn_q', 'self_attn.k_proj': 'attn_k',
             'self_attn.v_proj': 'attn_v', 'self_attn.o_proj': 'attn_output',
             'post_attention_layernorm': 'ffn_norm', 'mlp.c_fc': 'ffn_up', 'mlp.c_proj': 'ffn_down'}
    for i in range(args['n_layer']):
        names.update({f'model.layers.{i}.{k}': f'blk.{i}.{v}' for k, v in layer.items()})
    state = hf_state(ckpt['model'], args)
    for k, t in list(state.items()):
        if k.endswith(('_proj.weight', 'c_fc.weight')):
            state.setdefault(k[:-len('weight')] + 'bias', torch.zeros(t.size(0)))
    for k, t in state.items():
        module, part = k.rsplit('.', 1)
        a = t.numpy()
        # 1-d tensors stay f32, as in llama.cpp's own files; q8_0 packs rows in blocks of 32
        q = qtype if a.ndim == 2 and not (qtype == gguf.GGMLQuantizationType.Q8_0 and a.shape[1] % 32) \
            else gguf.GGMLQuantizationType.F32
        w.add_tensor(f'{names[module]}.{part}', gguf.quants.quantize(a, q), raw_dtype=q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


class WithPast(torch.nn.Module):
    """The model as one function of token ids and the past keys/values, returning every
    position's logits and the present keys/values: what a graph without in-place updates (ONNX)
    can hold. The same computation as GPT.forward with its cache, for any past length P and
    any number T of new tokens: query t (position P + t) sees keys 0 .. P + t."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, past):
        m, (B, T), P = self.model, input_ids.shape, past.size(4)
        nh, C = m.config.n_head, m.config.n_embd
        cos, sin = m.rope_cos[P:P + T], m.rope_sin[P:P + T]
        mask = torch.ones(T, P + T, dtype=torch.bool, device=input_ids.device).tril(P)
        x, present = m.transformer.wte(input_ids), []
        for i, block in enumerate(m.transformer.h):
            qkv = block.attn.c_attn(block.ln_1(x)).view(B, T, 3, nh, C // nh).permute(2, 0, 3, 1, 4)
            q, k = apply_rope(qkv[:2], cos, sin).unbind(0)
            k, v = torch.cat((past[i, 0], k), dim=2), torch.cat((past[i, 1], qkv[2]), dim=2)
            present.append(torch.stack((k, v)))
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            x = x + block.attn.c_proj(y.transpose(1, 2).reshape(B, T, C))
            x = x + block.mlp(block.ln_2(x))
        return m.lm_head(m.transformer.ln_f(x)), torch.stack(present)


def export_onnx(ckpt, path):
    """WithPast of the checkpoint's model as an ONNX file, dynamic in batch, past and new length."""
    try:
        import onnx  # noqa: F401  (torch.onnx needs both)
        import onnxscript  # noqa: F401
    except ImportError:
        need('export', "--format=onnx needs onnx and onnxscript")
    args = model_args(ckpt, 'onnx')
    model = WithPast(model_from_checkpoint(ckpt).eval())
    L, nh, hd = args['n_layer'], args['n_head'], args['n_embd'] // args['n_head']
    # sizes of 0 or 1 would be taken as fixed: trace with 2 new tokens after 3 past ones
    ids, past = torch.zeros(2, 2, dtype=torch.long), torch.zeros(L, 2, 2, nh, 3, hd)
    B, T, P = torch.export.Dim('batch'), torch.export.Dim('new'), torch.export.Dim('past')
    logging.disable(logging.WARNING)  # the exporter's notes on its own internals
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter('ignore')
            torch.onnx.export(model, (ids, past), path, dynamo=True, verbose=False, optimize=True,
                              external_data=False, input_names=['input_ids', 'past'],
                              output_names=['logits', 'present'],
                              dynamic_shapes={'input_ids': {0: B, 1: T}, 'past': {2: B, 4: P}})
    finally:
        logging.disable(logging.NOTSET)


def export_ort(ckpt, path):
    """The model in ONNX Runtime's own operators, written node by node: per layer two
    LayerNormalizations, four matmuls, a Gelu and one GroupQueryAttention, which rotates q and k
    (RoPE), appends k and v to the cache and attends causally: what some 40 nodes of
    export_onnx's graph do, half of its time per token in ONNX Runtime's profile. The caches are
    per layer, (B, n_head, P, head_dim) under Optimum's names; the output layer has its own
    transposed copy of the embedding, a plain MatMul that int8 can take. Only ONNX Runtime runs
    it (GroupQueryAttention is its own operator)."""
    try:
        import onnx
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        need('export', "ONNX Runtime's graph needs onnx")
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
        need('export', "int8 on the ONNX graph needs onnxruntime's quantizer")
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


def onnx_name(graph='standard', quant='f32'):
    return f"model{'-ort' if graph == 'ort' else ''}{'-int8' if quant == 'int8' else ''}.onnx"


ONNX_GRAPHS = {'standard': export_onnx, 'ort': export_ort}
