"""
Export a trained checkpoint for the tools people already run.

$ python export.py --format=hf                 # out/ckpt.pt -> out/hf/, for Hugging Face transformers
$ python export.py --format=hf --out=my-model

The hf folder loads anywhere with transformers (pip install transformers), no code of ours:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained('out/hf')
    tokenizer = AutoTokenizer.from_pretrained('out/hf')
It is transformers' Starcoder2 architecture, which is this GPT exactly: pre-norm LayerNorm,
separate q/k/v/o projections, rotary positions on the whole head, a GELU MLP (c_fc, c_proj) and
the output layer tied to the embedding.
"""
import os

import torch

from common import configure, die, load_checkpoint

# -----------------------------------------------------------------------------
out_dir = 'out'
ckpt_name = 'ckpt.pt'
format = 'hf'            # 'hf': a transformers folder (safetensors, config, tokenizer)
out = ''                 # where to write; '' = out_dir/hf
# -----------------------------------------------------------------------------


def rotate_half_order(w, n_head):
    """The rows of q or k (or their bias) reordered within each head from interleaved pairs
    (model.py's RoPE rotates (x0, x1), (x2, x3), ...) to halves (transformers rotates
    (x0, x_{d/2}), ...): the same rotation, so q.k is unchanged."""
    hd = w.size(0) // n_head
    return w.reshape(n_head, hd // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


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
        die("--format=hf needs transformers, safetensors and protobuf: "
            "pip install transformers safetensors protobuf")
    import sentencepiece as spm
    args = ckpt['model_args']
    if args.get('pos_emb', 'rope') != 'rope':
        die(f"--format=hf exports RoPE models only; this one has pos_emb={args['pos_emb']!r}")
    sp = spm.SentencePieceProcessor(model_proto=ckpt['tokenizer'])
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


if __name__ == '__main__':
    configure(globals())
    if format not in ('hf',):
        die(f"bad value format={format!r}: use 'hf'")
    ckpt = load_checkpoint(os.path.join(out_dir, ckpt_name))
    export_hf(ckpt, out or os.path.join(out_dir, 'hf'))
