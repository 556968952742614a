"""eval.py: the evaluation protocol against a plain story-by-story computation, on a prepared
split's .bin and on text alike, and train.py's closing `done:` line."""
import json
import math
import re
import shutil

import pytest
import sentencepiece as spm
import torch
import torch.nn.functional as F

from checkpoint import model_from_checkpoint
from conftest import STORIES, one_error_line, run, stories_slice, train
from data import read_stories

pytestmark = pytest.mark.slow


def eval_json(*args):
    p = run('eval.py', *args, '--json=True')
    return json.loads(p.stdout.splitlines()[-1])


def reference(ckpt_path, stories):
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


@pytest.fixture(scope='module')
def long_context(data_dir, tmp_path_factory):
    """A model whose context holds any story of the slice whole."""
    out = tmp_path_factory.mktemp('long')
    train(data_dir, out, '--max_iters=20', '--eval_interval=10', '--block_size=1024')
    return out


def test_text_bits_per_byte_matches_story_by_story_reference(long_context, tmp_path):
    text = tmp_path / 'held_out.txt'
    text.write_text(stories_slice(STORIES / 'valid.txt', 25), encoding='utf-8')
    loss, bpb, tokens, nbytes = reference(long_context / 'ckpt.pt', read_stories(str(text)))
    r = eval_json(f'--text={text}', f'--out_dir={long_context}', '--batch_size=4')
    assert r['tokens'] == tokens and r['bytes'] == nbytes and r['stories'] == 25
    assert abs(r['bpb'] - bpb) < 1e-3 and abs(r['loss'] - loss) < 1e-3
    assert abs(r['ppl'] - math.exp(loss)) < 1e-2 * math.exp(loss)


def test_a_prepared_split_scores_as_its_text(long_context, data_dir, tmp_path):
    """test.bin (BOS + ids + EOS per story) gives exactly what the same stories as text give:
    the held-out half of valid.txt, its 2nd, 4th, ... stories."""
    held_out = read_stories(str(STORIES / 'valid.txt'))[1::2]
    text = tmp_path / 'test.txt'
    text.write_text(''.join(s + '\n<|endoftext|>\n' for s in held_out), encoding='utf-8')
    by_text = eval_json(f'--text={text}', f'--out_dir={long_context}')
    by_split = eval_json(f'--out_dir={long_context}', f'--data_dir={data_dir}')  # split=test
    assert by_split['stories'] == len(held_out) == 40
    for k in ('tokens', 'bytes', 'loss', 'bpb', 'ppl'):
        assert by_split[k] == by_text[k], k
    val = eval_json(f'--out_dir={long_context}', '--split=val')  # data_dir: the checkpoint's
    assert val['stories'] == 40 and val['bytes'] != by_split['bytes']


def test_sliding_window_scores_every_token_once(data_dir, tmp_path):
    out = tmp_path / 'run'
    train(data_dir, out, '--max_iters=4', '--eval_interval=2')  # block_size 32: stories are longer
    text = tmp_path / 't.txt'
    text.write_text(stories_slice(STORIES / 'valid.txt', 5), encoding='utf-8')
    stories = read_stories(str(text))
    sp = spm.SentencePieceProcessor(model_proto=torch.load(out / 'ckpt.pt', weights_only=True)['tokenizer'])
    tokens = sum(len(sp.encode(s)) for s in stories)  # every story token, not BOS nor EOS
    nbytes = sum(len(s.encode('utf-8')) for s in stories)
    assert tokens > 5 * 32
    r = eval_json(f'--text={text}', f'--out_dir={out}')
    assert r['tokens'] == tokens and r['bytes'] == nbytes
    assert 0 < r['bpb'] < 10


def test_train_ends_with_the_protocol_on_val_and_test(data_dir, tmp_path):
    out = tmp_path / 'run'
    p = train(data_dir, out, '--max_iters=10', '--eval_interval=5')
    done = [line for line in p.stdout.splitlines() if line.startswith('done:')]
    assert len(done) == 1, p.stdout
    m = re.search(r'best iteration (\d+), val ([\d.]+) bits/byte, test ([\d.]+) bits/byte', done[0])
    assert m and str(out / 'ckpt.pt') in done[0] and ' min' in done[0], done[0]
    assert int(m[1]) == torch.load(out / 'ckpt.pt', weights_only=True)['iter_num']
    assert float(m[2]) == eval_json(f'--out_dir={out}', '--split=val')['bpb']
    assert float(m[3]) == eval_json(f'--out_dir={out}')['bpb']


def test_eval_bad_input(long_context, data_dir, tmp_path):
    one_error_line(run('eval.py', f'--out_dir={tmp_path}', ok=False), 'no checkpoint')
    one_error_line(run('eval.py', f'--out_dir={long_context}', '--split=dev', ok=False), 'split')
    one_error_line(run('eval.py', f'--out_dir={long_context}', '--text=/no/such.txt', ok=False),
                   '/no/such.txt')
    other = tmp_path / 'other'  # the same vocab size, another tokenizer
    shutil.copytree(data_dir, other)
    run('prepare.py', f'--source={STORIES / "valid.txt"}', f'--data_dir={other}', '--vocab_size=512')
    one_error_line(run('eval.py', f'--out_dir={long_context}', f'--data_dir={other}', ok=False),
                   "not the checkpoint's", '--text')
