"""
Export a trained checkpoint for the tools people already run (the writers are in formats.py).

$ python export.py --format=hf                 # out/ckpt.pt -> out/hf/, for Hugging Face transformers
$ python export.py --format=gguf               # out/ckpt.pt -> out/model-f32.gguf, for llama.cpp
$ python export.py --format=gguf --quant=q8_0  # 8-bit weights (also f16)
$ python export.py --format=onnx               # out/ckpt.pt -> out/model.onnx, for ONNX Runtime and OpenVINO
$ python export.py --format=onnx --onnx_graph=ort --quant=int8   # what --engine=onnxruntime runs
$ python export.py --format=peft               # a LoRA run's adapter -> out/peft/, for peft on the base's hf

Every format needs the export group of packages (pip install -e ".[export]"). The hf folder
loads anywhere with transformers, no code of ours:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained('out/hf')
    tokenizer = AutoTokenizer.from_pretrained('out/hf')
The gguf file is llama.cpp's starcoder2 architecture with the SentencePiece tokenizer inside:
    llama-cli -m out/model-f32.gguf -p "Once upon a time"
The standard onnx file is one graph with the key/value cache as an input and an output:
input_ids (B, T) and past (n_layer, 2, B, n_head, P, head_dim) in, logits (B, T, vocab) and
present (the same with P + T) out, every size dynamic; start with P = 0. The 'ort' graph takes and returns a key and a value per layer
(past_key_values.{i}.key, present.{i}.key, ...: (B, n_head, P, head_dim)). The SentencePiece
tokenizer.model goes beside either.
"""
import os
import tempfile

from checkpoint import load_checkpoint
from common import alternatives, configure, die
from formats import ONNX_GRAPHS, export_gguf, export_hf, export_peft, onnx_name, quantize_weights

# -----------------------------------------------------------------------------
out_dir = 'out'          # where the checkpoint is
ckpt_name = 'ckpt.pt'    # 'ckpt.pt' (the best) or 'last.pt'
format = 'hf'            # 'hf': a transformers folder (safetensors, config, tokenizer); 'gguf': llama.cpp; 'onnx'; 'peft'
out = ''                 # where to write; '' = out_dir/hf, out_dir/peft, out_dir/model-{quant}.gguf or out_dir/model*.onnx
quant = 'f32'            # gguf weights: 'f32', 'f16' or 'q8_0' (norms and biases stay f32); onnx: 'f32' or 'int8'
onnx_graph = 'standard'  # 'standard': ONNX's own operators, for any runtime; 'ort': ONNX Runtime's fused ones
# -----------------------------------------------------------------------------
QUANTS = {'hf': ('f32',), 'peft': ('f32',), 'gguf': ('f32', 'f16', 'q8_0'), 'onnx': ('f32', 'int8')}
configure(globals(), {'format': tuple(QUANTS), 'onnx_graph': tuple(ONNX_GRAPHS)})
if quant not in QUANTS[format]:
    die(f"bad value quant={quant!r} for --format={format}: use {alternatives(QUANTS[format])}")
# -----------------------------------------------------------------------------

ckpt = load_checkpoint(os.path.join(out_dir, ckpt_name))
if format == 'hf':  # a LoRA run's checkpoint: its base with the adapter merged in
    export_hf(ckpt, out or os.path.join(out_dir, 'hf'))
elif format == 'peft':
    export_peft(ckpt, out or os.path.join(out_dir, 'peft'))
elif format == 'gguf':
    path = out or os.path.join(out_dir, f'model-{quant}.gguf')
    export_gguf(ckpt, path, quant)
    print(f"wrote {path}: llama.cpp's starcoder2 architecture, {quant} weights, and its tokenizer")
else:
    path = out or os.path.join(out_dir, onnx_name(onnx_graph, quant))
    if quant == 'int8':  # int8 weights on the fp32 graph
        with tempfile.TemporaryDirectory() as d:
            ONNX_GRAPHS[onnx_graph](ckpt, os.path.join(d, 'f32.onnx'))
            quantize_weights(os.path.join(d, 'f32.onnx'), path)
    else:
        ONNX_GRAPHS[onnx_graph](ckpt, path)
    tok = os.path.join(os.path.dirname(path), 'tokenizer.model')
    with open(tok, 'wb') as f:
        f.write(ckpt['tokenizer'])  # beside it: the graph takes token ids
    runs = 'ONNX Runtime' if onnx_graph == 'ort' else 'ONNX Runtime and OpenVINO'
    print(f"wrote {path} ({onnx_graph} graph, {quant} weights, for {runs}: input_ids and past "
          f"keys/values in, logits and present keys/values out) and {tok}")
