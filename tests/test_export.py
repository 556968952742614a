"""export.py --format=hf, checked by transformers itself: AutoModelForCausalLM and AutoTokenizer
load the folder offline, tokenize the test slice as our tokenizer does, give our logits and
continue a prompt greedily with the same tokens."""
import os

import pytest
import sentencepiece as spm
import torch

from common import load_checkpoint, model_from_checkpoint
from conftest import STORIES, run
from prepare import read_stories
from test_train import one_error_line, train


@pytest.fixture(scope='module')
def exported(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp('run')
    train(data_dir, out, '--max_iters=30', '--eval_interval=30', '--block_size=256', '--bias=True')
    p = run('export.py', '--format=hf', f'--out_dir={out}')
    assert 'Starcoder2ForCausalLM' in p.stdout
    return out


def test_transformers_loads_the_export_and_agrees(exported):
    os.environ['HF_HUB_OFFLINE'] = '1'
    from transformers import AutoModelForCausalLM, AutoTokenizer
    hf = AutoModelForCausalLM.from_pretrained(exported / 'hf').eval()
    tok = AutoTokenizer.from_pretrained(exported / 'hf')
    ckpt = load_checkpoint(str(exported / 'ckpt.pt'))
    ours = model_from_checkpoint(ckpt).eval()
    sp = spm.SentencePieceProcessor(model_proto=ckpt['tokenizer'])
    stories = read_stories(str(STORIES / 'valid.txt')) + read_stories(str(STORIES / 'train.txt'))
    for s in stories:  # the same token ids, the begin-of-story token first, and back
        ids = tok(s)['input_ids']
        assert ids == [sp.bos_id()] + sp.encode(s)
        assert tok.decode(ids, skip_special_tokens=True) == s
    with torch.no_grad():
        for s in stories[:8]:  # the same logits on real stories
            x = torch.tensor([tok(s)['input_ids'][:256]])
            torch.testing.assert_close(hf(x).logits, ours(x, x)[0], atol=1e-4, rtol=0)
        prompt = torch.tensor([tok(stories[0])['input_ids'][:16]])
        theirs = hf.generate(prompt, max_new_tokens=100, do_sample=False, min_new_tokens=100)
        mine = ours.generate(prompt, 100, temperature=0)
    assert theirs.shape == (1, 116) and torch.equal(theirs, mine)


def test_export_refuses_what_transformers_cannot_hold(data_dir, tmp_path):
    out = tmp_path / 'learned'
    train(data_dir, out, '--max_iters=2', '--eval_interval=2', '--pos_emb=learned')
    one_error_line(run('export.py', f'--out_dir={out}', ok=False), 'RoPE', "pos_emb='learned'")
    one_error_line(run('export.py', f'--out_dir={tmp_path}', ok=False), 'no checkpoint')
    one_error_line(run('export.py', f'--out_dir={out}', '--format=tflite', ok=False), 'format')
