"""The ONNX export run by ONNX Runtime and OpenVINO themselves, against model.py in fp32: logits
of a prefill and of 50 cached decoding steps, greedy stories through sample.py, and int8."""
import onnx
import pytest
import torch
import torch.nn.functional as F

from conftest import STORIES, one_error_line, run, train
from data import read_stories
from engines import make_engine
from model import KVCache

import sentencepiece as spm

pytestmark = pytest.mark.slow


def all_logits(graph, ids):
    """Every position's logits of ids (B, T) from an empty cache, as the graph gives them."""
    return torch.from_numpy(graph.run({'input_ids': ids.numpy(), **graph.empty(ids.size(0))})[0])


@pytest.mark.parametrize('engine', ['onnxruntime', 'openvino'])
def test_prefill_and_50_cached_steps_match_pytorch(trained, engine):
    out, ckpt, model = trained
    graph = make_engine(engine, ckpt)
    cfg = model.config
    torch.manual_seed(0)
    ids = torch.randint(cfg.vocab_size, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(all_logits(graph, ids), model(ids, ids)[0], atol=1e-4, rtol=0)
        cache = KVCache(cfg, 2)
        ours = model(ids, cache=cache)[0][:, -1]
        graph.reset()
        theirs = graph.step(ids)
        for _ in range(50):
            torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)
            token = torch.randint(cfg.vocab_size, (2, 1))
            ours, theirs = model(token, cache=cache)[0][:, -1], graph.step(token)


@pytest.mark.parametrize('engine', ['onnxruntime', 'openvino'])
def test_sample_py_tells_the_same_greedy_story(trained, engine):
    """Past the 64-token context: its restart from the most recent half included."""
    args = ['sample.py', f'--out_dir={trained[0]}', '--start=Once upon a time', '--greedy',
            '--max_new_tokens=150', '--num_samples=1']
    theirs, ours = run(*args, f'--engine={engine}'), run(*args)
    assert theirs.stdout == ours.stdout and len(set(ours.stdout.split())) >= 5


def test_greedy_batch_with_a_stop_token_matches_pytorch(trained):
    out, ckpt, model = trained
    graph = make_engine('onnxruntime', ckpt)
    prompt = torch.randint(model.config.vocab_size, (3, 5), generator=torch.Generator().manual_seed(1))
    mine = torch.cat(list(model.stream(prompt, 40, temperature=0)), dim=1)
    stop = mine[0, 20].item()  # the first row reaches it: it stops there, the others go on
    mine = torch.cat(list(model.stream(prompt, 40, temperature=0, stop_token=stop)), dim=1)
    theirs = torch.cat(list(graph.stream(prompt, 40, temperature=0, stop_token=stop)), dim=1)
    assert torch.equal(theirs, mine)


@pytest.mark.parametrize('engine', ['onnxruntime', 'openvino'])
def test_int8_costs_under_one_percent_of_bits_per_byte(trained, engine):
    """int8 weights (ONNX Runtime's MatMulNBits, the output layer's included) against model.py
    in fp32, on the test slice's validation stories: the same tokens, so the ratio of total
    losses is the ratio of bits/byte."""
    out, ckpt, model = trained
    int8 = make_engine(engine, ckpt, 'int8')
    sp = spm.SentencePieceProcessor(model_proto=ckpt['tokenizer'])
    ours = theirs = 0.0
    for s in read_stories(str(STORIES / 'valid.txt'))[:40]:
        ids = torch.tensor([[sp.bos_id()] + sp.encode(s)])[:, :64]
        with torch.no_grad():
            ours += F.cross_entropy(model(ids, ids)[0][0, :-1], ids[0, 1:], reduction='sum').item()
        theirs += F.cross_entropy(all_logits(int8, ids)[0, :-1], ids[0, 1:],
                                  reduction='sum').item()
    assert theirs / ours < 1.01, (theirs, ours)
    ops = [n.op_type for n in onnx.load(int8.path).graph.node]
    assert ops.count('MatMulNBits') == 4 * model.config.n_layer + 1  # the output layer's too


@pytest.mark.parametrize('quant', ['f32', 'int8'])
def test_export_py_writes_the_graph_that_the_onnxruntime_engine_runs(trained, tmp_path, quant):
    """export.py --format=onnx --onnx_graph=ort: ONNX Runtime's own session on that file gives
    the engine's logits exactly, the tokenizer beside it."""
    import onnxruntime
    out, ckpt, model = trained
    path = tmp_path / 'g.onnx'
    p = run('export.py', f'--out_dir={out}', '--format=onnx', '--onnx_graph=ort', f'--quant={quant}', f'--out={path}')
    assert str(path) in p.stdout and (tmp_path / 'tokenizer.model').read_bytes() == ckpt['tokenizer']
    session = onnxruntime.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    engine = make_engine('onnxruntime', ckpt, 'int8' if quant == 'int8' else 'none')
    ids = torch.randint(model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(2))
    assert [i.name for i in session.get_inputs()][:3] == ['input_ids', 'past_key_values.0.key', 'past_key_values.0.value']
    theirs = session.run(None, {'input_ids': ids.numpy(), **engine.empty(2)})[0]
    engine.reset()
    assert torch.equal(torch.from_numpy(theirs[:, -1]), engine.step(ids))
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert 'GroupQueryAttention' in ops and ('MatMulNBits' in ops) == (quant == 'int8')


def test_engine_errors_are_one_line(trained, data_dir, tmp_path):
    out = trained[0]
    for args, words in [(['--engine=tensorrt'], ['engine']),
                        (['--engine=onnxruntime', '--device=cuda'], ['CPU', 'cuda']),
                        (['--engine=onnxruntime', '--dtype=bfloat16'], ['fp32', 'dtype'])]:
        one_error_line(run('sample.py', f'--out_dir={out}', *args, ok=False), *words)
    learned = tmp_path / 'learned'
    train(data_dir, learned, '--max_iters=2', '--eval_interval=2', '--pos_emb=learned')
    one_error_line(run('export.py', f'--out_dir={learned}', '--format=onnx', ok=False), 'RoPE')
