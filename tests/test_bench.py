"""bench.py: the speed report's JSON lines and its ratios."""
import json

import pytest

from conftest import ROOT, run

pytestmark = pytest.mark.slow


def bench_json(*args):
    p = run('bench.py', *args, '--json=True')
    return [json.loads(line) for line in p.stdout.splitlines() if line.startswith('{')]


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
        speed, ref = q['tokens_per_s'], plain[f'{how}_tokens_per_s']
        # the ratio is rounded to 0.01 and each speed to 0.1 token/s: slow speeds round coarsely
        assert abs(q['vs_plain_fp32'] - speed / ref) <= 0.005 + speed / ref * (0.05 / speed + 0.05 / ref) + 1e-9


def test_bad_rounds_is_one_clear_line():
    p = run('bench.py', '--rounds=0', ok=False)
    assert p.returncode == 1 and p.stderr.count('\n') == 1 and 'rounds=0' in p.stderr


def test_llama_cpp_rows_beside_pytorch():
    rows = bench_json('--models=cpu', '--skip_train=True', '--engine=llamacpp', '--max_new_tokens=8',
                      '--prompt_tokens=16', '--decode_prompt=4', '--batch_size=2', '--rounds=1')
    for engine in ('torch fp32', 'llamacpp fp32', 'llamacpp int8'):
        r = next(r for r in rows if r['name'] == f'cpu {engine} b1')
        assert r['prefill_tokens_per_s'] > 0 and r['greedy_tokens_per_s'] > 0 and r['top-p_tokens_per_s'] > 0


def test_bad_engine_or_model_is_one_clear_line():
    for arg, word in (('--engine=vllm', 'engine'), ('--models=huge', 'huge')):
        p = run('bench.py', arg, ok=False)
        assert p.returncode == 1 and p.stderr.count('\n') == 1 and word in p.stderr, p.stderr


def test_the_step_beside_its_adamw_step_and_another_model_py(tmp_path):
    """--muon: the step's parts and its time over the model's AdamW step alone; --nanogpt: the
    model.py of a checkout (here a copy of ours: nanoGPT's has the same GPT and GPTConfig)
    stepped alternately, with the ratio of the two speeds."""
    (tmp_path / 'model.py').write_text((ROOT / 'model.py').read_text())
    rows = bench_json('--models=cpu', '--skip_generate=True', '--train_iters=2', '--batch_size=2',
                      '--block_size=64', '--muon=True', f'--nanogpt={tmp_path}')
    adamw = next(r for r in rows if r['name'].endswith(' adamw') and 'nanoGPT' not in r['name'])
    other = next(r for r in rows if 'nanoGPT model.py adamw' in r['name'])
    step = next(r for r in rows if r['name'].endswith(' muon'))
    assert abs(step['vs_adamw'] - step['ms_per_iter'] / adamw['ms_per_iter']) < 0.002 + 0.1 / adamw['ms_per_iter']
    assert abs(other['vs_nanogpt'] - other['ms_per_iter'] / adamw['ms_per_iter']) < 0.002 + 0.1 / adamw['ms_per_iter']
    parts = [step[f'{p}_ms'] for p in ('forward', 'backward', 'clip', 'optimizer')]
    assert all(p > 0 for p in parts) and 0.75 < sum(parts) / step['ms_per_iter'] < 1.25, (parts, step)
    p = run('bench.py', f'--nanogpt={tmp_path / "nowhere"}', ok=False)
    assert p.returncode == 1 and p.stderr.count('\n') == 1 and 'nanoGPT checkout' in p.stderr, p.stderr
