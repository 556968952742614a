"""Fine-tuning: the Words task's data (words.py), LoRA (lora.py) against its definition, LoRA
runs of train.py (adapter-only files tied to their base by hash, exact resume, loaded merged by
sample.py and eval.py), and the adapter in PEFT's format loaded by peft itself."""
import json
import shutil

import numpy as np
import pytest
import sentencepiece as spm
import torch

from checkpoint import load_checkpoint, model_from_checkpoint
from conftest import STORIES, log_rows, one_error_line, run, tiny, train
from data import read_stories
from lora import add_lora, lora_state, merge, unwrap_state
from model import GPT, GPTConfig
from words import pick_words, read_split, uses


@pytest.fixture(scope='module')
def words_dir(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp('words')
    p = run('words.py', f'--data_dir={data_dir}', '--vocab_size=512', f'--out_data_dir={out}')
    assert 'test:' in p.stdout
    return out


@pytest.fixture(scope='module')
def base(trained, tmp_path_factory):
    """A copy of the trained model's checkpoint that the tests here may replace."""
    d = tmp_path_factory.mktemp('base')
    shutil.copy(trained[0] / 'ckpt.pt', d / 'ckpt.pt')
    return d / 'ckpt.pt'


def lora_run(words_dir, base, out, *args, ok=True):
    return train(words_dir, out, f'--init_from={base}', '--lora_rank=4', '--lora_alpha=8',
                 '--learning_rate=1e-2', '--eval_interval=10', '--dropout=0', *args, ok=ok)


@pytest.mark.slow
def test_the_words_task_scores_only_the_stories_and_keeps_the_splits(words_dir, data_dir):
    d, src = words_dir / 'tok512', data_dir / 'tok512'
    sp = spm.SentencePieceProcessor(model_file=str(d / 'tokenizer.model'))
    ids = np.fromfile(d / 'test.bin', dtype=np.uint16)
    mask = np.fromfile(d / 'test.mask.bin', dtype=np.uint8)
    assert len(ids) == len(mask)
    stories = list(read_split(src, 'test', sp))
    starts = list(np.flatnonzero(ids == sp.bos_id())) + [len(ids)]
    kept = [s for s in stories if pick_words(s)]
    assert len(kept) == len(starts) - 1 > 20
    for story, a, b in zip(kept, starts, starts[1:]):
        head, body = ids[a:b][mask[a:b] == 0].tolist(), ids[a:b][mask[a:b] == 1].tolist()
        words = pick_words(story)
        assert sp.decode(head[1:]) == f"Words: {', '.join(words)}\nStory:"  # the prompt: not scored
        assert body[-1] == sp.eos_id() and sp.decode(body[:-1]) == story  # the story: scored
        assert all(uses(story, w) for w in words) and pick_words(story) == words
        assert (mask[a:b] == 0).sum() == len(head) and list(mask[a:b][:len(head)]) == [0] * len(head)


def test_a_new_lora_model_is_the_base_exactly_and_merges_within_1e_5():
    model = tiny(bias=False, block_size=64).eval()
    ckpt = {'model': model.state_dict(), 'model_args': vars(model.config)}
    lora = model_from_checkpoint(ckpt).eval()
    wrapped = add_lora(lora, rank=4, alpha=8, targets='c_attn,c_proj,c_fc')
    assert len(wrapped) == 4 * model.config.n_layer
    idx = torch.randint(model.config.vocab_size, (2, 40))
    with torch.no_grad():
        assert torch.equal(lora(idx, idx)[0], model(idx, idx)[0])  # B = 0: the base, bit for bit
        for name, p in lora.named_parameters():
            if name.endswith('lora_B'):
                p.normal_(0, 0.05)
        merged = model_from_checkpoint({**ckpt, 'model': merge(
            unwrap_state(lora.state_dict()), lora_state(lora), 8 / 4)}).eval()
        ours, theirs = lora(idx, idx)[0], merged(idx, idx)[0]
        torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
        assert (ours - model(idx, idx)[0]).abs().max() > 1e-2  # the update does something


def test_flops_per_token_counts_a_frozen_base_without_its_weight_gradients():
    """mfu's FLOPs against torch's own count of a forward and backward, full and LoRA: a frozen
    weight's gradient is never computed, so counting it as trained would read a third too high."""
    from torch.utils.flop_counter import FlopCounterMode
    for rank in (0, 8):
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=512, n_layer=4, n_head=4, n_embd=128, block_size=64))
        if rank:
            add_lora(model, rank, 16.0, 'c_attn,c_proj,c_fc')
        x = torch.randint(512, (2, 64))
        with FlopCounterMode(display=False) as counted:
            model(x, x)[1].backward()
        assert 0.85 < counted.get_total_flops() / x.numel() / model.flops_per_token(64) < 1.0, rank


def test_only_the_adapter_trains():
    lora = tiny().train()
    add_lora(lora, rank=4, alpha=8, targets='c_attn')
    before = {k: v.clone() for k, v in lora.state_dict().items()}
    opt = lora.configure_optimizers(0.1, 1e-2, (0.9, 0.99))
    idx = torch.randint(lora.config.vocab_size, (4, 32))
    for _ in range(3):
        lora(idx, idx)[1].backward()
        opt.step()
        opt.zero_grad()
    after = lora.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all('.lora_' in k for k in changed)
    assert {k for k in changed if k.endswith('lora_B')}  # B left zero: it learned


@pytest.mark.slow
def test_a_lora_run_saves_its_adapter_only_loads_merged_and_refuses_another_base(words_dir, base, tmp_path):
    out = tmp_path / 'lora'
    p = lora_run(words_dir, base, out, '--max_iters=20')
    assert 'LoRA rank 4 on 8 Linears' in p.stdout and 'done:' in p.stdout
    raw = torch.load(out / 'ckpt.pt', weights_only=True)
    assert 'model' not in raw and raw['lora'] and all('.lora_' in k for k in raw['lora'])
    assert raw['base'] == str(base) and len(raw['base_sha256']) == 64
    n_adapter = sum(v.numel() for v in raw['lora'].values())
    n_base = sum(v.numel() for v in torch.load(base, weights_only=True)['model'].values())
    assert n_adapter < 0.2 * n_base
    # every script loads it as a whole model: the base with the adapter merged in
    merged = model_from_checkpoint(load_checkpoint(str(out / 'ckpt.pt'))).eval()
    plain = model_from_checkpoint(load_checkpoint(str(base))).eval()
    idx = torch.randint(512, (1, 30))
    with torch.no_grad():
        assert (merged(idx, idx)[0] - plain(idx, idx)[0]).abs().max() > 1e-3
    assert 'tok/s' in run('sample.py', f'--out_dir={out}', '--max_new_tokens=20').stderr
    assert 'bits/byte' in run('eval.py', f'--out_dir={out}').stdout
    # another base at that path: one line, nothing loaded
    state = torch.load(base, weights_only=True)
    good = base.read_bytes()
    state['model']['transformer.ln_f.weight'] += 1
    torch.save(state, base)
    try:
        one_error_line(run('sample.py', f'--out_dir={out}', ok=False), 'SHA-256', str(base))
    finally:
        base.write_bytes(good)
    base.rename(base.with_suffix('.away'))
    try:
        one_error_line(run('eval.py', f'--out_dir={out}', ok=False), 'LoRA adapter', 'not there')
    finally:
        base.with_suffix('.away').rename(base)
    assert run('sample.py', f'--out_dir={out}', '--max_new_tokens=5').returncode == 0


@pytest.mark.slow
def test_a_lora_run_resumes_exactly(words_dir, base, tmp_path):
    lora_run(words_dir, base, tmp_path / 'straight', '--max_iters=20', '--lr_decay_iters=20')
    lora_run(words_dir, base, tmp_path / 'split', '--max_iters=10', '--lr_decay_iters=20')
    lora_run(words_dir, base, tmp_path / 'split', '--init_from=resume', '--max_iters=20', '--lr_decay_iters=20')
    a = torch.load(tmp_path / 'straight' / 'last.pt', weights_only=True)['lora']
    b = torch.load(tmp_path / 'split' / 'last.pt', weights_only=True)['lora']
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert log_rows(tmp_path / 'straight') == log_rows(tmp_path / 'split')


@pytest.mark.slow
def test_peft_loads_the_exported_adapter_on_the_exported_base(words_dir, base, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    out = tmp_path / 'lora'
    lora_run(words_dir, base, out, '--max_iters=20', '--lora_targets=c_attn,c_proj,c_fc')
    run('export.py', '--format=hf', f'--out_dir={base.parent}')
    p = run('export.py', '--format=peft', f'--out_dir={out}')
    assert 'peft' in p.stdout
    hf = AutoModelForCausalLM.from_pretrained(base.parent / 'hf').eval()
    idx = torch.randint(512, (2, 30))
    with torch.no_grad():
        plain = hf(idx).logits
        tuned = PeftModel.from_pretrained(hf, out / 'peft').eval()(idx).logits
        ours = model_from_checkpoint(load_checkpoint(str(out / 'ckpt.pt'))).eval()(idx, idx)[0]
    torch.testing.assert_close(tuned, ours, atol=1e-4, rtol=0)
    assert (tuned - plain).abs().max() > 1e-3


@pytest.mark.slow
def test_fine_tuning_errors_are_one_line(words_dir, base, data_dir, tmp_path):
    one_error_line(train(words_dir, tmp_path / 'a', '--lora_rank=4', ok=False), 'init_from')
    one_error_line(lora_run(words_dir, base, tmp_path / 'b', '--lora_targets=wte', ok=False), 'lora_targets')
    one_error_line(lora_run(words_dir, base, tmp_path / 'c', '--n_layer=3', ok=False), 'n_layer')
    one_error_line(train(words_dir, tmp_path / 'd', '--init_from=nothing.pt', ok=False), 'init_from')
    one_error_line(run('export.py', '--format=peft', f'--out_dir={base.parent}', ok=False), 'LoRA')


@pytest.mark.slow
def test_word_use_compares_models_on_the_same_prompts_and_draws(trained, data_dir, monkeypatch):
    """Two copies of one model write the same stories, prompt for prompt; the interval redraws
    the same prompts for every model (a paired comparison); words.py --score prints both."""
    import words
    d, ckpt, _ = trained
    sp = spm.SentencePieceProcessor(model_proto=ckpt['tokenizer'])
    stories = list(read_split(data_dir / 'tok512', 'test', sp))[:8]
    tasks = [(w, [sp.bos_id()] + sp.encode(words.prompt_text(w))) for w in map(pick_words, stories) if w]
    monkeypatch.setattr(words, 'max_new_tokens', 40)
    a, b = (words.word_use(model_from_checkpoint(ckpt).eval(), sp, tasks) for _ in range(2))
    assert a == b and len({story for story, _ in a}) == len(tasks) > 1
    used = np.random.default_rng(0).random((2, 50))
    used[1] = used[0] + 0.1  # the same gain on every prompt: no spread when paired
    assert words.interval(used, lambda u: u[1].mean() - u[0].mean()) == pytest.approx([0.1, 0.1])
    flat = np.zeros((3, 4))
    flat[1, 0] = flat[2, 0] = 1  # model 1 gains on one prompt of four: some redraws leave it out
    assert words.interval(flat, lambda u: (u[2].mean() - u[0].mean()) / (u[1].mean() - u[0].mean())) is None
    p = run('words.py', f'--score={d},{d}', f'--data_dir={data_dir}', '--prompts=6', '--samples=2',
            '--max_new_tokens=30', '--json=True')
    result = json.loads(p.stdout.splitlines()[-1])
    assert (result['prompts'], result['samples']) == (6, 2) and result['models'][0] == result['models'][1]
    assert f'+0.0 points over {d} (90 % interval +0.0 to +0.0)' in p.stdout
    one_error_line(run('words.py', f'--score={d},{d}-missing', f'--data_dir={data_dir}', ok=False), 'missing')


@pytest.mark.slow
def test_the_words_task_can_train_on_other_stories(data_dir, tmp_path):
    p = run('words.py', f'--data_dir={data_dir}', '--vocab_size=512', f'--out_data_dir={tmp_path}',
            f'--train_text={STORIES / "valid.txt"}', '--max_train=50')
    n = min(50, sum(pick_words(s) is not None for s in read_stories(STORIES / 'valid.txt')))
    assert f'train: {n:,} prompts' in p.stdout
    meta = (tmp_path / 'tok512' / 'meta.json').read_text()
    assert f'"train_stories": {n}' in meta and 'valid.txt' in meta
