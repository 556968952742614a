"""bench.py: bits per byte by the shared protocol, against a plain story-by-story computation,
and the speed report's JSON lines."""
import json
import math

import sentencepiece as spm
import torch
import torch.nn.functional as F

from common import model_from_checkpoint
from conftest import SHARED, run, stories_slice
from test_train import TINY, train


def bench_json(*args):
    p = run('bench.py', *args, '--json=True')
    return [json.loads(line) for line in p.stdout.splitlines() if line.startswith('{')]


def reference_bpb(ckpt_path, stories):
    """Each story alone: BOS + tokens through the model in one pass (the model refuses a story
    longer than its context), the loss of every story token summed in float64; the
    end-of-story token is not scored."""
    ckpt = torch.load(ckpt_path, weights_only=True)
    model = model_from_checkpoint(ckpt).eval()
    sp = spm.SentencePieceProcessor(model_proto=ckpt['tokenizer'])
    total, tokens, nbytes = 0.0, 0, 0
    with torch.no_grad():
        for s in stories:
            ids = [sp.bos_id()] + sp.encode(s)
            x, y = torch.tensor([ids[:-1]]), torch.tensor([ids[1:]])
            logits, _ = model(x, y)
            total += F.cross_entropy(logits[0].double(), y[0], reduction='sum').item()
            tokens += len(ids) - 1
            nbytes += len(s.encode('utf-8'))
    return total / tokens, total / math.log(2) / nbytes, tokens, nbytes


def test_eval_text_bits_per_byte_matches_story_by_story_reference(data_dir, tmp_path):
    out = tmp_path / 'run'
    train(data_dir, out, '--max_iters=20', '--eval_interval=10', '--block_size=1024')
    text = tmp_path / 'held_out.txt'
    text.write_text(stories_slice(SHARED / 'valid.txt', 25), encoding='utf-8')
    from prepare import read_stories
    stories = read_stories(str(text))
    loss, bpb, tokens, nbytes = reference_bpb(out / 'ckpt.pt', stories)
    (r,) = bench_json('--eval_text', text, f'--out_dir={out}', '--eval_batch=4')
    assert r['tokens'] == tokens and r['bytes'] == nbytes and r['stories'] == 25
    assert abs(r['bpb'] - bpb) < 1e-3 and abs(r['loss'] - loss) < 1e-3
    assert abs(r['ppl'] - math.exp(loss)) < 1e-2 * math.exp(loss)


def test_eval_sliding_window_scores_every_token_once(data_dir, tmp_path):
    out = tmp_path / 'run'
    train(data_dir, out, '--max_iters=4', '--eval_interval=2')  # block_size 32: stories are longer
    text = tmp_path / 't.txt'
    text.write_text(stories_slice(SHARED / 'valid.txt', 5), encoding='utf-8')
    from prepare import read_stories
    stories = read_stories(str(text))
    sp = spm.SentencePieceProcessor(model_proto=torch.load(out / 'ckpt.pt', weights_only=True)['tokenizer'])
    tokens = sum(len(sp.encode(s)) for s in stories)  # every story token, not BOS nor EOS
    nbytes = sum(len(s.encode('utf-8')) for s in stories)
    assert tokens > 5 * 32
    (r,) = bench_json('--eval_text', text, f'--out_dir={out}')
    assert r['tokens'] == tokens and r['bytes'] == nbytes
    assert 0 < r['bpb'] < 10


def test_speed_report_has_every_figure():
    rows = bench_json('--models=cpu', '--train_iters=1', '--max_new_tokens=8',
                      '--prompt_tokens=16', '--decode_prompt=4', '--batch_size=2', '--threads=1')
    names = [r['name'] for r in rows]
    for want in ['matmul peak', 'train', 'prefill b1', 'decode b1 kv-cache top-p',
                 'decode b1 kv-cache greedy', 'decode b1 recompute', 'prefill b2', 'decode b2']:
        assert any(want in n for n in names), (want, names)
    train_row = next(r for r in rows if ' train ' in r['name'])
    assert train_row['tokens_per_s'] > 0 and 0 < train_row['mfu'] < 1 and train_row['peak_rss_mb'] > 0
    kv = next(r for r in rows if 'decode b1 kv-cache top-p' in r['name'])
    base = next(r for r in rows if 'recompute' in r['name'])
    # the ratio is of the reported medians (each rounded to 0.1 tok/s)
    assert abs(base['kv_cache_speedup'] - kv['tokens_per_s'] / base['tokens_per_s']) < 0.01 + 0.1 / base['tokens_per_s']


def test_int8_report_has_the_fp32_ratio():
    rows = bench_json('--models=cpu', '--skip_train=True', '--quantize=int8', '--max_new_tokens=8',
                      '--prompt_tokens=16', '--decode_prompt=4', '--batch_size=2', '--rounds=2')
    plain = next(r for r in rows if 'plain fp32' in r['name'])
    for how in ('top-p', 'greedy'):
        q = next(r for r in rows if r['name'].endswith(f'decode b1 kv-cache {how}'))
        assert abs(q['vs_plain_fp32'] - q['tokens_per_s'] / plain[f'{how}_tokens_per_s']) < 0.01


def test_bad_rounds_is_one_clear_line():
    p = run('bench.py', '--rounds=0', ok=False)
    assert p.returncode == 1 and p.stderr.count('\n') == 1 and 'rounds=0' in p.stderr
